"""persistd's MySQL backend (MariaDB too): the storage seam (`persistd.storage.Store`) over
trio-mysql, for production. Every statement persistd sends to MySQL is in this module.

Writes: multi-row INSERT ... ON DUPLICATE KEY UPDATE built as text (each row a JSON array
encoded by msgspec, in a worker thread) while the previous statement runs, each field changed
only by a newer version; task_counts kept in the same transaction. Reads: a small pool of
connections, thrown away after any error. The flusher's writer connection is its own.

The url may name several servers (a Galera cluster's nodes): every new connection goes to the
first that answers, from the one that answered last; reads wait for what other nodes
committed (wsrep_sync_wait)."""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import re
import time
import typing
from datetime import datetime
from typing import Any, NamedTuple

import msgspec
import trio
import trio_mysql
import trio_mysql.cursors
from msgspec import UNSET

from persistd.daemon import (SESSION_SETUP, STATEMENT_MAX_BYTES, STATEMENT_MAX_ROWS, UTC, DatabaseConfig, Entry,
                             Snapshot, Stats, Written, parse_database_url)
from persistd.storage import (CLEANUP_CHUNK_SESSIONS, CLEANUP_DRY_RUN, CLEANUP_WHERE, DELETE_CHUNK_ROWS, EMPTY_COUNTS,
                              JSON_COLUMNS, KEPT_COUNTS, RESTORED_FIELDS, SESSIONS, SESSIONS_BY_STATUS, SHEET_ORDER,
                              TASK_STATS, TASKS, TIME_COLUMNS, UNFINISHED, Query, Reads, Table, decode_json_columns,
                              drifted, group_by_shape, hour_floor, read_schema, reconcile_slice, sessions_after,
                              split_held, stats_from, upsert_columns, version_columns, version_values,
                              versioned_updates, written)


DB_ERRORS = (trio_mysql.MySQLError, OSError, trio.TooSlowError, trio.BrokenResourceError)
# Server errors that say the database is away, busy or changing hands, not that it refuses
# what we ask: a flush failing with one is retried, forever. Any other error (no privilege,
# an unknown table or column, a bad password) would fail the same way at every retry, while
# the journal fills and /health says healthy: it stops the daemon instead (see Fatal).
TRANSIENT = frozenset({
    1040,  # too many connections
    1053,  # server shutdown in progress
    1205, 1213,  # lock wait timeout, deadlock
    1021, 1114,  # disk full, table full: writes resume once an operator frees space
    1290, 1792, 1836,  # read-only (option, transaction, mode): a failover is under way
    1047,  # Galera: WSREP has not yet prepared the node for application use
    1317, 1927, 4031,  # query interrupted, connection killed, disconnected for being idle
    1152, 1158, 1159, 1160, 1161,  # aborted connection, network read and write errors or timeouts
})


def transient(exc: BaseException) -> bool:
    """Whether retrying can help. Client-side errors (2000-2999: refused, lost, gone away),
    timeouts, sockets and the driver's own protocol errors always can; a server error only
    when its code is in TRANSIENT."""
    if isinstance(exc, trio_mysql.MySQLError) and not isinstance(exc, trio_mysql.InterfaceError):
        code = exc.args[0] if exc.args else None
        return not isinstance(code, int) or 2000 <= code < 3000 or code in TRANSIENT
    return isinstance(exc, DB_ERRORS)


# What a read answers 503 for; any other database error is a bug of ours and a 500.
DB_UNAVAILABLE = (trio_mysql.OperationalError, trio_mysql.InterfaceError, OSError, trio.TooSlowError,
                  trio.BrokenResourceError)


def _force_close(conn: trio_mysql.Connection) -> None:
    """trio_mysql 1.0.3 closes a connection it gave up on (after an error, a cancellation,
    or `close()`) by calling SocketStream.close(), which does not exist: the error is
    swallowed and the socket leaks until garbage collection. Close the trio socket."""
    stream, conn._sock, conn._closed = conn._sock, None, True
    if stream is not None:
        try:
            stream.socket.close()
        except RuntimeError:  # garbage-collected outside trio: no loop to notify
            os.close(stream.socket.detach())


trio_mysql.connections.Connection._force_close = _force_close
trio_mysql.connections.Connection.__del__ = _force_close
ER_BAD_DB_ERROR = 1049
ER_DUP_ENTRY = 1062
ER_LOCK_DEADLOCK = 1213
# Errors that refuse a row for what it holds: retrying cannot help, the row goes to the
# dead-letter file and the rest is written. Any other error is the database's state (lost
# connection, deadlock, lock wait, disk full, ...) and the whole flush is retried.
# Validation at the door should leave none of these; a constraint or trigger added by an
# operator can still refuse rows.
ROW_REFUSED = frozenset({
    1048,  # column cannot be null
    1062,  # duplicate entry (a unique key beside the primary one)
    1264, 1265, 1292, 1366, 1406, 1690,  # value out of range, truncated, incorrect, too long
    1451, 1452,  # foreign key
    1644,  # SIGNAL from a trigger
    3140,  # invalid JSON (MySQL)
    3819, 4025,  # CHECK constraint (MySQL, MariaDB)
})
NEEDS_ESCAPE = re.compile("[\0\\\\\n\r\x1a'\"]")


def sql_escape(text: str) -> str:
    """MySQL's backslash escapes. A chain of str.replace runs at C speed; str.translate
    with a mapping costs ~50 ns a character on non-ASCII text."""
    return (text.replace("\\", "\\\\").replace("\0", "\\0").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\x1a", "\\Z").replace("'", "\\'").replace('"', '\\"'))


# task_counts: the tasks by session, status and hour of creation, changed in the transaction
# that changes the tasks. An upsert first counts out the stored states of its rows, then
# counts in their new ones, both in the database: a partial update keeps stored fields, and
# a task that already exists keeps its created_at. Each instance changes only its own rows
# (`shard`, its instance id): two instances flushing tasks of one session change different
# rows and never wait for (or, on Galera, abort) each other. A bucket is the sum of its
# shards. A count-out never takes a bucket below zero: a task written behind persistd's back
# was never counted in (the reconciliation counts it later), so its bucket may hold less
# than the tasks found.
CREATED_HOUR = "FROM_UNIXTIME(UNIX_TIMESTAMP(created_at) DIV 3600 * 3600)"
COUNT_COLUMNS = "session_id, status, created_hour, shard, tasks, duration_ms_sum, durations"
GROUPED_TASKS = ("SELECT session_id, status, {hour} AS hour, COUNT(*) AS n, COALESCE(SUM(duration_ms), 0) AS ms,"
                 " COUNT(duration_ms) AS nd FROM translation_tasks WHERE {where} GROUP BY 1, 2, 3")
ADD_COUNTS = (" ON DUPLICATE KEY UPDATE tasks = tasks + VALUES(tasks),"
              " duration_ms_sum = duration_ms_sum + VALUES(duration_ms_sum), durations = durations + VALUES(durations)")


def count_in_sql(where: str, shard: int) -> str:
    """Adds the tasks that match `where`, as they are stored, to their buckets."""
    return (f"INSERT INTO task_counts ({COUNT_COLUMNS}) SELECT d.session_id, d.status, d.hour, {shard:d}, d.n, d.ms,"
            " d.nd FROM (" + GROUPED_TASKS.format(hour=CREATED_HOUR, where=where) + ") AS d" + ADD_COUNTS)


def count_out_sql(where: str, shard: int) -> str:
    """Takes the tasks that match `where`, as they are stored, out of their buckets: out of
    this shard's rows, at most what the bucket's shards hold together."""
    def held(column: str) -> str:
        return (f"(SELECT COALESCE(SUM(c.{column}), 0) FROM task_counts c WHERE c.session_id = d.session_id"
                " AND c.status = d.status AND c.created_hour = d.hour)")
    return (f"INSERT INTO task_counts ({COUNT_COLUMNS}) SELECT d.session_id, d.status, d.hour, {shard:d},"
            f" -LEAST(d.n, {held('tasks')}), -LEAST(d.ms, {held('duration_ms_sum')}), -LEAST(d.nd, {held('durations')})"
            " FROM (" + GROUPED_TASKS.format(hour=CREATED_HOUR, where=where) + ") AS d" + ADD_COUNTS)


def sql_value(value: Any) -> str:
    """A literal for the statement text. The values were validated at the door; the
    connection runs with backslash escapes on (the server default, never changed here)."""
    if value is None:
        return "NULL"
    kind = type(value)
    if kind is str:
        return "'" + (sql_escape(value) if NEEDS_ESCAPE.search(value) else value) + "'"
    if kind is int or kind is float:
        return repr(value)
    if kind is datetime:
        return sql_time(value)
    return sql_value(msgspec.json.encode(value).decode())  # a JSON object


def sql_time(value: datetime) -> str:
    return "'" + time_text(value) + "'"


@functools.lru_cache(maxsize=256)
def time_text(value: datetime) -> str:
    """A TIMESTAMP literal's text. Times were made UTC, whole seconds, 1970-2038 at the door;
    isoformat is twice as fast as strftime."""
    return value.isoformat(" ")[:19]


def json_text(value: Any) -> str:
    return msgspec.json.encode(value).decode()


# A row's values, encoded by msgspec as a JSON array, are a MySQL row literal once its
# brackets are parentheses: JSON strings are double-quoted MySQL strings (SESSION_SETUP's
# sql_mode has no ANSI_QUOTES), their escapes \" \\ \n \r \t \b are MySQL's too, numbers are numbers and null
# is NULL. Only \f and \uXXXX (other control characters) mean something else to MySQL: a
# row with one (the check may also catch an escaped backslash before an f or u) is written
# value by value. Building a statement this way takes about half the time.
ROW_ENCODER = msgspec.json.Encoder()
NOT_MYSQL = re.compile(rb"\\[fu]")


def row_literal(values: list[Any]) -> bytes:
    literal = ROW_ENCODER.encode(values)
    if NOT_MYSQL.search(literal):
        return ("(" + ",".join(map(sql_value, values)) + ")").encode()
    return b"(" + literal[1:-1] + b")"


@functools.cache
def statement_frame(table: Table, shape: tuple[str, ...]) -> tuple[bytes, bytes]:
    """INSERT head and ON DUPLICATE KEY UPDATE tail for rows that carry the optional fields
    `shape`, each field changed only by a newer version (storage.versioned_updates)."""
    head = f"INSERT INTO {table.name} ({', '.join(f'`{c}`' for c in upsert_columns(table, shape))}) VALUES "
    updates = versioned_updates(table, shape, lambda c: f"VALUES(`{c}`)", "IF({}, {}, {})", "GREATEST", "LEAST")
    return head.encode(), (" ON DUPLICATE KEY UPDATE " + ", ".join(updates)).encode()


@functools.cache
def converters(columns: tuple[str, ...]) -> tuple[tuple[int, typing.Callable[[Any], str]], ...]:
    """The columns whose values msgspec would not encode as MySQL reads them: times (no
    ISO 8601 "T" and "Z" in a TIMESTAMP) and JSON objects (stored as their text)."""
    return tuple((i, time_text if name in TIME_COLUMNS else json_text)
                 for i, name in enumerate(columns) if name in TIME_COLUMNS or name in JSON_COLUMNS)


class Chunk(NamedTuple):
    """Rows of one shape for one statement: their value literals, built ahead."""
    table: Table
    shape: tuple[str, ...]
    entries: list[Entry]
    literals: list[bytes]
    keys: list[str]  # each row's key as an SQL literal

    def upsert(self, rows: list[int] | None = None, *, update: bool = True) -> bytes:
        """INSERT of the rows at `rows` (all by default), ON DUPLICATE KEY UPDATE by version
        unless not `update` (then a row stored meanwhile fails it with 1062)."""
        head, tail = statement_frame(self.table, self.shape)
        literals = self.literals if rows is None else [self.literals[i] for i in rows]
        return head + b",".join(literals) + (tail if update else b"")

    def task_statements(self, stored: set[str], shard: int) -> list[tuple[bytes | str, str]]:
        """What writes a chunk of tasks once the ones `stored` are known and locked, each with
        its part: "out", "upsert" and "in" for the stored tasks (their stored states counted
        out, the upsert, their new states counted in), "new" and "counted" for the others (a
        plain INSERT, and their states counted from the values)."""
        old = [i for i, e in enumerate(self.entries) if e.row.task_id in stored]
        new = [i for i, e in enumerate(self.entries) if e.row.task_id not in stored]
        statements: list[tuple[bytes | str, str]] = []
        if old:
            where = f"task_id IN ({','.join(self.keys[i] for i in old)})"
            statements += [(count_out_sql(where, shard), "out"), (self.upsert(old), "upsert"),
                           (count_in_sql(where, shard), "in")]
        if new:
            statements += [(self.upsert(new, update=False), "new"),
                           (count_new_tasks_sql([self.entries[i] for i in new], shard), "counted")]
        return statements


def count_new_tasks_sql(entries: list[Entry], shard: int) -> str:
    """count_in for tasks that did not exist: their stored state is the one written, with
    the accept time as created_at and no duration_ms unless the row carries one."""
    counts: dict[tuple[str, str, datetime, int], list[int]] = {}
    for entry in entries:
        row = entry.row
        n = counts.setdefault((row.session_id, row.status, hour_floor(entry.created_at), shard), [0, 0, 0])
        n[0] += 1
        if row.duration_ms is not UNSET and row.duration_ms is not None:
            n[1] += row.duration_ms
            n[2] += 1
    return (f"INSERT INTO task_counts ({COUNT_COLUMNS}) VALUES "
            + ",".join(f"({','.join(map(sql_value, (*key, *n)))})" for key, n in counts.items()) + ADD_COUNTS)


def chunks(table: Table, entries: list[Entry], max_bytes: int = STATEMENT_MAX_BYTES) -> list[Chunk]:
    """`entries` as chunks of one shape each, at most STATEMENT_MAX_ROWS rows and `max_bytes`
    bytes of values (UTF-8, as the server counts its max_allowed_packet: an emoji is one
    character and 4 bytes)."""
    found = []
    for shape, group in group_by_shape(table, entries).items():
        columns = table.required + shape
        values_of = operator.attrgetter(*columns)
        convert = converters(columns)
        chunk = Chunk(table, shape, [], [], [])
        size = 0
        for entry in group:
            row = [*values_of(entry.row), time_text(entry.created_at), time_text(entry.updated_at),
                   *version_values(entry, shape)]
            for i, to_text in convert:
                if row[i] is not None:
                    row[i] = to_text(row[i])
            literal = row_literal(row)
            if len(chunk.literals) == STATEMENT_MAX_ROWS or size + len(literal) > max_bytes:
                found.append(chunk)
                chunk, size = Chunk(table, shape, [], [], []), 0
            chunk.entries.append(entry)
            chunk.literals.append(literal)
            chunk.keys.append(sql_value(row[0]))
            size += len(literal) + 1
        if chunk.literals:
            found.append(chunk)
    return found


def concurrent_insert(exc: trio_mysql.MySQLError) -> bool:
    """A plain INSERT of tasks that were not stored met one that another flush stored since."""
    return bool(exc.args) and exc.args[0] == ER_DUP_ENTRY and "PRIMARY" in str(exc.args[-1])


async def upsert(conn: trio_mysql.Connection, table: Table, entries: list[Entry],
                 max_bytes: int = STATEMENT_MAX_BYTES, shard: int = 0) -> None:
    """Building the statements is mostly Python, ~4-7 µs a row. It runs in a worker thread,
    STATEMENT_MAX_ROWS rows at a time, while the previous statements execute: the
    database never waits for the next one, and on the event loop request handlers (each
    decoding a body in one go) would starve it under load and be held up by it. The GIL
    hands over every `sys.getswitchinterval()`, so both keep moving. The buffer does not
    touch a snapshot's rows while the flusher has it.

    Tasks: the stored ones are locked first, all in one statement and in key order (flushes
    of several instances never wait for each other in a circle), then counted out, upserted
    and counted in, a chunk at a time; the others are inserted and counted from their
    values. The writer's transactions are READ COMMITTED: no gap locks, which concurrent
    flushes inserting neighbouring keys would otherwise deadlock on (a server logging
    statements, binlog_format = STATEMENT, refuses that: use ROW or MIXED, the defaults). A
    task that another flush inserted after the lock fails the INSERT (1062): this flush is
    aborted as a conflict and retried."""
    ready_chunks, ready = trio.open_memory_channel[Chunk](1)
    stored = await lock_stored_tasks(conn, entries) if table is TASKS else set()

    async def build() -> None:
        async with ready_chunks:
            for i in range(0, len(entries), STATEMENT_MAX_ROWS):
                part = entries[i:i + STATEMENT_MAX_ROWS]
                for chunk in await trio.to_thread.run_sync(chunks, table, part, max_bytes):
                    await ready_chunks.send(chunk)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(build)
            async with ready:
                async for chunk in ready:
                    if table is TASKS:
                        await write_tasks(conn, chunk.task_statements(stored, shard))
                    else:
                        await conn.query(chunk.upsert())
    except* DB_ERRORS as group:  # the nursery wraps what its body raised; callers expect it bare
        raise group.exceptions[0] from None


async def lock_stored_tasks(conn: trio_mysql.Connection, entries: list[Entry]) -> set[str]:
    """The ids of the tasks among `entries` that are stored, locked until the transaction ends."""
    if not entries:
        return set()
    async with conn.cursor() as cursor:
        await cursor.execute(lock_tasks_sql(entries))
        return {task_id for (task_id,) in await cursor.fetchall()}


def lock_tasks_sql(entries: list[Entry]) -> str:
    ids = ",".join(map(sql_value, sorted(e.row.task_id for e in entries)))
    return f"SELECT task_id FROM translation_tasks WHERE task_id IN ({ids}) ORDER BY task_id FOR UPDATE"


async def write_tasks(conn: trio_mysql.Connection, statements: list[tuple[bytes | str, str]]) -> None:
    """Chunk.task_statements() in turn. An upsert refused for what a row holds is undone alone
    while the stored states stay counted out: the count-in after it puts them back."""
    for n, (sql, part) in enumerate(statements):
        try:
            await conn.query(sql)
        except trio_mysql.MySQLError as exc:
            if part == "upsert" and exc.args and exc.args[0] in ROW_REFUSED:
                await conn.query(statements[n + 1][0])
            elif part == "new" and concurrent_insert(exc):
                raise trio_mysql.OperationalError(ER_LOCK_DEADLOCK, f"a concurrent flush stored a task: {exc}") from None
            raise


async def upsert_isolating(conn: trio_mysql.Connection, table: Table, entries: list[Entry],
                           max_bytes: int = STATEMENT_MAX_BYTES, shard: int = 0) -> list[tuple[Entry, str]]:
    """upsert(), keeping out the rows the database refuses for what they hold. A refused
    statement is undone alone and the transaction goes on, so the rows are tried again
    in halves until each refused row stands alone. Returns those with the reason."""
    try:
        await upsert(conn, table, entries, max_bytes, shard)
        return []
    except trio_mysql.MySQLError as exc:
        if not (exc.args and exc.args[0] in ROW_REFUSED):
            raise
        if len(entries) == 1:
            return [(entries[0], f"{exc.args[0]}: {exc.args[1]}")]
    half = len(entries) // 2
    return (await upsert_isolating(conn, table, entries[:half], max_bytes, shard)
            + await upsert_isolating(conn, table, entries[half:], max_bytes, shard))


async def write_snapshot(conn: trio_mysql.Connection, snapshot: Snapshot, max_bytes: int = STATEMENT_MAX_BYTES,
                         shard: int = 0) -> Written:
    """Two transactions: the sessions, then the tasks whose session exists. Returns the
    counts written, the tasks held back because their session is not in the database, and
    the rows the database refused. A retry after a failure between the two writes the
    sessions again, which changes nothing.

    Session rows are locked in key order in both: written in that order, and the tasks'
    sessions share-locked in that order before any task is written (against a concurrent
    DELETE, and before the foreign key checks would lock them in the tasks' order). A flush
    of sessions and one of their tasks, from two instances, never wait for each other in a
    circle; nor are the sessions locked while the tasks are written."""
    await conn.query("BEGIN")
    sessions = sorted(snapshot.sessions.values(), key=lambda e: e.row.session_id)
    refused_sessions = await upsert_isolating(conn, SESSIONS, sessions, max_bytes)
    await conn.query("COMMIT")
    await conn.query("BEGIN")
    needed = sorted({e.row.session_id for e in snapshot.tasks.values()})
    missing = set()
    if needed:
        async with conn.cursor() as cursor:
            await cursor.execute(
                "SELECT session_id FROM translation_sessions WHERE session_id IN ("
                + ",".join(map(sql_value, needed)) + ") ORDER BY session_id LOCK IN SHARE MODE")
            missing = set(needed) - {session_id for (session_id,) in await cursor.fetchall()}
    tasks, held = split_held(snapshot, missing)
    refused_tasks = await upsert_isolating(conn, TASKS, tasks, max_bytes, shard)
    await conn.query("COMMIT")
    return written(snapshot, tasks, held, refused_sessions, refused_tasks)


def schema_statements(schema: str) -> list[str]:
    text = "\n".join(line for line in schema.splitlines() if not line.startswith("--"))
    return [sql for sql in text.split(";") if sql.strip()]


async def ensure_schema(conn: trio_mysql.Connection, schema: str) -> None:
    """Creates the tables that are missing."""
    for sql in schema_statements(schema):
        await conn.query(sql)


ER_DUP_FIELDNAME, ER_MULTIPLE_PRI_KEY = 1060, 1068


async def migrate(conn: trio_mysql.Connection) -> list[str]:
    """Adds what a database created by persistd 1.0 lacks: the version columns (0: older
    than any write) and task_counts' shard (0). ADD COLUMN is instant in InnoDB; task_counts'
    new primary key rebuilds it, a row a bucket. Another instance migrating at the same time
    is no error. Returns the columns added."""
    present = {(r["t"], r["c"]) for r in await fetch(
        conn, "SELECT table_name AS t, column_name AS c FROM information_schema.columns WHERE table_schema = DATABASE()")}
    added = []
    try:
        for table in (SESSIONS, TASKS):
            if missing := [c for c in version_columns(table) if (table.name, c) not in present]:
                await conn.query(f"ALTER TABLE {table.name} "
                                 + ", ".join(f"ADD COLUMN {c} BIGINT UNSIGNED NOT NULL DEFAULT 0" for c in missing))
                added += [f"{table.name}.{c}" for c in missing]
        if ("task_counts", "shard") not in present:
            await conn.query("ALTER TABLE task_counts ADD COLUMN shard SMALLINT UNSIGNED NOT NULL DEFAULT 0,"
                             " DROP PRIMARY KEY, ADD PRIMARY KEY (session_id, status, created_hour, shard)")
            added.append("task_counts.shard")
    except trio_mysql.OperationalError as exc:
        if exc.args[0] not in (ER_DUP_FIELDNAME, ER_MULTIPLE_PRI_KEY):
            raise
        return added + await migrate(conn)
    return added


async def clock_offset(conn: trio_mysql.Connection) -> float:
    """The server's clock minus ours, in seconds, read halfway through the round trip."""
    before = time.time()
    server = (await fetch_one(conn, "SELECT UNIX_TIMESTAMP(NOW(6)) AS t"))["t"]
    return float(server) - (before + time.time()) / 2


async def ensure_counts(conn: trio_mysql.Connection, shard: int) -> float | None:
    """Counts the tasks when task_counts is empty while tasks exist: it was just created for
    a database from before it, a recount was cut short, or an operator emptied it to have
    it recounted. Returns the seconds it took, None when there was nothing to count."""
    if not await count(conn, EMPTY_COUNTS):
        return None
    started = trio.current_time()
    await recount_tasks(conn, shard)
    return trio.current_time() - started


async def recount_tasks(conn: trio_mysql.Connection, shard: int) -> None:
    """task_counts anew from the tasks, in one transaction, all in `shard`. It reads every
    task (duration_ms is in no index): 4.5 s for a million here, with the buffer pool cold."""
    await conn.query("BEGIN")
    await conn.query("DELETE FROM task_counts")
    await conn.query(count_in_sql("TRUE", shard))
    await conn.query("COMMIT")


def from_db(row: dict) -> dict:
    """A row as the API shows it: times UTC-aware, JSON decoded, DECIMAL as float."""
    for name in ("created_at", "updated_at", "start_time", "end_time"):
        if row.get(name) is not None:
            row[name] = row[name].replace(tzinfo=UTC)
    if row.get("confidence") is not None:
        row["confidence"] = float(row["confidence"])
    return decode_json_columns(row)


async def fetch(conn: trio_mysql.Connection, sql: str, *args: Any) -> list[dict]:
    async with conn.cursor(trio_mysql.cursors.DictCursor) as cursor:
        await cursor.execute(sql, args or None)
        return [from_db(row) for row in await cursor.fetchall()]


async def fetch_one(conn: trio_mysql.Connection, sql: str, *args: Any) -> dict | None:
    rows = await fetch(conn, sql, *args)
    return rows[0] if rows else None


async def count(conn: trio_mysql.Connection, sql: str, *args: Any) -> int:
    return int((await fetch_one(conn, sql, *args))["n"] or 0)


# §5.2's task object, as the database writes it. Times are UTC on every connection.
RESTORED_TASK_JSON = ("JSON_OBJECT(" + ", ".join(f"'{name}', {name}" for name in RESTORED_FIELDS)
                      + ", 'created_at', DATE_FORMAT(created_at, '%%Y-%%m-%%dT%%H:%%i:%%sZ'))")


async def unfinished_tasks(conn: trio_mysql.Connection, session_id: str) -> list[bytes]:
    """The session's pending and processing tasks in sheet order, each the JSON text of its
    §5.2 object. With thousands of rows trio_mysql's pure-Python parsing is most of the
    time, and one column a row is a fifth less of it than eight (27 ms instead of 33 for
    2,400 tasks). One JSON array for all of them would be less still, but it has to fit
    max_allowed_packet, and 2,400 texts of up to 64 KB do not."""
    async with conn.cursor() as cursor:
        await cursor.execute(f"SELECT {RESTORED_TASK_JSON} FROM translation_tasks WHERE {UNFINISHED}"
                             f" ORDER BY {SHEET_ORDER}", (session_id,))
        return [task.encode() for (task,) in await cursor.fetchall()]


async def delete_tasks(conn: trio_mysql.Connection, shard: int, where: str, *args: Any) -> int:
    """Deletes the tasks that match `where`, DELETE_CHUNK_ROWS at a time until none is left.
    Each chunk is a transaction that locks its tasks, takes them out of task_counts and
    deletes them: concurrent writes wait at most one chunk, and every commit leaves the
    counts exact. (DELETE ... RETURNING would save a statement; MySQL 8 has none.)"""
    deleted = 0
    while True:
        await conn.query("BEGIN")
        async with conn.cursor() as cursor:
            await cursor.execute(f"SELECT task_id FROM translation_tasks WHERE {where} ORDER BY task_id"
                                 f" LIMIT {DELETE_CHUNK_ROWS} FOR UPDATE", args)
            ids = [task_id for (task_id,) in await cursor.fetchall()]
        if ids:
            chunk = f"task_id IN ({','.join(map(sql_value, ids))})"
            await conn.query(count_out_sql(chunk, shard))
            deleted += await conn.query(f"DELETE FROM translation_tasks WHERE {chunk}")
        await conn.query("COMMIT")
        if len(ids) < DELETE_CHUNK_ROWS:
            return deleted


async def delete_session(conn: trio_mysql.Connection, shard: int, session_id: str,
                         buffered_tasks: list[str]) -> tuple[bool, int]:
    """Deletes a session and its tasks. Returns whether the session was stored and how many
    tasks are gone: the stored ones and the buffered ones that were never written."""
    unwritten = set(buffered_tasks)
    for i in range(0, len(buffered_tasks), DELETE_CHUNK_ROWS):
        chunk = buffered_tasks[i:i + DELETE_CHUNK_ROWS]
        unwritten -= {r["task_id"] for r in await fetch(
            conn, "SELECT task_id FROM translation_tasks WHERE task_id IN %s", chunk)}
    deleted = await delete_tasks(conn, shard, "session_id = %s", session_id)
    async with conn.cursor() as cursor:
        existed = await cursor.execute("DELETE FROM translation_sessions WHERE session_id = %s", (session_id,))
    return bool(existed), deleted + len(unwritten)


async def cleanup(conn: trio_mysql.Connection, shard: int, cutoffs: tuple[datetime, datetime], dry_run: bool,
                  stop: trio.Event | None = None) -> tuple[int, int]:
    """Deletes expired sessions with their tasks, CLEANUP_CHUNK_SESSIONS sessions and
    DELETE_CHUNK_ROWS tasks at a time, until none is left or `stop` is set. A dry run
    counts the same rows and deletes none."""
    if dry_run:
        found = await fetch_one(conn, CLEANUP_DRY_RUN, *cutoffs, *cutoffs)
        return int(found["sessions"]), int(found["tasks"])
    sessions = tasks = 0
    while stop is None or not stop.is_set():
        ids = [r["session_id"] for r in await fetch(
            conn, f"SELECT session_id FROM translation_sessions WHERE {CLEANUP_WHERE}"
                  f" ORDER BY session_id LIMIT {CLEANUP_CHUNK_SESSIONS}", *cutoffs)]
        if not ids:
            return sessions, tasks
        tasks += await delete_tasks(conn, shard, "session_id IN %s", ids)
        async with conn.cursor() as cursor:
            sessions += await cursor.execute("DELETE FROM translation_sessions WHERE session_id IN %s", (ids,))
    return sessions, tasks


async def reconcile(conn: trio_mysql.Connection, shard: int, after: str | None, sessions: int,
                    tasks: int) -> tuple[str | None, int]:
    """One slice of the reconciliation (Store.reconcile). Its counts and tasks are first
    compared in one consistent snapshot, without locks (a flush commits tasks and counts
    together, so only drift makes them differ): a concurrent flush never waits and never
    deadlocks with it. Only a slice that drifted is recounted with its tasks read under
    shared locks and its counts locked for update, so that a flush of those sessions waits
    and none of its changes is counted twice or missed."""
    await conn.query("START TRANSACTION WITH CONSISTENT SNAPSHOT")  # a failure throws the connection away
    sql, args = sessions_after(after, sessions)
    ids = reconcile_slice([(r["session_id"], int(r["tasks"])) for r in await fetch(conn, sql, *args)], tasks)
    if not ids:
        await conn.query("COMMIT")
        return None, 0
    chunk = ",".join(map(sql_value, ids))
    actual = (f"SELECT session_id, status, {CREATED_HOUR} AS created_hour, COUNT(*) AS tasks,"
              " COALESCE(SUM(duration_ms), 0) AS duration_ms_sum, COUNT(duration_ms) AS durations"
              f" FROM translation_tasks WHERE session_id IN ({chunk}) GROUP BY 1, 2, 3")
    repaired = drifted(await fetch(conn, KEPT_COUNTS.format(ids=chunk)), await fetch(conn, actual))
    await conn.query("COMMIT")
    if repaired:
        await conn.query("BEGIN")
        kept = await fetch(conn, KEPT_COUNTS.format(ids=chunk) + " FOR UPDATE")
        repaired = drifted(kept, await fetch(conn, actual + " LOCK IN SHARE MODE"))
        if repaired:
            await conn.query(f"DELETE FROM task_counts WHERE session_id IN ({chunk})")
            await conn.query(count_in_sql(f"session_id IN ({chunk})", shard))
        await conn.query("COMMIT")
    return ids[-1], repaired


async def session_stats(conn: trio_mysql.Connection) -> tuple[list[dict], Any, dict[str, dict]]:
    """The session half of the stats, far fewer rows, and the catalog's storage figures."""
    by_status = await fetch(conn, SESSIONS_BY_STATUS)
    session_time = (await fetch_one(conn, "SELECT AVG(TIMESTAMPDIFF(SECOND, created_at, updated_at)) AS s"
                                          " FROM translation_sessions WHERE status = 'completed'"))["s"]
    catalog = {r["name"]: r for r in await fetch(
        conn, "SELECT table_name AS name, table_rows AS n, data_length + index_length AS bytes"
              " FROM information_schema.tables WHERE table_schema = DATABASE()")}
    return by_status, session_time, catalog


class Database:
    """Connection factory and a small pool for short reads. The flusher keeps its own
    connection. After any error or cancellation a connection is thrown away, never
    reused: trio_mysql cannot recover one that was interrupted mid-read."""

    def __init__(self, cfg: DatabaseConfig) -> None:
        self.cfg = cfg
        self.params = parse_database_url(cfg.url)
        self.hosts = self.params.pop("hosts")
        self.current = 0  # the server that answered last: new connections try it first
        self._idle: list[trio_mysql.Connection] = []
        self._limiter = trio.CapacityLimiter(cfg.pool_size)

    async def _open(self, host: str, port: int, **params: Any) -> trio_mysql.Connection:
        conn = trio_mysql.connect(host=host, port=port, charset="utf8mb4", use_unicode=True, autocommit=True,
                                  init_command=SESSION_SETUP, **params)
        await conn.connect()
        try:
            await galera_setup(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def connect(self, *, create: bool = False) -> trio_mysql.Connection:
        """A new connection to the first server that answers, starting from the one that
        answered last, each given connect_timeout; with `create`, the database is created
        when missing. An error that every server would give (a bad password) ends the round."""
        failed: BaseException | None = None
        for step in range(len(self.hosts)):
            index = (self.current + step) % len(self.hosts)
            try:
                with trio.fail_after(self.cfg.connect_timeout):
                    conn = await self._connect_to(*self.hosts[index], create=create)
            except DB_ERRORS as exc:
                if not transient(exc):
                    raise
                failed = exc
                continue
            self.current = index
            return conn
        assert failed is not None
        raise failed

    async def _connect_to(self, host: str, port: int, *, create: bool) -> trio_mysql.Connection:
        try:
            return await self._open(host, port, **self.params)
        except trio_mysql.OperationalError as exc:
            if not create or exc.args[0] != ER_BAD_DB_ERROR:
                raise
        server = await self._open(host, port, **{**self.params, "database": None})
        try:
            name = self.params["database"].replace("`", "``")
            await server.query(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4")
        finally:
            server.close()
        return await self._open(host, port, **self.params)

    @contextlib.asynccontextmanager
    async def connection(self) -> typing.AsyncIterator[trio_mysql.Connection]:
        async with self._limiter:
            conn = self._idle.pop() if self._idle else await self.connect()
            try:
                yield conn
            except BaseException:
                # After an outage every idle connection is dead too: none is reused.
                conn.close()
                self.close()
                raise
            self._idle.append(conn)

    async def ping(self) -> None:
        """Raises what the database answered, or trio.TooSlowError after ping_timeout. DO,
        unlike SELECT, does not wait for wsrep_sync_wait: while a Galera cluster evicts a
        lost node (seconds) the others still answer it at once; a node outside the primary
        component refuses it (1047)."""
        with trio.fail_after(self.cfg.ping_timeout):
            for attempt in range(2):  # a pooled connection may have died with an outage
                try:
                    async with self.connection() as conn:
                        await conn.query("DO 1")
                    return
                except DB_ERRORS:
                    if attempt:
                        raise

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


ER_UNKNOWN_COM_ERROR = 1047  # Galera: WSREP has not yet prepared the node for application use


async def galera_setup(conn: trio_mysql.Connection) -> None:
    """On a Galera node: one that is not ready (outside the primary component, still joining)
    is refused like a server that is down, and every read waits until the node has applied
    what other nodes committed before it (wsrep_sync_wait = 1: SELECT, SHOW and BEGIN), so a
    read through any node sees every write acknowledged by a flush. Elsewhere nothing."""
    async with conn.cursor() as cursor:
        await cursor.execute("SHOW VARIABLES LIKE 'wsrep_on'")
        wsrep = await cursor.fetchone()
        if wsrep is None or wsrep[1] != "ON":
            return
        await cursor.execute("SHOW STATUS LIKE 'wsrep_ready'")
        ready = await cursor.fetchone()
        if ready is None or ready[1] != "ON":
            raise trio_mysql.OperationalError(ER_UNKNOWN_COM_ERROR, "Galera node not ready (wsrep_ready OFF)")
        await conn.query("SET SESSION wsrep_sync_wait = 1")


async def rows(conn: trio_mysql.Connection, query: Query) -> list[dict]:
    return await fetch(conn, query.sql, *query.args)


async def page(conn: trio_mysql.Connection, total: Query, rows: Query) -> tuple[int, list[dict]]:
    return await count(conn, total.sql, *total.args), await fetch(conn, rows.sql, *rows.args)


class MySQLStore(Reads):
    """`persistd.storage.Store` on a MySQL or MariaDB server."""

    backend = "mysql"
    errors = DB_ERRORS
    unavailable = DB_UNAVAILABLE
    rows, page, unfinished_tasks_of = staticmethod(rows), staticmethod(page), staticmethod(unfinished_tasks)

    def __init__(self, cfg: DatabaseConfig, instance: int = 0) -> None:
        self.cfg = cfg
        self.shard = instance  # the task_counts rows this instance changes
        self.db = Database(cfg)
        self.schema = read_schema("mysql.sql")
        self.writer: trio_mysql.Connection | None = None
        self.statement_max_bytes = STATEMENT_MAX_BYTES  # and 3/4 of the server's max_allowed_packet
        self.migrated: list[str] = []  # columns the last open() added
        self.clock_offset = 0.0  # the server's clock minus ours, at the last open()

    async def recount_tasks(self, conn: trio_mysql.Connection) -> None:
        await recount_tasks(conn, self.shard)

    async def delete_session_of(self, conn: trio_mysql.Connection, session_id: str,
                                buffered_tasks: list[str]) -> tuple[bool, int]:
        return await delete_session(conn, self.shard, session_id, buffered_tasks)

    def transient(self, exc: BaseException) -> bool:
        return transient(exc)

    def conflict(self, exc: BaseException) -> bool:
        """A deadlock, or on Galera a certification conflict with another node's commit
        (which MariaDB reports as a deadlock too)."""
        return isinstance(exc, trio_mysql.MySQLError) and bool(exc.args) and exc.args[0] == ER_LOCK_DEADLOCK

    async def open(self) -> None:
        """The writer's connection, with the database and its tables created when missing,
        and the server's max_allowed_packet, under which statements are cut. Bounded by
        connect+write timeout: a DDL waiting for a metadata lock is an outage."""
        with trio.fail_after(len(self.db.hosts) * self.cfg.connect_timeout + self.cfg.write_timeout):
            conn = await self.db.connect(create=True)
            try:
                await ensure_schema(conn, self.schema)
                self.migrated = await migrate(conn)
                await conn.query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")  # see upsert()
                packet = await count(conn, "SELECT @@max_allowed_packet AS n")
                self.clock_offset = await clock_offset(conn)
            except BaseException:
                conn.close()
                raise
        self.writer = conn
        self.statement_max_bytes = min(STATEMENT_MAX_BYTES, packet * 3 // 4)

    async def recount_if_needed(self) -> float | None:
        if self.writer is None:
            await self.open()
        return await self._writing(ensure_counts, self.shard)

    async def write(self, snapshot: Snapshot) -> Written:
        if self.writer is None:
            await self.open()
            await self._writing(ensure_counts, self.shard)
        return await self._writing(write_snapshot, snapshot, self.statement_max_bytes, self.shard)

    async def _writing(self, fn: typing.Callable[..., typing.Awaitable[Any]], *args: Any) -> Any:
        """`fn` on the writer's connection; after any failure or cancellation it is closed."""
        try:
            return await fn(self.writer, *args)
        except BaseException:
            self.close_writer()
            raise

    def close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def _read(self, fn: typing.Callable[..., typing.Awaitable[Any]], *args: Any) -> Any:
        try:
            return await self._act(fn, *args)
        except DB_UNAVAILABLE:  # a pooled connection may have died with an outage; reads are idempotent
            return await self._act(fn, *args)

    async def _act(self, fn: typing.Callable[..., typing.Awaitable[Any]], *args: Any) -> Any:
        async with self.db.connection() as conn:
            return await fn(conn, *args)

    async def ping(self) -> None:
        await self.db.ping()

    async def writable(self) -> None:
        await self._rows(Query("SELECT 1 AS n", []))  # reachable: writes go through as reads do

    async def cleanup(self, cutoffs: tuple[datetime, datetime], dry_run: bool,
                      stop: trio.Event | None = None) -> tuple[int, int]:
        return await self._act(cleanup, self.shard, cutoffs, dry_run, stop)

    async def reconcile(self, after: str | None, sessions: int, tasks: int) -> tuple[str | None, int]:
        return await self._act(reconcile, self.shard, after, sessions, tasks)

    async def stats(self) -> Stats:
        """The two halves at once, on two pooled connections: about 5 ms each over a million tasks."""
        task_rows: list[dict] = []

        async def task_half() -> None:
            task_rows.extend(await self._rows(Query(TASK_STATS, [])))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(task_half)
                by_status, session_time, catalog = await self._read(session_stats)
        except* DB_ERRORS as group:  # the nursery wraps what failed; callers expect it bare
            raise group.exceptions[0] from None
        return stats_from(self.backend, task_rows, by_status, session_time, sum(int(r["bytes"] or 0) for r in catalog.values()),
                          {name: int(r["n"] or 0) for name, r in catalog.items()})

    def close(self) -> None:
        self.close_writer()
        self.db.close()
