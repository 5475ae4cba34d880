"""persistd's SQLite backend: the storage seam (`persistd.storage.Store`) over the standard
library's sqlite3, the embedded default (`[database] url = "sqlite:///path.db"`, or no url:
persistd.db in the state dir). Every statement persistd sends to SQLite is in this module.

sqlite3 is synchronous, so every operation runs in a worker thread and the event loop never
waits on the file. The writer connection is the flusher's (through `write`), one at a time;
reads, deletes and cleanups take connections from a small pool, at most `pool_size`
threads at once. WAL mode: readers never wait for the writer, nor the writer for them; a
second writer (a delete, a cleanup) waits up to write_timeout for the lock. synchronous=FULL:
a commit is on disk before the journal lets the rows go. task_counts is kept by triggers
(sql/sqlite.sql)."""

from __future__ import annotations

import sqlite3
import time
import typing
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import trio

from persistd.daemon import UTC, DatabaseConfig, Entry, Snapshot, Stats, Written, sqlite_path
from persistd.storage import (CLEANUP_CHUNK_SESSIONS, CLEANUP_DRY_RUN, CLEANUP_WHERE, DELETE_CHUNK_ROWS, EMPTY_COUNTS,
                              KEPT_COUNTS, RESTORED_FIELDS, SESSIONS, SESSIONS_BY_STATUS, SHEET_ORDER, TASK_STATS,
                              TASKS, UNFINISHED, Query, Reads, Table, decode_json_columns, drifted, group_by_shape,
                              read_schema, reconcile_slice, sessions_after, split_held, stats_from,
                              unknown_sessions, upsert_columns, version_columns, version_values, versioned_updates,
                              written)

# Primary result codes (the low byte of sqlite_errorcode) that say the file is busy, locked,
# read-only, full or away for now: a flush failing with one is retried. Any other error (no
# such table or column, a corrupt file) stops the daemon, as in MySQL (see Fatal).
TRANSIENT = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_INTERRUPT,
    sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL,
})
ERRORS = (sqlite3.Error, OSError, trio.TooSlowError)
UNAVAILABLE = (sqlite3.OperationalError, OSError, trio.TooSlowError)
TIME_COLUMNS = ("created_at", "updated_at", "start_time", "end_time")
# §5.2's task object, as SQLite writes it.
RESTORED_TASK_JSON = ("json_object(" + ", ".join(f"'{name}', {name}" for name in RESTORED_FIELDS)
                      + ", 'created_at', strftime('%Y-%m-%dT%H:%M:%SZ', created_at, 'unixepoch'))")


def transient(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in TRANSIENT
    return isinstance(exc, ERRORS)


def seconds(at: datetime) -> int:
    """A time as the INTEGER the columns hold: whole seconds since 1970, UTC (naive means
    UTC), the fraction dropped as MySQL's TIMESTAMP literal drops it."""
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp())


def db_value(value: Any) -> Any:
    if type(value) is datetime:
        return seconds(value)
    if type(value) is dict:
        return msgspec.json.encode(value).decode()
    return value


def db_args(args: list[Any]) -> list[Any]:
    """Query arguments: a time compares as it is, fraction included (MySQL compares a
    TIMESTAMP with 00:34:00.5 the same way)."""
    return [(a if a.tzinfo else a.replace(tzinfo=UTC)).timestamp() if isinstance(a, datetime) else a for a in args]


def from_db(cursor: sqlite3.Cursor, values: tuple) -> dict:
    """A row as the API shows it: times UTC-aware, JSON decoded."""
    row = {column[0]: value for column, value in zip(cursor.description, values)}
    for name in TIME_COLUMNS:
        if row.get(name) is not None:
            row[name] = datetime.fromtimestamp(row[name], UTC)
    return decode_json_columns(row)


def fetch(conn: sqlite3.Connection, sql: str, args: typing.Sequence[Any] = ()) -> list[dict]:
    return conn.execute(sql.replace("%s", "?"), db_args(list(args))).fetchall()


def count(conn: sqlite3.Connection, query: Query) -> int:
    return int(fetch(conn, query.sql, query.args)[0]["n"] or 0)


def page(conn: sqlite3.Connection, total: Query, rows: Query) -> tuple[int, list[dict]]:
    return count(conn, total), fetch(conn, rows.sql, rows.args)


def upsert_sql(table: Table, shape: tuple[str, ...]) -> str:
    """INSERT ... ON CONFLICT DO UPDATE of the columns a row with the optional fields `shape`
    carries, each field changed only by a newer version (storage.versioned_updates)."""
    columns = upsert_columns(table, shape)
    updates = versioned_updates(table, shape, lambda c: f"excluded.{c}", "CASE WHEN {} THEN {} ELSE {} END",
                                "MAX", "MIN")
    return (f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            f" ON CONFLICT ({table.key}) DO UPDATE SET {', '.join(updates)}")


def upsert(conn: sqlite3.Connection, table: Table, entries: list[Entry]) -> None:
    for shape, group in group_by_shape(table, entries).items():
        columns = table.required + shape
        conn.executemany(upsert_sql(table, shape), [
            (*[db_value(getattr(e.row, c)) for c in columns], seconds(e.created_at), seconds(e.updated_at),
             *version_values(e, shape))
            for e in group])


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Adds the version columns that a file created by persistd 1.0 lacks (0: older than
    any write). Returns the columns added."""
    added = []
    for table in (SESSIONS, TASKS):
        present = {row["name"] for row in fetch(conn, f"PRAGMA table_info({table.name})")}
        for column in version_columns(table):
            if column not in present:
                conn.execute(f"ALTER TABLE {table.name} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
                added.append(f"{table.name}.{column}")
    return added


def upsert_isolating(conn: sqlite3.Connection, table: Table, entries: list[Entry]) -> list[tuple[Entry, str]]:
    """upsert(), keeping out the rows the database refuses for what they hold (a constraint
    an operator added): each attempt runs in a savepoint, refused halves are tried again
    until each refused row stands alone. Returns those with the reason."""
    if not entries:
        return []
    conn.execute("SAVEPOINT rows")
    try:
        upsert(conn, table, entries)
        conn.execute("RELEASE rows")
        return []
    except sqlite3.IntegrityError as exc:
        conn.execute("ROLLBACK TO rows")
        conn.execute("RELEASE rows")
        if len(entries) == 1:
            return [(entries[0], f"{exc.sqlite_errorname}: {exc}")]
    half = len(entries) // 2
    return upsert_isolating(conn, table, entries[:half]) + upsert_isolating(conn, table, entries[half:])


def stored_sessions(conn: sqlite3.Connection, ids: set[str]) -> set[str]:
    found, ids_list = set(), sorted(ids)
    for i in range(0, len(ids_list), DELETE_CHUNK_ROWS):
        chunk = ids_list[i:i + DELETE_CHUNK_ROWS]
        found |= {r["session_id"] for r in fetch(
            conn, f"SELECT session_id FROM translation_sessions WHERE session_id IN ({','.join('?' * len(chunk))})",
            chunk)}
    return found


def write_snapshot(conn: sqlite3.Connection, snapshot: Snapshot) -> Written:
    """One transaction, holding the write lock from its start (BEGIN IMMEDIATE): sessions,
    then the tasks whose session exists."""
    with transaction(conn):
        refused_sessions = upsert_isolating(conn, SESSIONS, list(snapshot.sessions.values()))
        missing = unknown_sessions(snapshot, refused_sessions)
        missing -= stored_sessions(conn, missing)
        tasks, held = split_held(snapshot, missing)
        refused_tasks = upsert_isolating(conn, TASKS, tasks)
    return written(snapshot, tasks, held, refused_sessions, refused_tasks)


class transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.rollback()


def take_write_lock(conn: sqlite3.Connection) -> None:
    """Takes the file's write lock and lets it go: busy after write_timeout while another
    writer holds it, read-only or gone as the file is."""
    with transaction(conn):
        pass


HOUR_COUNTS = ("SELECT session_id, status, created_at / 3600 * 3600 AS created_hour, COUNT(*) AS tasks,"
               " COALESCE(SUM(duration_ms), 0) AS duration_ms_sum, COUNT(duration_ms) AS durations"
               " FROM translation_tasks WHERE {where} GROUP BY 1, 2, 3")


def recount_tasks(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM task_counts")
        conn.execute("INSERT INTO task_counts " + HOUR_COUNTS.format(where="TRUE"))


def ensure_counts(conn: sqlite3.Connection) -> float | None:
    """Recounts when task_counts is empty while tasks exist; the seconds it took."""
    if not count(conn, Query(EMPTY_COUNTS, [])):
        return None
    started = time.monotonic()
    recount_tasks(conn)
    return time.monotonic() - started


def unfinished_tasks(conn: sqlite3.Connection, session_id: str) -> list[bytes]:
    rows = fetch(conn, f"SELECT {RESTORED_TASK_JSON} AS task FROM translation_tasks WHERE {UNFINISHED}"
                       f" ORDER BY {SHEET_ORDER}", [session_id])
    return [row["task"].encode() for row in rows]


def delete_tasks(conn: sqlite3.Connection, where: str, args: list[Any]) -> int:
    """Deletes the tasks that match `where`, DELETE_CHUNK_ROWS a transaction, so that the
    flusher waits at most one chunk for the write lock. The triggers count them out."""
    deleted = 0
    while True:
        with transaction(conn):
            n = conn.execute(f"DELETE FROM translation_tasks WHERE task_id IN (SELECT task_id FROM translation_tasks"
                             f" WHERE {where} LIMIT {DELETE_CHUNK_ROWS})", args).rowcount
        deleted += n
        if n < DELETE_CHUNK_ROWS:
            return deleted


def delete_session(conn: sqlite3.Connection, session_id: str, buffered_tasks: list[str]) -> tuple[bool, int]:
    unwritten = set(buffered_tasks)
    for i in range(0, len(buffered_tasks), DELETE_CHUNK_ROWS):
        chunk = buffered_tasks[i:i + DELETE_CHUNK_ROWS]
        unwritten -= {r["task_id"] for r in fetch(
            conn, f"SELECT task_id FROM translation_tasks WHERE task_id IN ({','.join('?' * len(chunk))})", chunk)}
    deleted = delete_tasks(conn, "session_id = ?", [session_id])
    with transaction(conn):
        existed = conn.execute("DELETE FROM translation_sessions WHERE session_id = ?", (session_id,)).rowcount
    return bool(existed), deleted + len(unwritten)


def cleanup(conn: sqlite3.Connection, cutoffs: tuple[datetime, datetime], dry_run: bool,
            stopped: typing.Callable[[], bool]) -> tuple[int, int]:
    if dry_run:
        found = fetch(conn, CLEANUP_DRY_RUN, [*cutoffs, *cutoffs])[0]
        return int(found["sessions"]), int(found["tasks"])
    where, args = CLEANUP_WHERE.replace("%s", "?"), db_args(list(cutoffs))
    sessions = tasks = 0
    while not stopped():
        ids = [r["session_id"] for r in conn.execute(
            f"SELECT session_id FROM translation_sessions WHERE {where} ORDER BY session_id"
            f" LIMIT {CLEANUP_CHUNK_SESSIONS}", args).fetchall()]
        if not ids:
            break
        marks = ",".join("?" * len(ids))
        tasks += delete_tasks(conn, f"session_id IN ({marks})", ids)
        with transaction(conn):
            sessions += conn.execute(f"DELETE FROM translation_sessions WHERE session_id IN ({marks})", ids).rowcount
    return sessions, tasks


def reconcile(conn: sqlite3.Connection, after: str | None, sessions: int, tasks: int) -> tuple[str | None, int]:
    """One slice of the reconciliation (Store.reconcile), under the write lock. The
    triggers keep the counts whoever writes; this finds a task_counts edited by hand."""
    with transaction(conn):
        sql, args = sessions_after(after, sessions)
        ids = reconcile_slice([(r["session_id"], int(r["tasks"])) for r in fetch(conn, sql.replace("%s", "?"), args)],
                              tasks)
        if not ids:
            return None, 0
        marks = ",".join("?" * len(ids))
        kept = fetch(conn, KEPT_COUNTS.format(ids=marks), ids)
        actual = fetch(conn, HOUR_COUNTS.format(where=f"session_id IN ({marks})"), ids)
        repaired = drifted(kept, actual)
        if repaired:
            conn.execute(f"DELETE FROM task_counts WHERE session_id IN ({marks})", ids)
            conn.execute("INSERT INTO task_counts " + HOUR_COUNTS.format(where=f"session_id IN ({marks})"), ids)
    return ids[-1], repaired


def stats(conn: sqlite3.Connection) -> tuple[list[dict], list[dict], Any, int, dict[str, int]]:
    task_rows = fetch(conn, TASK_STATS)
    by_status = fetch(conn, SESSIONS_BY_STATUS)
    session_time = fetch(conn, "SELECT AVG(updated_at - created_at) AS s FROM translation_sessions"
                               " WHERE status = 'completed'")[0]["s"]
    size = fetch(conn, "SELECT page_count * page_size AS n FROM pragma_page_count(), pragma_page_size()")[0]["n"]
    rows = {"translation_sessions": sum(int(r["n"]) for r in by_status),
            "translation_tasks": sum(int(r["n"] or 0) for r in task_rows)}
    return task_rows, by_status, session_time, size, rows


def rows(conn: sqlite3.Connection, query: Query) -> list[dict]:
    return fetch(conn, query.sql, query.args)


class SQLiteStore(Reads):
    """`persistd.storage.Store` on a SQLite file."""

    backend = "sqlite"
    errors = ERRORS
    unavailable = UNAVAILABLE
    rows, page, recount_tasks = staticmethod(rows), staticmethod(page), staticmethod(recount_tasks)
    unfinished_tasks_of, delete_session_of = staticmethod(unfinished_tasks), staticmethod(delete_session)

    def __init__(self, cfg: DatabaseConfig) -> None:
        self.cfg = cfg
        self.path = Path(sqlite_path(cfg.url))
        self.schema = read_schema("sqlite.sql")
        self.writer: sqlite3.Connection | None = None
        self._idle: list[sqlite3.Connection] = []
        self._limiter = trio.CapacityLimiter(cfg.pool_size)
        self._writer_limiter = trio.CapacityLimiter(1)
        self.migrated: list[str] = []
        self.clock_offset = 0.0  # one file, one instance: the versions compare its own times

    def transient(self, exc: BaseException) -> bool:
        return transient(exc)

    def conflict(self, exc: BaseException) -> bool:
        return False  # one writer at a time: a second waits for the lock (busy_timeout)

    def _connect(self, mode: str = "rw") -> sqlite3.Connection:
        """A connection in autocommit mode (transactions are BEGIN ... COMMIT here), with
        foreign keys on and write_timeout to wait for another writer's lock. Only the
        writer creates the file (mode rwc): a reader finding none is an outage."""
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode={mode}", uri=True, timeout=self.cfg.write_timeout,
                               isolation_level=None, check_same_thread=False)
        conn.row_factory = from_db
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _open(self) -> sqlite3.Connection:
        """The writer: the file, WAL mode and the tables, created when missing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect("rwc")
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(self.schema)
            self.migrated = migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        with trio.fail_after(self.cfg.connect_timeout + self.cfg.write_timeout):
            self.writer = await trio.to_thread.run_sync(self._open, limiter=self._writer_limiter)

    async def _writing(self, fn: typing.Callable[..., Any], *args: Any) -> Any:
        """`fn` on the writer in a thread. Cancelled (the flusher's deadline), the statement
        is interrupted and the connection left to its thread, which rolls back and drops it."""
        if self.writer is None:
            await self.open()
        conn = self.writer
        try:
            return await trio.to_thread.run_sync(fn, conn, *args, limiter=self._writer_limiter, abandon_on_cancel=True)
        except BaseException:
            conn.interrupt()
            self.writer = None
            raise

    async def recount_if_needed(self) -> float | None:
        return await self._writing(ensure_counts)

    async def write(self, snapshot: Snapshot) -> Written:
        if self.writer is None:
            await self.open()
            await self._writing(ensure_counts)
        return await self._writing(write_snapshot, snapshot)

    async def _read(self, fn: typing.Callable[..., Any], *args: Any) -> Any:
        """`fn` on a pooled connection in a thread, at most pool_size at once, never tried
        again (a locked file waits write_timeout instead). One that is cancelled leaves its
        connection to its thread: it is never reused."""
        conn = self._idle.pop() if self._idle else None

        def run() -> tuple[sqlite3.Connection, Any]:
            nonlocal conn
            conn = conn or self._connect()
            return conn, fn(conn, *args)

        try:
            conn, result = await trio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)
        except BaseException:
            if conn is not None:
                conn.interrupt()
            raise
        self._idle.append(conn)
        return result

    _act = _read

    async def writable(self) -> None:
        await self._read(take_write_lock)

    async def ping(self) -> None:
        with trio.fail_after(self.cfg.ping_timeout):
            await self._rows(Query("SELECT 1 AS n FROM translation_sessions LIMIT 1", []))

    async def cleanup(self, cutoffs: tuple[datetime, datetime], dry_run: bool,
                      stop: trio.Event | None = None) -> tuple[int, int]:
        return await self._read(cleanup, cutoffs, dry_run, lambda: stop is not None and stop.is_set())

    async def reconcile(self, after: str | None, sessions: int, tasks: int) -> tuple[str | None, int]:
        return await self._act(reconcile, after, sessions, tasks)

    async def stats(self) -> Stats:
        return stats_from(self.backend, *await self._read(stats))

    def close(self) -> None:
        for conn in [*self._idle, *([self.writer] if self.writer else [])]:
            conn.close()
        self._idle.clear()
        self.writer = None
