"""The system API (spec §7: /health and /api/v1/system/metrics), error bodies for unknown
routes, and what the daemon does while the database is away (DESIGN.md "database down",
"flush"). Outages are made with a TCP proxy between persistd and MySQL (tests/proxy.py)."""

import re
import socket
import subprocess
import tomllib
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from conftest import SESSION_ID, SPEC_ROUTES, make_config, mysql_only, running, session, task
from persistd.daemon import load_config, parse_database_url
from processes import PERSISTD, assert_one_line_error, clean_environ, persistd_exits
from proxy import tcp_proxy

SESSIONS = "/api/v1/translation/sessions/batch"
TASKS = "/api/v1/translation/tasks/batch"
FLUSH = "/api/v1/translation/flush"
METRICS = "/api/v1/system/metrics"
CLEANUP = "/api/v1/translation/sessions/cleanup"

ERROR_KEYS = {"detail", "error_code", "errors"}
PING_MARGIN_S = 1.0  # scheduling slack on a loaded 2-core machine


# ── helpers ──────────────────────────────────────────────────────────────────────────


def tasks_of(prefix: str, n: int, **fields) -> list[dict]:
    return [task(f"{prefix}-{i:04d}", row_index=i, **fields) for i in range(n)]


async def accepted(d, path: str, body: dict) -> None:
    response = await d.post(path, body)
    assert response.status_code == 202, response.text


async def metrics(d) -> dict[tuple[str, frozenset], float]:
    """Every sample of /api/v1/system/metrics: (name, labels) → value."""
    response = await d.get(METRICS)
    assert response.status_code == 200, response.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_until(predicate, timeout: float, what: str):
    """Poll an async predicate until it returns something true."""
    with trio.move_on_after(timeout):
        while not (result := await predicate()):
            await trio.sleep(0.05)
        return result
    raise AssertionError(f"not within {timeout} s: {what}")


async def timed(coroutine) -> tuple[float, object]:
    started = trio.current_time()
    result = await coroutine
    return trio.current_time() - started, result


@asynccontextmanager
async def behind_proxy(tmp_path, **sections):
    """persistd in-process, talking to MySQL through a proxy the test can cut."""
    async with tcp_proxy() as proxy:
        database = {"url": proxy.url(), **sections.pop("database", {})}
        async with running(make_config(tmp_path, database=database, **sections)) as d:
            yield d, proxy


# ── /health ──────────────────────────────────────────────────────────────────────────


async def test_health_reports_buffer_and_database(db, tmp_path):
    """GET /health is 200 "healthy" with spec §7.1's shape; the buffer part counts the rows
    waiting in memory against the capacity, and last_flush is set by the first flush."""
    cfg = make_config(tmp_path, buffer={"flush_interval": 30, "max_rows": 1000})
    async with running(cfg) as d:
        response = await d.get("/health")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["status"] == "healthy" and body["database"] == "healthy"
        assert body["version"] == "1.0.0" and body["backend"] == db.backend
        assert isinstance(body["uptime_seconds"], int) and body["uptime_seconds"] >= 0
        assert {"sessions_count", "tasks_count", "total_count", "capacity", "usage_percent",
                "last_flush"} <= body["buffer"].keys()
        assert body["buffer"]["last_flush"] is None

        await accepted(d, SESSIONS, {"sessions": [session()]})
        await accepted(d, TASKS, {"tasks": tasks_of("t", 9)})
        buffer = (await d.get("/health")).json()["buffer"]
        assert (buffer["sessions_count"], buffer["tasks_count"], buffer["total_count"]) == (1, 9, 10)
        assert (buffer["capacity"], buffer["usage_percent"]) == (1000, 1.0)

        await d.flush()
        buffer = (await d.get("/health")).json()["buffer"]
        assert (buffer["sessions_count"], buffer["tasks_count"], buffer["total_count"]) == (0, 0, 0)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", buffer["last_flush"])
        first = datetime.fromisoformat(buffer["last_flush"])

        await trio.sleep(1.1)  # last_flush is in whole seconds
        assert (await d.flush())["tasks_written"] == 0  # nothing waited: a flush all the same
        assert datetime.fromisoformat((await d.get("/health")).json()["buffer"]["last_flush"]) > first


@mysql_only
async def test_health_degraded_while_database_cut_and_healthy_after(db, tmp_path):
    """While the database is unreachable /health answers 503 "degraded" / database
    "unhealthy" within ping_timeout, batches are still accepted (202) and failed flushes
    are counted; once it is back, the rows accepted meanwhile reach MySQL and /health is
    "healthy" again."""
    async with behind_proxy(tmp_path, database={"ping_timeout": 1}) as (d, proxy):
        assert (await d.get("/health")).status_code == 200
        errors_before = sample(await metrics(d), "persistence_flush_errors_total")

        await proxy.cut()
        elapsed, response = await timed(d.get("/health"))
        assert elapsed < 1 + PING_MARGIN_S
        assert response.status_code == 503
        body = response.json()
        assert (body["status"], body["database"]) == ("degraded", "unhealthy")
        assert {"sessions_count", "tasks_count", "total_count", "capacity", "usage_percent"} <= body["buffer"].keys()

        await accepted(d, SESSIONS, {"sessions": [session()]})
        await accepted(d, TASKS, {"tasks": tasks_of("outage", 50)})

        async def flush_failed():
            return sample(await metrics(d), "persistence_flush_errors_total") > errors_before
        await wait_until(flush_failed, 5, "persistence_flush_errors_total grows during the outage")
        assert (await d.get("/health")).status_code == 503
        assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((0,),)

        await proxy.restore()

        async def healthy():
            response = await d.get("/health")
            return response.status_code == 200 and response.json()["status"] == "healthy"
        await wait_until(healthy, 5, "/health is healthy again after the database returns")
        await d.flush()
        assert await db.query("SELECT COUNT(*) FROM translation_tasks WHERE task_id LIKE 'outage-%'") == ((50,),)
        assert await db.query("SELECT session_id FROM translation_sessions") == ((session()["session_id"],),)


@mysql_only
async def test_health_answers_within_ping_timeout_when_database_stops_answering(db, tmp_path):
    """A database that accepts connections but never answers (a partition, not a refusal)
    still gets /health a 503 "degraded" within ping_timeout, not a hang."""
    async with behind_proxy(tmp_path, database={"ping_timeout": 1}) as (d, proxy):
        assert (await d.get("/health")).status_code == 200
        proxy.stall()
        for _ in range(2):  # the pooled connection, then a fresh one
            elapsed, response = await timed(d.get("/health"))
            assert response.status_code == 503, response.text
            assert response.json()["database"] == "unhealthy"
            assert elapsed < 1 + PING_MARGIN_S
        await proxy.restore()


@mysql_only
async def test_health_is_healthy_as_soon_as_database_is_back(db, tmp_path):
    """/health tells the database's present state: a database that went away and came back
    between two health checks is reported healthy, not judged by a connection it dropped."""
    async with behind_proxy(tmp_path) as (d, proxy):
        assert (await d.get("/health")).status_code == 200
        await proxy.cut()  # also closes the connection /health used
        await proxy.restore()
        response = await d.get("/health")
        assert response.status_code == 200, response.text
        assert response.json()["database"] == "healthy"


@mysql_only
async def test_reads_while_database_cut_are_503_in_the_error_format_and_work_after(db, tmp_path):
    """Every read that needs the database answers 503 DATABASE_UNAVAILABLE in the error
    format while it is unreachable (stats too, whose two halves run on two connections),
    never a 500 or a hang, and answers 200 again once it is back."""
    reads = ["/api/v1/translation/sessions", "/api/v1/translation/tasks",
             f"/api/v1/translation/sessions/{SESSION_ID}/tasks", "/api/v1/translation/recovery/incomplete-sessions",
             "/api/v1/translation/stats"]
    async with behind_proxy(tmp_path, database={"connect_timeout": 1, "read_timeout": 2}) as (d, proxy):
        await accepted(d, SESSIONS, {"sessions": [session()]})
        await d.flush()
        await proxy.cut()
        for path in reads:
            elapsed, response = await timed(d.get(path))
            assert response.status_code == 503, (path, response.text)
            assert set(response.json()) == ERROR_KEYS and response.json()["error_code"] == "DATABASE_UNAVAILABLE"
            assert elapsed < 2 + PING_MARGIN_S
        await proxy.restore()
        for path in reads:
            assert (await d.get(path)).status_code == 200, path


# ── POST /flush and outages ──────────────────────────────────────────────────────────


@mysql_only
async def test_flush_while_database_cut_is_503_and_rows_are_kept(db, tmp_path):
    """POST /flush while the database is unreachable answers 503 with "status": "error"
    and an error_code after flush_timeout; the rows are kept and written once it is back."""
    async with behind_proxy(tmp_path, buffer={"flush_timeout": 1, "flush_interval": 5}) as (d, proxy):
        await accepted(d, SESSIONS, {"sessions": [session()]})
        await d.flush()
        await proxy.cut()
        await accepted(d, TASKS, {"tasks": tasks_of("kept", 20, status="completed")})

        elapsed, response = await timed(d.post(FLUSH))
        assert response.status_code == 503, response.text
        assert 1 <= elapsed < 1 + PING_MARGIN_S
        body = response.json()
        assert body["status"] == "error"
        assert isinstance(body["error_code"], str) and body["error_code"]
        assert isinstance(body["detail"], str) and body["detail"]
        assert body["duration_ms"] >= 1000
        assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((0,),)

        await proxy.restore()
        await d.flush()
        rows = await db.query("SELECT task_id, status FROM translation_tasks ORDER BY task_id")
        assert rows == tuple((f"kept-{i:04d}", "completed") for i in range(20))


async def test_concurrent_flushes_write_each_row_once(db, tmp_path):
    """Five /flush calls at once, interleaved with more batches, all answer 200 and write
    every row exactly once: persistence_rows_written_total equals the distinct rows sent."""
    async with running(make_config(tmp_path, buffer={"flush_interval": 5})) as d:
        await accepted(d, SESSIONS, {"sessions": [session()]})
        answers = []

        async def post_and_flush(n: int) -> None:
            await accepted(d, TASKS, {"tasks": tasks_of(f"c{n}", 700)})
            response = await d.post(FLUSH)
            answers.append(response)

        for round_ in range(2):
            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(post_and_flush, 5 * round_ + n)
        assert [r.status_code for r in answers] == [200] * 10, [r.text for r in answers]
        assert all(r.json()["status"] == "flushed" for r in answers)

        m = await metrics(d)
        assert sample(m, "persistence_rows_written_total", type="task") == 10 * 700
        assert sample(m, "persistence_rows_written_total", type="session") == 1
        assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((10 * 700,),)


@mysql_only
async def test_rows_accepted_during_outage_are_written_once_after_it(db, tmp_path):
    """Rows accepted while the database is cut are retried until it is back, then written
    once, even when five /flush calls arrive together."""
    async with behind_proxy(tmp_path, buffer={"flush_timeout": 5, "retry_max": 0.5}) as (d, proxy):
        await proxy.cut()
        await accepted(d, SESSIONS, {"sessions": [session()]})
        for n in range(3):
            await accepted(d, TASKS, {"tasks": tasks_of(f"o{n}", 400)})

        async def failed_twice():
            return sample(await metrics(d), "persistence_flush_errors_total") >= 2
        await wait_until(failed_twice, 5, "two failed flush attempts")

        await proxy.restore()
        responses = []

        async def flush() -> None:
            responses.append(await d.post(FLUSH))
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(flush)
        assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]

        m = await metrics(d)
        assert sample(m, "persistence_rows_written_total", type="task") == 1200
        assert sample(m, "persistence_rows_written_total", type="session") == 1
        assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((1200,),)


# ── metrics ──────────────────────────────────────────────────────────────────────────

FAMILIES = {
    "persistence_api_requests_total": "counter",
    "persistence_api_duration_seconds": "histogram",
    "persistence_buffer_size": "gauge",
    "persistence_flush_total": "counter",
    "persistence_flush_duration_seconds": "histogram",
    "persistence_rows_written_total": "counter",
    "persistence_flush_errors_total": "counter",
    "persistence_held_tasks": "gauge",
}


async def test_metrics_are_prometheus_text_with_the_spec_families(db, tmp_path):
    """GET /api/v1/system/metrics is Prometheus text format 0.0.4 with spec §7.2's families
    and ours; buffer size, flushes and rows written follow what happened."""
    async with running(make_config(tmp_path, buffer={"flush_interval": 30})) as d:
        await accepted(d, SESSIONS, {"sessions": [session()]})
        await accepted(d, TASKS, {"tasks": tasks_of("m", 3)})
        response = await d.get(METRICS)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        for name, kind in FAMILIES.items():
            assert f"# TYPE {name} {kind}\n" in response.text, name
        m = await metrics(d)
        assert sample(m, "persistence_buffer_size", type="session") == 1
        assert sample(m, "persistence_buffer_size", type="task") == 3
        assert sample(m, "persistence_flush_total") == 0
        assert sample(m, "persistence_api_requests_total", endpoint=TASKS, method="POST") == 1
        assert sample(m, "persistence_api_duration_seconds_count", endpoint=TASKS) == 1
        assert sample(m, "persistence_api_duration_seconds_bucket", endpoint=TASKS, le="+Inf") == 1

        await d.flush()
        m = await metrics(d)
        assert sample(m, "persistence_buffer_size", type="session") == 0
        assert sample(m, "persistence_buffer_size", type="task") == 0
        assert sample(m, "persistence_flush_total") >= 1
        assert sample(m, "persistence_flush_duration_seconds_count") == sample(m, "persistence_flush_total")
        assert sample(m, "persistence_rows_written_total", type="session") == 1
        assert sample(m, "persistence_rows_written_total", type="task") == 3
        assert sample(m, "persistence_flush_errors_total") == 0


async def test_held_tasks_are_shown_until_their_session_arrives(db, tmp_path):
    """Tasks whose session is unknown are held: /flush reports them as
    tasks_waiting_for_session, and persistence_held_tasks and /health count them; when the
    session arrives they are written."""
    async with running(make_config(tmp_path)) as d:
        await accepted(d, TASKS, {"tasks": tasks_of("early", 4)})
        assert (await d.flush())["tasks_waiting_for_session"] == 4
        assert sample(await metrics(d), "persistence_held_tasks") == 4
        assert (await d.get("/health")).json()["buffer"]["tasks_waiting_for_session"] == 4
        assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((0,),)

        await accepted(d, SESSIONS, {"sessions": [session()]})
        answer = await d.flush()
        assert (answer["tasks_waiting_for_session"], answer["tasks_written"]) == (0, 4)
        assert sample(await metrics(d), "persistence_held_tasks") == 0
        assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((4,),)


def by_template(samples: dict, name: str, **labels) -> dict[str, float]:
    """Values of `name` per endpoint, its placeholders spelled {id} whatever their name."""
    totals: dict[str, float] = {}
    for (sample_name, sample_labels), value in samples.items():
        found = dict(sample_labels)
        if sample_name == name and "endpoint" in found and labels.items() <= found.items():
            key = re.sub(r"\{\w+\}", "{id}", found["endpoint"])
            totals[key] = totals.get(key, 0.0) + value
    return totals


async def test_metrics_endpoint_label_is_the_route_template(daemon):
    """The endpoint label is the route template, never the path: requests to routes that
    carry an id are counted under their template, paths no route serves under "unmatched",
    and no label anywhere holds a raw id."""
    raw = {name: f"{name}-3f1c9a2e-{n}" for n, name in enumerate(("sess", "task", "tasks-of", "restore", "unknown"))}
    await daemon.get("/health")
    await daemon.get("/health")
    await accepted(daemon, SESSIONS, {"sessions": [session()]})
    await daemon.get(f"/api/v1/translation/sessions/{raw['sess']}")
    await daemon.get(f"/api/v1/translation/tasks/{raw['task']}")
    await daemon.get(f"/api/v1/translation/sessions/{raw['tasks-of']}/tasks")
    await daemon.post(f"/api/v1/translation/recovery/restore/{raw['restore']}")
    assert (await daemon.get(f"/api/v1/translation/no-such-thing/{raw['unknown']}")).status_code == 404
    assert (await daemon.get(f"/no/{raw['unknown']}/either")).status_code == 404
    await daemon.flush()

    response = await daemon.get(METRICS)
    for raw_id in raw.values():
        assert raw_id not in response.text
    m = await metrics(daemon)
    labels = {dict(labels)["endpoint"] for (_, labels) in m if "endpoint" in dict(labels)}
    for label in labels:
        assert label == "unmatched" or re.sub(r"\{\w+\}", "{id}", label) in SPEC_ROUTES, label

    get = by_template(m, "persistence_api_requests_total", method="GET")
    post = by_template(m, "persistence_api_requests_total", method="POST")
    assert get["/health"] == 2
    assert get["unmatched"] == 2
    assert post[SESSIONS] == 1 and post[FLUSH] == 1
    for template in ("/api/v1/translation/sessions/{id}", "/api/v1/translation/tasks/{id}",
                     "/api/v1/translation/sessions/{id}/tasks"):
        assert get[template] == 1, template
    assert post["/api/v1/translation/recovery/restore/{id}"] == 1
    assert by_template(m, "persistence_api_duration_seconds_count")["/health"] == 2


# ── errors for routes ────────────────────────────────────────────────────────────────


def assert_error_format(response, status: int, error_code: str, where=None) -> None:
    """DESIGN.md's error format: exactly {"detail", "error_code", "errors"}, as JSON."""
    assert response.status_code == status, where
    assert response.headers["content-type"].startswith("application/json")
    body = msgspec.json.decode(response.content)
    assert body.keys() == ERROR_KEYS
    assert body["error_code"] == error_code
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["errors"] == []


async def test_unknown_route_is_404_in_the_error_format(daemon):
    """An unknown path is 404 with {"detail", "error_code", "errors"}."""
    response = await daemon.get("/api/v1/translation/nothing-here")
    assert_error_format(response, 404, "NOT_FOUND")


async def test_wrong_method_is_405_in_the_error_format(daemon):
    """A known path with the wrong method is 405 with {"detail", "error_code", "errors"}."""
    for method, path in [("GET", FLUSH), ("DELETE", "/health"), ("PUT", SESSIONS), ("POST", METRICS)]:
        response = await daemon.client.request(method, path)
        assert_error_format(response, 405, "METHOD_NOT_ALLOWED", (method, path))


async def test_wrong_method_names_the_allowed_methods(daemon):
    """A 405 carries an Allow header listing the methods the path accepts (RFC 9110 §15.5.6:
    the server MUST send it)."""
    response = await daemon.client.get(FLUSH)
    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}
    assert "POST" in allowed, dict(response.headers)


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", [SESSIONS, TASKS, CLEANUP])
async def test_a_batch_or_cleanup_path_is_never_read_as_an_id(daemon, method, path):
    """/sessions/batch is the batch endpoint, not the session whose id is 'batch' (such ids
    are refused): its Allow names POST alone, as /openapi.json does."""
    response = await daemon.client.request(method, path)
    assert response.status_code == (200 if method == "OPTIONS" else 405), response.text
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"POST", "OPTIONS"}


# ── configuration ────────────────────────────────────────────────────────────────────


def test_config_defaults_without_a_file():
    cfg = load_config(None, {})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8001)
    assert cfg.buffer.flush_interval <= 5 and cfg.buffer.flush_rows == 1000


def test_example_config_documents_every_key_with_its_default(tmp_path):
    """persistd.toml lists every key; its values are the built-in defaults."""
    path = Path(__file__).parent.parent / "persistd.toml"
    example = load_config(str(path), {})
    defaults = msgspec.to_builtins(load_config(None, {}))
    raw = tomllib.loads(path.read_text())
    assert {name: set(keys) for name, keys in raw.items()} == {name: set(keys) for name, keys in defaults.items()}
    assert msgspec.to_builtins(example) == defaults


def test_environment_overrides_database_url_and_port(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[server]\nport = 9000\n[database]\nurl = "mysql://a@h:1/x"\n')
    cfg = load_config(str(path), {"PERSISTD_PORT": "9100", "PERSISTD_DATABASE_URL": "mysql://u:p%40ss@db:3307/name"})
    assert cfg.server.port == 9100
    assert parse_database_url(cfg.database.url) == {
        "hosts": [("db", 3307)], "user": "u", "password": "p@ss", "database": "name"}


def test_a_database_url_may_name_several_servers():
    """A Galera cluster's nodes, tried in this order; a port left out is 3306."""
    assert parse_database_url("mysql://u:pw@a:3311,b,[::1]:3313/name") == {
        "hosts": [("a", 3311), ("b", 3306), ("::1", 3313)], "user": "u", "password": "pw", "database": "name"}


@pytest.mark.parametrize(("text", "env"), [
    ("[server]\nprot = 1\n", {}),
    ("[buffer]\nflush_interval = 31\n", {}),
    ("[buffer]\nflush_rows = 0\n", {}),
    ("[database]\nurl = \"postgres://x@h/db\"\n", {}),
    ("[database]\nurl = \"mysql://h:99999/db\"\n", {}),
    ("[database]\nurl = \"sqlite://relative.db\"\n", {}),  # two slashes: a host, not a path
    ("[database]\nurl = \"sqlite:///:memory:\"\n", {}),  # a database per connection: the flusher's alone
    ("[database]\nurl = \"sqlite:///\"\n", {}),
    ("[server\n", {}),
    ("", {"PERSISTD_PORT": "http"}),
    ("", {"PERSISTD_PORT": "70000"}),
    ("[journal]\nmode = \"sometimes\"\n", {}),
    ("[buffer]\nmax_bytes = 2097152\n", {}),  # below max_body_bytes: the largest body could never fit
    ("[journal]\nmax_bytes = 33554432\n", {}),  # below [buffer] max_bytes
])
def test_invalid_config_is_one_line_and_exit_2(tmp_path, text, env):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = subprocess.run([*PERSISTD, "--config", str(path)], env=clean_environ(**env),
                          capture_output=True, text=True, timeout=30)
    assert proc.stderr.count("\n") == 1
    assert_one_line_error(proc, 2)


async def test_a_port_in_use_is_a_one_line_error_and_exit_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = await persistd_exits(tmp_path, server={"port": taken.getsockname()[1]})
    assert_one_line_error(proc, 1, "Address already in use")
