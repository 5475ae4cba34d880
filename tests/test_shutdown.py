"""Shutdown of the real process (DESIGN.md "shutdown"): SIGTERM or SIGINT → stop accepting,
finish in-flight requests, write everything out, exit 0. What cannot be written by
shutdown_timeout stays in the journal and the next start writes it; without a journal it
goes to <state dir>/dead-letter.jsonl. Never dropped silently.

persistd runs as `python -m persistd --config <toml>`; the load comes from concurrent
client tasks here, each on its own connection."""

import contextlib
import functools
import json
import os
import signal

import httpx
import hypercorn.trio
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from conftest import Raw, make_config, mysql_only, raw_request, running, session, task
from persistd.daemon import Buffer, Journal
from processes import encode, persistd_process, post
from proxy import database_outage, tcp_proxy

SESSIONS = "/api/v1/translation/sessions/batch"
TASKS = "/api/v1/translation/tasks/batch"
FLUSH = "/api/v1/translation/flush"
TASK_STATUSES = ("pending", "processing", "completed", "failed")
EXIT_MARGIN_S = 3.0  # process teardown and scheduling slack on a loaded 2-core machine


# ── signals under load ───────────────────────────────────────────────────────────────


class Load:
    """Clients sending distinct 1000-task batches until the daemon goes away, recording
    every task acknowledged with 202 and the status it was acknowledged with."""

    WORKERS = 4
    BATCH = 1000

    def __init__(self, url: str) -> None:
        self.url = url
        self.acked: dict[str, str] = {}
        self.batches_acked = 0
        self.acked_after_signal = 0
        self.signalled = trio.Event()
        self.unexpected: list[str] = []

    def batch(self, worker: int, n: int) -> tuple[bytes, list[str], str]:
        status = TASK_STATUSES[(worker + n) % len(TASK_STATUSES)]
        ids = [f"w{worker}-b{n:04d}-{i:04d}" for i in range(self.BATCH)]
        rows = [task(task_id, row_index=i, status=status, batch_id=f"w{worker}-b{n}") for i, task_id in enumerate(ids)]
        return encode("tasks", rows), ids, status

    async def worker(self, worker: int) -> None:
        limits = httpx.Limits(max_connections=1)  # one keep-alive connection per worker
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            for n in range(10_000):
                body, ids, status = self.batch(worker, n)
                try:
                    response = await client.post(TASKS, content=body, headers={"content-type": "application/json"})
                except httpx.TransportError:
                    if self.signalled.is_set():
                        return  # the daemon stopped listening or reset the connection: not acknowledged
                    raise
                if response.status_code == 202:
                    self.acked.update(dict.fromkeys(ids, status))
                    self.batches_acked += 1
                    self.acked_after_signal += self.signalled.is_set()
                elif response.status_code == 503 and response.json().get("error_code") == "BUFFER_FULL":
                    await trio.sleep(0.05)
                else:
                    self.unexpected.append(f"{response.status_code} {response.text[:200]}")
                    return


# A client whose upload the stopping daemon cuts off leaves httpx's body iterator to the
# garbage collector; that is the client's side of an unacknowledged request, not a defect.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object ByteStream.__aiter__:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_under_load_writes_every_acknowledged_row_and_exits_0(db, tmp_path, signum):
    """A signal in the middle of a load of task batches: persistd exits 0 within
    graceful_timeout + shutdown_timeout, and every row acknowledged with 202 (before or
    during the signal) is in MySQL with the status it was acknowledged with."""
    # flush_rows above what the load sends before the signal: the acknowledged rows are
    # still in memory when it comes, so the final flush is what has to write them.
    async with persistd_process(tmp_path, buffer={"max_rows": 30_000, "flush_rows": 50_000}) as process:
        async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
            assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
            load = Load(process.url)
            async with trio.open_nursery() as nursery:
                for worker in range(Load.WORKERS):
                    nursery.start_soon(load.worker, worker)
                with trio.fail_after(20):
                    while load.batches_acked < 12:
                        await trio.sleep(0.01)
                buffered = (await client.get("/health")).json()["buffer"]["tasks_count"]
                acked_before = load.batches_acked
                process.signal(signum)
                load.signalled.set()
                bound = process.cfg["server"]["graceful_timeout"] + process.cfg["buffer"]["shutdown_timeout"] + EXIT_MARGIN_S
                code, elapsed = await process.wait_exit(bound)
        print(f"{signal.Signals(signum).name}: {acked_before} batches acked before the signal "
              f"({buffered} tasks buffered), {load.acked_after_signal} during it; exit {code} in {elapsed:.2f} s")
        assert buffered >= 1000, "nothing was waiting in the buffer when the signal came"

        assert not load.unexpected, load.unexpected
        assert code == 0, process.log()[-4000:]
        stored = dict(await db.query("SELECT task_id, status FROM translation_tasks"))
        missing = [task_id for task_id in load.acked if task_id not in stored]
        assert not missing, f"{len(missing)} acknowledged rows are not in MySQL, e.g. {missing[:5]}"
        wrong = {task_id: (status, stored[task_id]) for task_id, status in load.acked.items() if stored[task_id] != status}
        assert not wrong, f"{len(wrong)} rows with another status than acknowledged, e.g. {list(wrong.items())[:5]}"
        assert await db.query("SELECT session_id FROM translation_sessions") == ((session()["session_id"],),)
        assert not (tmp_path / "state" / "dead-letter.jsonl").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@mysql_only
async def test_signal_stops_accepting_new_connections(db, tmp_path, signum):
    """After the signal the port refuses new connections at once, while persistd is still
    busy writing out its buffer (here: to a database that is slow to come back)."""
    async with tcp_proxy() as proxy:
        async with persistd_process(tmp_path, database={"url": proxy.url()},
                                    buffer={"shutdown_timeout": 5.0}) as process:
            async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
                assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
                assert (await client.post(FLUSH)).status_code == 200
                assert (await post(client, TASKS, "tasks", [task("after-flush")])).status_code == 202
            await proxy.cut()  # the final flush now keeps persistd busy
            assert await process.accepts_connections()
            process.signal(signum)
            with trio.fail_after(1.0):
                while await process.accepts_connections():
                    await trio.sleep(0.02)
            assert process.proc.returncode is None, "persistd exited before it could write its buffer"
            await proxy.restore()
            code, _ = await process.wait_exit(process.cfg["buffer"]["shutdown_timeout"] + EXIT_MARGIN_S)
            assert code == 0
            assert await db.query("SELECT task_id FROM translation_tasks") == (("after-flush",),)


# ── shutdown while the database is away ──────────────────────────────────────────────


async def sigterm_exits_0(process) -> None:
    """SIGTERM: persistd exits 0 within graceful_timeout + shutdown_timeout (and slack)."""
    process.signal(signal.SIGTERM)
    bound = process.cfg["server"]["graceful_timeout"] + process.cfg["buffer"]["shutdown_timeout"] + EXIT_MARGIN_S
    code, _ = await process.wait_exit(bound)
    assert code == 0, process.log()[-4000:]


def dead_letters(state_dir) -> list[dict]:
    path = os.path.join(state_dir, "dead-letter.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


async def start_again_and_flush(tmp_path) -> None:
    """The next start, on the state dir the last one left, with the database back."""
    async with persistd_process(tmp_path) as process:
        async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
            assert (await client.post(FLUSH)).status_code == 200
        process.signal(signal.SIGTERM)
        assert (await process.wait_exit(process.cfg["buffer"]["shutdown_timeout"] + EXIT_MARGIN_S))[0] == 0


LATE_TASKS = [task(f"late-{i:03d}", row_index=i, status="completed") for i in range(100)]


async def sigterm_while_database_cut(db, tmp_path, **sections):
    """A session and a task written by a first flush; then 100 completed tasks and the
    session's completion accepted, the database cut, SIGTERM: exit 0 within
    graceful_timeout + shutdown_timeout."""
    async with database_outage(db) as outage:
        async with persistd_process(tmp_path, database={"url": outage.url(), "write_timeout": 2.0},
                                    buffer={"shutdown_timeout": 3.0}, **sections) as process:
            async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
                assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
                assert (await post(client, TASKS, "tasks", [task("written")])).status_code == 202
                assert (await client.post(FLUSH)).status_code == 200  # a first successful flush
                assert (await post(client, TASKS, "tasks", LATE_TASKS)).status_code == 202
                assert (await post(client, SESSIONS, "sessions", [session(status="completed")])).status_code == 202
            await outage.cut()
            await sigterm_exits_0(process)
    return process


async def test_sigterm_while_database_unreachable_exits_0_and_the_next_start_writes_everything(db, tmp_path):
    """SIGTERM while the database is unreachable: persistd exits 0 within shutdown_timeout
    (plus the grace for requests); what it could not write stays in the journal, not in
    the dead-letter file, and the next start writes it all with its last state."""
    process = await sigterm_while_database_cut(db, tmp_path)
    assert not os.path.exists(os.path.join(process.state_dir, "dead-letter.jsonl"))
    assert await db.query("SELECT task_id FROM translation_tasks") == (("written",),)

    await start_again_and_flush(tmp_path)
    rows = await db.query("SELECT task_id, status FROM translation_tasks ORDER BY task_id")
    assert rows == tuple(sorted([(t["task_id"], "completed") for t in LATE_TASKS] + [("written", "pending")]))
    assert await db.query("SELECT status FROM translation_sessions") == (("completed",),)
    assert [name for name in os.listdir(os.path.join(process.state_dir, "journal")) if name.endswith(".journal")] == []


async def test_sigterm_while_database_unreachable_without_a_journal_dead_letters_the_buffer(db, tmp_path):
    """The same with `[journal] mode = "off"`: every buffered row it could not write is in
    <state dir>/dead-letter.jsonl with its reason, table and row."""
    process = await sigterm_while_database_cut(db, tmp_path, journal={"mode": "off"})
    records = dead_letters(process.state_dir)
    for record in records:
        assert {"reason", "table", "row"} <= record.keys()
        assert isinstance(record["reason"], str) and record["reason"]
    by_key = {(r["table"], r["row"].get("task_id") or r["row"]["session_id"]): r for r in records}
    assert len(by_key) == len(records), "a row is in the dead-letter file twice"
    expected = {("translation_tasks", t["task_id"]) for t in LATE_TASKS} | {("translation_sessions", session()["session_id"])}
    assert by_key.keys() == expected
    assert by_key[("translation_sessions", session()["session_id"])]["row"]["status"] == "completed"
    assert all(by_key[("translation_tasks", t["task_id"])]["row"]["status"] == "completed" for t in LATE_TASKS)
    # What was written before stays; nothing of the rest reached MySQL.
    assert await db.query("SELECT task_id FROM translation_tasks") == (("written",),)
    assert await db.query("SELECT status FROM translation_sessions") == (("processing",),)


async def flush_errors(client: httpx.AsyncClient) -> float:
    text = (await client.get("/api/v1/system/metrics")).text
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples if s.name == "persistence_flush_errors_total")


@mysql_only
async def test_dead_letter_file_ends_with_the_state_accepted_last(db, tmp_path):
    """Without a journal, when a row has several unwritten states at shutdown (one in a
    failed flush that is being retried, a newer one accepted after it), the dead-letter
    file lists them in the order they were accepted: replaying it line by line ends with
    the state accepted last."""
    async with tcp_proxy() as proxy:
        async with persistd_process(tmp_path, database={"url": proxy.url()}, journal={"mode": "off"},
                                    buffer={"flush_interval": 0.2, "shutdown_timeout": 1.5}) as process:
            async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
                assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
                assert (await client.post(FLUSH)).status_code == 200
                await proxy.cut()
                older = {"sessions": [session(status="processing", completed_tasks=1)],
                         "tasks": [task("t1", status="processing")]}
                newer = {"sessions": [session(status="completed", completed_tasks=2)],
                         "tasks": [task("t1", status="completed")]}
                for key, rows in older.items():
                    assert (await post(client, f"/api/v1/translation/{key}/batch", key, rows)).status_code == 202
                with trio.fail_after(5):
                    while await flush_errors(client) < 1:  # the older states are now in a failed flush
                        await trio.sleep(0.05)
                for key, rows in newer.items():
                    assert (await post(client, f"/api/v1/translation/{key}/batch", key, rows)).status_code == 202
            await sigterm_exits_0(process)

    last_state: dict[tuple[str, str], dict] = {}
    for record in dead_letters(process.state_dir):  # a replay: later lines win
        row = record["row"]
        last_state[(record["table"], row.get("task_id") or row["session_id"])] = row
    assert last_state.keys() == {("translation_sessions", session()["session_id"]), ("translation_tasks", "t1")}
    assert last_state[("translation_tasks", "t1")]["status"] == "completed"
    replayed = last_state[("translation_sessions", session()["session_id"])]
    assert (replayed["status"], replayed["completed_tasks"]) == ("completed", 2)


@mysql_only
async def test_sigterm_while_database_stops_answering_exits_within_shutdown_timeout(db, tmp_path):
    """SIGTERM while the database accepts nothing and answers nothing (a partition, not a
    refusal): the final write gives up at shutdown_timeout, persistd exits 0, and the next
    start writes the rows it held."""
    async with tcp_proxy() as proxy:
        async with persistd_process(tmp_path, database={"url": proxy.url()},
                                    buffer={"shutdown_timeout": 2.0}) as process:
            async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
                assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
                assert (await client.post(FLUSH)).status_code == 200
                assert (await post(client, TASKS, "tasks", [task("unanswered")])).status_code == 202
            proxy.stall()
            await sigterm_exits_0(process)
            await proxy.cut()
    assert await db.query("SELECT task_id FROM translation_tasks") == ()
    await start_again_and_flush(tmp_path)
    assert await db.query("SELECT task_id FROM translation_tasks") == (("unanswered",),)


@mysql_only
async def test_sigterm_during_a_hung_flush_exits_within_shutdown_timeout(db, tmp_path):
    """SIGTERM while a flush that started before the signal hangs on a database that
    stopped answering: the final write is bounded by shutdown_timeout, not by the longer
    write_timeout of that flush, and the next start writes the rows."""
    async with tcp_proxy() as proxy:
        async with persistd_process(tmp_path, database={"url": proxy.url(), "write_timeout": 30.0},
                                    buffer={"flush_interval": 0.2, "shutdown_timeout": 2.0}) as process:
            async with httpx.AsyncClient(base_url=process.url, timeout=10) as client:
                assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
                assert (await client.post(FLUSH)).status_code == 200
                proxy.stall()
                assert (await post(client, TASKS, "tasks", [task("stuck")])).status_code == 202
                await trio.sleep(1.0)  # the flusher is now waiting for an answer that never comes
            await sigterm_exits_0(process)
            await proxy.cut()
    assert await db.query("SELECT task_id FROM translation_tasks") == ()
    await start_again_and_flush(tmp_path)
    assert await db.query("SELECT task_id FROM translation_tasks") == (("stuck",),)


# ── an actor that fails ──────────────────────────────────────────────────────────────
# A bug in any actor must stop the daemon, never leave it half alive; what it acknowledged
# stays in the journal (the next start writes it) or, without one, goes to the dead-letter
# file first. Each test arms an injected RuntimeError once a batch has its 202, then makes
# that actor run.


def inject(monkeypatch, actor: str, store_class: type, armed: trio.Event) -> None:
    def armed_raise(*_):
        if armed.is_set():
            raise RuntimeError(f"injected into the {actor} actor")

    async def armed_raise_async(*args):
        armed_raise()

    if actor == "buffer":
        take = Buffer.take_snapshot
        monkeypatch.setattr(Buffer, "take_snapshot", lambda self, now: armed_raise() or take(self, now))
    elif actor == "flusher":
        monkeypatch.setattr(store_class, "write", armed_raise_async)
    elif actor == "journal":
        commit = Journal.commit
        monkeypatch.setattr(Journal, "commit", lambda self, *args: armed_raise() or commit(self, *args))
    elif actor == "janitor":
        monkeypatch.setattr(store_class, "cleanup", armed_raise_async)
    else:
        serve = hypercorn.trio.serve

        async def failing_serve(app, config, *, shutdown_trigger, task_status):
            async with trio.open_nursery() as nursery:
                task_status.started(await nursery.start(functools.partial(
                    serve, app, config, shutdown_trigger=shutdown_trigger)))
                await armed.wait()
                raise RuntimeError("injected into the http actor")

        monkeypatch.setattr(hypercorn.trio, "serve", failing_serve)


@pytest.mark.usefixtures("close_raw_clients")
@pytest.mark.parametrize(("actor", "mode"), [(actor, mode) for actor in ("http", "buffer", "journal", "flusher", "janitor")
                                             for mode in ("fsync", "off") if (actor, mode) != ("journal", "off")])
async def test_an_exception_in_any_actor_stops_the_daemon_and_loses_no_acknowledged_row(
        db, tmp_path, monkeypatch, actor, mode):
    """(Without a journal there is no journal actor.)"""
    armed = trio.Event()
    inject(monkeypatch, actor, type(db.store), armed)
    cfg = make_config(tmp_path, journal={"mode": mode}, janitor={"interval": 0.3 if actor == "janitor" else 0},
                      buffer={"flush_interval": 30, "flush_rows": 100_000})
    gone = trio.Event()
    async with trio.open_nursery() as nursery:
        with pytest.raises(BaseExceptionGroup) as raised:
            async with running(cfg) as d:
                assert (await d.post(SESSIONS, {"sessions": [session()]})).status_code == 202
                armed.set()
                nursery.start_soon(make_it_run, d, gone)
                with trio.fail_after(10):
                    await trio.sleep_forever()  # the failure cancels this wait
        gone.set()
    assert any(isinstance(e, RuntimeError) and actor in str(e) for e in leaves(raised.value)), raised.value
    monkeypatch.undo()
    if mode == "off":
        dead = tmp_path / "state" / "dead-letter.jsonl"
        lines = [json.loads(line) for line in dead.read_text().splitlines()] if dead.exists() else []
        in_file = {line["row"].get("session_id") for line in lines if line["table"] == "translation_sessions"}
        in_db = {s for (s,) in await db.query("SELECT session_id FROM translation_sessions")}
        assert session()["session_id"] in in_file | in_db, (lines, in_db)
    else:
        async with running(make_config(tmp_path, journal={"mode": mode})) as d:  # the next start
            await d.flush()
        assert await db.query("SELECT session_id FROM translation_sessions") == ((session()["session_id"],),)


async def make_it_run(d, gone: trio.Event) -> None:
    """A batch and a flush, again and again, until the daemon is gone: requests the armed
    actor takes part in. Outside the daemon's nursery, so that its failure never cancels a
    request half way; over raw sockets, because httpx leaves the body of a request that the
    dying daemon cut off to the garbage collector (an unraisable warning, seen in CI)."""
    batch = json.dumps({"tasks": [task()]}).encode()
    while not gone.is_set():
        with contextlib.suppress(OSError, EOFError, trio.BrokenResourceError):
            c = await Raw.open(d)
            for request in (raw_request("POST", TASKS, batch), raw_request("POST", FLUSH)):
                await c.send(request)
                await c.response()
        await trio.sleep(0.1)


def leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in leaves(e)]
    return [group]
