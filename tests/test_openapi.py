"""The API described (issue 10, point 1): GET /openapi.json is an OpenAPI 3.1 document that
the daemon builds at start from the msgspec types it validates and answers with; it holds
every route of the app, their parameters, bodies, answers and errors, and with auth on the
security schemes and each operation's scope. GET /docs is Swagger UI from assets that ship
in a package: nothing comes from another origin."""

import re

import pytest
import trio
from openapi_spec_validator import OpenAPIV31SpecValidator

from conftest import SPEC_ROUTES, key_line, keys_file, make_config, running
from persistd.daemon import NOT_IN_DOCUMENT, ROUTE_SCOPES, Auth, Metrics, create_app, endpoint_label, open_store


def operations(document: dict) -> dict[tuple[str, str], dict]:
    return {(method.upper(), path): op for path, item in document["paths"].items()
            for method, op in item.items() if isinstance(op, dict)}


async def test_the_document_is_valid_openapi_3_1_and_describes_every_route(daemon, tmp_path):
    response = await daemon.get("/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert list(OpenAPIV31SpecValidator(document).iter_errors()) == []
    assert {re.sub(r"\{\w+\}", "{id}", path) for path in document["paths"]} == SPEC_ROUTES

    cfg = make_config(tmp_path)
    app = create_app(cfg, trio.open_memory_channel(1)[0], open_store(cfg.database), Metrics(), Auth(cfg.auth))
    app_routes = {(method, endpoint_label(rule.rule)) for rule in app.url_map.iter_rules()
                  if rule.endpoint not in NOT_IN_DOCUMENT for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert set(operations(document)) == app_routes and len(app_routes) == 15
    for (method, path), op in operations(document).items():
        assert op["responses"] and op["operationId"], (method, path)
        assert "401" not in op["responses"]  # auth is off
    assert "securitySchemes" not in document["components"]


async def test_limits_and_errors_come_from_the_types_and_checks(daemon):
    document = (await daemon.get("/openapi.json")).json()
    ops, schemas = operations(document), document["components"]["schemas"]
    page_size = next(p for p in ops[("GET", "/api/v1/translation/tasks")]["parameters"] if p["name"] == "page_size")
    assert (page_size["schema"]["minimum"], page_size["schema"]["maximum"]) == (1, 100)
    batch = schemas["TaskBatch"]["properties"]["tasks"]
    assert (batch["minItems"], batch["maxItems"]) == (1, 1000)
    assert schemas["TaskIn"]["additionalProperties"] is False
    assert set(schemas["TaskIn"]["properties"]["status"]["enum"]) == {"pending", "processing", "completed", "failed"}
    tasks_batch = ops[("POST", "/api/v1/translation/tasks/batch")]["responses"]
    assert {"202", "400", "413", "422", "503"} <= set(tasks_batch)
    assert document["components"]["responses"]["BufferFull"]["headers"]["Retry-After"]["required"] is True
    restored = schemas["Restored"]["properties"]["tasks"]
    assert restored == {"type": "array", "items": {"$ref": "#/components/schemas/RestoredTask"}}


async def test_with_auth_on_every_operation_names_its_scope(db, tmp_path):
    path = keys_file(tmp_path, key_line("all", "read,write,admin", "pd_openapi_test_key_0123456789"))
    async with running(make_config(tmp_path, auth={"keys_file": str(path)})) as daemon:
        document = (await daemon.get("/openapi.json")).json()  # open, like /health
    assert list(OpenAPIV31SpecValidator(document).iter_errors()) == []
    assert set(document["components"]["securitySchemes"]) == {"apiKey", "apiKeyHeader", "jwt"}
    for (method, path), op in operations(document).items():
        scope = ROUTE_SCOPES.get(op["operationId"])
        if scope is None:
            assert op["security"] == [], op["operationId"]
        else:
            assert {s for requirement in op["security"] for scopes in requirement.values() for s in scopes} == {scope}
            assert {"401", "403"} <= set(op["responses"]), op["operationId"]


async def test_docs_are_served_from_our_own_routes_only(daemon):
    page = await daemon.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/docs/assets/") for s in sources), sources
    for source in sources + ["/docs/assets/docs-init.js"]:
        asset = await daemon.get(source)
        assert asset.status_code == 200 and len(asset.content) > 0, source
    assert "/openapi.json" in (await daemon.get("/docs/assets/docs-init.js")).text
    assert (await daemon.get("/docs/assets/nothing.js")).status_code == 404


@pytest.mark.parametrize("example", ["SessionBatch", "TaskBatch"])
async def test_the_documents_examples_are_accepted_as_written(daemon, example):
    document = (await daemon.get("/openapi.json")).json()
    key = "sessions" if example == "SessionBatch" else "tasks"
    op = operations(document)[("POST", f"/api/v1/translation/{key}/batch")]
    value = op["requestBody"]["content"]["application/json"]["examples"]["spec"]["value"]
    if key == "tasks":
        await daemon.post("/api/v1/translation/sessions/batch", {"sessions": [
            {"session_id": value["tasks"][0]["session_id"], "filename": "f", "file_path": "/f", "status": "pending",
             "llm_provider": "x"}]})
    assert (await daemon.post(f"/api/v1/translation/{key}/batch", value)).status_code == 202
