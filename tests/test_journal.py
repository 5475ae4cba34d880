"""The journal (issue 4): every batch is on disk before its 202 and stays there until the
database has it; a start replays what is unreleased; a torn or corrupt tail is kept aside
and never stops a start. Rows the database refuses go to the dead-letter file while the
rest of their batch is written. The crash loop and the outage run in test_durability.py."""

import functools
import json
import os
import signal
import socket
import subprocess
from datetime import datetime, timezone

import httpx
import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from conftest import KEPT_COUNTS, MYSQL_URL, SESSION_ID, MysqlDb, make_config, mysql_only, running, session, task
from processes import PERSISTD, Process, assert_one_line_error, clean_environ, free_port, persistd_process, process_config
from proxy import tcp_proxy
from persistd.daemon import (BATCH_KINDS, HELD_1_0, MICROS, RECORD, SESSIONS_1_0, TASKS_1_0, VERSION_FIELD, Buffer,
                             BufferConfig, DatabaseConfig, Journal, JournalConfig, TaskIn, clock_lease, decode_batch,
                             micros, overlay, version_of)
from persistd.mysql import Database, upsert, write_snapshot
from persistd.storage import TASKS

TASKS_URL = "/api/v1/translation/tasks/batch"
SESSIONS_URL = "/api/v1/translation/sessions/batch"
AT = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def body(key: str, rows: list[dict]) -> bytes:
    return msgspec.json.encode({key: rows})


def journal_at(path, mode: str = "fsync") -> Journal:
    journal = Journal(path, JournalConfig(mode=mode))
    journal.open()
    return journal


VERSION_AT = VERSION_FIELD.pack(version_of(micros(AT), 0))


def append(journal: Journal, seq: int, key: str, rows: list[dict]) -> None:
    journal.commit([(seq, BATCH_KINDS[key], (VERSION_AT, body(key, rows)))], None)


def replayed(journal: Journal, at: datetime = AT) -> list[tuple[int, list[str]]]:
    out = []
    for seq, kind, payload in journal.replay():
        key, entries, _ = journal.batch(seq, kind, payload)
        assert all(e.created_at == e.updated_at == at for e in entries)
        out.append((seq, [e.row.task_id if key == "tasks" else e.row.session_id for e in entries]))
    return out


def segments(path) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.endswith(".journal"))


# ── the file ─────────────────────────────────────────────────────────────────────────


def test_records_replay_in_order_with_their_accept_time(tmp_path):
    journal = journal_at(tmp_path)
    for seq in (1, 2, 3):
        append(journal, seq, "tasks", [task(f"t{seq}")])
    journal.close()
    again = journal_at(tmp_path)
    assert again.last_seq == 3 and again.kept_aside == 0
    assert replayed(again) == [(1, ["t1"]), (2, ["t2"]), (3, ["t3"])]


def test_a_journal_of_persistd_1_0_replays_with_its_accept_times_as_versions(tmp_path):
    """1.0 wrote batches as kinds 1 and 2 with the accept time (µs) before the body, and held
    tasks as kind 5 without versions: they replay older than anything accepted since."""
    journal = journal_at(tmp_path)
    earlier = MICROS.pack(micros(AT))
    held = msgspec.json.encode([(AT, AT, msgspec.convert(task("h"), TaskIn))])
    journal.commit([(1, SESSIONS_1_0, (earlier, body("sessions", [session("s")]))),
                    (2, TASKS_1_0, (earlier, body("tasks", [task("t")]))), (3, HELD_1_0, (held,))], None)
    journal.close()
    again = journal_at(tmp_path)
    found = [again.batch(*record) for record in again.replay()]
    assert [(key, [e.version for e in entries]) for key, entries, _ in found] == [
        ("sessions", [version_of(micros(AT), 0)]), ("tasks", [version_of(micros(AT), 0)]),
        ("tasks", [version_of(micros(AT), 0)])]
    assert all(e.created_at == AT for _, entries, _ in found for e in entries)


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_a_damaged_tail_is_kept_aside_and_the_valid_records_replay(tmp_path, damage):
    """A record cut short (a crash mid-write) or one whose checksum fails: the records
    before it replay, the tail from it on is moved to corrupt/ and counted, and the
    journal opens and takes new records."""
    journal = journal_at(tmp_path)
    for seq in (1, 2, 3):
        append(journal, seq, "tasks", [task(f"t{seq}", source_text="x" * 500)])
    journal.close()
    (name,) = segments(tmp_path)
    data = (tmp_path / name).read_bytes()
    third = len(data) - len(data) // 6  # inside the third record
    if damage == "torn":
        (tmp_path / name).write_bytes(data[:third])
    else:
        (tmp_path / name).write_bytes(data[:third] + bytes([data[third] ^ 0xFF]) + data[third + 1:])

    again = journal_at(tmp_path)
    assert again.kept_aside == 1
    assert replayed(again) == [(1, ["t1"]), (2, ["t2"])]
    (aside,) = os.listdir(tmp_path / "corrupt")
    good = (tmp_path / name).stat().st_size
    assert aside == f"{name}.{good}"
    assert (tmp_path / name).read_bytes() + (tmp_path / "corrupt" / aside).read_bytes() == (
        data[:third] if damage == "torn" else data[:third] + bytes([data[third] ^ 0xFF]) + data[third + 1:])
    append(again, 4, "tasks", [task("t4")])
    again.close()
    assert replayed(journal_at(tmp_path)) == [(1, ["t1"]), (2, ["t2"]), (4, ["t4"])]


def test_a_header_claiming_more_bytes_than_the_file_holds_is_a_torn_tail(tmp_path):
    journal = journal_at(tmp_path)
    append(journal, 1, "tasks", [task("t1")])
    journal.close()
    (name,) = segments(tmp_path)
    with open(tmp_path / name, "ab") as f:
        f.write(RECORD.pack(2**31, 0, 2, 2))  # a length no file here has
    again = journal_at(tmp_path)
    assert again.kept_aside == 1 and replayed(again) == [(1, ["t1"])]


def test_released_records_are_not_replayed_and_released_segments_are_deleted(tmp_path):
    journal = journal_at(tmp_path)
    journal.segment_bytes = 1  # a segment a commit
    for seq in (1, 2, 3):
        append(journal, seq, "tasks", [task(f"t{seq}")])
    assert len(segments(tmp_path)) == 3
    journal.commit([], 3)  # 1 and 2 are in the database
    assert len(segments(tmp_path)) == 2  # the third and the one holding the release mark
    journal.close()
    assert replayed(journal_at(tmp_path)) == [(3, ["t3"])]


def test_a_release_inside_a_segment_is_remembered(tmp_path):
    """Records below the release mark are not replayed even though their segment is kept
    for the records after them: an old state never comes back over a newer one."""
    journal = journal_at(tmp_path)
    for seq in (1, 2, 3):
        append(journal, seq, "tasks", [task(f"t{seq}")])
    journal.commit([], 3)
    journal.close()
    assert len(segments(tmp_path)) == 1
    assert replayed(journal_at(tmp_path)) == [(3, ["t3"])]


def test_everything_released_leaves_no_segment(tmp_path):
    journal = journal_at(tmp_path)
    append(journal, 1, "tasks", [task("t1")])
    journal.commit([], 2)
    journal.close()
    assert segments(tmp_path) == []
    assert journal_at(tmp_path).last_seq == 0


def test_a_deleted_session_takes_its_earlier_rows_out_of_the_replay(tmp_path):
    journal = journal_at(tmp_path)
    append(journal, 1, "tasks", [task("t1", session_id="gone"), task("t2", session_id="kept")])
    journal.commit([(2, 3, (b"gone",))], None)  # DELETE of session "gone"
    append(journal, 3, "tasks", [task("t3", session_id="gone")])  # written again after the DELETE
    journal.close()
    assert replayed(journal_at(tmp_path)) == [(1, ["t2"]), (3, ["t3"])]


# ── through the daemon ───────────────────────────────────────────────────────────────


async def metric(daemon, name: str) -> float:
    text = (await daemon.get("/api/v1/system/metrics")).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def test_a_start_replays_the_journal_before_it_listens(db, tmp_path):
    """Batches a stopped daemon left in its journal are written by the next start; a
    damaged tail does not stop it, and is counted in the metrics."""
    cfg = make_config(tmp_path)
    path = tmp_path / "state" / "journal"
    path.mkdir(parents=True)
    journal = journal_at(path)
    append(journal, 1, "sessions", [session()])
    append(journal, 2, "tasks", [task("t1", status="pending")])
    append(journal, 3, "tasks", [task("t1", status="completed", target_text="done"), task("t2")])
    journal.close()
    (name,) = segments(path)
    with open(path / name, "ab") as f:
        f.write(b"\x07" * 40)  # a torn header
    async with running(cfg) as daemon:
        assert await metric(daemon, "persistence_journal_corrupt_tails_total") == 1
        assert await metric(daemon, "persistence_journal_replayed_rows_total") == 4
        await daemon.flush()
        rows = await db.query("SELECT task_id, status, target_text FROM translation_tasks ORDER BY task_id")
        assert rows == (("t1", "completed", "done"), ("t2", "pending", None))
    assert segments(path) == []  # everything written: released


async def test_a_signal_during_a_long_replay_stops_the_daemon_and_keeps_the_journal(db, tmp_path):
    """The database is down and the backlog is three times the buffer: the replay waits
    for room that never comes. SIGTERM then stops the process within shutdown_timeout
    (exit 0) without it ever listening, and every record is still in the journal."""
    path = tmp_path / "state" / "journal"
    path.mkdir(parents=True)
    journal = journal_at(path)
    for seq in (1, 2, 3):
        append(journal, seq, "tasks", [task(f"t{seq}-{i}") for i in range(1000)])
    journal.close()
    before = {name: (path / name).read_bytes() for name in segments(path)}
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"mysql://root@127.0.0.1:{unused.getsockname()[1]}/persistd_test"
    port = free_port()
    cfg, config_path = process_config(tmp_path, port, {"database": {"url": nobody},
                                                       "buffer": {"max_rows": 1000, "shutdown_timeout": 1}})
    with open(tmp_path / "persistd.log", "wb") as log:
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(functools.partial(
                trio.run_process, [*PERSISTD, "--config", config_path], check=False, stdout=log,
                stderr=subprocess.STDOUT, env=clean_environ()))
            process = Process(proc, port, cfg, tmp_path / "persistd.log")
            await trio.sleep(2.0)
            assert proc.returncode is None and not await process.accepts_connections(), process.log()
            process.signal(signal.SIGTERM)
            code, _ = await process.wait_exit(cfg["server"]["graceful_timeout"] + 1 + 5)
    assert code == 0, process.log()
    assert "stopped during the replay" in process.log()
    for name, data in before.items():
        assert (path / name).read_bytes()[:len(data)] == data
    assert [ids[:1] for _, ids in replayed(journal_at(path))] == [["t1-0"], ["t2-0"], ["t3-0"]]


async def test_the_202_comes_after_the_batch_is_in_the_journal(db, tmp_path):
    async with running(make_config(tmp_path, buffer={"flush_interval": 30})) as daemon:
        answer = await daemon.post(TASKS_URL, {"tasks": [task("t1")]})
        assert answer.status_code == 202
        at = datetime.fromisoformat(answer.json()["timestamp"].replace("Z", "+00:00"))
        assert [ids for _, ids in replayed(journal_at(tmp_path / "state" / "journal"), at)] == [["t1"]]
        assert await metric(daemon, "persistence_journal_bytes") > 0


@mysql_only
async def test_a_delete_refused_while_the_database_is_down_leaves_every_row_to_the_next_start(db, tmp_path):
    """Rows accepted, then their session DELETEd, all while the database is unreachable,
    then a stop. The DELETE is a 503 that changes nothing (issue 12): the journal keeps
    the rows, and the next start writes them all, the later ones too."""
    async with tcp_proxy() as proxy:
        await proxy.cut()
        cut = make_config(tmp_path, database={"url": proxy.url()}, buffer={"shutdown_timeout": 1})
        async with running(cut) as daemon:
            for sessions in ([session("gone"), session("kept")], [session("gone", status="completed")]):
                assert (await daemon.post(SESSIONS_URL, {"sessions": sessions})).status_code == 202
            assert (await daemon.post(TASKS_URL, {"tasks": [task("g1", session_id="gone"),
                                                            task("k1", session_id="kept")]})).status_code == 202
            deleted = await daemon.client.delete("/api/v1/translation/sessions/gone")
            assert (deleted.status_code, deleted.json()["error_code"]) == (503, "DATABASE_UNAVAILABLE")
            assert (await daemon.post(TASKS_URL, {"tasks": [task("g2", session_id="gone")]})).status_code == 202
    assert segments(tmp_path / "state" / "journal")
    async with running(make_config(tmp_path)) as daemon:
        assert (await daemon.flush())["tasks_waiting_for_session"] == 0
    assert await db.query("SELECT session_id, status FROM translation_sessions ORDER BY 1") == (
        ("gone", "completed"), ("kept", "processing"))
    assert await db.query("SELECT task_id FROM translation_tasks ORDER BY 1") == (("g1",), ("g2",), ("k1",))


async def test_a_session_deleted_before_a_kill_9_does_not_come_back_from_the_journal(db, tmp_path):
    """A DELETE answered 200 while the session's rows are still in the journal (an older
    unwritten row keeps every later record there), then kill -9: the replay voids them
    (the journal's FORGET record), and what was accepted for the session after stays."""
    slow = {"flush_interval": 30.0, "flush_rows": 100_000}
    async with persistd_process(tmp_path, buffer=slow) as process:
        async with httpx.AsyncClient(base_url=process.url) as client:
            for body in ({"sessions": [session("kept")]}, {"sessions": [session("gone")]}):
                assert (await client.post(SESSIONS_URL, json=body)).status_code == 202
            assert (await client.post(TASKS_URL, json={"tasks": [task("g1", session_id="gone")]})).status_code == 202
            assert (await client.delete("/api/v1/translation/sessions/gone")).status_code == 200
            assert (await client.post(TASKS_URL, json={"tasks": [task("g2", session_id="gone")]})).status_code == 202
        await process.kill()
    async with persistd_process(tmp_path, buffer=slow) as process:
        async with httpx.AsyncClient(base_url=process.url) as client:
            assert (await client.post("/api/v1/translation/flush")).json()["tasks_waiting_for_session"] == 1  # g2
    assert await db.query("SELECT session_id FROM translation_sessions") == (("kept",),)
    assert await db.query("SELECT COUNT(*) FROM translation_tasks") == ((0,),)


def test_mode_off_refuses_to_start_over_unwritten_journal_records(tmp_path):
    """Switching the journal off must not silently drop what it still holds: exit 2, one line."""
    path = tmp_path / "state" / "journal"
    path.mkdir(parents=True)
    journal = journal_at(path)
    append(journal, 1, "tasks", [task("t1")])
    journal.close()
    config = tmp_path / "p.toml"
    config.write_text(f'[server]\nport = 0\n[state]\ndir = "{tmp_path / "state"}"\n[journal]\nmode = "off"\n')
    proc = subprocess.run([*PERSISTD, "--config", str(config)], env=clean_environ(),
                          capture_output=True, text=True, timeout=30)
    assert_one_line_error(proc, 2, "not yet written")


async def test_a_row_the_database_refuses_goes_to_the_dead_letter_file_and_the_rest_is_written(db, tmp_path):
    """A poison row (here: one a constraint an operator added refuses: a CHECK in MySQL, a
    trigger in SQLite, which cannot add one to a table) is isolated inside the flush's
    transaction; the other 999 rows of its batch are written, the flush is not retried
    forever, and the row is in the dead-letter file with the reason."""
    if db.backend == "mysql":
        await db.query("ALTER TABLE translation_tasks ADD CONSTRAINT poison CHECK (source_text <> 'POISON')")
    else:
        for when in ("INSERT", "UPDATE"):
            await db.query(f"CREATE TRIGGER poison_{when} BEFORE {when} ON translation_tasks"
                           " WHEN NEW.source_text = 'POISON' BEGIN SELECT RAISE(ABORT, 'poison'); END")
    try:
        async with running(make_config(tmp_path)) as daemon:
            assert (await daemon.post(SESSIONS_URL, {"sessions": [session()]})).status_code == 202
            rows = [task(f"t{i:03d}", row_index=i) for i in range(1000)]
            rows[537]["source_text"] = "POISON"
            assert (await daemon.post(TASKS_URL, {"tasks": rows})).status_code == 202
            assert (await daemon.flush())["tasks_written"] == 999
            assert await metric(daemon, "persistence_flush_errors_total") == 0
            await db.assert_counts_exact()
            # Again over stored rows: each refused statement is counted back in before the halves.
            rows = [task(f"t{i:03d}", row_index=i, status="completed", duration_ms=i) for i in range(1000)]
            rows[100]["source_text"] = "POISON"
            assert (await daemon.post(TASKS_URL, {"tasks": rows})).status_code == 202
            assert (await daemon.flush())["tasks_written"] == 999
    finally:
        if db.backend == "mysql":
            await db.query("ALTER TABLE translation_tasks DROP CONSTRAINT poison")
        else:
            for when in ("INSERT", "UPDATE"):
                await db.query(f"DROP TRIGGER poison_{when}")
    (count,), = await db.query("SELECT COUNT(*) FROM translation_tasks")
    assert count == 1000  # t537 came with the second batch
    assert await db.query("SELECT status FROM translation_tasks WHERE task_id = 't100'") == (("pending",),)
    first, second = (json.loads(line) for line in (tmp_path / "state" / "dead-letter.jsonl").read_text().splitlines())
    assert (first["reason"], first["table"], first["row"]["task_id"]) == ("refused_by_database", "translation_tasks", "t537")
    assert first["error"].startswith("4025:" if db.backend == "mysql" else "SQLITE_CONSTRAINT_TRIGGER: poison")
    assert (second["reason"], second["row"]["task_id"]) == ("refused_by_database", "t100")
    await db.assert_counts_exact()


async def test_a_held_task_keeps_its_orphan_ttl_clock_across_a_restart(db, tmp_path):
    """A task waiting for its session expires orphan_ttl after it was accepted, however
    often the daemon restarts meanwhile (the journal keeps when it was accepted)."""
    dead = tmp_path / "state" / "dead-letter.jsonl"
    sections = {"buffer": {"orphan_ttl": 4.0, "flush_interval": 0.2}}
    async with persistd_process(tmp_path, **sections) as process:
        async with httpx.AsyncClient(base_url=process.url) as client:
            r = await client.post(TASKS_URL, json={"tasks": [task("orphan", session_id="never")]})
            assert r.status_code == 202
        accepted = trio.current_time()
        await trio.sleep(2.5)
        process.signal(signal.SIGTERM)
        assert (await process.wait_exit(10))[0] == 0
    assert not dead.exists()
    async with persistd_process(tmp_path, **sections):
        with trio.fail_after(3.5):  # 4 s after it was accepted, not 4 s after this start
            while not (dead.exists() and dead.stat().st_size):
                await trio.sleep(0.1)
        waited = trio.current_time() - accepted
    assert 4.0 <= waited < 6.5, waited
    [line] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert (line["reason"], line["row"]["task_id"]) == ("orphan_ttl_expired", "orphan")


async def test_a_task_whose_session_never_comes_does_not_keep_the_journal_growing(db, tmp_path):
    """A held task would keep every later record in the journal until orphan_ttl, and
    under load the journal would fill and refuse everyone. Once the journal is a quarter
    full the held tasks are copied into a record of their own and the rest is released;
    the next start still holds the task, with its accept time."""
    cfg = make_config(tmp_path, server={"max_body_bytes": 1024 * 1024},
                      buffer={"max_bytes": 2 * 1024 * 1024}, journal={"max_bytes": 8 * 1024 * 1024})
    async with running(cfg) as daemon:
        orphan = await daemon.post(TASKS_URL, {"tasks": [task("orphan", session_id="never-comes")]})
        assert orphan.status_code == 202
        assert (await daemon.post(SESSIONS_URL, {"sessions": [session()]})).status_code == 202
        await daemon.flush()
        for n in range(12):  # 12 × ~600 KB: past a quarter of 8 MiB several times over
            rows = [task(f"b{n}-{i}", source_text="x" * 600) for i in range(1000)]
            assert (await daemon.post(TASKS_URL, {"tasks": rows})).status_code == 202
            assert (await daemon.flush())["tasks_waiting_for_session"] == 1
        assert await metric(daemon, "persistence_journal_bytes") < 3 * 1024 * 1024
    path = tmp_path / "state" / "journal"
    assert sum((path / name).stat().st_size for name in segments(path)) < 3 * 1024 * 1024
    async with running(cfg) as daemon:
        assert (await daemon.flush())["tasks_waiting_for_session"] == 1
        held = (await daemon.get("/api/v1/translation/tasks/orphan")).json()
        assert held["created_at"] == orphan.json()["timestamp"]


# ── merge and replay, as a property ──────────────────────────────────────────────────
# Any interleaving of accepted updates, failed flushes and crashes (before a flush, or
# after its commit but before the buffer heard of it) ends, once everything is written,
# with each key at its last acknowledged value. The pieces are the daemon's own: Buffer,
# Journal and write_snapshot against the real database; the test plays the actors. After
# every step, what a GET would show (the stored row with the buffer laid over it) is
# already the last acknowledged value: a lost write shows before a later one can hide it.

TASK_IDS = [f"k{i}" for i in range(8)]
FIELDS = {"status": st.sampled_from(["pending", "processing", "completed", "failed"]),
          "target_text": st.sampled_from([None, "a", "β", "c"]),
          "confidence": st.sampled_from([None, 0.25, 0.75])}


@st.composite
def a_write(draw) -> tuple:
    ids = draw(st.lists(st.sampled_from(TASK_IDS), min_size=1, max_size=3, unique=True))
    rows = []
    for task_id in ids:
        row = task(task_id, status=draw(FIELDS["status"]))
        for name in ("target_text", "confidence"):
            if draw(st.booleans()):  # absent keeps the stored value; None clears it
                row[name] = draw(FIELDS[name])
        rows.append(row)
    return ("write", rows)


# take: the buffer hands a snapshot to the flusher; writes may follow while it is out.
# commit / fail: the flusher's transaction commits, or rolls back and the buffer schedules
# the retry. crash: the process dies; the next one replays the journal, a record per
# replay step (a write first finishes the replay). commit_then_crash: the transaction
# commits and the process dies before the buffer hears of it.
STEPS = ["take", "commit", "fail", "crash", "commit_then_crash", "replay"]
OPS = st.lists(st.one_of(a_write(), st.sampled_from(STEPS).map(lambda step: (step,))), min_size=4, max_size=40)


def last_acknowledged(writes: list[list[dict]]) -> dict[str, tuple]:
    state: dict[str, dict] = {}
    for rows in writes:
        for row in rows:
            state.setdefault(row["task_id"], {}).update(row)
    return {k: (v["status"], v.get("target_text"), v.get("confidence")) for k, v in state.items()}


async def stored(conn) -> dict[str, dict]:
    async with conn.cursor() as cursor:
        await cursor.execute("SELECT task_id, status, target_text, confidence FROM translation_tasks")
        return {k: {"status": s, "target_text": t, "confidence": None if c is None else float(c)}
                for k, s, t, c in await cursor.fetchall()}


async def visible(conn, buf: Buffer) -> dict[str, tuple]:
    """Each key as a GET shows it: the buffered states laid over the stored row."""
    rows = await stored(conn)
    shown = {k: overlay(rows.get(k), buf.lookup("tasks", k)) for k in TASK_IDS}
    return {k: (v["status"], v["target_text"], v["confidence"]) for k, v in shown.items() if v is not None}


class Node:
    """One daemon's memory (a Buffer) over a journal that outlives it. It starts by
    replaying the journal, one record a step; flushes may run meanwhile, as in the daemon,
    and writes are accepted only once the replay is done (the daemon listens only then).
    Its clock stands still at AT: versions go on from the last run's lease (<state dir>/clock)."""

    def __init__(self, path, clock_us: int = 0) -> None:
        self.journal = journal_at(path)
        self.buf = Buffer(BufferConfig(), clock_us=clock_us)
        self.lease = clock_lease(micros(AT), clock_us)
        self.snapshot = None  # the one the flusher has
        self.buf.replaying = True
        self.records = self.journal.replay()
        self.replaying = True

    def replay_step(self) -> None:
        record = next(self.records, None) if self.replaying else None
        if record is not None:
            key, entries, nbytes = self.journal.batch(*record)
            self.buf.journaled(record[0], nbytes)
            self.buf.replay(key, entries, record[0], 0.0, AT)
        elif self.replaying:
            self.replaying = False
            self.buf.replay_done(self.journal.last_seq)

    def listen(self) -> None:
        while self.replaying:
            self.replay_step()

    def accept(self, rows: list[dict]) -> None:
        self.listen()
        data = body("tasks", rows)
        seq, version = self.buf.write("tasks", decode_batch("tasks", data), micros(AT), 0.0, len(data))
        self.buf.journaled(seq, len(data))
        self.journal.commit([(seq, BATCH_KINDS["tasks"], (VERSION_FIELD.pack(version), data))], None)  # acknowledged

    def take(self) -> None:
        self.buf.draining = True  # everything is due at once
        self.buf.retry_at = 0.0
        if self.snapshot is None:
            self.snapshot = self.buf.take_snapshot(0.0)

    async def commit(self, conn) -> None:
        if self.snapshot is None:
            return
        written = await write_snapshot(conn, self.snapshot)
        assert not written.refused and not written.held
        self.snapshot = None
        self.buf.written(written.sessions, written.tasks, written.held, 0.0)
        floor = self.buf.release()
        if floor is not None:
            self.journal.commit([], floor)

    async def fail(self, conn) -> None:
        """The statements ran; the commit never happened."""
        if self.snapshot is None:
            return
        await conn.query("BEGIN")
        await upsert(conn, TASKS, list(self.snapshot.tasks.values()))
        await conn.query("ROLLBACK")
        self.snapshot = None
        self.buf.failed("injected", 0.0)


async def play(ops, path) -> dict[str, tuple]:
    conn = await Database(DatabaseConfig(url=MYSQL_URL)).connect(create=True)  # fails, never skips, without one
    try:
        await conn.query("DELETE FROM task_counts")
        await conn.query("DELETE FROM translation_tasks")
        await conn.query("INSERT IGNORE INTO translation_sessions (session_id, filename, file_path, llm_provider) "
                         f"VALUES ('{SESSION_ID}', 'game.xlsx', '/game.xlsx', 'openai')")
        node, writes = Node(path), []
        for step, op in enumerate(ops):
            match op:
                case ("write", rows):
                    node.accept(rows)
                    writes.append(rows)
                case ("replay",):
                    node.replay_step()
                case ("take",):
                    node.take()
                case ("commit",):
                    await node.commit(conn)
                case ("fail",):
                    await node.fail(conn)
                case ("crash",) | ("commit_then_crash",):
                    if op[0] == "commit_then_crash" and node.snapshot is not None:
                        await write_snapshot(conn, node.snapshot)
                    node.journal.close()
                    node = Node(path, node.lease)
            if not node.replaying:  # while it runs, the records not yet replayed are not shown
                assert await visible(conn, node.buf) == last_acknowledged(writes), f"after step {step}: {op[0]}"
        node.listen()
        assert await visible(conn, node.buf) == last_acknowledged(writes), "after the last replay"
        for _ in range(20):  # everything out
            node.take()
            await node.commit(conn)
        assert node.buf.idle()
        node.journal.close()
        assert segments(path) == []
        async with conn.cursor() as cursor:
            await cursor.execute(KEPT_COUNTS)
            kept = await cursor.fetchall()
            await cursor.execute(MysqlDb.RECOUNTED)
            assert kept == await cursor.fetchall(), "task_counts"
        return {k: (v["status"], v["target_text"], v["confidence"]) for k, v in (await stored(conn)).items()}, \
            last_acknowledged(writes)
    finally:
        conn.close()


@pytest.mark.mysql  # the flusher's statements, rolled back in the middle: MySQL's
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_any_interleaving_of_writes_failed_flushes_and_crashes_ends_at_the_last_acknowledged_state(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("journal")
    stored, expected = trio.run(play, ops, path)
    assert stored == expected
