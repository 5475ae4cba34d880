"""Read-path benchmark for persistd: latency of every read endpoint over 1,000,000 tasks.

Data set (the issue's): 10,000 sessions and 1,000,000 tasks in persistd_readbench - with
--backend mysql (the default) the MariaDB database, its tables from the daemon's sql/mysql.sql;
with --backend sqlite the file bench-results/persistd_readbench/persistd.db, its tables from
sql/sqlite.sql, in WAL mode. Sessions are mostly completed, some failed, cancelled,
processing and pending, created over 90 days (the unfinished ones in the last three); 9,998 of
them have 59-120 tasks (about 90), one has 5,000 and one 100,000 tasks, both processing with
a large share of pending and processing tasks. Tasks are about 94 % completed and 2 % failed;
pending and processing tasks exist only in unfinished sessions. Texts are 20-200 characters
mixing CJK, Latin and emoji (the write-path benchmark's generator); sheets, row indexes,
batch ids, start/end times and duration_ms are filled as a translation run would; every
session's counters match its task rows and its times enclose theirs.

The rows are generated here (seeded: the same data every time, for both backends). MySQL: as
tab-separated files loaded with LOAD DATA LOCAL INFILE through `mariadb --local-infile=1`,
100,000 tasks per statement, then ANALYZE TABLE. SQLite: inserted with the standard
library's sqlite3 (times as INTEGER seconds since 1970, JSON as text), 100,000 tasks or more
a transaction; sqlite.sql's triggers fill task_counts as they go. No ANALYZE there: persistd
never runs one, so in production SQLite plans its queries without statistics too. Loading
takes about a minute; with --reuse an existing data set is used as it is when its row counts
match and its tables, indexes and triggers are those the schema file creates now (compared
with a scratch database made from it; for SQLite, sqlite_master against an in-memory
database): the daemon never alters existing tables, so a changed schema means loading again.

Measurement: the daemon runs as a subprocess (`python -m persistd --config FILE`, janitor
off, read_timeout 60 s so that slow queries are measured rather than cut off) and this process
calls it over one keep-alive HTTP connection (trio + h11, bench/write_path.py's client;
replaced, untimed, after 1000 requests or 4 s idle, before the server closes it), one
call at a time, so a latency is one call's: from sending the request to having the whole
response. Each endpoint group makes --calls calls (default 200) with varied filters and pages,
in a seeded random order, after 5 untimed warm-up calls, and reports p50, p99 and max
(nearest rank) against its target. A group stops early once it has used its time budget (the
larger of --budget and twice calls x target); it then averages more than twice its target,
so stopping does not change its verdict. Stats are cached by the daemon for 5 s, so they are
measured twice: back to back (cache hits), and --stats-cold-calls calls each made after the
cache expired, i.e. what a caller polling less often than every 5 s gets.

Checks: every answer must be 200; list answers must be consistent (total_pages, number of
items on the page) and give one `total` per filter; the totals of a sample of filters per
group, every restore's tasks_count, incomplete-sessions' count and the stats counts are
compared with COUNT(*) in the database (read by this script through trio_mysql, or sqlite3
on the file). Any failure is listed and the script exits 1 (after the table). Per group it
prints the CPU seconds of the daemon, MariaDB (mysql only: SQLite runs inside the daemon,
whose figure includes it), this script and all other processes (2 shared cores: a large
"other" figure means a disturbed measurement). The daemon's log goes to
bench-results/read_path-BACKEND.log.

--database measures another database (e.g. one for a changed schema; for sqlite
bench-results/DATABASE/persistd.db); it is dropped and loaded like persistd_readbench
unless --reuse finds it current. The daemon measured is the persistd that `import persistd`
finds (PYTHONPATH can point at a modified copy).

Usage:
  .venv/bin/python bench/read_path.py [--backend mysql|sqlite] [--reuse] [--database persistd_readbench]
      [--calls 200] [--budget 120] [--stats-cold-calls 12] [--only GROUP,...] [--port 18002]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote, urlencode

import h11
import msgspec
import trio

from persistd.daemon import SESSION_SETUP, STATS_CACHE_S
from persistd.storage import read_schema
from write_path import (COLUMNS, DAEMON_FILE, DATABASES, REPO, RESULTS_DIR, SHEETS, TOKENS, WEIGHTS, BenchError, CpuUse,
                        Daemon, Database, HttpConnection, MySQLDatabase, MySQLReader, Response, SQLiteDatabase,
                        SQLiteReader, code_version, cpu_seconds, mariadb, run_bench, session_row, stop_daemon, text,
                        wait_listening)

DEFAULT_DB = "persistd_readbench"
SCHEMA_CHECK_DB = "persistd_readbench_schema"  # sql/mysql.sql alone, compared with the data set's tables
SEED = 20250901
API = "/api/v1/translation"

N_SESSIONS = 10_000
N_TASKS = 1_000_000
# The two large sessions: (tasks, done (completed or failed), processing, failure rate of the done ones)
LARGE_SESSIONS = ((100_000, 72_000, 5_000, 0.028), (5_000, 2_600, 400, 0.04))
# The other 9,998 sessions by status
SESSION_MIX = (("completed", 9_000), ("failed", 400), ("cancelled", 388), ("processing", 150), ("pending", 60))
FAILURE_RATE = {"completed": 0.015, "cancelled": 0.03, "failed": 0.2, "processing": 0.015, "pending": 0.0}
UNFINISHED = ("pending", "processing")
END = int(datetime(2025, 9, 1, tzinfo=timezone.utc).timestamp())  # the data set's "now"
DAY = 86_400
TASK_STEP_S = 0.5  # a session's tasks start this far apart
ROWS_PER_LOAD = 100_000

TIME_COLUMNS = ("start_time", "end_time", "created_at", "updated_at")
SESSION_COLUMNS = ("session_id", "filename", "file_path", "status", "game_info", "llm_provider", "metadata",
                   "total_tasks", "completed_tasks", "failed_tasks", "processing_tasks", "created_at", "updated_at")
TASK_COLUMNS = ("task_id", "session_id", "batch_id", "sheet_name", "row_index", "column_name", "source_text",
                "target_text", "context", "status", "confidence", "error_message", "retry_count", "start_time",
                "end_time", "duration_ms", "created_at", "updated_at")
ERRORS = ("API rate limit exceeded (429), gave up after 3 retries",
          "LLM response could not be parsed: unterminated placeholder {player",
          "Translation exceeds max_length_ratio 1.3 (源文本 42 字, 译文 71 字)", "Upstream timeout after 60 s")

WARMUP_CALLS = 5
IDLE_REOPEN_S = 4.0  # a connection idle this long is replaced: hypercorn closes it at 5 s (keep_alive_timeout)
SLOWEST_SHOWN = 3  # calls listed for a group that misses its target or has none
VERIFIED_FILTERS = 8  # per list group: filters whose total is compared with COUNT(*)
PAGE_SIZES = (20, 50, 100)
TASK_STATUSES = ("pending", "processing", "completed", "failed")
SESSION_STATUSES = ("pending", "processing", "completed", "failed", "cancelled")


# ── data set ─────────────────────────────────────────────────────────────────────────


@dataclass
class SessionPlan:
    session_id: str
    status: str
    tasks: int
    created: int  # epoch seconds
    done: int  # tasks completed or failed (the first ones, in sheet order)
    processing: int  # the next ones; the rest are pending
    failure_rate: float  # of the done tasks


def plan_sessions(rng: random.Random) -> list[SessionPlan]:
    statuses = [status for status, n in SESSION_MIX for _ in range(n)]
    rng.shuffle(statuses)
    counts = small_task_counts(rng, len(statuses), N_TASKS - sum(large[0] for large in LARGE_SESSIONS))
    plans = [small_session(rng, status, n) for status, n in zip(statuses, counts)]
    plans += [SessionPlan(new_id(rng), "processing", n, created(rng, "processing"), done, processing, failure_rate)
              for n, done, processing, failure_rate in LARGE_SESSIONS]
    assert len(plans) == N_SESSIONS and sum(p.tasks for p in plans) == N_TASKS
    return sorted(plans, key=lambda p: p.session_id)  # tasks are then loaded in primary-key order


def small_task_counts(rng: random.Random, sessions: int, tasks: int) -> list[int]:
    """`sessions` counts of about 90 (59-120) that add up to exactly `tasks`."""
    counts = [tasks // sessions] * sessions
    for i in rng.sample(range(sessions), tasks % sessions):
        counts[i] += 1
    for i in range(0, sessions - 1, 2):
        d = rng.randint(0, 30)
        counts[i], counts[i + 1] = counts[i] + d, counts[i + 1] - d
    rng.shuffle(counts)
    return counts


def small_session(rng: random.Random, status: str, n: int) -> SessionPlan:
    if status == "pending":
        done = processing = 0
    elif status == "processing":
        done = int(n * rng.uniform(0.2, 0.8))
        processing = min(5, n - done)
    else:
        done, processing = n, 0
    return SessionPlan(new_id(rng), status, n, created(rng, status), done, processing, FAILURE_RATE[status])


def new_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def created(rng: random.Random, status: str) -> int:
    """Unfinished sessions started in the last three days, the others over 90 days."""
    oldest = 3 * DAY if status in UNFINISHED else 90 * DAY
    return END - rng.randint(DAY // 2, oldest)


def sql_time(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def tsv(value: object) -> str:
    """One field for LOAD DATA's defaults (tab-separated, backslash escapes, \\N for NULL)."""
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
    return str(value)


def tsv_line(columns: tuple[str, ...], row: tuple) -> str:
    """A row for LOAD DATA: its times (epoch seconds) as MySQL's literals."""
    return "\t".join(tsv(sql_time(value) if name in TIME_COLUMNS and value is not None else value)
                     for name, value in zip(columns, row)) + "\n"


def task_rows(rng: random.Random, corpus: str, s: SessionPlan) -> tuple[list[tuple], dict[str, int], int]:
    """A session's task rows (TASK_COLUMNS, times in epoch seconds); also its counts by status and its last update."""
    per_sheet = -(-s.tasks // len(SHEETS))
    counts = dict.fromkeys(TASK_STATUSES, 0)
    rows, last_update = [], s.created
    for i in range(s.tasks):
        sheet, j = SHEETS[i // per_sheet], i % per_sheet
        column, created_at = COLUMNS[j % len(COLUMNS)], s.created + i // 1000  # batches of 1000, 1 s apart
        start = s.created + 5 + int(min(i, s.done) * TASK_STEP_S)
        target = confidence = error = start_time = end_time = duration_ms = None
        retries, updated_at = 0, created_at
        if i < s.done:
            duration_ms = rng.randint(400, 9000)
            start_time, end_time = start, start + math.ceil(duration_ms / 1000)
            updated_at = end_time
            if rng.random() < s.failure_rate:
                status, error, retries, duration_ms = "failed", rng.choice(ERRORS), 3, None
            else:
                status, target, confidence = "completed", text(rng, corpus, 20, 200), round(rng.uniform(0.55, 1), 4)
                retries = int(rng.random() < 0.05)
        elif i < s.done + s.processing:
            status, start_time = "processing", start + (i - s.done)
            updated_at = start_time
        else:
            status = "pending"
        counts[status] += 1
        last_update = max(last_update, updated_at)
        rows.append((f"{s.session_id}-{i:06d}", s.session_id, f"{s.session_id[:8]}-b{i // 50:04d}", sheet, j + 2,
                     column, text(rng, corpus, 20, 200), target, f"{sheet}!{column}{j + 2}", status, confidence, error,
                     retries, start_time, end_time, duration_ms, created_at, updated_at))
    return rows, counts, last_update


def session_fields(rng: random.Random, n: int, s: SessionPlan, counts: dict[str, int], last_update: int) -> tuple:
    """The session's row (SESSION_COLUMNS, times in epoch seconds)."""
    row = session_row(rng, n, s.session_id, s.tasks)  # filename, file_path, provider, game_info, metadata
    return (s.session_id, row["filename"], row["file_path"], s.status, msgspec.json.encode(row["game_info"]).decode(),
            row["llm_provider"], msgspec.json.encode(row["metadata"]).decode(), s.tasks, counts["completed"],
            counts["failed"], counts["processing"], s.created, last_update)


def data_set() -> Iterator[tuple[tuple, list[tuple]]]:
    """Each session's row with its tasks' rows, in primary-key order (seeded: the same every time)."""
    rng = random.Random(SEED)
    corpus = "".join(rng.choices(TOKENS, WEIGHTS, k=50_000))
    for n, plan in enumerate(plan_sessions(rng)):
        tasks, counts, last_update = task_rows(rng, corpus, plan)
        yield session_fields(rng, n, plan, counts, last_update), tasks


def write_files(tmp: Path) -> tuple[Path, list[Path]]:
    """The sessions file and the task files (ROWS_PER_LOAD rows each), in primary-key order."""
    sessions_path, task_paths, pending = tmp / "sessions.tsv", [], []
    with open(sessions_path, "w", encoding="utf-8") as sessions:
        for n, (session, tasks) in enumerate(data_set()):
            sessions.write(tsv_line(SESSION_COLUMNS, session))
            pending += [tsv_line(TASK_COLUMNS, task) for task in tasks]
            while len(pending) >= ROWS_PER_LOAD or (pending and n == N_SESSIONS - 1):
                task_paths.append(tmp / f"tasks-{len(task_paths):02d}.tsv")
                task_paths[-1].write_text("".join(pending[:ROWS_PER_LOAD]), encoding="utf-8")
                del pending[:ROWS_PER_LOAD]
    return sessions_path, task_paths


def data_set_database(backend: str, name: str) -> Database:
    """Where the data set is: the MariaDB database `name`, or bench-results/`name`/persistd.db,
    kept between runs alike (see --reuse)."""
    return MySQLDatabase(name) if backend == "mysql" else SQLiteDatabase(RESULTS_DIR / name / "persistd.db")


def definitions(db: str) -> list[str]:
    """Each table's SHOW CREATE TABLE and each trigger's statement."""
    tables = mariadb("-N", "-e", "SHOW TABLES", db).split()
    return [mariadb("-N", "-e", f"SHOW CREATE TABLE `{table}`", db) for table in tables] + [mariadb(
        "-N", "-e", "SELECT trigger_name, action_statement FROM information_schema.triggers"
                    " WHERE trigger_schema = DATABASE() ORDER BY trigger_name", db)]


def sqlite_definitions(conn: sqlite3.Connection) -> list[tuple]:
    """Each table's, index's and trigger's statement, as sqlite_master keeps it."""
    with closing(conn):
        return conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()


def schema_is_current(db: Database) -> bool:
    """Whether `db` has the tables, indexes and triggers the schema file creates now: the
    daemon creates missing tables but never alters present ones."""
    if db.backend == "sqlite":
        scratch = sqlite3.connect(":memory:")
        scratch.executescript(read_schema("sqlite.sql"))
        return sqlite_definitions(sqlite3.connect(f"{db.path.as_uri()}?mode=rw", uri=True)) == sqlite_definitions(scratch)
    scratch = MySQLDatabase(SCHEMA_CHECK_DB)
    scratch.create()
    try:
        return definitions(db.name) == definitions(scratch.name)
    finally:
        scratch.drop()


def load_statement(path: Path, table: str, columns: tuple[str, ...]) -> str:
    return (f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE {table} CHARACTER SET utf8mb4 ({', '.join(columns)});\n"
            f"SELECT '{path.name}', @@warning_count;\n")


def load_data_set(db: Database) -> float:
    """Drops, recreates and fills `db`; returns the seconds it took."""
    started = time.perf_counter()
    if db.backend == "mysql":
        load_mysql(db, started)
    else:
        load_sqlite(db)
    return time.perf_counter() - started


def load_mysql(db: MySQLDatabase, started: float) -> None:
    with tempfile.TemporaryDirectory(prefix="persistd-readbench-") as tmp:
        sessions_path, task_paths = write_files(Path(tmp))
        print(f"  generated {len(task_paths) + 1} files in {time.perf_counter() - started:.0f} s", flush=True)
        db.create()
        script = Path(tmp) / "load.sql"
        script.write_text(SESSION_SETUP + ";\n" + load_statement(sessions_path, "translation_sessions", SESSION_COLUMNS)
                          + "".join(load_statement(p, "translation_tasks", TASK_COLUMNS) for p in task_paths)
                          + "ANALYZE TABLE translation_sessions, translation_tasks;\n", encoding="utf-8")
        with open(script, "rb") as sql:
            output = mariadb("--local-infile=1", "-N", db.name, stdin=sql)
    warned = [line for line in output.splitlines() if line.split("\t")[0].endswith(".tsv") and not line.endswith("\t0")]
    if warned:
        raise BenchError(f"LOAD DATA reported warnings (rows truncated or refused): {warned}")


def insert_sql(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def load_sqlite(db: SQLiteDatabase) -> None:
    """Each session, then its tasks, ROWS_PER_LOAD tasks or more a transaction; the triggers of
    sqlite.sql count them into task_counts. No ANALYZE: persistd never runs one, so SQLite
    plans its queries without statistics in production too."""
    db.create()
    insert_session = insert_sql("translation_sessions", SESSION_COLUMNS)
    insert_task = insert_sql("translation_tasks", TASK_COLUMNS)
    with closing(db.writer()) as conn:
        conn.execute("BEGIN")
        uncommitted = 0
        for session, tasks in data_set():
            conn.execute(insert_session, session)
            conn.executemany(insert_task, tasks)
            uncommitted += len(tasks)
            if uncommitted >= ROWS_PER_LOAD:
                conn.execute("COMMIT")
                conn.execute("BEGIN")
                uncommitted = 0
        conn.execute("COMMIT")


# ── what is stored ───────────────────────────────────────────────────────────────────

SIZES_SQL = {  # per table: bytes of data, bytes of indexes
    "mysql": ("SELECT table_name, data_length, index_length FROM information_schema.tables"
              " WHERE table_schema = DATABASE()"),
    "sqlite": ("SELECT m.tbl_name, SUM(IIF(m.type = 'table', d.pgsize, 0)), SUM(IIF(m.type = 'index', d.pgsize, 0))"
               " FROM dbstat AS d JOIN sqlite_master AS m USING (name) GROUP BY m.tbl_name"),
}


async def row_counts(db: Database) -> tuple[int, int] | None:
    """(sessions, tasks) in `db`, None when it or its tables do not exist."""
    try:
        conn = await db.connect()
    except db.missing:
        return None
    try:
        ((sessions, tasks),) = await conn.rows("SELECT (SELECT COUNT(*) FROM translation_sessions),"
                                               " (SELECT COUNT(*) FROM translation_tasks)")
        return int(sessions), int(tasks)
    except db.missing:
        return None
    finally:
        conn.close()


@dataclass
class Stored:
    """What the calls are built from, and what their answers are checked against."""
    database: Database
    sessions: list[tuple[str, str, int]]  # (session_id, status, total_tasks)
    large: dict[int, str]  # task count -> session_id of the two large sessions
    # per large session: (status, sheet_name) -> tasks; status or sheet None means any
    large_counts: dict[str, dict[tuple[str | None, str | None], int]]
    sessions_by_status: dict[str, int]
    tasks_by_status: dict[str, int]
    sizes_mb: dict[str, tuple[float, float]]  # table -> (data, indexes)


async def read_stored(db: Database) -> Stored:
    conn = await db.connect()
    try:
        sessions = [(sid, status, int(n)) for sid, status, n in await conn.rows(
            "SELECT session_id, status, total_tasks FROM translation_sessions ORDER BY session_id")]
        large = {n: sid for sid, _, n in sessions if n in {size for size, *_ in LARGE_SESSIONS}}
        large_counts = {sid: await status_sheet_counts(conn, sid) for sid in large.values()}
        by_status = {}
        for table in ("translation_sessions", "translation_tasks"):
            by_status[table] = {status: int(n) for status, n in await conn.rows(
                f"SELECT status, COUNT(*) FROM {table} GROUP BY status")}
        sizes = {name: (data / 2**20, index / 2**20) for name, data, index in await conn.rows(SIZES_SQL[db.backend])}
    finally:
        conn.close()
    return Stored(db, sessions, large, large_counts, by_status["translation_sessions"], by_status["translation_tasks"],
                  sizes)


async def status_sheet_counts(conn: MySQLReader | SQLiteReader,
                              session_id: str) -> dict[tuple[str | None, str | None], int]:
    counts: dict[tuple[str | None, str | None], int] = {}
    for status, sheet, n in await conn.rows("SELECT status, sheet_name, COUNT(*) FROM translation_tasks"
                                            " WHERE session_id = %s GROUP BY status, sheet_name", session_id):
        for key in ((status, sheet), (status, None), (None, sheet), (None, None)):
            counts[key] = counts.get(key, 0) + int(n)
    return counts


# ── the calls ────────────────────────────────────────────────────────────────────────


@dataclass
class Call:
    method: str
    path: str
    params: dict[str, str | int] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.path + ("?" + urlencode(self.params) if self.params else "")

    @property
    def filters(self) -> tuple:
        """The call without its page: calls with equal filters must report equal totals."""
        return (self.path, *sorted((k, v) for k, v in self.params.items() if k not in ("page", "page_size")))


@dataclass
class Group:
    key: str  # for --only
    name: str
    target_ms: float | None  # p99 target; None: measured, no target
    warmup: list[Call]  # untimed, before the timed calls
    calls: list[Call]
    pause_s: float = 0.0  # untimed wait before each timed call


def rfc3339(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def date_filter(rng: random.Random) -> dict[str, str]:
    """None, from only, to only, or a window of 1, 7 or 30 days, anywhere in the 90 days."""
    kind = rng.choice(("none", "none", "from", "to", "window"))
    end = END - rng.randint(0, 90 * 24) * 3600
    if kind == "from":
        return {"from_date": rfc3339(end)}
    if kind == "to":
        return {"to_date": rfc3339(end)}
    if kind == "window":
        return {"from_date": rfc3339(end - rng.choice((1, 7, 30)) * DAY), "to_date": rfc3339(end)}
    return {}


def paged(rng: random.Random, params: dict, pages: int | Callable[[int], int]) -> dict:
    """`pages`: the largest page (drawn uniformly from 1..pages), or a function of the page size."""
    size = rng.choice(PAGE_SIZES)
    last = pages(size) if callable(pages) else pages
    return {**params, "page": rng.randint(1, max(last, 1)), "page_size": size}


def session_list_call(rng: random.Random) -> Call:
    params = {"status": rng.choice(SESSION_STATUSES)} if rng.random() < 0.6 else {}
    params |= date_filter(rng) | {"sort_by": rng.choice(("created_at", "updated_at")), "order": rng.choice(("asc", "desc"))}
    return Call("GET", f"{API}/sessions", paged(rng, params, 10))


def session_tasks_call(rng: random.Random, session_id: str, counts: dict) -> Call:
    """Any filter (status, sheet, both, none) and any page of it, last page included."""
    status = rng.choice((None, *TASK_STATUSES))
    sheet = rng.choice((None, *SHEETS)) if rng.random() < 0.5 else None
    params = {k: v for k, v in (("status", status), ("sheet_name", sheet)) if v is not None}
    total = counts.get((status, sheet), 0)
    return Call("GET", f"{API}/sessions/{session_id}/tasks", paged(rng, params, lambda size: math.ceil(total / size)))


def task_list_filter(rng: random.Random, stored: Stored) -> dict:
    params = {}
    if rng.random() < 0.3:
        params["session_id"] = rng.choice([*stored.large.values(), *(sid for sid, _, _ in rng.sample(stored.sessions, 3))])
    if rng.random() < 0.5:
        params["status"] = rng.choice(TASK_STATUSES)
    return params | date_filter(rng)


def deep_task_list_call(rng: random.Random, page: int) -> Call:
    """Filters with at least 50,000 tasks, so that page 500 of 100 exists."""
    params = rng.choice(({}, {"status": "completed"}, {"from_date": rfc3339(END - rng.randint(45, 90) * DAY)},
                         {"to_date": rfc3339(END - rng.randint(0, 30) * DAY)}))
    return Call("GET", f"{API}/tasks", {**params, "page": page, "page_size": rng.choice(PAGE_SIZES)})


def random_task_id(rng: random.Random, stored: Stored, weights: list[int]) -> str:
    """Uniform over all tasks: a session weighted by its tasks, then one of its tasks."""
    session_id, _, n = rng.choices(stored.sessions, weights)[0]
    return f"{session_id}-{rng.randrange(n):06d}"


def build_groups(stored: Stored, calls: int, stats_cold_calls: int) -> list[Group]:
    rng = random.Random(SEED + 1)
    big, mid = stored.large[100_000], stored.large[5_000]
    weights = [tasks for _, _, tasks in stored.sessions]

    def group(key: str, name: str, target_ms: float | None, make: Callable[[], Call], n: int = calls,
              warmup: int = WARMUP_CALLS, pause_s: float = 0.0) -> Group:
        return Group(key, name, target_ms, [make() for _ in range(warmup)], [make() for _ in range(n)], pause_s)

    return [
        group("session", "GET /sessions/{id}", 20,
              lambda: Call("GET", f"{API}/sessions/{rng.choice(stored.sessions)[0]}")),
        group("task", "GET /tasks/{id}", 20,
              lambda: Call("GET", f"{API}/tasks/{quote(random_task_id(rng, stored, weights))}")),
        group("sessions", "GET /sessions (10,000; any filter, pages 1-10)", 20, lambda: session_list_call(rng)),
        group("incomplete", "GET /recovery/incomplete-sessions", 20,
              lambda: Call("GET", f"{API}/recovery/incomplete-sessions")),
        group("stats", "GET /stats (back to back: cached)", 20, lambda: Call("GET", f"{API}/stats")),
        group("session-tasks-5k", "GET /sessions/{id}/tasks (5,000 tasks; any filter, any page)", 20,
              lambda: session_tasks_call(rng, mid, stored.large_counts[mid])),
        group("restore-5k", "POST /recovery/restore/{id} (5,000 tasks)", 50,
              lambda: Call("POST", f"{API}/recovery/restore/{mid}")),
        group("session-tasks-100k", "GET /sessions/{id}/tasks (100,000 tasks; any filter, any page)", None,
              lambda: session_tasks_call(rng, big, stored.large_counts[big])),
        group("restore-100k", "POST /recovery/restore/{id} (100,000 tasks)", 1000,
              lambda: Call("POST", f"{API}/recovery/restore/{big}")),
        group("tasks", "GET /tasks (1,000,000; any filter, pages 1-10)", 50,
              lambda: Call("GET", f"{API}/tasks", paged(rng, task_list_filter(rng, stored), 10))),
        group("tasks-p50", "GET /tasks page 50 (deeper pages, measured)", None, lambda: deep_task_list_call(rng, 50)),
        group("tasks-p500", "GET /tasks page 500 (deeper pages, measured)", None, lambda: deep_task_list_call(rng, 500)),
        group("stats-cold", f"GET /stats (cache expired: calls {STATS_CACHE_S + 0.5:g} s apart)", 20,
              lambda: Call("GET", f"{API}/stats"), n=stats_cold_calls, warmup=1, pause_s=STATS_CACHE_S + 0.5),
    ]


# ── running a group ──────────────────────────────────────────────────────────────────


class Connection(HttpConnection):
    """bench/write_path.py's keep-alive connection, except that the answer after which the
    server closes the connection is returned rather than refused: `closed` then says so."""
    closed = False

    async def request(self, method: str, target: str, body: bytes = b"") -> Response:
        assert not body, "the read endpoints take no body"
        headers = [("Host", f"127.0.0.1:{self.port}"), ("Content-Length", "0")]
        await self.stream.send_all(self.h11.send(h11.Request(method=method, target=target, headers=headers)))
        self.h11.send(h11.EndOfMessage())
        response = await self.receive()
        if h11.MUST_CLOSE in (self.h11.our_state, self.h11.their_state):
            self.closed = True
        else:
            self.h11.start_next_cycle()
        return response


class Client:
    """One connection at a time, one call at a time. persistd (hypercorn) closes a
    connection after 1000 requests, and one idle for keep_alive_timeout (5 s: the cold
    stats calls wait longer); the next is opened in ready(), outside any timing."""

    def __init__(self, port: int) -> None:
        self.port, self.conn, self.answered = port, None, 0.0

    async def ready(self) -> None:
        if self.conn is not None and (self.conn.closed or trio.current_time() - self.answered > IDLE_REOPEN_S):
            await self.conn.aclose()
            self.conn = None
        if self.conn is None:
            self.conn = await Connection.open(self.port)

    async def request(self, call: Call) -> Response:
        response = await self.conn.request(call.method, call.target)
        self.answered = trio.current_time()
        return response

    async def aclose(self) -> None:
        if self.conn is not None:
            await self.conn.aclose()


@dataclass
class Result:
    group: Group
    timed: list[tuple[float, Call]] = field(default_factory=list)  # (seconds, call), in call order
    answers: list[tuple[Call, dict]] = field(default_factory=list)  # decoded 200 answers
    errors: list[str] = field(default_factory=list)
    response_bytes: int = 0
    stopped_early: bool = False
    cpu: CpuUse | None = None
    seconds: float = 0.0

    @property
    def latencies(self) -> list[float]:
        return [seconds for seconds, _ in self.timed]

    def ms(self, quantile: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]

    @property
    def met(self) -> bool | None:
        return None if self.group.target_ms is None else self.ms(0.99) <= self.group.target_ms


async def run_group(client: Client, group: Group, budget_s: float, daemon_pid: int, server_pid: int | None) -> Result:
    result = Result(group)
    for call in group.warmup:
        await client.ready()
        await client.request(call)
    if group.target_ms is not None:
        budget_s = max(budget_s, 2 * len(group.calls) * group.target_ms / 1000)
    cpu_before, started = CpuUse.now(cpu_seconds(daemon_pid), server_pid), time.perf_counter()
    for call in group.calls:
        if time.perf_counter() - started > budget_s:
            result.stopped_early = True
            break
        await trio.sleep(group.pause_s)
        await client.ready()
        gc.disable()  # collections of this process (it decodes megabytes of answers) are not the daemon's latency
        try:
            sent = time.perf_counter()
            response = await client.request(call)
            result.timed.append((time.perf_counter() - sent, call))
        finally:
            gc.enable()
        result.response_bytes += len(response.body)
        if response.status == 200:
            result.answers.append((call, msgspec.json.decode(response.body)))
        else:
            result.errors.append(f"{call.method} {call.target}: HTTP {response.status} {response.body[:200]!r}")
    result.seconds = time.perf_counter() - started
    result.cpu = CpuUse.now(cpu_seconds(daemon_pid), server_pid) - cpu_before
    return result


# ── checks ───────────────────────────────────────────────────────────────────────────


def check_answer(call: Call, body: dict) -> str | None:
    """What is wrong with one answer on its own, if anything."""
    asked = call.path.rsplit("/", 1)[1]
    if "page" in call.params:
        total, page, size = body["total"], call.params["page"], call.params["page_size"]
        on_page = max(0, min(size, total - (page - 1) * size))
        if body["total_pages"] != math.ceil(total / size) or len(body["items"]) != on_page:
            return f"{call.target}: total {total}, total_pages {body['total_pages']}, {len(body['items'])} items"
    elif "/recovery/restore/" in call.path:
        if body["tasks_count"] != len(body["tasks"]) or body["session"]["session_id"] != asked:
            return f"{call.target}: tasks_count {body['tasks_count']}, {len(body['tasks'])} tasks"
    elif call.path.endswith("/incomplete-sessions"):
        if body["count"] != len(body["sessions"]):
            return f"{call.target}: count {body['count']} but {len(body['sessions'])} sessions"
    elif call.path.startswith(f"{API}/sessions/") and body["session_id"] != asked:
        return f"{call.target}: answered session {body['session_id']}"
    elif call.path.startswith(f"{API}/tasks/") and body["task_id"] != asked:
        return f"{call.target}: answered task {body['task_id']}"
    return None


def reported_count(call: Call, body: dict) -> int | None:
    """The count an answer reports, for comparison with COUNT(*)."""
    for key in ("total", "tasks_count", "count"):
        if key in body:
            return body[key]
    return None


def count_sql(call: Call) -> tuple[str, list]:
    """COUNT(*) for what a call lists, written here independently of the daemon's SQL."""
    p, where, args = call.params, [], []
    if call.path == f"{API}/sessions":
        table = "translation_sessions"
    elif call.path.endswith("/incomplete-sessions"):
        table, where = "translation_sessions", ["status IN ('pending', 'processing')"]
    elif "/recovery/restore/" in call.path:
        table, where, args = ("translation_tasks", ["session_id = %s", "status IN ('pending', 'processing')"],
                              [call.path.rsplit("/", 1)[1]])
    elif call.path.endswith("/tasks") and call.path != f"{API}/tasks":
        table, where, args = "translation_tasks", ["session_id = %s"], [call.path.split("/")[-2]]
    else:
        table = "translation_tasks"
    for name, column, op in (("session_id", "session_id", "="), ("status", "status", "="),
                             ("sheet_name", "sheet_name", "="), ("from_date", "created_at", ">="),
                             ("to_date", "created_at", "<=")):
        if name in p:
            where.append(f"{column} {op} %s")
            value = p[name]
            args.append(datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ") if name.endswith("_date") else value)
    return f"SELECT COUNT(*) FROM {table}" + (" WHERE " + " AND ".join(where) if where else ""), args


async def verify(results: list[Result], stored: Stored) -> tuple[list[str], int]:
    """Answers on their own, one total per filter, sampled totals against COUNT(*), stats.
    Returns the problems and how many totals were compared with COUNT(*)."""
    problems, rng, compared = [], random.Random(SEED + 2), 0
    conn = await stored.database.connect()
    try:
        for result in results:
            totals: dict[tuple, tuple[Call, int]] = {}
            for call, body in result.answers:
                if (problem := check_answer(call, body)) is not None:
                    problems.append(problem)
                if (n := reported_count(call, body)) is not None:
                    first = totals.setdefault(call.filters, (call, n))
                    if first[1] != n:
                        problems.append(f"{call.target}: count {n}, but {first[1]} for {first[0].target}")
            for call, n in rng.sample(list(totals.values()), min(VERIFIED_FILTERS, len(totals))):
                sql, args = count_sql(call)
                ((expected,),) = await conn.rows(sql, *args)
                compared += 1
                if int(expected) != n:
                    problems.append(f"{call.target}: count {n}, COUNT(*) says {expected}")
            if result.group.key.startswith("stats"):
                problems += [f"GET /stats: {p}" for p in check_stats(result, stored)]
    finally:
        conn.close()
    return problems, compared


def check_stats(result: Result, stored: Stored) -> list[str]:
    expected_sessions = {"total": N_SESSIONS, **{s: stored.sessions_by_status.get(s, 0) for s in SESSION_STATUSES}}
    expected_tasks = {"total": N_TASKS, **{s: stored.tasks_by_status.get(s, 0) for s in TASK_STATUSES}}
    return [f"{body['sessions']} / {body['tasks']}, expected {expected_sessions} / {expected_tasks}"
            for _, body in result.answers[:1] if (body["sessions"], body["tasks"]) != (expected_sessions, expected_tasks)]


# ── the daemon ───────────────────────────────────────────────────────────────────────


async def counts_kept(db: Database) -> bool:
    """Whether task_counts holds rows: a data set just loaded into MariaDB has none, and the
    daemon's start counts it (SQLite's triggers count the rows as they are loaded)."""
    conn = await db.connect()
    try:
        ((kept,),) = await conn.rows("SELECT EXISTS (SELECT 1 FROM task_counts)")
        return bool(kept)
    finally:
        conn.close()


def start_daemon(port: int, tmp: Path, db: Database) -> Daemon:
    config, state_dir = tmp / "persistd.toml", tmp / "state"
    config.write_text(f'[server]\nport = {port}\n'
                      f'[database]\nurl = "{db.url}"\nread_timeout = 60.0\n'
                      f'[state]\ndir = "{state_dir}"\n[janitor]\ninterval = 0\n')
    log_path = RESULTS_DIR / f"read_path-{db.backend}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSISTD_")}  # the config file rules
    counted = trio.run(counts_kept, db)
    with open(log_path, "wb") as log:  # run from its parent directory, `-m` finds the persistd imported here
        process = subprocess.Popen([sys.executable, "-P", "-m", "persistd", "--config", str(config)],
                                   cwd=DAEMON_FILE.parents[1], env=env, stdout=log, stderr=subprocess.STDOUT)
    daemon = Daemon(process, log_path, state_dir)
    wait_listening(daemon)
    if counted:
        return daemon
    # The data set was loaded behind persistd's back: its totals are right once the start has counted it.
    deadline = time.monotonic() + 300
    while b"task_counts recounted in" not in log_path.read_bytes():
        if daemon.process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"persistd did not recount task_counts; see {log_path}")
        time.sleep(0.1)
    print(next(line for line in log_path.read_text().splitlines() if "task_counts recounted" in line), flush=True)
    return daemon


async def drive(groups: list[Group], port: int, budget_s: float, daemon_pid: int, db: Database) -> list[Result]:
    client, results, server_pid = Client(port), [], db.server_pid()
    try:
        for group in groups:
            results.append(await run_group(client, group, budget_s, daemon_pid, server_pid))
            print(describe(results[-1], db.server), flush=True)
    finally:
        await client.aclose()
    return results


# ── report ───────────────────────────────────────────────────────────────────────────


def verdict(result: Result) -> str:
    if result.met is None:
        return "measured"
    return f"≤ {result.group.target_ms:g} " + ("✓" if result.met else "✗")


def describe(result: Result, server: str | None) -> str:
    r, n = result, len(result.latencies)
    early = f" (stopped at its time budget after {r.seconds:.0f} s)" if r.stopped_early else ""
    lines = [f"{r.group.name}: {n} calls{early}, p50 {r.ms(0.5):.1f} ms, p99 {r.ms(0.99):.1f} ms, "
             f"max {r.ms(1.0):.1f} ms, target p99 {verdict(r)}; {r.response_bytes / max(n, 1) / 1024:.0f} KiB per answer, "
             f"{len(r.errors)} not 200", f"  {r.cpu.describe('daemon', r.seconds, server)}"]
    if not r.met:
        lines += [f"  slow: {1000 * seconds:.0f} ms {call.method} {call.target}"
                  for seconds, call in sorted(r.timed, key=lambda t: -t[0])[:SLOWEST_SHOWN]]
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    lines = ["| endpoint group | calls | p50 ms | p99 ms | max ms | target p99 | other processes, CPU s / wall s |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for r in results:
        others = r.cpu.machine - r.cpu.subject - r.cpu.server - r.cpu.script
        lines.append(f"| {r.group.name} | {len(r.latencies)}{'*' if r.stopped_early else ''} | {r.ms(0.5):.1f} "
                     f"| {r.ms(0.99):.1f} | {r.ms(1.0):.1f} | {verdict(r)} | {others:.1f} / {r.seconds:.0f} |")
    if any(r.stopped_early for r in results):
        lines.append("\n\\* stopped at its time budget (the larger of --budget and twice calls x target): on average"
                     " slower than twice its target")
    return "\n".join(lines)


def describe_data(stored: Stored) -> str:
    sizes = ", ".join(f"{name} {data:.0f} MB data + {index:.0f} MB indexes" for name, (data, index) in stored.sizes_mb.items())
    return (f"data set {stored.database}: sessions {stored.sessions_by_status}, tasks {stored.tasks_by_status}; "
            f"large sessions: {stored.large[100_000]} (100,000 tasks), {stored.large[5_000]} (5,000 tasks); {sizes}")


# ── main ─────────────────────────────────────────────────────────────────────────────


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=list(DATABASES), default="mysql",
                        help="the daemon's database: MariaDB here, or a SQLite file (default mysql)")
    parser.add_argument("--database", default=DEFAULT_DB,
                        help=f"where the data set is: a MariaDB database, or for sqlite bench-results/DATABASE/persistd.db"
                             f" (default {DEFAULT_DB})")
    parser.add_argument("--reuse", action="store_true", help="use the database as it is when its row counts match")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per endpoint group (default 200)")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds a group without target, or a slow one, may run (default 120)")
    parser.add_argument("--stats-cold-calls", type=int, default=12,
                        help=f"stats calls made {STATS_CACHE_S + 0.5:g} s apart (default 12)")
    parser.add_argument("--only", type=lambda s: s.split(","), help="run these groups only (keys, comma-separated)")
    parser.add_argument("--port", type=int, default=18002)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    version, db = code_version(), data_set_database(args.backend, args.database)
    print(f"$ {command}\n{version}\n{db.info()}", flush=True)
    if args.reuse and trio.run(row_counts, db) == (N_SESSIONS, N_TASKS) and schema_is_current(db):
        print(f"reusing the {db} ({N_SESSIONS:,} sessions, {N_TASKS:,} tasks, tables as sql/{db.backend}.sql creates them)",
              flush=True)
    else:
        print(f"loading the {db}: {N_SESSIONS:,} sessions, {N_TASKS:,} tasks", flush=True)
        print(f"  loaded in {load_data_set(db):.0f} s", flush=True)
        if (counts := trio.run(row_counts, db)) != (N_SESSIONS, N_TASKS):
            raise BenchError(f"the {db} holds {counts} (sessions, tasks) after loading")
    stored = trio.run(read_stored, db)
    print(describe_data(stored), flush=True)
    groups = [g for g in build_groups(stored, args.calls, args.stats_cold_calls) if not args.only or g.key in args.only]
    RESULTS_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="persistd-readbench-") as tmp:
        version = code_version()  # the daemon loads the files once, at its start
        daemon = start_daemon(args.port, Path(tmp), db)
        if code_version() != version:
            print("WARNING: persistd's code changed while the daemon started; it runs one of two versions")
        try:
            results = trio.run(drive, groups, args.port, args.budget, daemon.process.pid, db)
        finally:
            log_problems = stop_daemon(daemon)
    problems, compared = trio.run(verify, results, stored)
    problems = [e for r in results for e in r.errors] + problems
    print(f"\ndaemon log {daemon.log_path.relative_to(REPO)}: {len(log_problems)} warning/error lines",
          *log_problems[:10], sep="\n  ")
    print(f"\n{table(results)}\n\nCommand: `{command}`; daemon {version}")
    if problems:
        raise BenchError(f"{len(problems)} answers wrong or refused:\n  " + "\n  ".join(problems[:20]))
    print(f"\nAll answers 200 and consistent; {compared} sampled totals equal COUNT(*) in the {db}.")


if __name__ == "__main__":
    run_bench(main)
