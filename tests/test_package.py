"""persistd as it is installed and started (issue 9): the wheel in a fresh virtualenv
outside the checkout, started from a directory of its own; the command line; the faults
that are not outages, each a one-line error and a non-zero exit, before the daemon
listens when they are there at start; and the log, one event a line.

The wheel is built from a copy of this checkout and installed without -e, with the
locked dependencies (deploy/constraints.txt): what a user installs, not this checkout."""

import importlib.metadata
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from functools import partial

import httpx
import msgspec
import pytest
import trio
import trio_mysql
from prometheus_client.parser import text_string_to_metric_families

from conftest import SESSION_ID, mysql_only, scratch_database, session, task
from persistd.daemon import DatabaseConfig, describe, load_config
from persistd.mysql import Database, transient
from processes import (PERSISTD, Process, assert_one_line_error, clean_environ, free_port, persistd_exits, persistd_process,
                       post, wait_healthy)
from proxy import tcp_proxy

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "deploy" / "constraints.txt"
SESSIONS = "/api/v1/translation/sessions/batch"
TASKS = "/api/v1/translation/tasks/batch"
FLUSH = "/api/v1/translation/flush"
EXIT_S = 15.0  # a start that must fail, or a daemon that must stop, does so within this


@pytest.fixture(scope="module")
def installed():
    """The bin/ directory of a fresh virtualenv with persistd's wheel installed, not -e.
    It lies outside pytest's private tmp dir, so that an unprivileged user can run it."""
    root = Path(tempfile.mkdtemp(prefix="persistd-installed-"))
    root.chmod(0o755)
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "state"))
    env = clean_environ(PIP_CONSTRAINT=str(CONSTRAINTS))  # the build backend is pinned too
    pip = ["-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([sys.executable, *pip, "wheel", "--no-deps", "-w", root / "dist", source], check=True, env=env)
    subprocess.run([sys.executable, "-m", "venv", root / "venv"], check=True)
    wheel = next((root / "dist").glob("persistd-*.whl"))
    subprocess.run([root / "venv" / "bin" / "python", *pip, "install", "-c", CONSTRAINTS, wheel], check=True, env=env)
    yield root / "venv" / "bin"
    shutil.rmtree(root)


def installed_persistd(installed: Path) -> list[str]:
    return [str(installed / "persistd")]


# ── the installed package ────────────────────────────────────────────────────────────


async def test_the_installed_wheel_writes_sessions_and_tasks_to_its_database(installed, db, tmp_path):
    """The wheel's persistd, started in a directory of its own: batches go in over HTTP
    and are found in the database; SIGTERM stops it with exit status 0."""
    where = subprocess.run([installed / "python", "-c", "import persistd; print(persistd.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(installed.parent)) and not where.startswith(str(REPO)), where

    async with persistd_process(tmp_path, command=installed_persistd(installed)) as process:
        async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
            assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
            tasks = [task(f"t{i:03d}", row_index=i) for i in range(300)]
            assert (await post(client, TASKS, "tasks", tasks)).status_code == 202
            assert (await client.post(FLUSH)).json()["tasks_written"] == 300
        process.signal(signal.SIGTERM)
        assert (await process.wait_exit(EXIT_S))[0] == 0
    assert await db.query("SELECT session_id FROM translation_sessions") == ((SESSION_ID,),)
    assert (await db.query("SELECT COUNT(*) FROM translation_tasks"))[0][0] == 300


async def test_a_file_missing_from_the_installed_package_stops_the_start(installed, db, tmp_path):
    """The schema is read from the package at start: without it, one line and exit 1,
    before the daemon listens (it would acknowledge batches it can never write)."""
    [schema] = installed.parent.glob(f"lib/python*/site-packages/persistd/sql/{db.backend}.sql")
    schema.rename(schema.with_suffix(".moved"))
    try:
        proc = await persistd_exits(tmp_path, command=installed_persistd(installed))
    finally:
        schema.with_suffix(".moved").rename(schema)
    assert_one_line_error(proc, 1, f"{db.backend}.sql", "reinstall")
    assert b"listening on" not in proc.stderr


async def test_with_no_config_in_an_empty_directory_the_spec_examples_work(installed, tmp_path):
    """`persistd` and nothing else (the port aside, through its override) on a machine with
    no database server: SQLite in ./state/persistd.db, healthy, and every curl example of
    the spec, in its order, answers 2xx."""
    home = tmp_path / "empty"
    home.mkdir()
    port = free_port()
    log_path = tmp_path / "persistd.log"
    with open(log_path, "wb") as log:
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(partial(
                trio.run_process, [str(installed / "persistd")], check=False, stdout=log, stderr=subprocess.STDOUT,
                env=clean_environ(PERSISTD_PORT=str(port)), cwd=home))
            process = Process(proc, port, {"state": {"dir": str(home / "state")}}, log_path)
            await wait_healthy(process)
            examples = await trio.run_process(
                ["bash", Path(__file__).with_name("spec-examples.sh")], capture_stdout=True, capture_stderr=True,
                check=False, env=clean_environ(PERSISTD_URL=process.url))
            assert examples.returncode == 0, (examples.stdout + examples.stderr).decode()
            answers = [json.loads(line) for line in examples.stdout.decode().splitlines()]
            assert len(answers) == 14 and answers[-1]["backend"] == "sqlite"
            process.signal(signal.SIGTERM)
            assert (await process.wait_exit(EXIT_S))[0] == 0
    assert {p.name for p in (home / "state").iterdir()} >= {"instance", "journal", "persistd.db"}


async def test_the_version_is_the_installed_package_version(installed):
    out = subprocess.run([installed / "persistd", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"persistd {importlib.metadata.version('persistd')}"


@pytest.mark.parametrize(("url", "ddl"), [("", "sqlite.sql"), ("mysql://root@db/persistd", "mysql.sql")])
async def test_print_schema_prints_the_ddl_that_ships_in_the_package(installed, url, ddl):
    """The configured backend's: SQLite's without a url."""
    env = clean_environ(**({"PERSISTD_DATABASE_URL": url} if url else {}))
    out = subprocess.run([installed / "persistd", "--print-schema"], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert out == (REPO / "sql" / ddl).read_text(encoding="utf-8")
    assert out.count("CREATE TABLE IF NOT EXISTS") == 3


async def test_the_example_config_runs_as_written_for_an_unprivileged_user(installed, db, tmp_path):
    """persistd.toml as shipped, in a directory owned by nobody, started as nobody: its
    state dir is created there. Port and database come from the documented overrides."""
    home = installed.parent.parent / f"home-{db.backend}"
    home.mkdir()
    shutil.copy(REPO / "persistd.toml", home / "persistd.toml")
    shutil.chown(home, "nobody", "nogroup")
    port = free_port()
    env = clean_environ(PERSISTD_PORT=str(port), **({"PERSISTD_DATABASE_URL": db.url} if db.backend == "mysql" else {}))
    command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
               str(installed / "persistd"), "--config", "persistd.toml"]
    log_path = tmp_path / "persistd.log"
    with open(log_path, "wb") as log:
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(partial(
                trio.run_process, command, check=False, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home))
            process = Process(proc, port, {"state": {"dir": str(home / "state")}}, log_path)
            await wait_healthy(process)
            assert (home / "state" / "journal").is_dir()
            assert (home / "state").stat().st_uid == proc_uid(proc.pid) != 0
            process.signal(signal.SIGTERM)
            assert (await process.wait_exit(EXIT_S))[0] == 0


def proc_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Uid:")).split()[1])


# ── the command line ─────────────────────────────────────────────────────────────────


def test_check_config_prints_the_effective_configuration_with_secrets_masked(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[database]\nurl = "mysql://app:s3cr%40t@db.internal:3307/persistd"\n[journal]\nmode = "write"\n')
    proc = subprocess.run([*PERSISTD, "--check-config", path], capture_output=True, text=True,
                          env=clean_environ(PERSISTD_PORT="9100"), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "s3cr" not in proc.stdout and 'url = "mysql://app:***@db.internal:3307/persistd"' in proc.stdout
    assert proc.stdout.startswith("# backend: mysql\n")
    shown = tmp_path / "shown.toml"
    shown.write_text(proc.stdout)
    effective = load_config(str(path), {"PERSISTD_PORT": "9100"})
    assert load_config(str(shown), {}) == msgspec.structs.replace(
        effective, database=msgspec.structs.replace(effective.database, url="mysql://app:***@db.internal:3307/persistd"))
    assert effective.server.port == 9100 and effective.journal.mode == "write"


def test_without_a_database_url_the_backend_is_sqlite_in_the_state_dir(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[state]\ndir = "/var/lib/persistd"\n')
    proc = subprocess.run([*PERSISTD, "--check-config", path], capture_output=True, text=True, env=clean_environ(),
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# backend: sqlite\n")
    assert 'url = "sqlite:////var/lib/persistd/persistd.db"' in proc.stdout


def test_check_config_of_an_invalid_file_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[buffer]\nflush_rows = 0\n")
    proc = subprocess.run([*PERSISTD, "--check-config", path], capture_output=True, text=True,
                          env=clean_environ(), timeout=30)
    assert_one_line_error(proc, 2, "flush_rows")
    assert proc.stdout == ""


def test_systemd_state_directory_is_the_state_dir_unless_the_config_names_one(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[server]\nport = 1\n")
    assert load_config(str(path), {"STATE_DIRECTORY": "/var/lib/persistd"}).state.dir == "/var/lib/persistd"
    path.write_text('[state]\ndir = "/srv/persistd"\n')
    assert load_config(str(path), {"STATE_DIRECTORY": "/var/lib/persistd"}).state.dir == "/srv/persistd"
    assert load_config(None, {}).state.dir == "state"


# ── faults that are not outages ──────────────────────────────────────────────────────


async def test_a_state_dir_that_cannot_be_created_stops_the_start(db, tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = await persistd_exits(tmp_path, state={"dir": str(tmp_path / "a-file" / "state")})
    assert_one_line_error(proc, 1, "state dir", "a-file")


@pytest.mark.parametrize("mode", ["fsync", "off"])
async def test_a_state_dir_that_cannot_be_written_stops_the_start(db, tmp_path, mode):
    """Made immutable (chattr +i), which even root cannot write: the journal and the
    dead-letter file could not be kept there, whatever the journal mode."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["chattr", "+i", state], check=True)
    try:
        proc = await persistd_exits(tmp_path, journal={"mode": mode})
    finally:
        subprocess.run(["chattr", "-i", state], check=True)
    assert_one_line_error(proc, 1, "state dir", "cannot be written")


@pytest.mark.parametrize(("privileges", "password", "code"), [
    ("SELECT, INSERT, UPDATE, DELETE", "right", "1142"),  # no privilege to create the tables
    ("ALL PRIVILEGES", "wrong", "1045"),  # access denied
])
@mysql_only
async def test_a_database_that_refuses_persistd_stops_the_start(db, tmp_path, privileges, password, code):
    async with scratch_database("persistd_test_refused", ("persistd_refused", "right", privileges)) as url:
        proc = await persistd_exits(tmp_path, database={"url": url.replace(":right@", f":{password}@")})
    assert_one_line_error(proc, 1, "refuses persistd", code)
    assert b"listening on" not in proc.stderr and b"right" not in proc.stderr


@mysql_only
async def test_the_documented_privileges_are_enough(db, tmp_path):
    """README: the MySQL user needs these privileges on its database, and no others."""
    privileges = "SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX, REFERENCES"
    async with scratch_database("persistd_test_grants", ("persistd_grants", "pw", privileges)) as url:
        async with persistd_process(tmp_path, database={"url": url}) as process:
            async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
                assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
                assert (await post(client, TASKS, "tasks", [task()])).status_code == 202
                assert (await client.post(FLUSH)).json()["tasks_written"] == 1
                assert (await client.get("/api/v1/translation/stats")).status_code == 200
                assert (await client.request("DELETE", f"/api/v1/translation/sessions/{SESSION_ID}")).status_code == 200
                cleanup = await client.post("/api/v1/translation/sessions/cleanup", json={"dry_run": False})
                assert cleanup.status_code == 200
            process.signal(signal.SIGTERM)
            assert (await process.wait_exit(EXIT_S))[0] == 0
    assert "ERROR" not in process.log() and "WARNING" not in process.log(), process.log()


@pytest.mark.parametrize("mode", ["fsync", "off"])
@mysql_only
async def test_a_database_that_refuses_writes_for_good_stops_the_daemon_keeping_what_it_acknowledged(
        db, tmp_path, mode):
    """A column gone from under persistd (1054): every retry would fail the same way while
    /health says healthy. The daemon stops with exit 1; with a journal the acknowledged
    rows are written by the next start once the column is back, without one they are in
    the dead-letter file."""
    async with scratch_database("persistd_test_altered") as url:
        async with persistd_process(tmp_path, database={"url": url}, journal={"mode": mode},
                                    buffer={"flush_interval": 0.5}) as process:
            async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
                assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
                assert (await client.post(FLUSH)).status_code == 200
                altered = Database(msgspec.convert({"url": url}, DatabaseConfig))
                async with altered.connection() as conn:
                    await conn.query("ALTER TABLE translation_tasks DROP COLUMN context")
                tasks = [task(f"t{i}", row_index=i, context="scene 1") for i in range(50)]
                assert (await post(client, TASKS, "tasks", tasks)).status_code == 202
            code, _ = await process.wait_exit(EXIT_S)
        last = [line for line in process.log().splitlines() if "persistd: " in line][-1]
        assert code == 1 and "1054" in last and "refuses persistd's writes" in last, process.log()[-3000:]
        async with altered.connection() as conn:
            await conn.query("ALTER TABLE translation_tasks ADD COLUMN context TEXT AFTER target_text")
        if mode == "off":
            with open(tmp_path / "state" / "dead-letter.jsonl") as f:
                lines = [json.loads(line) for line in f]
            assert sorted(line["row"]["task_id"] for line in lines) == sorted(t["task_id"] for t in tasks)
            assert {line["reason"] for line in lines} == {"database_refused_writes"}
        else:
            async with persistd_process(tmp_path, database={"url": url}) as process:
                async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
                    assert (await client.post(FLUSH)).status_code == 200
                process.signal(signal.SIGTERM)
                assert (await process.wait_exit(EXIT_S))[0] == 0
            async with altered.connection() as conn:
                async with conn.cursor() as cursor:
                    await cursor.execute("SELECT COUNT(*) FROM translation_tasks WHERE context = 'scene 1'")
                    assert (await cursor.fetchone())[0] == 50
        altered.close()


def server_error(code: int) -> trio_mysql.MySQLError:
    return trio_mysql.err.OperationalError(code, "as the server says it")


async def test_only_outages_are_retried():
    """Lost, refused, busy or failing over: transient, retried. Refusals of what we ask:
    not. The connection refused comes from a real port with nothing behind it."""
    closed = Database(msgspec.convert({"url": f"mysql://root@127.0.0.1:{free_port()}/x"}, DatabaseConfig))
    with pytest.raises(trio_mysql.OperationalError) as refused:
        await closed.connect()
    assert refused.value.args[0] == 2003 and transient(refused.value), describe(refused.value)
    for code in (2006, 2013, 1040, 1053, 1205, 1213, 1290, 1836, 1047, 4031):
        assert transient(server_error(code)), code
    for code in (1045, 1044, 1142, 1146, 1054, 1064, 1406):
        assert not transient(server_error(code)), code
    assert transient(trio.TooSlowError()) and transient(ConnectionResetError())
    assert transient(trio_mysql.err.InterfaceError(0, ""))


def test_only_sqlite_outages_are_retried(tmp_path):
    """A file locked by another writer, opened read-only, or missing: transient, retried.
    A statement the schema refuses (a table or column gone): not. Real errors, each."""
    from persistd.sqlite import transient as sqlite_transient
    path = tmp_path / "t.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    errors = {}

    def error(name: str, connect, sql: str) -> None:
        with pytest.raises(sqlite3.Error) as raised:
            connect().execute(sql)
        errors[name] = raised.value

    holder.execute("BEGIN EXCLUSIVE")
    error("locked", lambda: sqlite3.connect(path, timeout=0), "INSERT INTO t VALUES (1)")
    holder.rollback()
    error("read-only", lambda: sqlite3.connect(f"file:{path}?mode=ro", uri=True), "INSERT INTO t VALUES (1)")
    error("missing", lambda: sqlite3.connect(f"file:{tmp_path / 'none.db'}?mode=rw", uri=True), "SELECT 1")
    error("no such table", lambda: sqlite3.connect(path), "SELECT * FROM nope")
    assert [sqlite_transient(errors[n]) for n in ("locked", "read-only", "missing")] == [True] * 3, errors
    assert not sqlite_transient(errors["no such table"]), errors


# ── the log ──────────────────────────────────────────────────────────────────────────


def events(process) -> list[dict]:
    """The JSON log's events, in order: every line of it is one JSON object."""
    lines = [line for line in process.log().splitlines() if not line.startswith("--- ")]
    return [json.loads(line) for line in lines]


def named(logged: list[dict], name: str) -> list[dict]:
    return [e for e in logged if e["event"] == name]


async def test_json_log_has_one_event_a_line_from_start_to_stop(db, tmp_path):
    async with persistd_process(tmp_path, log={"format": "json"}) as process:
        async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
            assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
        process.signal(signal.SIGTERM)
        assert (await process.wait_exit(EXIT_S))[0] == 0
    logged = events(process)
    assert {"time", "level", "logger", "event", "message"} <= set(logged[0])
    assert [e["event"] for e in logged if e["event"] in (
        "starting", "ready", "stopping", "http_stopped", "draining", "drained", "stopped")] == [
        "starting", "ready", "stopping", "http_stopped", "draining", "drained", "stopped"]
    ready, draining = named(logged, "ready")[0], named(logged, "draining")[0]
    assert ready["port"] == process.port and ready["seconds"] > 0 and draining["rows"] == 1


@mysql_only
async def test_an_outage_and_a_backpressure_episode_are_logged_once_each_with_their_figures(db, tmp_path):
    """While the database is cut the flusher fails every 0.1-0.2 s and /health is asked
    every 0.2 s, and batches meet a full buffer: one line when each episode begins, one
    when it ends, none per retry, per request or per refusal. (A backpressure episode ends
    once no batch was refused for 10 s, or at the stop.)"""
    async with tcp_proxy() as proxy:
        async with persistd_process(tmp_path, database={"url": proxy.url()}, log={"format": "json"},
                                    buffer={"flush_interval": 0.1, "retry_max": 0.2, "max_rows": 1000}) as process:
            async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
                assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
                assert (await client.post(FLUSH)).status_code == 200
                await proxy.cut()
                tasks = [task(f"t{i:04d}", row_index=i) for i in range(1000)]
                assert (await post(client, TASKS, "tasks", tasks)).status_code == 202
                for _ in range(15):
                    assert (await client.get("/health")).status_code == 503
                    assert (await post(client, TASKS, "tasks", [task("more")])).status_code == 503
                    await trio.sleep(0.2)
                await proxy.restore()
                assert (await client.post(FLUSH)).status_code == 200
                assert (await client.get("/health")).status_code == 200
                r = await post(client, TASKS, "tasks", [task("more")])
                assert r.status_code == 202, (r.text, (await client.get("/health")).text)
            process.signal(signal.SIGTERM)
            assert (await process.wait_exit(EXIT_S))[0] == 0
    logged = events(process)
    for name in ("flush_failing", "flush_recovered", "database_unreachable", "database_reachable",
                 "backpressure", "backpressure_over"):
        assert len(named(logged, name)) == 1, (name, [e["message"] for e in logged])
    assert named(logged, "flush_failing")[0]["rows"] == 1000
    assert named(logged, "flush_recovered")[0]["attempts"] >= 5
    assert named(logged, "flush_recovered")[0]["seconds"] >= 2
    assert named(logged, "backpressure")[0]["rows"] == 1000
    assert named(logged, "backpressure_over")[0]["refused"] == 15  # over at the stop: no 10 s quiet yet


# ── what an operator scrapes ─────────────────────────────────────────────────────────


async def test_every_metric_the_alert_rules_name_is_exported(slow_daemon, db):
    """deploy/prometheus-alerts.yml names only metrics the daemon exports; the age of the
    oldest unwritten batch grows while it waits and is 0 once it is written."""
    rules = (REPO / "deploy" / "prometheus-alerts.yml").read_text()
    assert (await slow_daemon.post(SESSIONS, {"sessions": [session()]})).status_code == 202
    await trio.sleep(0.3)
    text = (await slow_daemon.get("/api/v1/system/metrics")).text
    families = list(text_string_to_metric_families(text))
    exported = {s.name: s.value for family in families for s in family.samples}
    counters = {f"{family.name}_total" for family in families if family.type == "counter"}  # labelled: no sample yet
    named = set(re.findall(r"\b(persistence_\w+)", rules))
    assert named and named <= exported.keys() | counters, named - exported.keys() - counters
    assert exported["persistence_oldest_unwritten_seconds"] >= 0.3
    assert exported["persistence_database_up"] == 1 and exported["persistence_backpressure"] == 0
    assert f'persistence_database_backend{{backend="{db.backend}"}} 1.0' in text
    await slow_daemon.flush()
    text = (await slow_daemon.get("/api/v1/system/metrics")).text
    assert "persistence_oldest_unwritten_seconds 0.0" in text
    assert (await slow_daemon.get("/health")).json()["buffer"]["oldest_unwritten_seconds"] is None
