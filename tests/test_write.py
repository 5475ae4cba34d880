"""The write path: spec §3 and DESIGN.md's rules for what a 202 promises.

Behaviour that crosses actors is shown over real HTTP against persistd and MariaDB; the
buffer's timing is shown on the buffer actor alone, driven through its channels under
trio's autojump clock.
"""

import json
import os
import random
from datetime import datetime, timezone

import msgspec
import pytest
import trio
import trio.testing

from conftest import SESSION_ID, BufferAlone, Raw, make_config, mysql_only, raw_request, running, session, task
from persistd.daemon import (
    RETRY_BASE_S, SNAPSHOT_MAX_ROWS, Admit, Buffer, BufferConfig, Claim, Entry, Drain, Failed, Fatal, Flush,
    FlushWaiter, LetGo, SessionIn, TaskIn, Write, Written, micros,
)
from persistd.mysql import upsert
from persistd.storage import TASKS

SESSIONS_URL = "/api/v1/translation/sessions/batch"
TASKS_URL = "/api/v1/translation/tasks/batch"


async def stored_task(db, task_id):
    rows = await db.query(
        "SELECT status, target_text, confidence, retry_count, context, created_at, updated_at"
        " FROM translation_tasks WHERE task_id = %s", task_id)
    return rows[0] if rows else None


# ── acknowledgement ──────────────────────────────────────────────────────────────────


async def test_batch_is_acknowledged_before_anything_is_written(db, tmp_path):
    """202 {"status":"accepted","count":N,"timestamp"} comes back while the rows are
    still only in the buffer; /flush puts them in the database."""
    # Neither flush_interval nor flush_rows may start a flush before /flush does.
    async with running(make_config(tmp_path, buffer={"flush_interval": 30, "flush_rows": 100_000})) as d:
        r = await d.post(SESSIONS_URL, {"sessions": [session()]})
        assert r.status_code == 202
        r = await d.post(TASKS_URL, {"tasks": [task(f"t{i}") for i in range(1000)]})
        assert r.status_code == 202
        body = r.json()
        assert body["status"] == "accepted" and body["count"] == 1000
        assert body["timestamp"].endswith("Z")
        datetime.fromisoformat(body["timestamp"])
        assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((0,),)
        flushed = await d.flush()
        assert flushed["status"] == "flushed"
        assert (flushed["sessions_written"], flushed["tasks_written"]) == (1, 1000)
        assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((1000,),)


# ── validation at the door ───────────────────────────────────────────────────────────

CJK_OVER_TEXT = "译" * 21846  # 65,538 UTF-8 bytes in 21,846 characters

BAD_TASK_FIELDS = [
    ("task_id", "x" * 65),
    ("task_id", "task 1"),
    ("task_id", ""),
    ("session_id", "s" * 37),
    ("sheet_name", "s" * 256),
    ("batch_id", "b" * 65),
    ("source_text", CJK_OVER_TEXT),
    ("target_text", "a" * 65536),
    ("row_index", -1),
    ("row_index", 2**31),
    ("row_index", "10"),
    ("row_index", 1.5),
    ("retry_count", -3),
    ("duration_ms", 2**31),
    ("confidence", 1.01),
    ("confidence", -0.1),
    ("confidence", "high"),
    ("status", "done"),
    ("status", None),
    ("start_time", "yesterday"),
    ("start_time", "2025-09-30"),
    ("end_time", "2040-01-01T00:00:00Z"),
    ("end_time", "1969-12-31T23:59:59Z"),
    ("context", 42),
    ("unknown_field", 1),
]


@pytest.mark.parametrize(("field", "value"), BAD_TASK_FIELDS)
async def test_task_the_database_could_refuse_is_422(daemon, db, field, value):
    """A value MySQL would refuse is refused at the door, in DESIGN.md's error format,
    naming the row and field; the rest of the batch is not kept either."""
    rows = [task(f"t{i}") for i in range(5)]
    rows[3][field] = value
    r = await daemon.post(TASKS_URL, {"tasks": rows})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error_code"] == "VALIDATION_ERROR"
    assert isinstance(body["detail"], str)
    assert [e["field"] for e in body["errors"]] == [f"tasks[3].{field}"]
    assert body["errors"][0]["message"]
    await daemon.post(SESSIONS_URL, {"sessions": [session()]})
    await daemon.flush()
    assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((0,),)


BAD_SESSION_FIELDS = [
    ("session_id", "s" * 37),
    ("filename", "f" * 256),
    ("file_path", "p" * 513),
    ("llm_provider", "x" * 51),
    ("status", "paused"),
    ("total_tasks", -1),
    ("completed_tasks", 2**31),
    ("failed_tasks", True),
    ("game_info", "not an object"),
    ("game_info", {"deep": json.loads("[" * 31 + "]" * 31)}),
    ("metadata", {"blob": "x" * 70000}),
]


@pytest.mark.parametrize(("field", "value"), BAD_SESSION_FIELDS)
async def test_session_the_database_could_refuse_is_422(daemon, db, field, value):
    rows = [session(f"s{i}") for i in range(3)]
    rows[1][field] = value
    r = await daemon.post(SESSIONS_URL, {"sessions": rows})
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == [f"sessions[1].{field}"]
    await daemon.flush()
    assert await db.query("SELECT COUNT(*) FROM translation_sessions") == ((0,),)


async def test_every_offending_row_and_field_is_listed(daemon):
    rows = [task(f"t{i}") for i in range(6)]
    rows[0]["confidence"] = 2
    rows[0]["status"] = "nope"
    del rows[2]["source_text"]
    rows[5] = "not a row"
    r = await daemon.post(TASKS_URL, {"tasks": rows})
    assert r.status_code == 422
    assert sorted(e["field"] for e in r.json()["errors"]) == [
        "tasks[0].confidence", "tasks[0].status", "tasks[2].source_text", "tasks[5]"]


async def test_deepest_json_the_database_accepts_is_accepted(daemon, db):
    """31 levels is MariaDB's limit for JSON columns; exactly that is still accepted."""
    deep = json.loads("[" * 30 + "]" * 30)
    r = await daemon.post(SESSIONS_URL, {"sessions": [session(game_info={"levels": deep})]})
    assert r.status_code == 202, r.text
    await daemon.flush()
    assert await db.query("SELECT COUNT(*) FROM translation_sessions") == ((1,),)


async def test_batch_size_limits(daemon):
    r = await daemon.post(TASKS_URL, {"tasks": [task(f"t{i}") for i in range(1001)]})
    assert r.status_code == 422
    assert r.json()["error_code"] == "BATCH_TOO_LARGE"
    assert r.json()["errors"][0]["field"] == "tasks"
    r = await daemon.post(TASKS_URL, {"tasks": []})
    assert r.status_code == 422
    assert r.json()["error_code"] == "VALIDATION_ERROR"
    r = await daemon.post(SESSIONS_URL, {"sessions": [session(f"s{i}") for i in range(1000)]})
    assert r.status_code == 202


@pytest.mark.parametrize(("body", "status", "code"), [
    (b'{"tasks": [', 400, "INVALID_JSON"),
    (b"\xff\xfe", 400, "INVALID_JSON"),
    (b'{"tasks": [{"task_id": "\\ud800"}]}', 400, "INVALID_JSON"),
    (b"", 400, "INVALID_JSON"),
    (b"[1,", 400, "INVALID_JSON"),
    (b'{"tasks": [{"task_id": 1,', 400, "INVALID_JSON"),
    (b"[]", 422, "VALIDATION_ERROR"),
    (b'{"task": []}', 422, "VALIDATION_ERROR"),
    (b'{"tasks": {}}', 422, "VALIDATION_ERROR"),
])
async def test_malformed_bodies(daemon, body, status, code):
    r = await daemon.client.post(TASKS_URL, content=body)
    assert r.status_code == status
    assert r.json()["error_code"] == code
    assert set(r.json()) == {"detail", "error_code", "errors"}


async def test_body_over_the_limit_is_413(db, tmp_path):
    async with running(make_config(tmp_path, server={"max_body_bytes": 4096})) as d:
        r = await d.post(TASKS_URL, {"tasks": [task(f"t{i}") for i in range(50)]})
        assert r.status_code == 413
        assert r.json()["error_code"] == "PAYLOAD_TOO_LARGE"


async def test_no_client_input_produces_a_500(daemon):
    """Random damage to valid bodies (bounded, seeded) is answered 202, 400 or 422."""
    rnd = random.Random(1234)
    good = msgspec.json.encode({"tasks": [task(f"t{i}", confidence=0.5, start_time="2025-09-30T10:10:00Z")
                                          for i in range(3)]})
    junk = [b"\x00", b'"', b"{", b"]", b"\\", b"\xe4\xb8", b"1e999", b"-", b"null", b"\\ud800", b",", b":"]
    for _ in range(300):
        body = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            at = rnd.randrange(len(body))
            body[at:at + rnd.randint(0, 3)] = rnd.choice(junk)
        r = await daemon.client.post(TASKS_URL, content=bytes(body))
        assert r.status_code in (202, 400, 422), (r.status_code, bytes(body), r.text)
        assert "Traceback" not in r.text


# ── DESIGN.md's rules, end to end ────────────────────────────────────────────────────


async def test_created_at_is_first_acceptance_and_updated_at_the_latest(daemon, db):
    await daemon.post(SESSIONS_URL, {"sessions": [session()]})
    await daemon.post(TASKS_URL, {"tasks": [task()]})
    await daemon.flush()
    created, updated = (await stored_task(db, "task_001"))[5:]
    assert created == updated
    await trio.sleep(1.1)  # TIMESTAMP columns hold whole seconds
    await daemon.post(TASKS_URL, {"tasks": [task(status="completed")]})
    await daemon.flush()
    created2, updated2 = (await stored_task(db, "task_001"))[5:]
    assert created2 == created
    assert updated2 > updated
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    assert abs((now - updated2).total_seconds()) < 5  # stored as UTC


async def test_last_write_wins_inside_a_batch_and_across_batches(daemon, db):
    await daemon.post(SESSIONS_URL, {"sessions": [session()]})
    await daemon.post(TASKS_URL, {"tasks": [task(status="pending"), task(status="processing")]})
    assert (await stored_task(db, "task_001")) is None
    await daemon.post(TASKS_URL, {"tasks": [task(status="completed", target_text="你好")]})
    await daemon.flush()
    assert (await stored_task(db, "task_001"))[:2] == ("completed", "你好")
    await daemon.post(TASKS_URL, {"tasks": [task(status="failed")]})
    await daemon.flush()
    assert (await stored_task(db, "task_001"))[:2] == ("failed", "你好")


async def test_absent_field_keeps_its_value_and_null_clears_it(daemon, db):
    await daemon.post(SESSIONS_URL, {"sessions": [session(total_tasks=7, metadata={"a": 1})]})
    await daemon.post(TASKS_URL, {"tasks": [task(target_text="你好", confidence=0.95, retry_count=2,
                                                 context="NPC")]})
    await daemon.flush()
    # absent in this update: kept; explicit null: cleared
    await daemon.post(TASKS_URL, {"tasks": [task(status="completed", confidence=None)]})
    await daemon.post(SESSIONS_URL, {"sessions": [session(status="completed", metadata=None)]})
    await daemon.flush()
    status, target, confidence, retries, context = (await stored_task(db, "task_001"))[:5]
    assert (status, target, confidence, retries, context) == ("completed", "你好", None, 2, "NPC")
    assert await db.query("SELECT total_tasks, metadata FROM translation_sessions") == ((7, None),)


async def test_absent_fields_are_kept_across_buffered_updates(daemon, db):
    """Partial updates that meet in the buffer before any flush merge the same way."""
    await daemon.post(SESSIONS_URL, {"sessions": [session()]})
    await daemon.post(TASKS_URL, {"tasks": [task(target_text="a", retry_count=1)]})
    await daemon.post(TASKS_URL, {"tasks": [task(status="processing", retry_count=None)]})
    await daemon.post(TASKS_URL, {"tasks": [task(status="completed", confidence=0.12345)]})
    await daemon.flush()
    status, target, confidence, retries, _ = (await stored_task(db, "task_001"))[:5]
    assert (status, target, retries) == ("completed", "a", None)
    assert float(confidence) == 0.1235  # DECIMAL(5,4), rounded at the door


async def test_the_same_batch_twice_stores_the_same_rows(daemon, db):
    batch = {"tasks": [task(f"t{i}", target_text=f"译文 {i} 😀", confidence=0.5) for i in range(100)]}
    await daemon.post(SESSIONS_URL, {"sessions": [session()]})
    await daemon.post(TASKS_URL, batch)
    await daemon.flush()
    first = await db.query("SELECT task_id, status, target_text, confidence, created_at FROM translation_tasks ORDER BY task_id")
    await daemon.post(TASKS_URL, batch)
    await daemon.flush()
    again = await db.query("SELECT task_id, status, target_text, confidence, created_at FROM translation_tasks ORDER BY task_id")
    assert again == first and len(first) == 100


@pytest.mark.parametrize("bad_id", ["proj/42", ".", "..", "a b", "/", "batch", "cleanup"])
async def test_ids_that_a_url_path_cannot_hold_are_422(daemon, bad_id):
    """An id must be one segment of a URL path: GET, DELETE and restore could never reach
    a row whose id holds a '/' or is '.' or '..', nor one called 'batch' or 'cleanup'
    (/sessions/batch and /sessions/cleanup are routes of their own)."""
    for path, body, field in ((SESSIONS_URL, {"sessions": [session(bad_id)]}, "sessions[0].session_id"),
                              (TASKS_URL, {"tasks": [task(bad_id)]}, "tasks[0].task_id")):
        r = await daemon.post(path, body)
        assert r.status_code == 422, r.text
        assert [e["field"] for e in r.json()["errors"]] == [field]


async def test_whole_numbers_written_as_floats_are_integers(daemon, db):
    """JSON has one number type: 10.0 and 1e3 are the integers a JSON Schema `integer`
    allows. 10.5 is not. The objects game_info and metadata keep what was sent."""
    s = session(total_tasks=100.0, completed_tasks=1e1, game_info={"ratio": 2.5})
    assert (await daemon.post(SESSIONS_URL, {"sessions": [s]})).status_code == 202
    t = task(row_index=10.0, retry_count=0.0, duration_ms=1e3, confidence=1.0)
    assert (await daemon.post(TASKS_URL, {"tasks": [t]})).status_code == 202
    r = await daemon.post(TASKS_URL, {"tasks": [task("t2", row_index=10.5)]})
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["tasks[0].row_index"]
    await daemon.flush()
    assert await db.query("SELECT total_tasks, completed_tasks FROM translation_sessions") == ((100, 10),)
    assert await db.query("SELECT row_index, retry_count, duration_ms FROM translation_tasks") == ((10, 0, 1000),)
    cleanup = await daemon.client.post("/api/v1/translation/sessions/cleanup",
                                       content=b'{"completed_days": 90.0, "dry_run": true}')
    assert cleanup.status_code == 200, cleanup.text


async def test_ids_that_differ_only_in_case_are_different_rows(daemon, db):
    await daemon.post(SESSIONS_URL, {"sessions": [session()]})
    await daemon.post(TASKS_URL, {"tasks": [task("Task_A", status="completed"), task("task_a")]})
    await daemon.flush()
    assert await db.query("SELECT task_id, status FROM translation_tasks ORDER BY status") == (
        ("Task_A", "completed"), ("task_a", "pending"))


async def test_times_are_stored_in_utc_and_naive_times_read_as_utc(daemon, db):
    await daemon.post(SESSIONS_URL, {"sessions": [session()]})
    await daemon.post(TASKS_URL, {"tasks": [task(start_time="2025-09-30T18:10:00+08:00",
                                                 end_time="2025-09-30T10:10:05.900")]})
    await daemon.flush()
    rows = await db.query("SELECT start_time, end_time FROM translation_tasks")
    assert rows == ((datetime(2025, 9, 30, 10, 10), datetime(2025, 9, 30, 10, 10, 5)),)


async def test_tasks_before_their_session_are_held_then_written_after_it(daemon, db):
    """The reference client sends tasks first. They are accepted, held (reported by
    /flush as waiting), and written right after their session arrives."""
    r = await daemon.post(TASKS_URL, {"tasks": [task(f"t{i}") for i in range(10)]})
    assert r.status_code == 202
    flushed = await daemon.flush()
    assert flushed["tasks_written"] == 0
    assert flushed["tasks_waiting_for_session"] == 10
    # updates to held tasks are held with them, and merge
    await daemon.post(TASKS_URL, {"tasks": [task("t0", status="completed")]})
    assert (await daemon.flush())["tasks_waiting_for_session"] == 10
    assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((0,),)
    await daemon.post(SESSIONS_URL, {"sessions": [session()]})
    flushed = await daemon.flush()
    assert (flushed["sessions_written"], flushed["tasks_written"], flushed["tasks_waiting_for_session"]) == (1, 10, 0)
    assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((10,),)
    assert (await stored_task(db, "t0"))[0] == "completed"


async def test_tasks_for_a_session_already_in_the_database_are_not_held(daemon, db):
    await daemon.post(SESSIONS_URL, {"sessions": [session()]})
    await daemon.flush()
    await daemon.post(TASKS_URL, {"tasks": [task()]})
    assert (await daemon.flush())["tasks_written"] == 1


async def test_concurrent_flushes_write_nothing_twice(daemon, db):
    await daemon.post(SESSIONS_URL, {"sessions": [session()]})
    await daemon.post(TASKS_URL, {"tasks": [task(f"t{i}") for i in range(500)]})
    answers = []

    async def flush():
        answers.append(await daemon.flush())

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(flush)
    assert all(a["status"] == "flushed" for a in answers)
    metrics = (await daemon.get("/api/v1/system/metrics")).text
    assert 'persistence_rows_written_total{type="task"} 500.0' in metrics
    assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((500,),)


async def test_rows_of_4_byte_characters_at_every_maximum_are_written(db, tmp_path):
    """80 tasks whose every text column is full of emoji (one character, 4 bytes: 65,532
    bytes a TEXT column, 255 characters a VARCHAR(255)), flushed at once: 21 MB of
    values. MySQL's statements are cut by bytes, under the max_allowed_packet the server
    states (set to 8 MiB here, as on servers with older defaults); cut at 4 Mi characters,
    a statement came to 16.7 MB, the server answered 1153 and hung up, at every retry."""
    emoji, text = "😀", "😀" * 16_383
    if db.backend == "mysql":
        ((packet,),) = await db.query("SELECT @@GLOBAL.max_allowed_packet")
        await db.query("SET GLOBAL max_allowed_packet = 8388608")  # for the connections opened from now on
    try:
        await write_rows_of_4_byte_characters(db, tmp_path, emoji, text)
    finally:
        if db.backend == "mysql":
            await db.query("SET GLOBAL max_allowed_packet = %s", packet)


async def write_rows_of_4_byte_characters(db, tmp_path, emoji: str, text: str) -> None:

    def full(i: int) -> dict:
        return task(f"{emoji * 60}{i:04d}", batch_id=emoji * 64, sheet_name=emoji * 255, column_name=emoji * 255,
                    source_text=text, target_text=text, context=text, error_message=text, status="completed")

    cfg = make_config(tmp_path, buffer={"flush_interval": 30, "flush_rows": 100_000, "flush_timeout": 60})
    async with running(cfg) as d:
        assert (await d.post(SESSIONS_URL, {"sessions": [session(filename=emoji * 255, file_path=emoji * 512,
                                                                  llm_provider=emoji * 50)]})).status_code == 202
        for part in range(2):
            r = await d.post(TASKS_URL, {"tasks": [full(part * 40 + i) for i in range(40)]})
            assert r.status_code == 202, r.text
        assert (await d.flush())["tasks_written"] == 80
    rows = await db.query("SELECT task_id, source_text, error_message, sheet_name FROM translation_tasks ORDER BY task_id")
    assert [r[0] for r in rows] == [f"{emoji * 60}{i:04d}" for i in range(80)]
    assert all(r[1:] == (text, text, emoji * 255) for r in rows)
    await db.assert_counts_exact()


# ── statements ───────────────────────────────────────────────────────────────────────


class Recording:
    """A real connection that also keeps the statements sent through it (reads through a
    cursor, the lock of the stored tasks, are not kept)."""

    def __init__(self, conn):
        self.conn, self.statements = conn, []

    async def query(self, sql):
        self.statements.append(sql.decode() if isinstance(sql, bytes) else sql)
        return await self.conn.query(sql)

    def cursor(self):
        return self.conn.cursor()


@mysql_only
async def test_upserts_are_multi_row_statements_of_at_most_1000_rows(db):
    """Stored tasks are locked first, in one statement; new ones are written by plain
    multi-row INSERTs, stored ones by INSERT ... ON DUPLICATE KEY UPDATE between their
    count-out and count-in: 1000 rows a statement at most."""
    await db.query("INSERT INTO translation_sessions (session_id, filename, file_path, llm_provider)"
                   " VALUES (%s, 'f', 'p', 'openai')", SESSION_ID)
    at = datetime(2025, 9, 30, 10, 0, tzinfo=timezone.utc)
    async with db.store.db.connection() as conn:
        new = Recording(conn)  # tasks not stored yet: an INSERT, then their count from the values
        await upsert(new, TASKS, [Entry(row, at, at, 1, version=1) for row in task_rows(2500)])
        stored = Recording(conn)  # stored: counted out, upserted, counted in
        await upsert(stored, TASKS, [Entry(row, at, at, 2, version=2) for row in task_rows(2500, status="completed")])
    assert [s.count("),(") + 1 for s in new.statements[0::2]] == [1000, 1000, 500]
    assert all(s.startswith("INSERT INTO translation_tasks") and "ON DUPLICATE" not in s for s in new.statements[0::2])
    assert all(s.startswith("INSERT INTO task_counts") for s in new.statements[1::2])
    assert [s.count("),(") + 1 for s in stored.statements[1::3]] == [1000, 1000, 500]
    assert all(s.startswith("INSERT INTO translation_tasks") and "ON DUPLICATE KEY UPDATE" in s
               for s in stored.statements[1::3])
    assert all(s.startswith("INSERT INTO task_counts") for i, s in enumerate(stored.statements) if i % 3 != 1)
    assert await db.query("SELECT COUNT(*) FROM translation_tasks WHERE status = 'completed'") == ((2500,),)
    await db.assert_counts_exact()


# ── task_counts ──────────────────────────────────────────────────────────────────────


async def test_task_counts_follow_new_rows_status_changes_partial_updates_and_moves(daemon, db):
    """task_counts (the source of list totals and stats) is what a recount of the tasks
    gives after every flush: new tasks, status changes, fields left out (kept) or null
    (cleared), a task moved to another session, a repeat, a rewrite to the same state."""
    await daemon.post(SESSIONS_URL, {"sessions": [session("A"), session("B")]})
    await daemon.post(TASKS_URL, {"tasks": [task(f"t{i}", "A", duration_ms=100 * i if i % 2 else None)
                                            for i in range(10)]})
    await daemon.flush()
    await db.assert_counts_exact()
    await daemon.post(TASKS_URL, {"tasks": [
        task("t0", "A", status="completed", duration_ms=500),
        task("t1", "A", status="failed"),  # keeps duration 100
        task("t3", "A", status="completed"),  # keeps duration 300
        task("t4", "B", status="processing"),  # moves to B
        task("t5", "A", status="completed", duration_ms=None),  # clears 500
        task("t6", "A"),  # as it was
        task("t10", "B", status="completed", duration_ms=7)]})
    await daemon.post(TASKS_URL, {"tasks": [task("t0", "A", status="completed", duration_ms=900)]})
    await daemon.flush()
    await db.assert_counts_exact()
    r = await daemon.get("/api/v1/translation/tasks", params={"session_id": "A", "status": "completed"})
    assert r.json()["total"] == 3
    ((n,),) = await db.query("SELECT SUM(tasks) FROM task_counts WHERE session_id = 'B'")
    assert n == 2


async def test_a_start_counts_the_tasks_when_task_counts_is_empty_and_trusts_it_otherwise(db, tmp_path, caplog):
    """A database from before task_counts, or one whose counts an operator emptied, is
    counted at start (before the first write); counts that exist are used as they are, so
    a start does not read every task."""
    caplog.set_level("INFO", logger="persistd")
    await db.query("INSERT INTO translation_sessions (session_id, filename, file_path, llm_provider)"
                   " VALUES ('A', 'f', 'p', 'openai')")
    await db.query("INSERT INTO translation_tasks (task_id, session_id, batch_id, sheet_name, row_index,"
                   " column_name, source_text, status) VALUES ('x', 'A', 'b', 's', 0, 'c', 't', 'failed')")
    await db.query("DELETE FROM task_counts")  # (SQLite's triggers counted 'x')
    async with running(make_config(tmp_path)) as d:
        await d.post(SESSIONS_URL, {"sessions": [session("B")]})
        await d.flush()  # a job for the flusher, which connects (and counts) before it writes
        await db.assert_counts_exact()
        assert (await d.get("/api/v1/translation/tasks")).json()["total"] == 1
    assert sum("task_counts recounted" in r.message for r in caplog.records) == 1
    await db.query("INSERT INTO translation_tasks (task_id, session_id, batch_id, sheet_name, row_index,"
                   " column_name, source_text, status) VALUES ('y', 'A', 'b', 's', 1, 'c', 't', 'failed')")
    caplog.clear()
    async with running(make_config(tmp_path)) as d:
        await d.post(SESSIONS_URL, {"sessions": [session("B")]})
        await d.flush()
        # 'y' came behind persistd's back: SQLite's triggers count it, MySQL's counts are persistd's
        assert (await d.get("/api/v1/translation/tasks")).json()["total"] == (2 if db.backend == "sqlite" else 1)
    assert not any("task_counts recounted" in r.message for r in caplog.records)


# ── the buffer actor's timing, alone, under the autojump clock ───────────────────────

AT = datetime(2025, 9, 30, 10, 0, tzinfo=timezone.utc)
AT_US = micros(AT)


def task_rows(n, **fields):
    return [msgspec.convert(task(f"t{i}", **fields), TaskIn) for i in range(n)]


@pytest.fixture
async def harness(tmp_path, nursery):
    return BufferAlone(tmp_path).start(nursery)


async def test_rows_are_flushed_once_flush_interval_elapses(harness, autojump_clock):
    start = trio.current_time()
    await harness.accept("tasks", task_rows(10), AT)
    snapshot, _ = await harness.jobs.receive()
    assert trio.current_time() - start == pytest.approx(2.0)
    assert len(snapshot.tasks) == 10


async def test_rows_are_flushed_as_soon_as_flush_rows_wait(harness, autojump_clock):
    start = trio.current_time()
    await harness.accept("tasks", task_rows(999), AT)
    with trio.move_on_after(1):
        await harness.jobs.receive()
        pytest.fail("flushed before flush_rows or flush_interval")
    await harness.accept("tasks", [msgspec.convert(task("t-last"), TaskIn)], AT)
    snapshot, _ = await harness.jobs.receive()
    assert trio.current_time() - start == pytest.approx(1.0)
    assert len(snapshot.tasks) == 1000


async def test_buffer_coalesces_by_primary_key(harness, autojump_clock):
    for status in ("pending", "processing", "completed"):
        await harness.accept("tasks", task_rows(300, status=status), AT)
    snapshot, _ = await harness.jobs.receive()
    assert len(snapshot.tasks) == 300
    assert {e.row.status for e in snapshot.tasks.values()} == {"completed"}


async def test_failed_flush_keeps_every_row_and_retries_with_growing_backoff(harness, autojump_clock):
    await harness.accept("tasks", task_rows(5), AT)
    first, _ = await harness.jobs.receive()
    delays = []
    for _ in range(4):
        failed_at = trio.current_time()
        await harness.to_buffer.send(Failed("OperationalError 2003", True))
        again, _ = await harness.jobs.receive()
        assert again is first  # the same rows, retried as they were
        delays.append(trio.current_time() - failed_at)
    assert delays[0] >= RETRY_BASE_S * 0.5
    assert delays[3] > delays[0]
    assert all(d <= harness.cfg.buffer.retry_max for d in delays)


async def test_newer_writes_win_over_a_snapshot_that_failed_and_was_retried(harness, autojump_clock):
    """Last write wins across failed and retried flushes: the failed snapshot is
    retried before anything newer, and the newer state follows it."""
    await harness.accept("tasks", task_rows(1, status="processing"), AT)
    old, _ = await harness.jobs.receive()
    await harness.accept("tasks", task_rows(1, status="completed", target_text="done"), AT)
    await harness.to_buffer.send(Failed("lost connection", True))
    retried, _ = await harness.jobs.receive()
    assert retried is old
    await harness.to_buffer.send(Written(0, 1, [], []))
    newer, _ = await harness.jobs.receive()
    assert newer.tasks["t0"].row.status == "completed"


async def test_flush_request_is_answered_once_its_rows_are_written(harness, autojump_clock):
    await harness.accept("tasks", task_rows(3), AT)
    reply, replies = trio.open_memory_channel(1)
    await harness.to_buffer.send(Flush(FlushWaiter(reply)))
    snapshot, _ = await harness.jobs.receive()  # asked for: no waiting for flush_interval
    assert trio.current_time() < 1
    await harness.to_buffer.send(Written(0, 3, [], []))
    waiter = await replies.receive()
    assert waiter.tasks_written == 3


async def test_drain_writes_the_last_rows_then_closes_the_flusher(harness, autojump_clock):
    await harness.accept("tasks", task_rows(3), AT)
    await harness.to_buffer.send(Drain())
    snapshot, _ = await harness.jobs.receive()
    assert len(snapshot.tasks) == 3
    await harness.to_buffer.send(Written(0, 3, [], []))
    with pytest.raises(trio.EndOfChannel):
        await harness.jobs.receive()


async def test_drain_gives_up_at_shutdown_timeout_into_the_dead_letter_file(tmp_path, nursery, autojump_clock):
    h = BufferAlone(tmp_path, shutdown_timeout=5).start(nursery)
    await h.accept("tasks", task_rows(3), AT)
    await h.to_buffer.send(Drain())
    while True:
        try:
            _, attempt = await h.jobs.receive()
        except trio.EndOfChannel:
            break
        assert attempt.deadline <= 5 + 1e-9
        await h.to_buffer.send(Failed("server gone", True))
    assert trio.current_time() == pytest.approx(5, abs=0.5)
    lines = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert sorted(line["row"]["task_id"] for line in lines) == ["t0", "t1", "t2"]
    assert {line["reason"] for line in lines} == {"database_unreachable_at_shutdown"}


async def test_drain_shortens_an_attempt_already_running_to_shutdown_timeout(tmp_path, nursery, autojump_clock):
    h = BufferAlone(tmp_path, shutdown_timeout=5).start(nursery)
    await h.accept("tasks", task_rows(3), AT)
    _, attempt = await h.jobs.receive()
    assert attempt.deadline > trio.current_time() + 20  # write_timeout
    await h.to_buffer.send(Drain())
    await trio.sleep(0.1)
    assert attempt.deadline == pytest.approx(trio.current_time() + 5, abs=0.2)
    with attempt:  # what the flusher does: it gives up at the deadline...
        await trio.sleep_forever()
    await h.to_buffer.send(Failed("gave up", True))  # ...and says so
    with pytest.raises(trio.EndOfChannel):
        await h.jobs.receive()
    lines = (tmp_path / "dead.jsonl").read_text().splitlines()
    assert len(lines) == 3


async def test_a_flush_refused_for_good_stops_the_buffer_and_dead_letters_its_rows_without_a_journal(
        tmp_path, autojump_clock):
    """Failed with transient=False (no privilege, a column gone): retrying cannot help, so
    the buffer actor raises Fatal, and stops the daemon; without a journal its rows go to
    the dead-letter file first."""
    h = BufferAlone(tmp_path)
    with pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            h.start(nursery)
            await h.accept("tasks", task_rows(3), AT)
            await h.accept("tasks", task_rows(2, status="completed"), AT)
            await h.jobs.receive()
            await h.to_buffer.send(Failed("OperationalError: (1142, 'INSERT command denied')", False))
            await trio.sleep_forever()
    [fatal] = raised.value.exceptions
    assert isinstance(fatal, Fatal) and "1142" in str(fatal) and "dead.jsonl" in str(fatal)
    lines = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert sorted((line["row"]["task_id"], line["row"]["status"]) for line in lines) == [
        ("t0", "completed"), ("t1", "completed"), ("t2", "pending")]
    assert {line["reason"] for line in lines} == {"database_refused_writes"}


async def test_held_tasks_expire_into_the_dead_letter_file_after_orphan_ttl(tmp_path, nursery, autojump_clock):
    """Held tasks go with a snapshot every flush_interval, to find their session written
    meanwhile (by another instance); here it never is."""
    h = BufferAlone(tmp_path, orphan_ttl=100).start(nursery)

    async def flusher_without_their_session():
        async for job in h.jobs:
            await h.to_buffer.send(Written(0, 0, list(job.snapshot.tasks.values()), []))

    nursery.start_soon(flusher_without_their_session)
    await h.accept("tasks", task_rows(2), AT)
    await trio.sleep(99)
    assert not (tmp_path / "dead.jsonl").exists()
    await trio.sleep(12)
    for _ in range(1000):  # written by a worker thread, in real time, while the clock jumps
        if (tmp_path / "dead.jsonl").exists() and (tmp_path / "dead.jsonl").stat().st_size:
            break
        await trio.sleep(1)
    lines = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert [(line["reason"], line["row"]["task_id"]) for line in lines] == [
        ("orphan_ttl_expired", "t0"), ("orphan_ttl_expired", "t1")]


async def test_a_flush_tries_held_tasks_again_after_it_was_asked(tmp_path, nursery, autojump_clock):
    """Held tasks go with a snapshot when /flush is asked (another instance may have written
    their session since): the answer waits for a try that began after the call, not for one
    already in flight when it came."""
    h = BufferAlone(tmp_path, flush_interval=2).start(nursery)
    await h.accept("tasks", task_rows(2), AT)
    first = await h.jobs.receive()
    await h.to_buffer.send(Written(0, 0, list(first.snapshot.tasks.values()), []))  # their session is missing
    in_flight = await h.jobs.receive()  # tried again after flush_interval
    assert set(in_flight.snapshot.tasks) == {"t0", "t1"}
    reply, answered = trio.open_memory_channel(1)
    await h.to_buffer.send(Flush(FlushWaiter(reply)))
    await h.to_buffer.send(Written(0, 0, list(in_flight.snapshot.tasks.values()), []))  # begun before the call
    again = await h.jobs.receive()  # at once, not after flush_interval
    assert trio.current_time() < 2 * 2 + 0.5 and set(again.snapshot.tasks) == {"t0", "t1"}
    with pytest.raises(trio.WouldBlock):
        answered.receive_nowait()
    await h.to_buffer.send(Written(0, 2, [], []))  # the session is in the database now
    waiter = await answered.receive()
    assert waiter.tasks_written == 2


async def test_a_dead_letter_write_that_blocks_leaves_the_event_loop_answering(db, tmp_path):
    """The dead-letter file is written in a worker thread: here it is a FIFO that nobody
    reads yet, so the write blocks; meanwhile the daemon answers what needs no buffer (a
    list, the document) at once. Once a reader comes, the expired rows are in it."""
    (tmp_path / "state").mkdir()
    os.mkfifo(tmp_path / "state" / "dead-letter.jsonl")
    async with running(make_config(tmp_path, buffer={"orphan_ttl": 0.5})) as d:
        assert (await d.post(TASKS_URL, {"tasks": [task("orphan", session_id="never")]})).status_code == 202
        await trio.sleep(1.0)  # expired; the buffer actor waits on the FIFO
        for path in ("/api/v1/translation/sessions", "/openapi.json"):
            with trio.fail_after(1):
                assert (await d.get(path)).status_code == 200, path
        lines = await trio.to_thread.run_sync((tmp_path / "state" / "dead-letter.jsonl").read_bytes)
    [line] = [json.loads(line) for line in lines.splitlines()]
    assert (line["reason"], line["row"]["task_id"]) == ("orphan_ttl_expired", "orphan")


# ── the buffer's merge rules, pure ───────────────────────────────────────────────────


def test_held_tasks_move_to_pending_when_their_session_arrives():
    buf = Buffer(BufferConfig())
    buf.write("tasks", task_rows(2), AT_US, 0.0, 0)
    snapshot = buf.take_snapshot(10.0)
    assert snapshot is not None
    buf.written(0, 0, list(snapshot.tasks.values()), 10.0)
    assert buf.held_count() == 2 and not buf.tasks
    buf.write("sessions", [msgspec.convert(session(), SessionIn)], AT_US, 11.0, 0)
    assert buf.held_count() == 0 and set(buf.tasks) == {"t0", "t1"}


def test_held_tasks_tried_again_beyond_one_snapshot_leave_the_rest_due_within_flush_interval():
    """6,000 held tasks go with the next snapshot after flush_interval: 5,000 in it
    (SNAPSHOT_MAX_ROWS), the other 1,000 pending and due flush_interval later."""
    buf = Buffer(BufferConfig(flush_interval=2, flush_rows=100_000, max_rows=100_000))
    buf.write("tasks", task_rows(SNAPSHOT_MAX_ROWS + 1000), AT_US, 0.0, 0)
    for now in (2.0, 2.0):  # each snapshot comes back held: the session is not in the database
        snapshot = buf.take_snapshot(now)
        buf.written(0, 0, list(snapshot.tasks.values()), now)
    assert buf.held_count() == SNAPSHOT_MAX_ROWS + 1000 and buf.take_snapshot(3.9) is None
    tried = buf.take_snapshot(4.0)
    rest = set(buf.tasks)
    assert len(tried.tasks) == SNAPSHOT_MAX_ROWS and len(rest) == 1000
    buf.written(0, SNAPSHOT_MAX_ROWS, [], 4.0)  # another instance wrote their session meanwhile
    assert buf.take_snapshot(5.9) is None
    assert set(buf.take_snapshot(6.0).tasks) == rest


def test_buffer_refuses_what_would_pass_max_rows():
    buf = Buffer(BufferConfig(max_rows=1000))
    assert buf.has_room(1000, 0)
    buf.write("tasks", task_rows(600), AT_US, 0.0, 0)
    assert not buf.has_room(401, 0)
    assert buf.has_room(400, 0)  # 600 rows are below the low watermark (80 %)


def test_once_full_the_buffer_refuses_until_below_the_low_watermark():
    """Clients back off instead of squeezing a batch into every gap a flush opens, and a
    buffer over its limit flushes at once instead of after flush_interval."""
    buf = Buffer(BufferConfig(max_rows=1000))
    buf.write("tasks", task_rows(900), AT_US, 0.0, 0)
    assert not buf.has_room(101, 0)
    assert not buf.has_room(50, 0)  # 950 would fit, but 900 is above 800
    snapshot = buf.take_snapshot(0.0)  # due now, though flush_interval has not passed
    assert snapshot is not None and len(snapshot.tasks) == 900
    buf.written(0, 900, [], 0.0)
    assert buf.has_room(50, 0)
    assert not buf.refusing


def test_buffered_bytes_are_limited_too():
    buf = Buffer(BufferConfig(max_rows=100_000, max_bytes=2_000_000))
    buf.write("tasks", task_rows(1000), AT_US, 0.0, 1_000_000)
    buf.write("tasks", task_rows(1000), AT_US, 0.0, 1_000_000)  # the same rows again: merged, not added
    assert buf.bytes == 1_000_000
    assert not buf.has_room(1, 1_000_001)
    assert buf.take_snapshot(0.0) is not None  # over the limit: due now
    buf.written(0, 1000, [], 0.0)
    assert buf.bytes == 0 and buf.has_room(1, 1_000_000)


@pytest.mark.parametrize("nasty", [
    "它说：\"Hello\", 'adventurer' \\ \\\\n \0 \n\r\t \x1a 😀 🎮 é ' OR 1=1; --",  # NUL: escaped value by value
    "它说：\"Hello\", 'adventurer' \\ \\\\n \n\r\t\b 😀 é ' OR 1=1; --",  # JSON's escapes as MySQL's
    "form\x0cfeed \\u0041 \\f \x7f \u2028",  # JSON's \f, and \u \f after a backslash: value by value
], ids=["control", "json-escapes", "form-feed"])
async def test_every_character_is_stored_as_sent(daemon, db, nasty):
    """Escaping round-trips: quotes, backslashes, NUL, control characters, CJK, emoji."""
    await daemon.post(SESSIONS_URL, {"sessions": [session(game_info={"name": nasty, nasty: [nasty]})]})
    await daemon.post(TASKS_URL, {"tasks": [task(source_text=nasty, target_text=nasty, context=nasty,
                                                 error_message=nasty, sheet_name=nasty[:50])]})
    await daemon.flush()
    rows = await db.query("SELECT source_text, target_text, context, error_message, sheet_name FROM translation_tasks")
    assert rows == ((nasty, nasty, nasty, nasty, nasty[:50]),)
    (game_info,), = await db.query("SELECT game_info FROM translation_sessions")
    assert json.loads(game_info) == {"name": nasty, nasty: [nasty]}


def test_a_flush_takes_at_most_snapshot_max_rows_tasks_and_flush_waits_for_all():
    buf = Buffer(BufferConfig(max_rows=100_000))
    rows = [msgspec.convert(task(f"t{i}"), TaskIn) for i in range(2 * SNAPSHOT_MAX_ROWS + 500)]
    for start in range(0, len(rows), 1000):
        buf.write("tasks", rows[start:start + 1000], AT_US, 0.0, 0)
    waiter = FlushWaiter(trio.open_memory_channel(1)[0])
    assert buf.request_flush(waiter)
    sizes, answered = [], []
    while (snapshot := buf.take_snapshot(0.0)) is not None:
        sizes.append(len(snapshot.tasks))
        answered.append([value for _, value in buf.written(0, len(snapshot.tasks), [], 0.0)])
    assert sizes == [SNAPSHOT_MAX_ROWS, SNAPSHOT_MAX_ROWS, 500]
    assert answered == [[], [], [waiter]]  # /flush is answered when the last part is written
    assert waiter.tasks_written == len(rows)


def test_the_journal_floor_is_the_oldest_write_any_unwritten_row_still_needs():
    """floor() keeps a heap of the seqs that pin rows instead of scanning every row: after any
    mix of writes, flushes (some tasks coming back held), deletes, expiries and held rows
    copied forward, it equals the scan."""
    rng = random.Random(12)
    buf = Buffer(BufferConfig(max_rows=100_000, orphan_ttl=50))
    now = 0.0

    def scanned() -> int:
        groups = [buf.sessions, buf.tasks, *buf.held.values()]
        if buf.in_flight is not None:
            groups += [buf.in_flight.sessions, buf.in_flight.tasks]
        return min((e.first_seq for group in groups for e in group.values()), default=buf.seq + 1)

    for _ in range(400):
        now += 1
        op = rng.random()
        if op < 0.45:
            sid = f"s{rng.randrange(5)}"
            rows = [msgspec.convert(task(f"t{rng.randrange(60)}", sid), TaskIn) for _ in range(rng.randrange(1, 8))]
            buf.write("tasks", rows, AT_US, now, 100 * len(rows))
        elif op < 0.55:
            buf.write("sessions", [msgspec.convert(session(f"s{rng.randrange(5)}"), SessionIn)], AT_US, now, 100)
        elif op < 0.8 and buf.take_snapshot(now + 100) is not None:
            flushed = buf.in_flight
            held = [e for e in flushed.tasks.values() if rng.random() < 0.3]
            buf.written(len(flushed.sessions), len(flushed.tasks) - len(held), held, now)
        elif op < 0.87:
            buf.forget(f"s{rng.randrange(5)}", None)
        elif op < 0.93:
            buf.expire_orphans(now)
        else:
            buf.held_pinning_the_journal()
        assert buf.floor() == scanned()


# ── admission: room before the body is read ──────────────────────────────────────────


async def test_a_batch_that_does_not_fit_waits_for_the_flush_that_makes_room(tmp_path, nursery, autojump_clock):
    h = BufferAlone(tmp_path, max_rows=2000, admission_wait=1.0).start(nursery)
    await h.accept("tasks", task_rows(2000), AT, body=b"x" * 300_000)  # 150 bytes a row: full, flushed now
    await h.jobs.receive()
    reply, replies = trio.open_memory_channel(1)
    asked_at = trio.current_time()
    await h.to_buffer.send(Admit("tasks", 75_000, reply))  # 500 rows, claimed as 666: no room until the flush
    await trio.sleep(0.6)
    with pytest.raises(trio.WouldBlock):
        replies.receive_nowait()
    await h.to_buffer.send(Written(0, 2000, [], []))
    claim = await replies.receive()
    assert isinstance(claim, Claim) and claim.rows == 666  # estimated high, at 3/4 of 150 bytes a row
    assert trio.current_time() - asked_at == pytest.approx(0.6)


async def test_a_batch_still_without_room_after_admission_wait_gets_retry_after_from_the_drain_rate(
        tmp_path, nursery, autojump_clock):
    """1000 rows written in the last 5 s: 200 rows/s. 4000 rows in memory, the low watermark
    at 3200: 800 rows to go, 4 s."""
    h = BufferAlone(tmp_path, max_rows=4000, admission_wait=1.0).start(nursery)
    await h.accept("tasks", task_rows(1000), AT, body=b"x" * 100_000)
    await h.jobs.receive()
    await h.to_buffer.send(Written(0, 1000, [], []))
    for n in range(4):
        await h.accept("tasks", [msgspec.convert(task(f"u{n}-{i}"), TaskIn) for i in range(1000)], AT,
                       body=b"x" * 100_000)
    await h.jobs.receive()  # the flusher takes a job and never answers
    asked_at = trio.current_time()
    assert await h.ask(Admit, "tasks", 100_000) == 4
    assert trio.current_time() - asked_at == pytest.approx(1.0)


async def test_batches_wait_their_turn_and_a_batch_that_gives_up_frees_its_place(tmp_path, nursery, autojump_clock):
    h = BufferAlone(tmp_path, max_rows=2000, admission_wait=5.0).start(nursery)
    await h.accept("tasks", task_rows(2000), AT, body=b"x" * 300_000)
    await h.jobs.receive()
    first, second = (trio.open_memory_channel(1) for _ in range(2))
    await h.to_buffer.send(Admit("tasks", 150_000, first[0]))  # 1000 rows
    await h.to_buffer.send(Admit("tasks", 10_000, second[0]))  # 88 rows: waits its turn all the same
    await trio.sleep(1)
    with pytest.raises(trio.WouldBlock):
        second[1].receive_nowait()
    await h.to_buffer.send(Written(0, 2000, [], []))
    one = await first[1].receive()
    assert isinstance(one, Claim) and one.rows == 1000
    other = await second[1].receive()
    assert isinstance(other, Claim)
    await h.to_buffer.send(LetGo(one))  # its request failed before its rows came: the room is free again
    assert isinstance(await h.ask(Admit, "tasks", 150_000), Claim)


async def test_a_batch_given_room_is_taken_even_while_later_ones_wait(tmp_path, nursery, autojump_clock):
    """850 of 1000 rows: a 100-row batch is given room; a second one must wait, which turns
    the buffer to refusing until it is below 80 %. The first batch's rows are taken all the
    same: their room was held for them."""
    h = BufferAlone(tmp_path, max_rows=1000, flush_rows=100_000, flush_interval=30).start(nursery)
    await h.accept("tasks", task_rows(850), AT, body=b"x" * 127_500)  # 150 bytes a row
    claim = await h.ask(Admit, "tasks", 15_000)
    assert isinstance(claim, Claim) and claim.rows == 133  # 100 rows, estimated high
    waiting, _ = trio.open_memory_channel(1)
    await h.to_buffer.send(Admit("tasks", 15_000, waiting))
    rows = [msgspec.convert(task(f"u{i}"), TaskIn) for i in range(100)]
    assert await h.ask(Write, "tasks", rows, b"x" * 15_000, AT_US, claim) is True


async def test_the_room_of_a_request_that_stopped_waiting_is_not_kept(tmp_path, nursery, autojump_clock):
    """A client that disconnects while its batch waits: the room it is given later goes back."""
    h = BufferAlone(tmp_path, max_rows=2000, admission_wait=5.0).start(nursery)
    await h.accept("tasks", task_rows(2000), AT, body=b"x" * 300_000)
    await h.jobs.receive()
    gone, gone_replies = trio.open_memory_channel(1)
    await h.to_buffer.send(Admit("tasks", 150_000, gone))  # 1000 rows
    await gone_replies.aclose()
    await h.to_buffer.send(Written(0, 2000, [], []))
    asked_at = trio.current_time()
    claims = [await h.ask(Admit, "tasks", 150_000) for _ in range(2)]  # 2000 rows: all the room
    assert all(isinstance(claim, Claim) for claim in claims) and trio.current_time() == asked_at


@pytest.mark.usefixtures("close_raw_clients")
async def test_a_batch_without_room_is_refused_before_its_body_is_read(db, tmp_path):
    """The buffer is full and nothing is written (the flush interval is long, the rows wait
    for a session): a batch gets 503 after admission_wait, on its Content-Length alone, while
    the client has sent only its headers."""
    cfg = make_config(tmp_path, buffer={"max_rows": 1000, "flush_interval": 30, "admission_wait": 0.5})
    async with running(cfg) as d:
        assert (await d.post(TASKS_URL, {"tasks": [task(f"t{i}") for i in range(1000)]})).status_code == 202
        raw = await Raw.open(d)
        started = trio.current_time()
        await raw.send(raw_request("POST", TASKS_URL)[:-2].replace(b"Content-Length: 0", b"Content-Length: 500000")
                       + b"\r\n")
        status, headers, body = await raw.response()
        assert status == 503 and json.loads(body)["error_code"] == "BUFFER_FULL"
        assert headers["retry-after"] == "30" and headers["connection"] == "close"
        assert 0.5 <= trio.current_time() - started < 2
        metrics = (await d.get("/api/v1/system/metrics")).text
        assert "persistence_refused_body_bytes_read_total 0.0" in metrics


async def test_a_waiting_batch_is_taken_once_the_flush_it_caused_makes_room(db, tmp_path):
    cfg = make_config(tmp_path, buffer={"max_rows": 1000, "flush_interval": 30, "flush_rows": 100_000,
                                        "admission_wait": 5})
    async with running(cfg) as d:
        await d.post(SESSIONS_URL, {"sessions": [session()]})
        assert (await d.post(TASKS_URL, {"tasks": [task(f"t{i}") for i in range(999)]})).status_code == 202
        started = trio.current_time()
        assert (await d.post(TASKS_URL, {"tasks": [task(f"u{i}") for i in range(10)]})).status_code == 202
        assert trio.current_time() - started < 5
        metrics = (await d.get("/api/v1/system/metrics")).text
        assert "persistence_batches_refused_total 0.0" in metrics


async def test_batches_are_refused_with_503_and_retry_after_when_the_buffer_is_full(db, tmp_path):
    async with running(make_config(tmp_path, buffer={"max_rows": 1000, "flush_interval": 30})) as d:
        assert (await d.post(TASKS_URL, {"tasks": [task(f"t{i}") for i in range(600)]})).status_code == 202
        r = await d.post(TASKS_URL, {"tasks": [task(f"u{i}") for i in range(400)]})  # counted as 533 until read
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "30"  # nothing written lately: flush_interval
        assert r.json()["error_code"] == "BUFFER_FULL"
        assert (await d.post(TASKS_URL, {"tasks": [task(f"u{i}") for i in range(300)]})).status_code == 202
        health = (await d.get("/health")).json()
        assert health["buffer"]["tasks_count"] == 900 and health["buffer"]["usage_percent"] == 90.0
