"""Fuzzing (issue 10, point 3): schemathesis generates requests from the daemon's own
/openapi.json, sends them to a real daemon process with auth on, and checks every answer
against the document (`--checks all`: no 5xx, status codes, content types, headers and
bodies as documented, schema-violating requests refused, valid ones accepted, 401 without
the credential). Each run is at least 1,000 requests over all 15 operations; afterwards the
daemon is healthy and every batch it acknowledged is in the database (each backend: the db fixture).

The runs are repeatable: the seed is fixed (PERSISTD_FUZZ_SEED sets another, to explore) and
nothing is kept between runs. A failure prints schemathesis's report, with a curl command
and `st replay` for each failing case."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from conftest import key_line, keys_file
from processes import persistd_process

SEED = int(os.environ.get("PERSISTD_FUZZ_SEED", "20261201"))
EXAMPLES = 50  # per operation and phase; gives 1,800 to 2,000 requests a run
READ_WRITE = "pd_fuzz_read_write_0123456789"
ADMIN = "pd_fuzz_admin_0123456789"
OPEN = {"GET /health", "GET /api/v1/system/metrics"}  # auth on, metrics = "open" (the default)


async def fuzz(process, tmp_path: Path, name: str, credential: str | None) -> list[dict]:
    """One schemathesis run against `process`; its calls, as tests/fuzz_hooks.py logged them."""
    log = tmp_path / f"{name}.jsonl"
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{process.url}/openapi.json",
               "--checks", "all", "--seed", str(SEED), "--max-examples", str(EXAMPLES), "--workers", "1",
               "--generation-database", "none", "--no-color"]
    if credential:
        command += ["--header", f"Authorization: Bearer {credential}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "FUZZ_LOG": str(log),
           "PYTHONPATH": str(Path(__file__).parent)}
    run = await trio.run_process(command, env=env, cwd=tmp_path, check=False,
                                 capture_stdout=True, stderr=subprocess.STDOUT)
    report = run.stdout.decode(errors="replace")
    print(f"--- schemathesis, {name} (seed {SEED}) ---\n" + report[report.find("= SUMMARY ="):])
    assert run.returncode == 0, report
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) >= 1000, len(calls)
    assert not [c for c in calls if c["status"] >= 500]
    return calls


async def documented_operations(process) -> set[str]:
    async with httpx.AsyncClient(base_url=process.url) as client:
        document = (await client.get("/openapi.json")).json()
    return {f"{method.upper()} {path}" for path, item in document["paths"].items()
            for method, op in item.items() if isinstance(op, dict)}


async def assert_healthy(process) -> dict:
    assert process.proc.returncode is None, process.log()[-4000:]
    async with httpx.AsyncClient(base_url=process.url) as client:
        health = await client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "healthy", health.text
    return health.json()


def last_acknowledged(calls: list[dict], key: str, columns: tuple[str, ...]) -> dict[str, tuple]:
    """Each row acknowledged (202) by the batch endpoint of `key`, as its last batch left it."""
    rows = {}
    for call in calls:
        if call["operation"] == f"POST /api/v1/translation/{key}/batch" and call["status"] == 202:
            for row in call["body"][key]:
                rows[row[columns[0]]] = tuple(row[c] for c in columns)
    return rows


@pytest.fixture
async def fuzzed(db, tmp_path):
    path = keys_file(tmp_path, key_line("fuzz", "read,write", READ_WRITE), key_line("fuzz-admin", "read,write,admin", ADMIN))
    async with persistd_process(tmp_path, auth={"keys_file": str(path)}) as process:
        yield process


async def test_with_a_read_write_key_every_acknowledged_row_is_in_mysql(fuzzed, db, tmp_path):
    """Writes and reads pass; DELETE and cleanup are 403 (no admin scope), so that what the
    run acknowledged stays to be looked for."""
    calls = await fuzz(fuzzed, tmp_path, "read-write", READ_WRITE)
    assert {c["operation"] for c in calls} >= await documented_operations(fuzzed)
    async with httpx.AsyncClient(base_url=fuzzed.url, headers={"X-API-Key": READ_WRITE}) as client:
        assert (await client.post("/api/v1/translation/flush")).status_code == 200
    health = await assert_healthy(fuzzed)

    session_columns = ("session_id", "filename", "file_path", "status", "llm_provider")
    sessions = last_acknowledged(calls, "sessions", session_columns)
    stored = await db.query(f"SELECT {', '.join(session_columns)} FROM translation_sessions")
    assert {row[0]: row for row in stored} == sessions and sessions

    task_columns = ("task_id", "session_id", "batch_id", "sheet_name", "row_index", "column_name", "source_text", "status")
    tasks = last_acknowledged(calls, "tasks", task_columns)
    stored = await db.query(f"SELECT {', '.join(task_columns)} FROM translation_tasks")
    written = {task_id: row for task_id, row in tasks.items() if row[1] in sessions}
    assert {row[0]: row for row in stored} == written and written
    # The rest wait for a session that never came (spec §3.2), up to [buffer] orphan_ttl.
    assert health["buffer"]["tasks_waiting_for_session"] == len(tasks) - len(written)
    await db.assert_counts_exact()
    print(f"{len(calls)} requests; {len(sessions)} sessions and {len(written)} tasks acknowledged and stored,"
          f" {len(tasks) - len(written)} tasks waiting for their session")


async def test_without_credentials_only_health_and_metrics_answer(fuzzed, tmp_path):
    calls = await fuzz(fuzzed, tmp_path, "no-credentials", None)
    operations = await documented_operations(fuzzed)
    assert {c["operation"] for c in calls} >= operations
    answered = {c["operation"] for c in calls if c["operation"] in operations and c["status"] != 401}
    assert answered == OPEN
    await assert_healthy(fuzzed)


async def test_with_an_admin_key_deletes_and_cleanups_conform_too(fuzzed, db, tmp_path):
    calls = await fuzz(fuzzed, tmp_path, "admin", ADMIN)
    deletes = [c for c in calls if c["operation"].startswith("DELETE /api/v1/translation/sessions/{")]
    cleanups = [c for c in calls if c["operation"] == "POST /api/v1/translation/sessions/cleanup"]
    assert {c["status"] for c in deletes} >= {200} and {c["status"] for c in cleanups} >= {200}
    await assert_healthy(fuzzed)
    await db.assert_counts_exact()
