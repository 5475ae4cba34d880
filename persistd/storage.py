"""The storage seam: what persistd asks of a database, as operations, never as connections
or SQL. Two backends implement `Store`:

- `persistd.mysql`: a MySQL or MariaDB server through trio-mysql (async), for production;
- `persistd.sqlite`: a file through the standard library's sqlite3 (synchronous, run in
  worker threads), the embedded default.

The daemon (`persistd.daemon`) holds the actors, the buffer, the journal and the HTTP API,
and calls only the methods below; it picks the backend by the URL's scheme (`open_store`).
What both dialects share sits here: the columns, the orders, and the queries a list runs,
written once with `%s` placeholders (the SQLite backend turns them into `?` and the
datetimes into seconds)."""

from __future__ import annotations

import functools
import importlib.resources
import typing
from datetime import datetime, timedelta
from typing import Any

import msgspec
from msgspec import UNSET

from persistd.daemon import (OPTIONAL_FIELDS, TIMESTAMP_MAX, TIMESTAMP_MIN, Entry, Fatal, Performance, SessionIn,
                             SessionQuery, RestoredTask, SessionStatus, SessionTaskQuery, Snapshot, Stats, Storage, TaskIn, TaskQuery,
                             TaskStatus, Written, as_utc)


class Store(typing.Protocol):
    backend: str  # "mysql" or "sqlite": /health, the stats, the metrics and --check-config name it
    errors: tuple[type[BaseException], ...]  # what an operation raises when the database fails it
    unavailable: tuple[type[BaseException], ...]  # of those, what a read answers 503 for

    def transient(self, exc: BaseException) -> bool:
        """Whether retrying can help (an outage, a lock) or not (no privilege, a missing column)."""

    def conflict(self, exc: BaseException) -> bool:
        """Whether a concurrent transaction aborted this one (retried like any transient error)."""

    async def open(self) -> None:
        """Connects the writer and creates what is missing (the database, its tables)."""

    async def write(self, snapshot: Snapshot) -> Written:
        """One transaction: the sessions, then the tasks whose session exists; the rows the
        database refuses for what they hold are kept out and returned, the rest written.
        Connects (open) first when the writer is not connected; after a failure it is not."""

    async def recount_if_needed(self) -> float | None:
        """Recounts task_counts when it is empty while tasks exist; the seconds it took."""

    async def recount(self) -> None: ...
    async def ping(self) -> None: ...

    async def writable(self) -> None:
        """Raises (an error of `unavailable`) when a write could not be made now."""

    async def session(self, session_id: str) -> dict | None: ...
    async def task(self, task_id: str) -> dict | None: ...
    async def has_session(self, session_id: str) -> bool: ...
    async def list_sessions(self, q: SessionQuery) -> tuple[int, list[dict]]: ...
    async def list_session_tasks(self, session_id: str, q: SessionTaskQuery) -> tuple[int, list[dict]]: ...
    async def list_tasks(self, q: TaskQuery) -> tuple[int, list[dict]]: ...
    async def incomplete_sessions(self) -> list[dict]: ...

    async def unfinished_tasks(self, session_id: str) -> list[bytes]:
        """The session's pending and processing tasks in sheet order, each the JSON of its
        §5.2 object (RestoredTask), built by the database."""

    async def delete_session(self, session_id: str, buffered_tasks: list[str]) -> tuple[bool, int]:
        """Whether the session was stored, and how many tasks are gone: the stored ones and
        the buffered ones never written. Tasks go DELETE_CHUNK_ROWS a transaction."""

    async def cleanup(self, cutoffs: tuple[datetime, datetime], dry_run: bool,
                      stop: typing.Any = None) -> tuple[int, int]:
        """Deletes the expired sessions with their tasks, in chunks, until none is left or
        `stop` (a trio.Event) is set; a dry run counts the same rows."""

    async def stats(self) -> Stats: ...

    async def reconcile(self, after: str | None, sessions: int, tasks: int) -> tuple[str | None, int]:
        """Recounts task_counts for the next `sessions` sessions after `after` (key order),
        fewer when they keep more than `tasks` tasks (reconcile_slice), in one transaction, and rewrites the rows of those that drifted (tasks written,
        changed or deleted by other means than persistd). Returns the last session looked
        at (None: the pass is done) and how many task_counts rows were wrong."""

    async def count_rows(self, table: Table) -> int:
        """COUNT(*), for copy-data's check."""

    async def max_key(self, table: Table) -> str | None: ...

    async def rows_after(self, table: Table, after: str | None, limit: int) -> list[dict]:
        """Up to `limit` rows whose key sorts after `after`, in key order, as the API shows
        them (every column; times UTC-aware)."""

    def close(self) -> None: ...



class Table(typing.NamedTuple):
    name: str
    key: str
    required: tuple[str, ...]  # fields every request row has, in column order
    optional: tuple[str, ...]  # fields a row may leave out: the stored value is kept


def _table(name: str, key: str, row_type: type) -> Table:
    fields = msgspec.structs.fields(row_type)
    return Table(name, key, tuple(f.name for f in fields if f.required), OPTIONAL_FIELDS[row_type])


SESSIONS = _table("translation_sessions", "session_id", SessionIn)
TASKS = _table("translation_tasks", "task_id", TaskIn)


# Last-write-wins, kept by the database: each row carries the version of the latest write
# (row_version) and, for each optional field, the version of the latest write that carried it
# (<field>_version). An upsert changes a field only with a higher version, so an older write
# flushed late (another instance's, a retry, a journal replay) changes nothing a newer one set.
def version_columns(table: Table) -> tuple[str, ...]:
    return ("row_version", *(f"{name}_version" for name in table.optional))


def version_values(entry: Entry, shape: tuple[str, ...]) -> list[int]:
    """What a row of `shape` writes into row_version and its fields' version columns."""
    return [entry.version, *(entry.field_version(name) for name in shape)]


def upsert_columns(table: Table, shape: tuple[str, ...]) -> tuple[str, ...]:
    """The columns an upsert of rows that carry the optional fields `shape` writes, in the
    order of their values: the fields, the times, then version_values()."""
    return (*table.required, *shape, "created_at", "updated_at", "row_version",
            *(f"{name}_version" for name in shape))


def versioned_updates(table: Table, shape: tuple[str, ...], incoming: typing.Callable[[str], str],
                      pick: str, greatest: str, least: str) -> list[str]:
    """The assignments of an upsert's update, in the dialect that names the value written to
    a column `incoming(column)`, a choice `pick.format(condition, then, otherwise)` and the
    larger and smaller of two `greatest` and `least`. Only the columns a row carries are
    updated, each only by a newer version: the required ones and updated_at by a newer
    row_version, an optional one by a newer version of its own; created_at is the earliest.
    The versions come last: MySQL assigns left to right, each assignment seeing the ones
    before (SQLite's reads the row as it was)."""
    def newer(version: str) -> str:
        return f"{incoming(version)} > {version}"
    updates = [f"{c} = {pick.format(newer('row_version'), incoming(c), c)}"
               for c in (*table.required, "updated_at") if c != table.key]
    for name in shape:
        updates += [f"{name} = {pick.format(newer(f'{name}_version'), incoming(name), name)}",
                    f"{name}_version = {greatest}({name}_version, {incoming(f'{name}_version')})"]
    return updates + [f"created_at = {least}(created_at, {incoming('created_at')})",
                      f"row_version = {greatest}(row_version, {incoming('row_version')})"]


def group_by_shape(table: Table, entries: typing.Iterable[Entry]) -> dict[tuple[str, ...], list[Entry]]:
    """Rows that carry the same optional fields share a statement."""
    groups: dict[tuple[str, ...], list[Entry]] = {}
    for entry in entries:
        row = entry.row
        shape = tuple([name for name in table.optional if getattr(row, name) is not UNSET])
        groups.setdefault(shape, []).append(entry)
    return groups


def unknown_sessions(snapshot: Snapshot, refused_sessions: list[tuple[Entry, str]]) -> set[str]:
    """The sessions of the snapshot's tasks that it does not write: the database must have them."""
    written = snapshot.sessions.keys() - {e.row.session_id for e, _ in refused_sessions}
    return {e.row.session_id for e in snapshot.tasks.values()} - written


def split_held(snapshot: Snapshot, missing: set[str]) -> tuple[list[Entry], list[Entry]]:
    """The snapshot's tasks: those to write, and those held back because their session is
    `missing` (in neither the snapshot nor the database)."""
    tasks = list(snapshot.tasks.values())
    if not missing:
        return tasks, []
    return [e for e in tasks if e.row.session_id not in missing], [e for e in tasks if e.row.session_id in missing]


def written(snapshot: Snapshot, tasks: list[Entry], held: list[Entry], refused_sessions: list[tuple[Entry, str]],
            refused_tasks: list[tuple[Entry, str]]) -> Written:
    return Written(len(snapshot.sessions) - len(refused_sessions), len(tasks) - len(refused_tasks), held,
                   [(SESSIONS.name, e, why) for e, why in refused_sessions] + [(TASKS.name, e, why) for e, why in refused_tasks])


def read_schema(name: str) -> str:
    """A dialect's DDL, shipped inside the package (sql/ in the checkout); a copy that cannot
    be read stops the start."""
    try:
        return importlib.resources.files("persistd.sql").joinpath(name).read_text(encoding="utf-8")
    except (OSError, ImportError) as exc:
        raise Fatal(f"cannot read {name} from the installed package persistd.sql ({exc}): reinstall persistd") from None


JSON_COLUMNS = ("game_info", "metadata")  # JSON objects, stored as their text
TIME_COLUMNS = ("start_time", "end_time")  # times a row carries (besides created_at and updated_at)


def sessions_after(after: str | None, sessions: int) -> tuple[str, list[Any]]:
    """The next `sessions` sessions after `after` in key order, each with the tasks its
    counts keep (reconcile_slice cuts them to a slice): SQL with %s, and its arguments."""
    return ("SELECT s.session_id, (SELECT COALESCE(SUM(c.tasks), 0) FROM task_counts c"
            " WHERE c.session_id = s.session_id) AS tasks FROM translation_sessions s"
            + ("" if after is None else " WHERE s.session_id > %s") + " ORDER BY s.session_id LIMIT %s",
            [*([] if after is None else [after]), sessions])


def reconcile_slice(sessions: list[tuple[str, int]], tasks: int) -> list[str]:
    """The sessions one reconciliation transaction recounts: in order, while their kept
    counts add up to at most `tasks` (always at least one), so that no slice holds its
    locks long whatever the sessions' sizes."""
    ids, total = [], 0
    for session_id, kept in sessions:
        total += kept
        if ids and total > tasks:
            break
        ids.append(session_id)
    return ids


def decode_json_columns(row: dict) -> dict:
    for name in JSON_COLUMNS:
        if row.get(name) is not None:
            row[name] = msgspec.json.decode(row[name])
    return row


SESSION_COLUMNS = ("session_id, filename, file_path, status, game_info, llm_provider, metadata, total_tasks,"
                   " completed_tasks, failed_tasks, processing_tasks, created_at, updated_at")
TASK_COLUMNS = ("task_id, session_id, batch_id, sheet_name, row_index, column_name, source_text, target_text,"
                " context, status, confidence, error_message, retry_count, start_time, end_time, duration_ms,"
                " created_at, updated_at")
INCOMPLETE_COLUMNS = ("session_id, filename, status, total_tasks, completed_tasks, failed_tasks, processing_tasks,"
                      " created_at, updated_at")  # only what §5.1 shows: decoding game_info was half its time
# A single row, with its versions: the daemon lays the buffered states over it by version.
SESSION_BY_ID = (f"SELECT {SESSION_COLUMNS}, {', '.join(version_columns(SESSIONS))} FROM translation_sessions"
                 " WHERE session_id = %s")
TASK_BY_ID = f"SELECT {TASK_COLUMNS}, {', '.join(version_columns(TASKS))} FROM translation_tasks WHERE task_id = %s"
INCOMPLETE = (f"SELECT {INCOMPLETE_COLUMNS} FROM translation_sessions WHERE status IN ('pending', 'processing')"
              " ORDER BY created_at, session_id")
SHEET_ORDER = "sheet_name, row_index, column_name, task_id"
UNFINISHED = "session_id = %s AND status IN ('pending', 'processing')"
# §5.2's task object, which the database builds as JSON: these columns as they are, then
# created_at in RFC 3339.
RESTORED_FIELDS = tuple(f.name for f in msgspec.structs.fields(RestoredTask) if f.name != "created_at")
DELETE_CHUNK_ROWS = 5000  # rows one DELETE statement removes: short locks for concurrent writes
CLEANUP_CHUNK_SESSIONS = 100
CLEANUP_WHERE = ("(status = 'completed' AND updated_at < %s)"
                 " OR (status IN ('failed', 'cancelled') AND updated_at < %s)")
# The dry run counts the tasks themselves: exact whoever wrote them, as the cleanup deletes them.
CLEANUP_DRY_RUN = (f"SELECT (SELECT COUNT(*) FROM translation_sessions WHERE {CLEANUP_WHERE}) AS sessions,"
                   " (SELECT COUNT(*) FROM translation_tasks WHERE session_id IN"
                   f" (SELECT session_id FROM translation_sessions WHERE {CLEANUP_WHERE})) AS tasks")
# (On MySQL each instance keeps rows of its own, which add up: see persistd.mysql.)
KEPT_COUNTS = ("SELECT session_id, status, created_hour, SUM(tasks) AS tasks, SUM(duration_ms_sum) AS duration_ms_sum,"
               " SUM(durations) AS durations FROM task_counts WHERE session_id IN ({ids}) GROUP BY 1, 2, 3")
SORT_COLUMNS = {"created_at": "created_at", "updated_at": "updated_at"}  # never request text in SQL
ORDERS = {"asc": "ASC", "desc": "DESC"}
TASK_STATS = ("SELECT status, SUM(tasks) AS n, SUM(duration_ms_sum) AS ms, SUM(durations) AS d"
              " FROM task_counts GROUP BY status")
SESSIONS_BY_STATUS = "SELECT status, COUNT(*) AS n FROM translation_sessions GROUP BY status"
EMPTY_COUNTS = "SELECT NOT EXISTS (SELECT 1 FROM task_counts) AND EXISTS (SELECT 1 FROM translation_tasks) AS n"


class Query(typing.NamedTuple):
    sql: str
    args: list[Any]


def where_clause(where: list[str]) -> str:
    return " WHERE " + " AND ".join(where) if where else ""


def date_filters(q: SessionQuery | TaskQuery, where: list[str], args: list[Any]) -> None:
    if q.from_date is not None:
        where.append("created_at >= %s")
        args.append(as_utc(q.from_date))
    if q.to_date is not None:
        where.append("created_at <= %s")
        args.append(as_utc(q.to_date))


def page_args(args: list[Any], q: SessionQuery | SessionTaskQuery | TaskQuery) -> list[Any]:
    return [*args, q.page_size, (q.page - 1) * q.page_size]


def sessions_page(q: SessionQuery) -> tuple[Query, Query]:
    """The total and the page of GET /sessions. The page's ids come from the index that has
    the order (a deferred join: the OFFSET skips index entries, not rows)."""
    where, args = [], []
    if q.status is not None:
        where.append("status = %s")
        args.append(q.status)
    date_filters(q, where, args)
    order = f"{SORT_COLUMNS[q.sort_by]} {ORDERS[q.order]}, session_id {ORDERS[q.order]}"
    page = f"SELECT session_id FROM translation_sessions{where_clause(where)} ORDER BY {order} LIMIT %s OFFSET %s"
    return (Query("SELECT COUNT(*) AS n FROM translation_sessions" + where_clause(where), args),
            Query(f"SELECT {SESSION_COLUMNS} FROM translation_sessions JOIN ({page}) AS page"
                  f" USING (session_id) ORDER BY {order}", page_args(args, q)))


def page_of_tasks(where: list[str], order: str) -> str:
    """A deferred join, as for sessions: only the page's rows are read."""
    return (f"SELECT {TASK_COLUMNS} FROM translation_tasks JOIN (SELECT task_id FROM translation_tasks"
            f"{where_clause(where)} ORDER BY {order} LIMIT %s OFFSET %s) AS page USING (task_id) ORDER BY {order}")


def session_tasks_page(session_id: str, q: SessionTaskQuery) -> tuple[Query, Query]:
    """The total and the page of GET /sessions/{id}/tasks, in sheet order. Without a
    sheet_name the total comes from task_counts; with one, from the session's index."""
    where, args = ["session_id = %s"], [session_id]
    if q.status is not None:
        where.append("status = %s")
        args.append(q.status)
    if q.sheet_name is not None:
        where.append("sheet_name = %s")
        args.append(q.sheet_name)
        total = Query("SELECT COUNT(*) AS n FROM translation_tasks" + where_clause(where), args)
    else:
        total = count_tasks({"session_id": session_id} | ({} if q.status is None else {"status": q.status}), None, None)
    return total, Query(page_of_tasks(where, SHEET_ORDER), page_args(args, q))


def tasks_page(q: TaskQuery) -> tuple[Query, Query]:
    """GET /tasks: newest first; ties broken by task_id so pages never overlap or skip."""
    where, args = [], []
    equal = {name: value for name, value in (("session_id", q.session_id), ("status", q.status)) if value is not None}
    for name, value in equal.items():
        where.append(f"{name} = %s")
        args.append(value)
    date_filters(q, where, args)
    return (count_tasks(equal, q.from_date, q.to_date),
            Query(page_of_tasks(where, "created_at DESC, task_id DESC"), page_args(args, q)))


@functools.lru_cache(maxsize=256)
def hour_floor(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def count_tasks(equal: dict[str, str], from_date: datetime | None, to_date: datetime | None) -> Query:
    """What COUNT(*) would say of the tasks whose columns hold `equal` (session_id, status)
    and that were created from `from_date` to `to_date`, both included: the whole hours in
    between summed from task_counts, the partial hours at the two ends counted in the
    tasks' indexes (at most an hour of tasks at each end)."""
    lowest, highest = as_utc(TIMESTAMP_MIN), as_utc(TIMESTAMP_MAX)
    start = None if from_date is None else as_utc(from_date)
    end = None if to_date is None else as_utc(to_date)
    if (start is not None and start > highest) or (end is not None and end < lowest):
        return Query("SELECT 0 AS n", [])
    # [start, end) in whole seconds, the unit of created_at; no bound where none is needed.
    start = None if start is None or start <= lowest else start + timedelta(microseconds=-start.microsecond % 10**6)
    end = None if end is None or end >= highest else end.replace(microsecond=0) + timedelta(seconds=1)
    first = None if start is None else hour_floor(start + timedelta(hours=1, seconds=-1))
    last = None if end is None else hour_floor(end)
    values = list(equal.values())
    parts: list[str] = []
    args: list[Any] = []

    def between(table: str, what: str, column: str, low: datetime | None, high: datetime | None) -> None:
        where = [f"{name} = %s" for name in equal]  # the names are ours, never request text
        where += [f"{column} >= %s"] * (low is not None) + [f"{column} < %s"] * (high is not None)
        parts.append(f"(SELECT {what} FROM {table}{where_clause(where)})")
        args.extend(values + [low] * (low is not None) + [high] * (high is not None))

    if first is not None and last is not None and first >= last:  # no whole hour in the range
        between("translation_tasks", "COUNT(*)", "created_at", start, end)
    else:
        between("task_counts", "COALESCE(SUM(tasks), 0)", "created_hour", first, last)
        if start is not None and start < first:
            between("translation_tasks", "COUNT(*)", "created_at", start, first)
        if end is not None and last < end:
            between("translation_tasks", "COUNT(*)", "created_at", last, end)
    return Query(f"SELECT {' + '.join(parts)} AS n", args)


class Reads:
    """The operations both dialects run alike, on top of what each gives: `_read(fn, *args)`
    calls `fn(connection, *args)` on a pooled connection (awaiting it, or in a worker
    thread), and may try again on another after an outage; `_act` does the same once, for
    what must never act or count twice (a delete); and these functions of the dialect's module, as class attributes:
    `rows(conn, query)`, `page(conn, total, rows)`, `unfinished_tasks_of(conn, session_id)`,
    `delete_session_of(conn, session_id, buffered_tasks)`, `recount_tasks(conn)`."""

    async def _rows(self, query: Query) -> list[dict]:
        return await self._read(self.rows, query)

    async def _first(self, sql: str, *args: Any) -> dict | None:
        rows = await self._rows(Query(sql, list(args)))
        return rows[0] if rows else None

    async def recount(self) -> None:
        await self._read(self.recount_tasks)

    async def session(self, session_id: str) -> dict | None:
        return await self._first(SESSION_BY_ID, session_id)

    async def task(self, task_id: str) -> dict | None:
        return await self._first(TASK_BY_ID, task_id)

    async def has_session(self, session_id: str) -> bool:
        return await self._first("SELECT 1 AS n FROM translation_sessions WHERE session_id = %s", session_id) is not None

    async def list_sessions(self, q: SessionQuery) -> tuple[int, list[dict]]:
        return await self._read(self.page, *sessions_page(q))

    async def list_session_tasks(self, session_id: str, q: SessionTaskQuery) -> tuple[int, list[dict]]:
        return await self._read(self.page, *session_tasks_page(session_id, q))

    async def list_tasks(self, q: TaskQuery) -> tuple[int, list[dict]]:
        return await self._read(self.page, *tasks_page(q))

    async def incomplete_sessions(self) -> list[dict]:
        return await self._rows(Query(INCOMPLETE, []))

    async def unfinished_tasks(self, session_id: str) -> list[bytes]:
        return await self._read(self.unfinished_tasks_of, session_id)

    async def delete_session(self, session_id: str, buffered_tasks: list[str]) -> tuple[bool, int]:
        return await self._act(self.delete_session_of, session_id, buffered_tasks)

    async def count_rows(self, table: Table) -> int:
        return int((await self._rows(Query(f"SELECT COUNT(*) AS n FROM {table.name}", [])))[0]["n"])

    async def max_key(self, table: Table) -> str | None:
        return (await self._first(f"SELECT MAX({table.key}) AS n FROM {table.name}"))["n"]

    async def rows_after(self, table: Table, after: str | None, limit: int) -> list[dict]:
        columns = SESSION_COLUMNS if table is SESSIONS else TASK_COLUMNS
        where = "" if after is None else f" WHERE {table.key} > %s"
        return await self._rows(Query(f"SELECT {columns} FROM {table.name}{where} ORDER BY {table.key} LIMIT %s",
                                      [*([] if after is None else [after]), limit]))


# ── copy-data: from one backend to the other ─────────────────────────────────────────

COPY_CHUNK_ROWS = 1000  # rows a read and a write transaction hold


def as_entry(table: Table, row: dict) -> Entry:
    """A stored row as the flusher writes one: the request row, with its times."""
    row_type = SessionIn if table is SESSIONS else TaskIn
    fields = {f.name for f in msgspec.structs.fields(row_type)}
    return Entry(msgspec.convert({k: v for k, v in row.items() if k in fields}, row_type),
                 row["created_at"], row["updated_at"], 0)


async def copy_data(source: Store, target: Store, say: typing.Callable[[str], None],
                    chunk: int = COPY_CHUNK_ROWS) -> dict[str, tuple[int, int]]:
    """Every session, then every task, from `source` to `target`, in key order, `chunk`
    rows a transaction, through the target's own write (its counts kept as it keeps
    them). Resumable: a copy that was cut off starts again after the largest key the
    target holds (which must be the source's too: a target with rows of its own is
    refused), and rows written twice are the same rows. Returns each table's (source,
    target) row counts once done."""
    await target.open()
    for table in (SESSIONS, TASKS):
        after = await target.max_key(table)
        copied = 0
        if after is not None:
            if (await source.session(after) if table is SESSIONS else await source.task(after)) is None:
                raise Fatal(f"the target's {table.name} holds {after!r}, which the source does not: it holds rows"
                            " of its own; copy into an empty database")
            say(f"{table.name}: the target holds keys up to {after!r}; continuing after it")
        while rows := await source.rows_after(table, after, chunk):
            try:
                entries = {row[table.key]: as_entry(table, row) for row in rows}
            except msgspec.ValidationError as exc:  # a row written by other means, that persistd would refuse
                raise Fatal(f"{table.name} after {after!r} holds a row persistd refuses ({exc});"
                            " nothing after it was copied") from None
            snapshot = Snapshot(0, entries if table is SESSIONS else {}, entries if table is TASKS else {})
            outcome = await target.write(snapshot)
            if outcome.refused or outcome.held:
                reason = outcome.refused[0][2] if outcome.refused else "its session is not in the target"
                raise Fatal(f"the target refused {len(outcome.refused) + len(outcome.held)} rows of {table.name}"
                            f" (first: {reason}); nothing after {after!r} was copied")
            after, copied = rows[-1][table.key], copied + len(rows)
            say(f"{table.name}: {copied} rows copied, up to {after!r}")
    return {table.name: (await source.count_rows(table), await target.count_rows(table)) for table in (SESSIONS, TASKS)}


def drifted(kept: list[dict], actual: list[dict]) -> int:
    """How many task_counts rows differ from a recount (rows of zeros count as absent)."""
    def keyed(rows: list[dict]) -> dict[tuple, tuple]:
        return {(r["session_id"], r["status"], r["created_hour"]): (int(r["tasks"]), int(r["duration_ms_sum"]),
                                                                  int(r["durations"]))
                for r in rows if (r["tasks"], r["duration_ms_sum"], r["durations"]) != (0, 0, 0)}
    a, b = keyed(kept), keyed(actual)
    return sum(a.get(k) != b.get(k) for k in a.keys() | b.keys())


def stats_from(backend: str, task_rows: list[dict], session_rows: list[dict], session_time: Any, size_bytes: int,
               table_rows: dict[str, int]) -> Stats:
    """§6.3 from task_counts by status (TASK_STATS), the sessions by status, the average
    seconds of a completed session, and the catalog's figures."""
    by_status = {}
    for table, rows, statuses in (("sessions", session_rows, typing.get_args(SessionStatus)),
                                  ("tasks", task_rows, typing.get_args(TaskStatus))):
        counts = {r["status"]: int(r["n"]) for r in rows}
        by_status[table] = {"total": sum(counts.values()), **{s: counts.get(s, 0) for s in statuses}}
    tasks = by_status["tasks"]
    completed = next((r for r in task_rows if r["status"] == "completed" and r["d"]), None)
    finished = tasks["completed"] + tasks["failed"]
    return Stats(
        sessions=by_status["sessions"], tasks=tasks,
        performance=Performance(
            average_session_time=None if session_time is None else round(float(session_time), 1),
            average_task_time=None if completed is None else round(float(completed["ms"] / completed["d"]) / 1000, 3),
            success_rate=round(100 * tasks["completed"] / finished, 1) if finished else None),
        storage=Storage(
            database_size_mb=round(size_bytes / 2**20, 1),
            sessions_table_rows=table_rows.get("translation_sessions", 0),
            tasks_table_rows=table_rows.get("translation_tasks", 0), backend=backend))
