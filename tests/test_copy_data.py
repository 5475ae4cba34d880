"""`persistd copy-data FROM_URL TO_URL` (issue 11): every session and task from one backend
to the other, in chunks, through the target's own write; run again after an interruption,
it goes on after the last key the target holds; the counts are checked at the end. Tested
both ways on a data set with every field shape, and cut off with kill -9 and resumed."""

import signal
import sqlite3
import subprocess

import httpx
import msgspec
import pytest
import trio

from conftest import MYSQL_URL, scratch_database, session, task
from persistd.daemon import DatabaseConfig, open_store
from persistd.storage import SESSIONS, TASKS
from processes import PERSISTD, assert_one_line_error, clean_environ, persistd_process, post

SESSIONS_URL = "/api/v1/translation/sessions/batch"
TASKS_URL = "/api/v1/translation/tasks/batch"
LONG = "长" * 21_845  # 65,535 bytes of UTF-8: a TEXT column full


def every_shape() -> tuple[list[dict], list[dict]]:
    """Sessions and tasks with each field absent, null, at its limits, and in every status."""
    sessions = [session("plain"),
                session("full", status="completed", game_info={"name": "RPG", "nested": {"list": [1, 2.5, None, "é"]}},
                        metadata={"emoji": "⚔️", "empty": {}}, total_tasks=2_147_483_647, completed_tasks=0,
                        failed_tasks=7, processing_tasks=None),
                session("Case-Sensitive", status="failed", game_info=None),
                session("case-sensitive", status="cancelled", filename="f" * 255, file_path="p" * 512)]
    tasks = [task("t-min", "plain"),
             task("t-max", "full", status="completed", target_text=LONG, context="c\n\t\"'\\", confidence=1.0,
                  error_message=None, retry_count=2_147_483_647, start_time="1970-01-01T00:00:01Z",
                  end_time="2038-01-19T03:14:07Z", duration_ms=0),
             task("t-zero", "full", status="failed", confidence=0.0, error_message="timeout ⏱", retry_count=0,
                  start_time="2025-09-30T10:10:00+08:00", duration_ms=5000),
             task("T-ZERO", "Case-Sensitive", status="processing", source_text="NUL-free \u0001 \U0001F600", row_index=0),
             task("t-null", "case-sensitive", target_text=None, context=None, confidence=None, start_time=None)]
    tasks += [task(f"bulk-{i:05d}", ("plain", "full")[i % 2], row_index=i, status=("pending", "completed")[i % 2],
                   duration_ms=i % 97 or None, confidence=round(i % 10_000 / 10_000, 4)) for i in range(2600)]
    return sessions, tasks


async def fill(tmp_path, url: str) -> None:
    """The data set written through a persistd process on `url`, as clients write it."""
    sessions, tasks = every_shape()
    (tmp_path / "writer").mkdir()
    # Nothing is written before the /flush, which then writes every row.
    async with persistd_process(tmp_path / "writer", database={"url": url},
                                buffer={"flush_interval": 30.0, "flush_rows": 100_000}) as process:
        async with httpx.AsyncClient(base_url=process.url, timeout=30) as client:
            assert (await post(client, SESSIONS_URL, "sessions", sessions)).status_code == 202
            for i in range(0, len(tasks), 1000):
                assert (await post(client, TASKS_URL, "tasks", tasks[i:i + 1000])).status_code == 202
            assert (await client.post("/api/v1/translation/flush")).json()["tasks_written"] == len(tasks)
        process.signal(signal.SIGTERM)
        await process.wait_exit(30)


async def everything(url: str) -> dict:
    """Every row of both tables, every column, as the API reads them; and the kept counts."""
    store = open_store(msgspec.convert({"url": url}, DatabaseConfig))
    try:
        rows = {}
        for table in (SESSIONS, TASKS):
            after, rows[table.name] = None, []
            while page := await store.rows_after(table, after, 1000):
                rows[table.name] += page
                after = page[-1][table.key]
        stats = await store.stats()
        return {**rows, "counts": (stats.sessions, stats.tasks, stats.performance)}
    finally:
        store.close()


async def copy(from_url: str, to_url: str) -> subprocess.CompletedProcess:
    return await trio.run_process([*PERSISTD, "copy-data", from_url, to_url], capture_stdout=True, capture_stderr=True,
                                  check=False, env=clean_environ())


def backends(tmp_path, mysql_url: str) -> dict[str, str]:
    return {"sqlite": f"sqlite:///{tmp_path / 'from.db'}", "sqlite-2": f"sqlite:///{tmp_path / 'to.db'}",
            "mysql": mysql_url}


@pytest.mark.parametrize(("source", "target"), [
    ("sqlite", "sqlite-2"),
    pytest.param("sqlite", "mysql", marks=pytest.mark.mysql),  # the path a growing deployment takes
    pytest.param("mysql", "sqlite", marks=pytest.mark.mysql),
])
async def test_copy_data_copies_every_field_shape_both_ways(tmp_path, source, target):
    async with scratch_database_or_none("persistd_test_copy", "mysql" in (source, target)) as mysql_url:
        urls = backends(tmp_path, mysql_url)
        await fill(tmp_path, urls[source])
        proc = await copy(urls[source], urls[target])
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stderr.decode().strip().endswith("done: the counts match")
        copied = await everything(urls[target])
        assert copied == await everything(urls[source])
        assert len(copied["translation_tasks"]) == 2605
        assert copied["counts"][1]["total"] == 2605  # the target's kept counts, as its stats read them


@pytest.mark.parametrize("target", ["sqlite-2", pytest.param("mysql", marks=pytest.mark.mysql)])
async def test_a_copy_cut_off_by_kill_9_goes_on_where_it_stopped(tmp_path, target):
    async with scratch_database_or_none("persistd_test_copy", target == "mysql") as mysql_url:
        urls = backends(tmp_path, mysql_url)
        await fill(tmp_path, urls["sqlite"])
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(lambda task_status: trio.run_process(
                [*PERSISTD, "copy-data", urls["sqlite"], urls[target]], stderr=subprocess.PIPE, check=False,
                env=clean_environ(), task_status=task_status))
            seen = b""
            while b"translation_tasks: 1000 rows copied" not in seen:
                seen += await proc.stderr.receive_some()
            proc.send_signal(signal.SIGKILL)
        partial = await everything(urls[target])
        assert 0 < len(partial["translation_tasks"]) < 2605
        again = await copy(urls["sqlite"], urls[target])
        assert again.returncode == 0, again.stderr.decode()
        assert "continuing after" in again.stderr.decode()
        assert await everything(urls[target]) == await everything(urls["sqlite"])


async def test_a_target_that_holds_rows_of_its_own_is_refused(tmp_path):
    urls = backends(tmp_path, "")
    await fill(tmp_path, urls["sqlite"])
    store = open_store(msgspec.convert({"url": urls["sqlite-2"]}, DatabaseConfig))
    await store.open()
    store.close()
    (tmp_path / "other").mkdir()
    async with persistd_process(tmp_path / "other", database={"url": urls["sqlite-2"]}) as process:
        async with httpx.AsyncClient(base_url=process.url) as client:
            assert (await post(client, SESSIONS_URL, "sessions", [session("zzz-other")])).status_code == 202
            await client.post("/api/v1/translation/flush")
    proc = await copy(urls["sqlite"], urls["sqlite-2"])
    assert proc.returncode == 1 and "holds rows of its own" in proc.stderr.decode().splitlines()[-1]


async def test_a_source_row_persistd_would_refuse_stops_the_copy_with_one_line(tmp_path):
    """A row written by other means that persistd's door refuses (here an id with a space)
    stops the copy before it, with one line and exit 1, not a traceback."""
    urls = backends(tmp_path, "")
    store = open_store(msgspec.convert({"url": urls["sqlite"]}, DatabaseConfig))
    await store.open()
    store.close()
    with sqlite3.connect(tmp_path / "from.db") as conn:
        conn.execute("INSERT INTO translation_sessions (session_id, filename, file_path, status, llm_provider)"
                     " VALUES ('a b', 'f', 'p', 'pending', 'x')")
    proc = await copy(urls["sqlite"], urls["sqlite-2"])
    assert_one_line_error(proc, 1, "translation_sessions", "refuses")


def scratch_database_or_none(name: str, wanted: bool):
    """A scratch MySQL database when the test uses one."""
    return scratch_database(name) if wanted else _none()


class _none:
    async def __aenter__(self) -> str:
        return MYSQL_URL

    async def __aexit__(self, *exc) -> None:
        return None
