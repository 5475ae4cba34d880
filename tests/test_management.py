"""Management: spec §6 (delete, cleanup, stats) and the janitor actor.

Old rows are inserted straight into MariaDB with their updated_at in the past (TIMESTAMP
columns, UTC); rows still in the buffer are sent over HTTP to a daemon that flushes only
every 30 s. How DELETE meets a flush in flight is shown on the buffer actor alone, under
trio's autojump clock.
"""

import time
from datetime import datetime, timedelta, timezone

import msgspec
import pytest
import trio

from conftest import SESSION_ID, BufferAlone, make_config, mysql_only, running, session, task
from persistd.daemon import (
    Forget, Status, Written,
)
from persistd.mysql import delete_tasks
from persistd.storage import DELETE_CHUNK_ROWS, reconcile_slice
from proxy import database_outage

SESSIONS = "/api/v1/translation/sessions"
TASKS = "/api/v1/translation/tasks"
CLEANUP = "/api/v1/translation/sessions/cleanup"
STATS = "/api/v1/translation/stats"
SESSIONS_BATCH = "/api/v1/translation/sessions/batch"
TASKS_BATCH = "/api/v1/translation/tasks/batch"
BASE = datetime(2025, 9, 30, 10, 0, 0)  # naive UTC


def ago(days: float) -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0) - timedelta(days=days)


def srow(session_id, status="processing", created_at=BASE, updated_at=None, **fields):
    return {"session_id": session_id, "filename": f"{session_id}.xlsx", "file_path": f"/uploads/{session_id}.xlsx",
            "status": status, "llm_provider": "openai", "created_at": created_at,
            "updated_at": updated_at or created_at, **fields}


def trow(task_id, session_id=SESSION_ID, status="pending", **fields):
    return {"task_id": task_id, "session_id": session_id, "batch_id": "batch_001", "sheet_name": "Dialogue",
            "row_index": 0, "column_name": "Text", "source_text": "Hello", "status": status,
            "duration_ms": None, **fields}


async def session_ids(db) -> set[str]:
    return {sid for (sid,) in await db.query("SELECT session_id FROM translation_sessions")}


async def task_count(db, session_id=None) -> int:
    if session_id is None:
        ((n,),) = await db.query("SELECT COUNT(*) FROM translation_tasks")
    else:
        ((n,),) = await db.query("SELECT COUNT(*) FROM translation_tasks WHERE session_id = %s", session_id)
    return n


# ── §6.1 DELETE ──────────────────────────────────────────────────────────────────────


async def test_delete_cascades_to_the_tasks_and_reports_how_many(daemon, db):
    """DELETE answers {"status":"deleted","session_id","deleted_tasks"}; the session and its
    tasks are gone from MySQL, other sessions are untouched, and the reads say 404."""
    await daemon.post(SESSIONS_BATCH, {"sessions": [session(), session("other")]})
    await daemon.post(TASKS_BATCH, {"tasks": [task(f"t{i}") for i in range(5)] + [task("o1", session_id="other")]})
    await daemon.flush()
    r = await daemon.client.delete(f"{SESSIONS}/{SESSION_ID}")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "deleted", "session_id": SESSION_ID, "deleted_tasks": 5}
    assert await session_ids(db) == {"other"}
    assert (await task_count(db, SESSION_ID), await task_count(db, "other")) == (0, 1)
    for path in (f"{SESSIONS}/{SESSION_ID}", f"{SESSIONS}/{SESSION_ID}/tasks", f"{TASKS}/t0"):
        assert (await daemon.get(path)).status_code == 404, path
    again = await daemon.client.delete(f"{SESSIONS}/{SESSION_ID}")
    assert again.status_code == 404


async def test_delete_of_an_unknown_session_is_404(daemon, db):
    """DELETE of an id never accepted is 404 with the id in the body, and deletes nothing."""
    await db.insert("translation_sessions", [srow(SESSION_ID)])
    r = await daemon.client.delete(f"{SESSIONS}/nope")
    assert r.status_code == 404
    assert r.json() == {"detail": "Session not found", "session_id": "nope", "error_code": "NOT_FOUND",
                        "errors": []}
    assert await session_ids(db) == {SESSION_ID}


async def test_delete_removes_more_tasks_than_one_chunk(daemon, db):
    """A session with more tasks than one DELETE chunk (5,000) loses every one of them."""
    n = DELETE_CHUNK_ROWS + 1001
    await db.insert("translation_sessions", [srow(SESSION_ID), srow("other")])
    await db.insert("translation_tasks", [trow(f"t{i:05}") for i in range(n)] + [trow("o1", session_id="other")])
    r = await daemon.client.delete(f"{SESSIONS}/{SESSION_ID}")
    assert r.json() == {"status": "deleted", "session_id": SESSION_ID, "deleted_tasks": n}
    assert (await task_count(db), await session_ids(db)) == (1, {"other"})


@mysql_only
async def test_each_chunk_of_a_delete_takes_its_tasks_out_of_task_counts(db):
    """Every chunk commits with its own count correction, so the counts are exact between
    chunks too, not only once the session (and with it its counts) is gone. (SQLite's
    triggers count each deleted task out in its own statement.)"""
    n = DELETE_CHUNK_ROWS + 1001
    await db.insert("translation_sessions", [srow(SESSION_ID), srow("other")])
    await db.insert("translation_tasks", [
        trow(f"t{i:05}", status=("pending", "completed")[i % 2], duration_ms=i if i % 3 else None,
             created_at=BASE + timedelta(minutes=i)) for i in range(n)] + [trow("o1", "other", created_at=BASE)])
    async with db.store.db.connection() as conn:
        assert await delete_tasks(conn, 0, "session_id = %s AND task_id < %s", SESSION_ID, "t05500") == 5500
    await db.assert_counts_exact()
    assert await task_count(db, SESSION_ID) == n - 5500


async def test_delete_drops_buffered_rows_so_a_later_flush_cannot_bring_them_back(slow_daemon, db):
    """A session and tasks accepted but not written are dropped by DELETE, counted, and
    the next flush writes none of them."""
    d = slow_daemon
    await d.post(SESSIONS_BATCH, {"sessions": [session(), session("other")]})
    await d.post(TASKS_BATCH, {"tasks": [task(f"t{i}") for i in range(3)] + [task("o1", session_id="other")]})
    r = await d.client.delete(f"{SESSIONS}/{SESSION_ID}")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "deleted", "session_id": SESSION_ID, "deleted_tasks": 3}
    flushed = await d.flush()
    assert (flushed["sessions_written"], flushed["tasks_written"], flushed["tasks_waiting_for_session"]) == (1, 1, 0)
    assert await session_ids(db) == {"other"}
    assert (await task_count(db, SESSION_ID), await task_count(db, "other")) == (0, 1)
    for path in (f"{SESSIONS}/{SESSION_ID}", f"{TASKS}/t0"):
        assert (await d.get(path)).status_code == 404, path


async def test_a_delete_answered_503_while_the_database_is_down_changes_nothing(db, tmp_path):
    """With the database away (MySQL cut, SQLite's write lock held elsewhere) a DELETE is
    503 DATABASE_UNAVAILABLE before the buffer drops anything: once the database is back,
    the session and tasks it held are written, and a DELETE then removes them all."""
    async with database_outage(db) as outage:
        cfg = make_config(tmp_path, database={"url": outage.url(), "write_timeout": 1, "read_timeout": 3},
                          buffer={"flush_interval": 30, "flush_rows": 100_000})
        async with running(cfg) as d:
            await d.post(SESSIONS_BATCH, {"sessions": [session()]})
            await d.post(TASKS_BATCH, {"tasks": [task(f"t{i}") for i in range(3)]})
            await outage.cut()
            r = await d.client.delete(f"{SESSIONS}/{SESSION_ID}")
            assert (r.status_code, r.json()["error_code"]) == (503, "DATABASE_UNAVAILABLE"), r.text
            await outage.restore()
            assert (await d.flush())["tasks_written"] == 3
            assert (await session_ids(db), await task_count(db, SESSION_ID)) == ({SESSION_ID}, 3)
            r = await d.client.delete(f"{SESSIONS}/{SESSION_ID}")
            assert r.json() == {"status": "deleted", "session_id": SESSION_ID, "deleted_tasks": 3}


async def test_delete_counts_stored_tasks_and_buffered_ones_never_written_once_each(slow_daemon, db):
    """deleted_tasks = stored tasks + buffered tasks that never reached MySQL; a buffered
    update of a stored task is counted once. Nothing comes back at the next flush."""
    d = slow_daemon
    await d.post(SESSIONS_BATCH, {"sessions": [session()]})
    await d.post(TASKS_BATCH, {"tasks": [task(f"t{i}") for i in range(4)]})
    await d.flush()
    await d.post(SESSIONS_BATCH, {"sessions": [session(status="completed")]})
    await d.post(TASKS_BATCH, {"tasks": [task("t0", status="completed"), task("t4"), task("t5")]})
    r = await d.client.delete(f"{SESSIONS}/{SESSION_ID}")
    assert r.json() == {"status": "deleted", "session_id": SESSION_ID, "deleted_tasks": 6}
    await d.flush()
    assert (await session_ids(db), await task_count(db)) == (set(), 0)


async def test_delete_drops_tasks_held_for_a_session_that_never_arrived(slow_daemon, db):
    """Tasks held for their session are dropped by DELETE of that id and counted; when a
    session of that id arrives later, they do not come back with it."""
    d = slow_daemon
    await d.post(TASKS_BATCH, {"tasks": [task(f"t{i}", session_id="late") for i in range(5)]})
    assert (await d.flush())["tasks_waiting_for_session"] == 5
    r = await d.client.delete(f"{SESSIONS}/late")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "deleted", "session_id": "late", "deleted_tasks": 5}
    assert (await d.flush())["tasks_waiting_for_session"] == 0
    await d.post(SESSIONS_BATCH, {"sessions": [session("late")]})
    await d.flush()
    assert (await session_ids(db), await task_count(db)) == ({"late"}, 0)
    assert (await d.get(f"{TASKS}/t0")).status_code == 404


# DELETE meeting a flush in flight, on the buffer actor alone: we play http and flusher.

AT = datetime(2025, 9, 30, 10, 0, tzinfo=timezone.utc)


@pytest.fixture
async def alone(tmp_path, nursery):
    return BufferAlone(tmp_path).start(nursery)


async def test_delete_waits_for_the_flush_in_flight_before_it_is_answered(alone, autojump_clock):
    """Forget (DELETE) is answered only once the snapshot in flight is written, so the
    database delete that follows cannot be overtaken by it."""
    await alone.write("sessions", [session()], AT)
    await alone.write("tasks", [task("t0")], AT)
    in_flight, _ = await alone.jobs.receive()
    reply, replies = trio.open_memory_channel(1)
    await alone.to_buffer.send(Forget(SESSION_ID, reply))
    await trio.sleep(1)
    with pytest.raises(trio.WouldBlock):
        replies.receive_nowait()
    await alone.to_buffer.send(Written(1, 1, [], []))
    assert await replies.receive() == (True, [])  # its session was in flight; nothing else buffered


async def test_an_idle_daemon_does_not_spin_after_delete_emptied_its_buffer(db, tmp_path):
    """When DELETE drops every row waiting for the next flush, the buffer actor goes back
    to sleep: an idle daemon burns almost no CPU (it must not wake up in a loop for a flush
    that has nothing to write)."""
    async with running(make_config(tmp_path, buffer={"flush_interval": 0.5})) as d:
        await d.post(SESSIONS_BATCH, {"sessions": [session()]})
        await d.post(TASKS_BATCH, {"tasks": [task()]})
        r = await d.client.delete(f"{SESSIONS}/{SESSION_ID}")  # well before the flush is due
        assert r.json() == {"status": "deleted", "session_id": SESSION_ID, "deleted_tasks": 1}
        await trio.sleep(0.7)  # the flush would have been due now
        cpu, wall = time.process_time(), time.monotonic()
        await trio.sleep(1)
        busy = (time.process_time() - cpu) / (time.monotonic() - wall)
        assert busy < 0.3, f"the idle daemon kept {busy:.0%} of a core busy"
        assert (await d.get("/health")).json()["buffer"]["total_count"] == 0


async def test_delete_drops_tasks_that_return_held_from_the_flush_it_waited_for(alone, autojump_clock):
    """Tasks in flight when DELETE arrives, handed back as held because their session is
    not in MySQL, are dropped too: a session of that id arriving later must not bring
    them back (DESIGN.md: DELETE removes the session's buffered rows)."""
    # the §10 client's order: tasks first, their session still in the client's buffer
    await alone.write("tasks", [task(f"t{i}", session_id="S") for i in range(3)], AT)
    in_flight, _ = await alone.jobs.receive()
    reply, replies = trio.open_memory_channel(1)
    await alone.to_buffer.send(Forget("S", reply))  # DELETE /sessions/S while they are written
    # the flusher finds no session S in MySQL and hands the tasks back to be held
    await alone.to_buffer.send(Written(0, 0, list(in_flight.tasks.values()), []))
    await replies.receive()
    still_held = (await alone.ask(Status)).held_tasks
    await alone.write("sessions", [session("S")], AT)
    job = await alone.jobs.receive()
    assert (still_held, sorted(job.snapshot.tasks)) == (0, []), \
        "tasks of the deleted session stayed held and were written with a new session of the same id"


# ── §6.2 cleanup ─────────────────────────────────────────────────────────────────────

# id → (status, days since updated_at, tasks)
AGED = {
    "c-91": ("completed", 91, 3),
    "c-89": ("completed", 89, 2),
    "f-31": ("failed", 31, 2),
    "f-29": ("failed", 29, 1),
    "x-31": ("cancelled", 31, 4),
    "x-29": ("cancelled", 29, 1),
    "p-400": ("pending", 400, 1),
    "r-400": ("processing", 400, 1),
}


async def insert_aged(db):
    # created_at long ago for every row: ageing goes by updated_at
    await db.insert("translation_sessions", [srow(sid, status, created_at=ago(500), updated_at=ago(days))
                                              for sid, (status, days, _) in AGED.items()])
    await db.insert("translation_tasks", [trow(f"{sid}/{i}", session_id=sid)
                                           for sid, (_, _, n) in AGED.items() for i in range(n)])


def expected(ids: set[str]) -> tuple[int, int]:
    return len(ids), sum(AGED[sid][2] for sid in ids)


async def cleanup(d, body=None, content=None) -> dict:
    if content is None and body is not None:
        content = msgspec.json.encode(body)
    r = await d.client.post(CLEANUP, content=content or b"",
                            headers={"content-type": "application/json"} if content else {})
    assert r.status_code == 200, r.text
    return r.json()


async def test_cleanup_defaults_expire_completed_after_90_days_and_failed_or_cancelled_after_30(daemon, db):
    """With no body: completed sessions not updated for 90 days, failed and cancelled ones
    for 30 days go with their tasks; a dry run first counts exactly the same rows and
    deletes nothing; pending, processing and younger sessions stay."""
    await insert_aged(db)
    gone = {"c-91", "f-31", "x-31"}
    n_sessions, n_tasks = expected(gone)
    dry = await cleanup(daemon, {"dry_run": True})
    assert dry == {"status": "completed", "deleted_sessions": n_sessions, "deleted_tasks": n_tasks, "dry_run": True}
    assert (await session_ids(db), await task_count(db)) == (set(AGED), 15)
    real = await cleanup(daemon)
    assert real == {**dry, "dry_run": False}
    assert await session_ids(db) == set(AGED) - gone
    assert await task_count(db) == 15 - n_tasks
    assert await cleanup(daemon, {}) == {"status": "completed", "deleted_sessions": 0, "deleted_tasks": 0,
                                         "dry_run": False}


@pytest.mark.parametrize(("body", "gone"), [
    ({"completed_days": 90, "failed_days": 30}, {"c-91", "f-31", "x-31"}),  # the defaults, spelt out
    ({"completed_days": 10, "failed_days": 100}, {"c-91", "c-89"}),
    ({"completed_days": 365, "failed_days": 0}, {"f-31", "f-29", "x-31", "x-29"}),
    ({"completed_days": 0, "failed_days": 0}, {"c-91", "c-89", "f-31", "f-29", "x-31", "x-29"}),
])
async def test_cleanup_dry_run_counts_exactly_what_the_real_run_deletes(daemon, db, body, gone):
    """For any retention, the dry run's counts equal the real run's, and the real run
    deletes exactly the sessions past their retention, with their tasks."""
    await insert_aged(db)
    dry = await cleanup(daemon, {**body, "dry_run": True})
    assert (dry["deleted_sessions"], dry["deleted_tasks"]) == expected(gone)
    assert await task_count(db) == 15
    real = await cleanup(daemon, {**body, "dry_run": False})
    assert real == {**dry, "dry_run": False}
    assert await session_ids(db) == set(AGED) - gone
    assert await task_count(db) == 15 - expected(gone)[1]


async def test_cleanup_deletes_more_sessions_and_tasks_than_one_chunk(daemon, db):
    """150 expired sessions (more than a chunk of 100) and one with 6,001 tasks (more than
    a chunk of 5,000) are all deleted; the dry run counted them all."""
    big = DELETE_CHUNK_ROWS + 1001
    await db.insert("translation_sessions", [srow(f"old{i:03}", "completed", updated_at=ago(100)) for i in range(150)]
                 + [srow("big", "failed", updated_at=ago(40)), srow("young", "completed", updated_at=ago(1))])
    await db.insert("translation_tasks", [trow(f"big/{i:05}", session_id="big") for i in range(big)]
                 + [trow(f"old{i:03}/0", session_id=f"old{i:03}") for i in range(150)]
                 + [trow(f"young/{i}", session_id="young") for i in range(10)])
    dry = await cleanup(daemon, {"dry_run": True})
    assert (dry["deleted_sessions"], dry["deleted_tasks"]) == (151, big + 150)
    real = await cleanup(daemon, {"dry_run": False})
    assert (real["deleted_sessions"], real["deleted_tasks"]) == (151, big + 150)
    assert (await session_ids(db), await task_count(db)) == ({"young"}, 10)
    await db.assert_counts_exact()


async def test_cleanup_spares_a_session_whose_latest_update_is_still_in_the_buffer(slow_daemon, db):
    """A session updated just now is not expired, even while its update waits in the
    buffer: cleanup must not delete its stored row and tasks, only for the next flush to
    re-create the session without them (its latest accepted updated_at is now)."""
    d = slow_daemon
    created = ago(500)
    await db.insert("translation_sessions", [srow("rerun", "failed", created_at=created, updated_at=ago(40),
                                                   total_tasks=3)])
    await db.insert("translation_tasks", [trow(f"rerun/{i}", session_id="rerun") for i in range(3)])
    r = await d.post(SESSIONS_BATCH, {"sessions": [session("rerun", status="processing")]})  # retried by a user
    assert r.status_code == 202
    answer = await cleanup(d, {"dry_run": False})
    await d.flush()
    stored = await db.query("SELECT status, total_tasks, created_at FROM translation_sessions")
    assert (stored, await task_count(db), answer["deleted_sessions"]) == ((("processing", 3, created),), 3, 0)


@pytest.mark.parametrize(("content", "status", "code", "field"), [
    (b'{"completed_days": -1}', 422, "VALIDATION_ERROR", "completed_days"),
    (b'{"failed_days": -30}', 422, "VALIDATION_ERROR", "failed_days"),
    (b'{"completed_days": 1.5}', 422, "VALIDATION_ERROR", "completed_days"),
    (b'{"completed_days": "90"}', 422, "VALIDATION_ERROR", "completed_days"),
    (b'{"dry_run": "yes"}', 422, "VALIDATION_ERROR", "dry_run"),
    (b'{"retention_days": 10}', 422, "VALIDATION_ERROR", "retention_days"),
    (b'[]', 422, "VALIDATION_ERROR", ""),
    (b'{"dry_run": true', 400, "INVALID_JSON", None),
    (b'dry_run=true', 400, "INVALID_JSON", None),
    (b'\x0b', 400, "INVALID_JSON", None),  # not JSON whitespace: not an empty body either
    (b'[1,', 400, "INVALID_JSON", None),  # the typed decoder stops at the array; it is not JSON all the same
    (b'{"dry_run": [true', 400, "INVALID_JSON", None),
    (b'{"dry_run": tru\xff}', 400, "INVALID_JSON", None),
])
async def test_a_bad_cleanup_body_is_refused_and_deletes_nothing(daemon, db, content, status, code, field):
    """Negative or non-integer days, unknown fields and wrong types are 422; malformed
    JSON is 400; either way nothing is deleted."""
    await insert_aged(db)
    r = await daemon.client.post(CLEANUP, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "error_code", "errors"} and body["error_code"] == code
    if field is not None:
        assert [e["field"] for e in body["errors"]] == [field]
    assert (await session_ids(db), await task_count(db)) == (set(AGED), 15)


async def test_totals_stats_and_the_dry_run_are_exact_within_a_reconciliation_period_whoever_writes(db, tmp_path):
    """Tasks inserted, changed and deleted by SQL behind persistd's back (a migration, an
    operator's hand) while it runs, and then deleted through it: within one
    reconcile_interval (1 s here) every total, the stats and the cleanup dry run equal
    COUNT(*) again, no count is below zero, and the repairs are counted in a metric."""
    cfg = make_config(tmp_path, janitor={"interval": 0, "reconcile_interval": 1.0})
    async with running(cfg) as d:
        await d.post(SESSIONS_BATCH, {"sessions": [session("kept"), session("old", status="completed")]})
        await d.post(TASKS_BATCH, {"tasks": [task(f"p{i}", "kept", duration_ms=i) for i in range(20)]})
        await d.flush()
        await db.insert("translation_tasks", [trow(f"x{i}", "kept", "completed", duration_ms=7) for i in range(30)]
                        + [trow(f"o{i}", "old", "failed") for i in range(12)], recount=False)
        await db.query("UPDATE translation_tasks SET status = 'failed' WHERE task_id IN ('p0', 'p1', 'p2')")
        await db.query("DELETE FROM translation_tasks WHERE task_id IN ('p3', 'p4')")
        await db.query("UPDATE translation_sessions SET updated_at = %s WHERE session_id = 'old'", ago(100))
        r = await d.client.delete(f"{SESSIONS}/kept")  # persistd takes out what it finds, counted or not
        assert r.json()["deleted_tasks"] == 48
        await trio.sleep(2.5)  # a pass starts within 1 s and takes milliseconds here
        assert await db.query("SELECT COUNT(*) FROM task_counts WHERE tasks < 0 OR durations < 0") == ((0,),)
        await db.assert_counts_exact()
        stats = (await d.get(STATS)).json()  # (the first stats read: nothing cached)
        assert stats["tasks"]["total"] == 12 and stats["tasks"]["failed"] == 12
        assert (await d.get(TASKS, params={"session_id": "old"})).json()["total"] == 12
        dry = (await d.client.post(CLEANUP, json={"dry_run": True})).json()
        assert (dry["deleted_sessions"], dry["deleted_tasks"]) == (1, 12)
        metrics = (await d.get("/api/v1/system/metrics")).text
        repaired = next(float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("persistence_task_counts_repaired_total "))
        assert repaired >= (1 if db.backend == "mysql" else 0)  # SQLite's triggers counted them as they came
        assert (await d.client.post(CLEANUP, json={"dry_run": False})).json()["deleted_tasks"] == 12


def test_a_reconciliation_slice_holds_at_most_its_share_of_tasks_unless_one_session_alone_has_more():
    assert reconcile_slice([("a", 5_000), ("b", 10_000), ("c", 6_000), ("d", 1)], 20_000) == ["a", "b"]
    assert reconcile_slice([("a", 50_000), ("b", 1)], 20_000) == ["a"]
    assert reconcile_slice([("a", 0)] * 3, 20_000) == ["a"] * 3
    assert reconcile_slice([], 20_000) == []


async def test_no_count_goes_below_zero_when_persistd_changes_or_deletes_tasks_it_never_counted(db, tmp_path):
    """Tasks inserted by SQL were never counted in. Before any reconciliation pass, persistd
    changes their status and then deletes some in a cleanup: their buckets go down to zero,
    never below (the next pass counts them in)."""
    cfg = make_config(tmp_path, janitor={"interval": 0, "reconcile_interval": 3600.0})
    negative = "SELECT COUNT(*) FROM task_counts WHERE tasks < 0 OR duration_ms_sum < 0 OR durations < 0"
    async with running(cfg) as d:
        await d.post(SESSIONS_BATCH, {"sessions": [session("s"), session("old", status="failed")]})
        await d.post(TASKS_BATCH, {"tasks": [task("p0", "s", duration_ms=5), task("q0", "old")]})
        await d.flush()
        await db.insert("translation_tasks", [trow(f"x{i}", "s", duration_ms=9) for i in range(3)]
                        + [trow("y", "s", "completed", duration_ms=9)]
                        + [trow(f"o{i}", "old", "failed", duration_ms=1) for i in range(5)], recount=False)
        await d.post(TASKS_BATCH, {"tasks": [task(t, "s", status="failed") for t in ("p0", "x0", "x1", "x2", "y")]})
        await d.flush()
        assert await db.query(negative) == ((0,),)
        await db.query("UPDATE translation_sessions SET updated_at = %s WHERE session_id = 'old'", ago(100))
        gone = (await d.client.post(CLEANUP, json={"dry_run": False})).json()
        assert (gone["deleted_sessions"], gone["deleted_tasks"]) == (1, 6)
        assert await db.query(negative) == ((0,),)


# ── the janitor ──────────────────────────────────────────────────────────────────────


async def wait_until_gone(db, session_id, within_s):
    with trio.fail_after(within_s):
        while session_id in await session_ids(db):
            await trio.sleep(0.1)


async def test_the_janitor_runs_the_cleanup_on_its_schedule_and_stops_cleanly(db, tmp_path):
    """With [janitor] interval 0.5 s the configured retention is applied within seconds,
    again on every run, and the daemon still stops promptly."""
    await db.insert("translation_sessions", [
        srow("c-10", "completed", updated_at=ago(10)), srow("c-2", "completed", updated_at=ago(2)),
        srow("f-40", "failed", updated_at=ago(40)), srow("f-20", "failed", updated_at=ago(20)),
        srow("r-400", "processing", updated_at=ago(400))])
    await db.insert("translation_tasks", [trow("f-40/0", session_id="f-40"), trow("c-10/0", session_id="c-10")])
    cfg = make_config(tmp_path, janitor={"interval": 0.5, "completed_days": 5})
    with trio.fail_after(15):
        async with running(cfg):
            await wait_until_gone(db, "c-10", 4)
            await wait_until_gone(db, "f-40", 1)
            assert await session_ids(db) == {"c-2", "f-20", "r-400"}
            assert await task_count(db) == 0
            # a later run finds what has expired since
            await db.insert("translation_sessions", [srow("x-40", "cancelled", updated_at=ago(40))])
            await wait_until_gone(db, "x-40", 4)
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 3
    assert await session_ids(db) == {"c-2", "f-20", "r-400"}


async def test_no_janitor_runs_when_its_interval_is_0(db, tmp_path):
    """[janitor] interval 0 turns scheduled cleanup off: expired sessions stay."""
    await db.insert("translation_sessions", [srow("c-100", "completed", updated_at=ago(100))])
    async with running(make_config(tmp_path, janitor={"interval": 0})):
        await trio.sleep(1)
    assert await session_ids(db) == {"c-100"}


# ── §6.3 stats ───────────────────────────────────────────────────────────────────────

STATS_KEYS = {"sessions", "tasks", "performance", "storage"}
PERFORMANCE_KEYS = {"average_session_time", "average_task_time", "success_rate"}
STORAGE_KEYS = {"database_size_mb", "sessions_table_rows", "tasks_table_rows", "backend"}  # backend: issue 11


async def test_stats_for_a_known_data_set(daemon, db):
    """Counts per status (sessions include cancelled), average session time of completed
    sessions, average task time from duration_ms of completed tasks, success rate of
    finished tasks, and the storage figures of the two tables."""
    await db.insert("translation_sessions", [
        srow("c1", "completed", created_at=BASE, updated_at=BASE + timedelta(seconds=100)),
        srow("c2", "completed", created_at=BASE, updated_at=BASE + timedelta(seconds=301)),
        srow("f1", "failed", created_at=BASE, updated_at=BASE + timedelta(seconds=5000)),
        srow("x1", "cancelled", created_at=BASE, updated_at=BASE + timedelta(seconds=7000)),
        srow("p1", "pending"), srow("r1", "processing"), srow("r2", "processing")])
    await db.insert("translation_tasks", [
        trow("done1", "r1", "completed", duration_ms=1000),
        trow("done2", "r1", "completed", duration_ms=2000),
        trow("done3", "r1", "completed", duration_ms=4500),
        trow("done4", "r1", "completed"),  # no duration: not in the average
        trow("fail1", "r1", "failed", duration_ms=90000),  # failed: not in the average
        trow("fail2", "r1", "failed"),
        trow("pend1", "r1", "pending", duration_ms=70000), trow("pend2", "r2", "pending"),
        trow("proc1", "r2", "processing", duration_ms=80000)])
    await db.analyze()
    r = await daemon.get(STATS)
    assert r.status_code == 200, r.text
    stats = r.json()
    assert set(stats) == STATS_KEYS
    assert stats["sessions"] == {"total": 7, "pending": 1, "processing": 2, "completed": 2, "failed": 1,
                                 "cancelled": 1}
    assert stats["tasks"] == {"total": 9, "pending": 2, "processing": 1, "completed": 4, "failed": 2}
    assert stats["performance"] == {"average_session_time": 200.5, "average_task_time": 2.5,
                                    "success_rate": 66.7}
    storage = stats["storage"]
    assert set(storage) == STORAGE_KEYS
    assert isinstance(storage["database_size_mb"], (int, float)) and storage["database_size_mb"] > 0
    assert (storage["sessions_table_rows"], storage["tasks_table_rows"], storage["backend"]) == (7, 9, db.backend)


async def test_stats_of_an_empty_database_and_their_cache(daemon, db):
    """With no rows every count is 0 and the performance figures are null (nothing to
    average); the answer is cached for a few seconds, so a new row is not seen at once."""
    r = await daemon.get(STATS)
    stats = r.json()
    assert stats["sessions"] == {"total": 0, "pending": 0, "processing": 0, "completed": 0, "failed": 0,
                                 "cancelled": 0}
    assert stats["tasks"] == {"total": 0, "pending": 0, "processing": 0, "completed": 0, "failed": 0}
    assert stats["performance"] == {"average_session_time": None, "average_task_time": None, "success_rate": None}
    assert set(stats["storage"]) == STORAGE_KEYS
    await db.insert("translation_sessions", [srow("new", "completed")])
    assert (await daemon.get(STATS)).json() == stats
