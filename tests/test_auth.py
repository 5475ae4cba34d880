"""Authentication (spec §2.2, issue 10): off by default; API keys with scopes, stored as
hashes, compared in constant time, read again when their file changes; JWTs verified by
PyJWT (HS256, RS256, ES256; iss, aud, exp, nbf). 401 without a valid credential, 403 with
one that lacks the route's scope, both in the error format with WWW-Authenticate."""

import base64
import datetime
import hashlib
import hmac
import ipaddress
import logging
import ssl
import time

import httpx
import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from conftest import SESSION_ID, key_line, keys_file, make_config, running, session, task
from persistd.daemon import ROUTE_SCOPES, ConfigError, load_config
from processes import PERSISTD, assert_one_line_error, clean_environ

SESSIONS = "/api/v1/translation/sessions/batch"
TASKS = "/api/v1/translation/tasks/batch"
METRICS = "/api/v1/system/metrics"
ISSUER, AUDIENCE = "https://id.example.test/", "persistd"

# One request per route, by the handler name ROUTE_SCOPES uses.
ROUTES = {
    "sessions_batch": ("POST", SESSIONS, {"sessions": [session()]}),
    "tasks_batch": ("POST", TASKS, {"tasks": [task()]}),
    "flush": ("POST", "/api/v1/translation/flush", None),
    "sessions_list": ("GET", "/api/v1/translation/sessions", None),
    "session_detail": ("GET", f"/api/v1/translation/sessions/{SESSION_ID}", None),
    "session_tasks": ("GET", f"/api/v1/translation/sessions/{SESSION_ID}/tasks", None),
    "task_detail": ("GET", "/api/v1/translation/tasks/task_001", None),
    "tasks_list": ("GET", "/api/v1/translation/tasks", None),
    "recovery_incomplete": ("GET", "/api/v1/translation/recovery/incomplete-sessions", None),
    "recovery_restore": ("POST", f"/api/v1/translation/recovery/restore/{SESSION_ID}", None),
    "stats": ("GET", "/api/v1/translation/stats", None),
    "session_delete": ("DELETE", "/api/v1/translation/sessions/no-such-session", None),
    "sessions_cleanup": ("POST", "/api/v1/translation/sessions/cleanup", {"dry_run": True}),
}
KEYS = {scope: f"pd_test_key_{scope}_0123456789" for scope in ("read", "write", "admin")}
ALL = "pd_test_key_all_0123456789"


async def call(daemon, route: str, **headers):
    method, path, body = ROUTES[route]
    return await daemon.client.request(method, path, json=body, headers=headers)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_refused(response, status: int, code: str, challenge: str = "") -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert body["error_code"] == code and body["detail"] and body["errors"] == [], body
    assert response.headers["www-authenticate"].startswith('Bearer realm="persistd"'), response.headers
    assert challenge in response.headers["www-authenticate"]


@pytest.fixture
async def keyed(db, tmp_path):
    lines = [key_line(f"only-{scope}", scope, key) for scope, key in KEYS.items()]
    path = keys_file(tmp_path, *lines, key_line("everything", "read,write,admin", ALL))
    async with running(make_config(tmp_path, auth={"keys_file": str(path)})) as daemon:
        yield daemon


async def test_auth_is_off_by_default(daemon):
    for route in ROUTES:
        assert (await call(daemon, route)).status_code not in (401, 403), route


async def test_every_route_needs_its_scope_and_no_other(keyed):
    """Without credentials 401; with a key lacking the route's scope 403 naming it; with a
    key that has it, the route's own answer. /health stays open, and so do the metrics."""
    assert set(ROUTES) == set(ROUTE_SCOPES)
    for route, scope in ROUTE_SCOPES.items():
        assert_refused(await call(keyed, route), 401, "UNAUTHORIZED")
        for other, key in KEYS.items():
            response = await call(keyed, route, **bearer(key))
            if other == scope:
                assert response.status_code not in (401, 403), (route, response.text)
            else:
                assert_refused(response, 403, "FORBIDDEN", f'error="insufficient_scope", scope="{scope}"')
    assert (await keyed.get("/health")).status_code == 200
    assert (await keyed.get(METRICS)).status_code == 200


async def test_a_key_works_in_either_header_and_a_wrong_one_is_401(keyed):
    assert (await keyed.post(SESSIONS, {"sessions": [session()]}, headers={"X-API-Key": KEYS["write"]})).status_code == 202
    assert (await keyed.post(SESSIONS, {"sessions": [session()]}, headers=bearer(KEYS["write"]))).status_code == 202
    assert (await keyed.post(SESSIONS, {"sessions": [session()]}, headers={"authorization": f"bearer {ALL}"})).status_code == 202
    for wrong in (KEYS["write"] + "x", KEYS["write"][:-1], "", "Bearer", "Basic " + KEYS["write"]):
        response = await keyed.client.post(SESSIONS, json={"sessions": [session()]}, headers={"Authorization": f"Bearer {wrong}" if wrong.startswith("pd_") else wrong})
        assert_refused(response, 401, "UNAUTHORIZED")
    assert_refused(await keyed.client.get("/api/v1/translation/stats", headers={"X-API-Key": "pd_guess"}),
                   401, "UNAUTHORIZED", 'error="invalid_token"')


async def test_refusals_are_counted_by_reason_in_the_metrics(keyed):
    await keyed.get("/api/v1/translation/stats")
    await keyed.client.get("/api/v1/translation/stats", headers=bearer("pd_guess"))
    await keyed.client.get("/api/v1/translation/stats", headers=bearer(KEYS["write"]))
    text = (await keyed.get(METRICS)).text
    for reason in ("missing", "invalid_key", "insufficient_scope"):
        assert f'persistence_auth_refusals_total{{reason="{reason}"}} 1.0' in text, text


async def test_metrics_need_the_read_scope_when_configured(db, tmp_path):
    path = keys_file(tmp_path, key_line("scraper", "read", KEYS["read"]))
    async with running(make_config(tmp_path, auth={"keys_file": str(path), "metrics": "read"})) as daemon:
        assert_refused(await daemon.get(METRICS), 401, "UNAUTHORIZED")
        assert (await daemon.client.get(METRICS, headers=bearer(KEYS["read"]))).status_code == 200
        assert (await daemon.get("/health")).status_code == 200


async def test_keys_rotate_without_a_restart(db, tmp_path):
    """Two keys valid at once: the new one is added, clients move, the old one goes. The
    file is read again within a second of each change."""
    old, new = "pd_rotation_old_0123456789", "pd_rotation_new_0123456789"
    path = keys_file(tmp_path, key_line("backend", "write", old))
    async with running(make_config(tmp_path, auth={"keys_file": str(path)})) as daemon:
        async def status(key: str) -> int:
            return (await daemon.post(SESSIONS, {"sessions": [session()]}, headers=bearer(key))).status_code

        assert (await status(old), await status(new)) == (202, 401)
        keys_file(tmp_path, key_line("backend", "write", old), key_line("backend", "write", new))
        await wait_for(lambda: status(new), 202)
        assert await status(old) == 202
        keys_file(tmp_path, key_line("backend", "write", new))
        await wait_for(lambda: status(old), 401)
        assert await status(new) == 202
        path.write_text("not a key line\n")  # a broken file keeps the keys that were loaded
        await trio.sleep(1.5)
        assert await status(new) == 202


async def wait_for(probe, expected, within_s: float = 3.0) -> None:
    deadline = trio.current_time() + within_s
    while (got := await probe()) != expected:
        assert trio.current_time() < deadline, f"still {got}, not {expected}, after {within_s} s"
        await trio.sleep(0.1)


async def test_new_key_prints_a_key_and_the_line_that_admits_it(db, tmp_path):
    proc = await trio.run_process([*PERSISTD, "--new-key", "backend", "read,write"], capture_stdout=True,
                                  env=clean_environ())
    key_shown, line_shown = proc.stdout.decode().splitlines()
    key, line = key_shown.rsplit(" ", 1)[1], line_shown.split(": ", 1)[1]
    assert key.startswith("pd_") and len(key) > 40 and key not in line
    async with running(make_config(tmp_path, auth={"keys_file": str(keys_file(tmp_path, line))})) as daemon:
        assert (await daemon.client.get("/api/v1/translation/stats", headers=bearer(key))).status_code == 200
        assert (await daemon.post("/api/v1/translation/flush", headers=bearer(key))).status_code == 200
        assert_refused(await daemon.client.request("DELETE", f"/api/v1/translation/sessions/{SESSION_ID}",
                                                   headers=bearer(key)), 403, "FORBIDDEN")
    bad = await trio.run_process([*PERSISTD, "--new-key", "backend", "read,root"], check=False, capture_stderr=True,
                                 env=clean_environ())
    assert_one_line_error(bad, 2, "SCOPES")


# ── JWT ──────────────────────────────────────────────────────────────────────────────


def claims(**overrides) -> dict:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "backend", "iat": now, "exp": now + 300,
            "scope": "read write", **overrides}


def pem(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def signing_keys(algorithm: str):
    """(key that signs, what persistd's key_file holds)."""
    if algorithm == "HS256":
        return b"a shared secret of at least thirty-two bytes", b"a shared secret of at least thirty-two bytes"
    private = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if algorithm == "RS256"
               else ec.generate_private_key(ec.SECP256R1()))
    return private, pem(private.public_key())


@pytest.fixture(params=["HS256", "RS256", "ES256"])
async def with_jwt(request, db, tmp_path):
    algorithm = request.param
    signer, verifier = signing_keys(algorithm)
    (tmp_path / "jwt.key").write_bytes(verifier)
    cfg = make_config(tmp_path, auth={"jwt": {"algorithm": algorithm, "key_file": str(tmp_path / "jwt.key"),
                                              "issuer": ISSUER, "audience": AUDIENCE}})
    async with running(cfg) as daemon:
        yield daemon, algorithm, signer, verifier


async def test_a_valid_token_grants_its_scopes(with_jwt):
    daemon, algorithm, signer, _ = with_jwt
    token = jwt.encode(claims(), signer, algorithm=algorithm)
    assert (await daemon.post(SESSIONS, {"sessions": [session()]}, headers=bearer(token))).status_code == 202
    assert (await daemon.client.get("/api/v1/translation/stats", headers={"X-API-Key": token})).status_code == 200
    assert_refused(await daemon.client.request("DELETE", f"/api/v1/translation/sessions/{SESSION_ID}",
                                               headers=bearer(token)), 403, "FORBIDDEN", 'scope="admin"')
    listed = jwt.encode(claims(scope=["admin"]), signer, algorithm=algorithm)
    response = await daemon.client.request("DELETE", f"/api/v1/translation/sessions/{SESSION_ID}", headers=bearer(listed))
    assert response.status_code in (200, 404)


async def test_forged_expired_early_and_foreign_tokens_are_refused(with_jwt):
    daemon, algorithm, signer, verifier = with_jwt
    other_signer, _ = signing_keys(algorithm) if algorithm != "HS256" else (b"another secret of thirty-two bytes!", None)
    unsigned = jwt.encode(claims(), None, algorithm="none")
    forged = {
        "alg none": unsigned,
        "alg none, signature kept": unsigned + "c2lnbmF0dXJl",
        "another key": jwt.encode(claims(), other_signer, algorithm=algorithm),
        "expired": jwt.encode(claims(exp=int(time.time()) - 120), signer, algorithm=algorithm),
        "not yet valid": jwt.encode(claims(nbf=int(time.time()) + 120), signer, algorithm=algorithm),
        "another audience": jwt.encode(claims(aud="billing"), signer, algorithm=algorithm),
        "another issuer": jwt.encode(claims(iss="https://evil.example.test/"), signer, algorithm=algorithm),
        "no exp": jwt.encode({k: v for k, v in claims().items() if k != "exp"}, signer, algorithm=algorithm),
        "tampered": tamper(jwt.encode(claims(scope="read"), signer, algorithm=algorithm)),
    }
    if algorithm != "HS256":  # the public key used as an HMAC secret: the classic confusion
        forged["HS256 with the public key"] = hmac_token(claims(), verifier)
    for name, token in forged.items():
        response = await daemon.client.post(SESSIONS, json={"sessions": [session()]}, headers=bearer(token))
        assert_refused(response, 401, "UNAUTHORIZED")
        assert "invalid_token" in response.headers["www-authenticate"], name
    text = (await daemon.get(METRICS)).text
    assert 'persistence_auth_refusals_total{reason="expired"} 1.0' in text
    assert 'persistence_auth_refusals_total{reason="invalid_token"}' in text


def tamper(token: str) -> str:
    """The payload swapped for one that grants more, the signature kept."""
    header, _, signature = token.split(".")
    payload = jwt.utils.base64url_encode(jwt.api_jws.json.dumps(claims(scope="read write admin")).encode()).decode()
    return f"{header}.{payload}.{signature}"


def hmac_token(payload: dict, secret: bytes) -> str:
    """HS256 by hand: PyJWT refuses to sign with a PEM key, which is the point."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(jwt.api_jws.json.dumps(payload).encode())
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


# ── configuration and logs ───────────────────────────────────────────────────────────


def test_jwt_without_issuer_or_audience_is_a_config_error(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[auth.jwt]\nkey_file = "/etc/persistd/jwt.pem"\naudience = "persistd"\n')
    with pytest.raises(ConfigError, match="issuer and audience"):
        load_config(str(path), {})


async def test_a_broken_keys_file_stops_the_start(db, tmp_path):
    path = keys_file(tmp_path, "backend write md5:0123")
    with pytest.raises(BaseExceptionGroup) as raised:
        async with running(make_config(tmp_path, auth={"keys_file": str(path)})):
            pass
    assert "expected NAME SCOPES sha256:HEX" in str(raised.value.exceptions[0])


async def test_auth_off_on_an_address_others_reach_is_warned_about(db, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="persistd")
    async with running(make_config(tmp_path, server={"host": "0.0.0.0"})):
        pass
    assert [r.event for r in caplog.records if getattr(r, "event", None) == "auth_off"] == ["auth_off"]


async def test_no_credential_ever_reaches_the_log(db, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    signer, verifier = signing_keys("HS256")
    (tmp_path / "jwt.key").write_bytes(verifier)
    token = jwt.encode(claims(exp=int(time.time()) - 120), signer, algorithm="HS256")
    path = keys_file(tmp_path, key_line("backend", "write", KEYS["write"]))
    cfg = make_config(tmp_path, auth={"keys_file": str(path), "jwt": {
        "algorithm": "HS256", "key_file": str(tmp_path / "jwt.key"), "issuer": ISSUER, "audience": AUDIENCE}})
    async with running(cfg) as daemon:
        for credential in (KEYS["write"], KEYS["write"] + "x", token):
            await daemon.post(SESSIONS, {"sessions": [session()]}, headers=bearer(credential))
            await daemon.client.get("/api/v1/translation/stats", headers={"X-API-Key": credential})
    logged = caplog.text
    for secret in (KEYS["write"], token, token.split(".")[2], signer.decode()):
        assert secret not in logged


# ── TLS ──────────────────────────────────────────────────────────────────────────────


def self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made for the test."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "persistd test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


async def test_tls_serves_the_api_over_https_only(db, tmp_path):
    certfile, keyfile = self_signed(tmp_path)
    path = keys_file(tmp_path, key_line("backend", "read,write", ALL))
    cfg = make_config(tmp_path, server={"certfile": certfile, "keyfile": keyfile}, auth={"keys_file": str(path)})
    async with running(cfg) as daemon:
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{daemon.port}", verify=ssl.create_default_context(cafile=certfile),
                                     timeout=10) as tls:
            assert (await tls.post(SESSIONS, json={"sessions": [session()]}, headers=bearer(ALL))).status_code == 202
            assert (await tls.post("/api/v1/translation/flush", headers=bearer(ALL))).json()["sessions_written"] == 1
            assert (await tls.get("/health")).status_code == 200
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{daemon.port}", timeout=10) as unknown_ca:
            with pytest.raises(httpx.ConnectError):
                await unknown_ca.get("/health")
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port gets no HTTP answer
            await daemon.get("/health")
