"""Scaling out (issue 13): last-write-wins held by the database, several instances behind
HAProxy, a Galera cluster.

Every write carries its version (accept time in µs, the instance's id in the low bits), and
every upsert only moves a row, field by field, to a newer version: whichever instance
flushes a write, and whenever (a retry, a journal replay after kill -9), an older write never
overwrites a newer one."""

import contextlib
import glob
import re
import signal
import socket
import typing
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import httpx
import msgspec
import pytest
import trio
import trio_mysql

from cluster import GaleraCluster, HAProxy
from conftest import MYSQL_URL, SESSION_ID, Db, make_config, mysql_only, running, session, task
from processes import clean_environ, free_port, persistd_process
from persistd.daemon import (INSTANCE_BITS, Buffer, BufferConfig, DatabaseConfig, Entry, SessionIn, Snapshot, TaskIn,
                             combine, micros, version_of)
from persistd.mysql import MySQLStore, chunks, lock_stored_tasks, write_tasks
from persistd.storage import TASKS

SESSIONS_BATCH = "/api/v1/translation/sessions/batch"
TASKS_BATCH = "/api/v1/translation/tasks/batch"
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)


def write(row: dict, seconds: float, instance: int = 1, **fields_versions: float) -> Entry:
    """A buffered task write accepted `seconds` after T0 by `instance`; `fields_versions`
    gives optional fields merged in from earlier writes their own accept times."""
    at = T0 + timedelta(seconds=seconds)
    version = version_of(micros(at), instance)
    versions = {name: version_of(micros(T0 + timedelta(seconds=s)), instance) for name, s in fields_versions.items()}
    row_type = TaskIn if "task_id" in row else SessionIn
    return Entry(msgspec.convert(row, row_type), at.replace(microsecond=0), at.replace(microsecond=0), 1,
                 version=version, versions=versions or None)


async def flush(db, *entries: Entry) -> None:
    """Each entry in a transaction of its own, in the order given, as instances would."""
    await db.store.open()
    try:
        for entry in entries:
            rows = {entry.row.task_id: entry} if isinstance(entry.row, TaskIn) else {}
            sessions = {} if rows else {entry.row.session_id: entry}
            written = await db.store.write(Snapshot(0, sessions, rows))
            assert not written.refused and not written.held
    finally:
        db.store.close()


async def stored(db, *columns: str):
    """The task's columns (a DECIMAL as float)."""
    row = (await db.query(f"SELECT {', '.join(columns)} FROM translation_tasks WHERE task_id = 't'"))[0]
    return tuple(float(v) if isinstance(v, Decimal) else v for v in row)


# ── the order, kept by the database ─────────────────────────────────────────────────


async def test_an_older_write_flushed_after_a_newer_one_changes_nothing(db):
    await flush(db, write(session(), 0))
    await flush(db, write(task("t", status="completed", target_text="new", confidence=0.9), 2),
                write(task("t", status="pending", target_text="old", confidence=0.1, batch_id="b-old"), 1))
    assert await stored(db, "status", "target_text", "confidence", "batch_id") == ("completed", "new", 0.9, "batch_001")
    await db.assert_counts_exact()


async def test_a_field_keeps_the_value_of_the_latest_write_that_carried_it(db):
    """W1 carries target_text and confidence, W2 (newer) the status and context only, W3
    (newest) target_text only. Flushed W3, W2, then W1 (a late replay): each field holds its
    latest carrier's value, and the required fields the newest write's."""
    await flush(db, write(session(), 0))
    w1 = write(task("t", status="processing", target_text="a", confidence=0.5, batch_id="b1"), 1)
    w2 = write(task("t", status="completed", context="c", batch_id="b2"), 2)
    w3 = write(task("t", status="completed", target_text="b", batch_id="b3"), 3)
    await flush(db, w3, w2, w1)
    assert await stored(db, "status", "batch_id", "target_text", "confidence", "context") == (
        "completed", "b3", "b", 0.5, "c")
    await db.assert_counts_exact()


def test_a_merged_buffer_row_writes_each_field_at_the_version_it_was_carried():
    """One instance merges W1 (target_text) and W3 (status only) into one row: its
    target_text still has W1's version, so another instance's W2 target_text wins over it."""
    merged = combine(write(task("t", target_text="a"), 1), write(task("t", status="completed"), 3))
    assert merged.version == version_of(micros(T0 + timedelta(seconds=3)), 1)
    assert merged.field_version("target_text") == version_of(micros(T0 + timedelta(seconds=1)), 1)
    assert merged.row.target_text == "a" and merged.row.status == "completed"


async def test_a_merged_row_loses_its_older_fields_to_another_instances_newer_write(db):
    await flush(db, write(session(), 0))
    other = write(task("t", status="pending", target_text="from B"), 2, instance=2)
    merged = write(task("t", status="completed", target_text="from A"), 3, target_text=1)
    await flush(db, other, merged)
    assert await stored(db, "status", "target_text") == ("completed", "from B")


async def test_the_earliest_accept_time_is_created_at(db):
    await flush(db, write(session(), 0))
    await flush(db, write(task("t"), 7200), write(task("t"), 5))
    assert await stored(db, "created_at") == ((T0 + timedelta(seconds=5)).replace(tzinfo=None, microsecond=0),)
    await db.assert_counts_exact()


def test_versions_only_go_up_whatever_the_wall_clock_does():
    """A clock stepped back (NTP) or a replay of a journal from a clock ahead: the next
    version is still higher than every one given out or replayed."""
    buf = Buffer(BufferConfig(), instance=5)
    rows = [msgspec.convert(task("t"), TaskIn)]
    _, first = buf.write("tasks", rows, micros(T0), 0.0, 100)
    _, second = buf.write("tasks", rows, micros(T0 - timedelta(seconds=30)), 0.0, 100)
    assert second > first and second & ((1 << INSTANCE_BITS) - 1) == 5
    ahead = version_of(micros(T0 + timedelta(hours=1)), 9)
    buf.replay("tasks", [Entry(rows[0], T0, T0, 3, version=ahead)], 3, 0.0, T0)
    _, third = buf.write("tasks", rows, micros(T0), 0.0, 100)
    assert third > ahead


async def test_a_get_shows_the_newer_stored_state_over_an_older_buffered_one(db, tmp_path):
    """Another instance wrote a newer state of the task than the one this instance holds
    unflushed: a GET answers the newer one, field by field."""
    cfg = make_config(tmp_path, buffer={"flush_interval": 30})
    async with running(cfg) as d:
        await d.post(SESSIONS_BATCH, {"sessions": [session()]})
        await d.post(TASKS_BATCH, {"tasks": [task("t", status="processing", context="mine")]})
        await d.flush()
        await d.post(TASKS_BATCH, {"tasks": [task("t", status="processing", target_text="older", context="mine 2")]})
        newer = write(task("t", status="completed", target_text="newer"), 0, instance=2)
        newer.version = version_of(micros(datetime.now(timezone.utc) + timedelta(seconds=5)), 2)
        await flush(db, newer)
        got = (await d.get("/api/v1/translation/tasks/t")).json()
        assert (got["status"], got["target_text"], got["context"]) == ("completed", "newer", "mine 2")
        await d.flush()
    assert await stored(db, "status", "target_text", "context") == ("completed", "newer", "mine 2")


# ── a database of persistd 1.0 ───────────────────────────────────────────────────────

VERSION_COLUMNS = {
    "translation_sessions": ["row_version", "game_info_version", "metadata_version", "total_tasks_version",
                             "completed_tasks_version", "failed_tasks_version", "processing_tasks_version"],
    "translation_tasks": ["row_version", "target_text_version", "context_version", "confidence_version",
                          "error_message_version", "retry_count_version", "start_time_version", "end_time_version",
                          "duration_ms_version"],
}


async def as_created_by_1_0(db) -> None:
    """The tables as persistd 1.0 created them: no versions, and task_counts without shard."""
    for table, columns in VERSION_COLUMNS.items():
        for column in columns:
            await db.query(f"ALTER TABLE {table} DROP COLUMN {column}")
    if db.backend == "mysql":
        await db.query("ALTER TABLE task_counts DROP PRIMARY KEY, DROP COLUMN shard,"
                       " ADD PRIMARY KEY (session_id, status, created_hour)")


async def test_a_database_created_by_persistd_1_0_is_migrated_at_start(db, tmp_path):
    async with running(make_config(tmp_path)) as d:
        await d.post(SESSIONS_BATCH, {"sessions": [session()]})
        await d.post(TASKS_BATCH, {"tasks": [task("t", target_text="kept")]})
        await d.flush()
    await as_created_by_1_0(db)
    async with running(make_config(tmp_path)) as d:
        assert (await d.get("/api/v1/translation/tasks/t")).json()["target_text"] == "kept"
        await d.post(TASKS_BATCH, {"tasks": [task("t", status="completed")]})
        await d.flush()
    assert await stored(db, "status", "target_text", "row_version > 0", "target_text_version") == (
        "completed", "kept", 1, 0)
    await db.assert_counts_exact()
    assert (await db.query("SELECT COUNT(*) FROM translation_sessions WHERE session_id = %s", SESSION_ID)) == ((1,),)



@mysql_only
async def test_a_task_another_flush_stored_after_the_lock_aborts_this_flush_as_a_conflict(db):
    """A flush locks the tasks that are stored, then inserts the others. If another
    instance stores one of those in between, the INSERT fails (1062 on the primary key): the
    flush is aborted as a conflict and retried, its counts never added twice."""
    await flush(db, write(session(), 0))
    entry = write(task("t"), 1)
    store = MySQLStore(msgspec.convert({"url": db.url}, DatabaseConfig), 3)
    await store.open()
    try:
        await store.writer.query("BEGIN")
        assert await lock_stored_tasks(store.writer, [entry]) == set()
        await flush(db, write(task("t"), 2, instance=2))  # another instance, committed meanwhile
        (chunk,) = chunks(TASKS, [entry])
        with pytest.raises(trio_mysql.OperationalError) as caught:
            await write_tasks(store.writer, chunk.task_statements(set(), 3))
        assert store.conflict(caught.value) and store.transient(caught.value)
    finally:
        store.close()
    await db.assert_counts_exact()

# ── several instances behind HAProxy ────────────────────────────────────────────────
# Writers each own some tasks and write them round after round through the load balancer,
# each round a different shape (a partial update carries some optional fields only). A
# writer remembers, task by task, what its acknowledged writes carried: the model each stored
# row must equal once every instance has flushed.

ROUND_FIELDS = (("target_text",), ("context",), ("error_message", "retry_count"))
ROUND_STATUS = ("processing", "completed", "failed")
CHECKED = ("status", "batch_id", "target_text", "context", "error_message", "retry_count")


def round_rows(writer: int, tasks: int, round_no: int) -> list[dict]:
    fields = {name: round_no if name == "retry_count" else f"w{writer} r{round_no}"
              for name in ROUND_FIELDS[round_no % len(ROUND_FIELDS)]}
    return [task(f"w{writer}-{i}", f"s{writer}", status=ROUND_STATUS[round_no % len(ROUND_STATUS)],
                 batch_id=f"r{round_no}", **fields) for i in range(tasks)]


class Writer:
    """One client of the load balancer, writing its tasks round after round; a write that
    is not acknowledged (a 502 or a connection closed by an instance that died, a 503) is
    sent again until it is."""

    def __init__(self, number: int, tasks: int = 25) -> None:
        self.number, self.tasks = number, tasks
        self.model: dict[str, dict] = {}
        self.resent = 0

    async def post(self, client: httpx.AsyncClient, path: str, body: dict) -> None:
        for _ in range(200):
            try:
                response = await client.post(path, json=body)
                if response.status_code == 202:
                    return
            except httpx.TransportError:
                pass
            self.resent += 1
            await trio.sleep(0.05)
        raise AssertionError(f"writer {self.number}: no write acknowledged in 200 attempts")

    async def run(self, url: str, rounds: range, after_round: typing.Callable[[int], typing.Awaitable[None]] | None = None):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            if rounds.start == 0:
                await self.post(client, SESSIONS_BATCH, {"sessions": [session(f"s{self.number}")]})
            for round_no in rounds:
                rows = round_rows(self.number, self.tasks, round_no)
                await self.post(client, TASKS_BATCH, {"tasks": rows})
                for row in rows:
                    self.model.setdefault(row["task_id"], {}).update({k: row[k] for k in CHECKED if k in row})
                if after_round is not None:
                    await after_round(round_no)


async def flush_each(instances) -> int:
    """/flush on each instance in turn; returns the tasks still waiting for their session."""
    waiting = 0
    async with httpx.AsyncClient(timeout=30) as client:
        for instance in instances:
            response = await client.post(f"{instance.url}/api/v1/translation/flush")
            assert response.status_code == 200, response.text
            waiting += response.json()["tasks_waiting_for_session"]
    return waiting


async def flush_every(instances) -> None:
    """What the README's client does before it reads: /flush on every instance, again while
    one holds tasks whose session another wrote after that one's flush (one pass more at most)."""
    for _ in instances:
        if not await flush_each(instances):
            return
    raise AssertionError(f"tasks still wait for their session after {len(instances)} passes")


async def assert_every_task_at_its_last_acknowledged_write(db, writers: list[Writer]) -> None:
    rows = await db.query(f"SELECT task_id, {', '.join(CHECKED)} FROM translation_tasks")
    stored = {row[0]: dict(zip(CHECKED, row[1:])) for row in rows}
    expected = {task_id: {**dict.fromkeys(CHECKED), "retry_count": 0, **fields}
                for writer in writers for task_id, fields in writer.model.items()}
    wrong = {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}
    assert not wrong, f"{len(wrong)} of {len(expected)} tasks differ, e.g. {next(iter(wrong.items()))}"
    assert len(stored) == len(expected)
    await db.assert_counts_exact()


FAST = {"buffer": {"flush_interval": 0.3}}


def instance_config(i: int, sections: dict) -> dict:
    """persistd_process() arguments of instance i: its state dir, port and id, and `sections`."""
    return {"state": {"instance_id": i + 1}, **sections}


@contextlib.asynccontextmanager
async def instances_behind_haproxy(tmp_path, *sections: dict):
    """A persistd process per `sections` (each instance's config sections), each with its
    own state dir (<tmp_path>/instance<i>) and instance id, behind HAProxy; yields (proxy,
    [process, ...], ports)."""
    ports = [free_port() for _ in sections]
    async with contextlib.AsyncExitStack() as stack:
        instances = [await stack.enter_async_context(persistd_process(
            tmp_path / f"instance{i}", port=port, **instance_config(i, each)))
            for i, (port, each) in enumerate(zip(ports, sections))]
        proxy = await stack.enter_async_context(HAProxy(tmp_path / "haproxy", free_port(),
                                                        [("127.0.0.1", port) for port in ports]))
        yield proxy, instances, ports


async def requests_by_server(proxy: HAProxy) -> dict[str, int]:
    header, *lines = (await proxy.command("show stat")).removeprefix("# ").splitlines()
    rows = [dict(zip(header.split(","), line.split(","))) for line in lines if line]
    return {row["svname"]: int(row["stot"]) for row in rows if row["pxname"] == "persistd" and row["svname"].startswith("s")}


@mysql_only
@pytest.mark.parametrize("count", [2, 3])
async def test_writes_spread_over_instances_end_at_their_last_acknowledged_write(db, tmp_path, count):
    async with instances_behind_haproxy(tmp_path, *[FAST] * count) as (proxy, instances, _):
        writers = [Writer(n) for n in range(6)]
        async with trio.open_nursery() as nursery:
            for writer in writers:
                nursery.start_soon(writer.run, proxy.url, range(12))
        await flush_every(instances)
        spread = await requests_by_server(proxy)
        assert len(spread) == count and min(spread.values()) >= 6 * 13 // count - 6, spread
    await assert_every_task_at_its_last_acknowledged_write(db, writers)


@mysql_only
@pytest.mark.parametrize("count", [2, 3])
async def test_an_instance_killed_and_replayed_after_newer_writes_loses_nothing_and_wins_nothing(db, tmp_path, count):
    """Instance 0 flushes only every 30 s: everything it acknowledges waits in its journal.
    Some tasks are written only through it. Mid-run it is killed (kill -9); the writers go on
    through the others, whose newer writes are flushed; then it starts again on its state,
    replays its older writes and flushes them: every task ends at its last acknowledged
    write, those written only through the dead instance included."""
    holding = {"buffer": {"flush_interval": 30, "flush_rows": 100_000}}
    async with instances_behind_haproxy(tmp_path, holding, *[FAST] * (count - 1)) as (proxy, instances, ports):
        first, others = instances[0], instances[1:]
        only_first = Writer(99)
        await only_first.run(first.url, range(3))  # these tasks are written through instance 0 alone
        writers = [Writer(n) for n in range(6)]
        killed = trio.Event()

        async def kill_after_round_4(round_no: int) -> None:
            if round_no == 4 and not killed.is_set():
                killed.set()
                assert await first.kill() == -signal.SIGKILL

        async with trio.open_nursery() as nursery:
            for writer in writers:
                nursery.start_soon(writer.run, proxy.url, range(12), kill_after_round_4 if writer.number == 0 else None)
        assert killed.is_set()
        await flush_each(others)  # what has its session written (the others' sessions' tasks wait for instance 0)
        async with persistd_process(tmp_path / "instance0", port=ports[0], **instance_config(0, holding)) as again:
            await flush_every([again, *others])
            replayed = re.findall(r"journal replayed: (\d+) rows", again.log())
            assert replayed and int(replayed[-1]) >= 3 * only_first.tasks, again.log()[-2000:]
    await assert_every_task_at_its_last_acknowledged_write(db, [only_first, *writers])


# ── clocks ───────────────────────────────────────────────────────────────────────────


def clock_behind(seconds: float) -> dict[str, str]:
    """The environment of a persistd whose wall clock runs `seconds` behind (libfaketime,
    Debian's faketime package; its monotonic clock is left alone)."""
    library = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    assert library, "libfaketime is missing: apt-get install faketime"
    return clean_environ(LD_PRELOAD=library[0], FAKETIME=f"-{seconds}", FAKETIME_DONT_FAKE_MONOTONIC="1")


@mysql_only
async def test_beyond_the_clock_skew_assumption_a_later_write_through_a_slow_clock_loses(db, tmp_path):
    """The README's assumption: the instances' clocks differ by less than the time between
    two writes of one row. Instance B runs 2 s behind: it says so at start, a write through
    it 0.5 s after one through A is taken as the older and loses, and one sent 2.5 s after wins."""
    async with persistd_process(tmp_path / "a", state={"instance_id": 1}, buffer={"flush_interval": 0.2}) as a, \
            persistd_process(tmp_path / "b", env=clock_behind(2), state={"instance_id": 2},
                             buffer={"flush_interval": 0.2}) as b:
        assert re.search(r"clock is -(1\.9|2\.0)\d\d s from the database's", b.log()), b.log()[-1500:]
        async with httpx.AsyncClient(timeout=10) as client:
            await client.post(f"{a.url}{SESSIONS_BATCH}", json={"sessions": [session()]})
            await client.post(f"{a.url}{TASKS_BATCH}", json={"tasks": [task("t", target_text="first")]})
            await trio.sleep(0.5)
            await client.post(f"{b.url}{TASKS_BATCH}", json={"tasks": [task("t", target_text="0.5 s later")]})
            await flush_every([a, b])
            assert await stored(db, "target_text") == ("first",)
            await trio.sleep(2.0)
            await client.post(f"{b.url}{TASKS_BATCH}", json={"tasks": [task("t", target_text="2.5 s later")]})
            await flush_every([a, b])
            assert await stored(db, "target_text") == ("2.5 s later",)



async def test_a_restart_with_the_clock_stepped_back_gives_out_newer_versions_all_the_same(db, tmp_path):
    """Versions go on from the last run's lease (<state dir>/clock), not from the wall clock
    alone: a write after a restart whose clock stepped back 30 s still wins over the last run's."""
    async with persistd_process(tmp_path, buffer={"flush_interval": 0.2}) as before:
        async with httpx.AsyncClient(base_url=before.url, timeout=10) as client:
            await client.post(SESSIONS_BATCH, json={"sessions": [session()]})
            await client.post(TASKS_BATCH, json={"tasks": [task("t", target_text="before")]})
            await flush_every([before])
    async with persistd_process(tmp_path, env=clock_behind(30), buffer={"flush_interval": 0.2}) as after:
        async with httpx.AsyncClient(base_url=after.url, timeout=10) as client:
            await client.post(TASKS_BATCH, json={"tasks": [task("t", target_text="after")]})
            await flush_every([after])
    assert await stored(db, "target_text") == ("after",)

# ── Galera, and servers to fail over to ──────────────────────────────────────────────


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1 (a Galera cluster's)."""
    for base in range(13_300, 20_000, 50):
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise AssertionError("no block of free ports")


@mysql_only
async def test_the_flusher_and_the_readers_go_to_the_next_server_when_one_is_down(db, tmp_path):
    """The url's first server refuses connections: persistd starts, writes and reads
    through the second, and /health says healthy."""
    dead = f"127.0.0.1:{free_port()}"
    url = MYSQL_URL.replace("@127.0.0.1:", f"@{dead},127.0.0.1:", 1)
    async with running(make_config(tmp_path, database={"url": url})) as d:
        assert (await d.get("/health")).json()["status"] == "healthy"
        await d.post(SESSIONS_BATCH, {"sessions": [session()]})
        await d.post(TASKS_BATCH, {"tasks": [task("t")]})
        await d.flush()
        assert (await d.get("/api/v1/translation/tasks/t")).status_code == 200
    assert await stored(db, "task_id") == ("t",)


@mysql_only
async def test_health_is_degraded_only_when_no_server_answers(db, tmp_path):
    url = MYSQL_URL.replace("@127.0.0.1:", f"@127.0.0.1:{free_port()},127.0.0.1:", 1)
    async with running(make_config(tmp_path, database={"url": url})) as d:
        assert (await d.get("/health")).status_code == 200
    nobody = f"mysql://root@127.0.0.1:{free_port()},127.0.0.1:{free_port()}/persistd"
    async with running(make_config(tmp_path / "b", database={"url": nobody},
                                   state={"dir": str(tmp_path / "b")})) as d:
        health = await d.get("/health")
        assert health.status_code == 503 and health.json()["database"] == "unhealthy"


async def watch_health(instances, until: trio.Event, degraded: list) -> None:
    """/health of every instance every 100 ms until `until`; what was not 200 goes in `degraded`."""
    async with httpx.AsyncClient(timeout=5) as client:
        while not until.is_set():
            for instance in instances:
                try:
                    status = (await client.get(f"{instance.url}/health")).status_code
                except httpx.TransportError as exc:
                    status = repr(exc)
                if status != 200:
                    degraded.append((trio.current_time(), instance.url, status))
            await trio.sleep(0.1)


@pytest.mark.mysql
async def test_galera_a_node_killed_under_load_and_rejoining_loses_no_acknowledged_row(tmp_path):
    """Three mariadbd in a Galera cluster; two persistd behind HAProxy, the first writing
    through node 0, the second through node 1 (its url lists the nodes from there). Node 0 is
    killed (kill -9) in the middle of the writes, and started again later: it rejoins. No
    acknowledged write is lost or overtaken, every node holds the same rows, and /health
    never says degraded: some node always answers."""
    async with GaleraCluster(tmp_path / "galera", free_port_block(12)) as cluster:
        hosts = [f"127.0.0.1:{port}" for port in cluster.ports]
        urls = [f"mysql://root@{','.join(hosts)}/persistd", f"mysql://root@{','.join(hosts[1:] + hosts[:1])}/persistd"]
        async with instances_behind_haproxy(tmp_path, *[{**FAST, "database": {"url": url}} for url in urls]) \
                as (proxy, instances, _):
            writers = [Writer(n) for n in range(6)]
            degraded: list = []
            watched = trio.Event()

            async def kill_and_restart_node_0(round_no: int) -> None:
                if round_no == 3:
                    await cluster.kill(0)
                elif round_no == 9:
                    await cluster.restart(0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_health, instances, watched, degraded)
                async with trio.open_nursery() as writing:
                    for writer in writers:
                        writing.start_soon(writer.run, proxy.url, range(14),
                                           kill_and_restart_node_0 if writer.number == 0 else None)
                await flush_every(instances)
                watched.set()
            assert cluster.running() == [0, 1, 2]
            assert not degraded, degraded[:5]
        for port in cluster.ports:
            node = Db("mysql", tmp_path, f"mysql://root@127.0.0.1:{port}/persistd")
            try:
                await assert_every_task_at_its_last_acknowledged_write(node, writers)
            finally:
                node.impl.close()
