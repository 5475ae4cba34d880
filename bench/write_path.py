"""Write-path benchmark for persistd: 1000-row HTTP batches in, rows in the database out.

Workload (the issue's): S sessions x T tasks (default 20 x 5000) of realistic rows - source
texts of 20-200 characters mixing CJK, Latin and emoji, JSON game_info and metadata on the
sessions - with every task written twice: first "pending", then "completed" with
target_text and confidence, in batches of 1000 rows. One session stream is, in this order:
the session row ("processing"), its pending batches, its completed batches, the session
row again ("completed"). At concurrency N, N workers - each with one keep-alive HTTP
connection - take the streams one at a time, so N streams run in parallel.

--backend picks the daemon's database. mysql (the default): the MariaDB database
persistd_bench, dropped and recreated for each level with the empty tables of sql/mysql.sql.
sqlite: a file persistd.db in a fresh temporary directory for each level, created in WAL mode
with the empty tables of sql/sqlite.sql (the url is sqlite:////that/dir/persistd.db); this
script reads it back with the standard library's sqlite3. Per concurrency level, on such a
fresh database and with a fresh daemon process (`python -m persistd --config FILE`, stopped
with SIGTERM, must exit 0):

  accepted rows/s     rows acknowledged with 202 / wall time of the sending phase
  ack p50/p99/max     per 1000-row task batch: from starting to send the request to having
                      the whole 202 response (503 answers, their waits and resends included)
  end-to-end          row-writes sent (sessions and tasks, each written twice) / time from the
                      first request until, after POST /flush, a count query in the database
                      confirmed every row with its final status
  peak RSS            VmHWM of the daemon process at the end
  503s                batches answered 503 (buffer full) and sent again, and their body bytes
                      as a share of the accepted bytes (target < 5 %)
  µs a row written    CPU of the daemon and of MariaDB over the timed interval, divided by
                      the rows the daemon wrote (it coalesces the two writes of a task when
                      both wait in one flush; the rows written are in the table too)

Each level runs with each client of --clients: `resend` sends a batch answered 503 again
after min(Retry-After, 50 ms), the kindest client; `honour` sleeps for Retry-After as told
(whole seconds), as the spec's 503 row asks. The table ends with the ratio of the second to
the first at each concurrency (target >= 0.9). A batch refused before its body was read is
answered with Connection: close; the client then opens a new connection.

--against REV also runs persistd as it was at git revision REV (its persistd/ and sql/ from
`git archive`), level by level beside the code measured, and prints the ratio of their
daemon CPU a row written (target <= 0.5 against the commit before issue 12's work).
--stages samples the daemon with py-spy (pip install '.[bench]') and splits its CPU a row
by stage: checks, decode, SQL text, journal, merge (the buffer), driver, HTTP, trio/other,
each the time it held the GIL, and "no GIL": system calls and C code that released it.

Also printed per level: the latency of single requests, and the CPU seconds of
the daemon, MariaDB (mysql only: SQLite runs inside the daemon, whose figure includes it),
this script and all other processes over the timed interval - on a shared 2-core machine a
large "other processes" figure means the run was disturbed (with sqlite, MariaDB serving
anyone else counts there too). The first lines name the code measured (persistd/*.py and
sql/*.sql: paths, one sha256 over them, commit); a warning follows the table if it changed
during the run.

After the timed interval every session and task is read back and compared with what was sent;
anything missing or wrong ends the script with a non-zero exit, as does any request that
fails (a 503 is sent again), a dead-letter file, or a daemon that does not exit 0. Warnings and errors in the daemon's
log are printed (they do not fail the run).

Ceiling, measured once, into a fresh database of the same backend: the same upserts in the
same order (the concurrency-1 order), read back and compared like a level's.
- mysql: each request's rows as one multi-row INSERT ... ON DUPLICATE KEY UPDATE built with
  persistd's own statement builder (persistd.mysql.chunks), written to a
  .sql file and timed as `mariadb --default-character-set=utf8mb4 DB < file.sql` (the
  client's default, utf8mb3, cannot carry emoji). The file starts with the daemon's own
  session setup (time_zone '+00:00', strict sql_mode) and runs with autocommit: one commit
  per statement, i.e. per 1000-row batch. It writes no task_counts. The "× ceiling"
  column is against it. A second MySQL ceiling is measured and printed beside it: the same
  file with the daemon's statements for tasks (the lock of the stored ones; for those the
  count-out, upsert and count-in, for the others an INSERT and their count), one
  transaction per request: what the server can do with exact totals.
- sqlite: each request's rows bound as persistd's SQLite backend binds them (upsert_sql's
  INSERT ... ON CONFLICT (key) DO UPDATE, db_value, seconds), before the timing; timed: this
  script running them with sqlite3's executemany, BEGIN IMMEDIATE ... COMMIT around each
  request, i.e. one transaction per 1000-row batch, on a connection with the daemon
  writer's pragmas (WAL, synchronous=FULL, foreign keys). sql/sqlite.sql's triggers keep
  task_counts in those transactions, as in the daemon.
The daemon commits once per flush; flush_rows = 1000 makes most of its flushes 1000 rows or
more under this load.

The client is trio + h11 in this process. Every request body is generated and
msgspec-encoded before the timed phase, so that on a 2-core machine the client takes as
little CPU as possible from the daemon and the database. Daemon logs go to
bench-results/write_path-BACKEND-JOURNAL-cN.log. The databases persistd_bench and
persistd_bench_ceiling (sqlite: their temporary directories) are dropped when done, unless
--keep (after a failure they are left for inspection).

Usage:
  .venv/bin/python bench/write_path.py [--backend mysql|sqlite] [--levels 1,4,16] [--sessions 20]
      [--tasks-per-session 5000] [--port 18001] [--journal fsync|write|off] [--clients resend,honour]
      [--against REV] [--stages] [--keep]
"""

from __future__ import annotations

import argparse
import calendar
import hashlib
import itertools
import math
import os
import random
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import typing
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

import h11
import msgspec
import trio
import trio_mysql

import persistd.daemon
import persistd.sql

from persistd.daemon import SESSION_SETUP, Entry, SessionIn, TaskIn
from persistd.mysql import chunks, lock_tasks_sql
from persistd.sqlite import db_value, seconds, upsert_sql
from persistd.storage import SESSIONS, TASKS, Table, group_by_shape, read_schema, version_values

REPO = Path(__file__).resolve().parent.parent
DAEMON_FILE = Path(persistd.daemon.__file__).resolve()
SQL_DIR = Path(persistd.sql.__file__).resolve().parent  # the schema files the daemon applies
RESULTS_DIR = REPO / "bench-results"
BENCH_DB = "persistd_bench"
CEILING_DB = "persistd_bench_ceiling"
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
MARIADB_CLI = ("mariadb", "-uroot", "-h127.0.0.1", "--default-character-set=utf8mb4")
PATHS = {"sessions": "/api/v1/translation/sessions/batch", "tasks": "/api/v1/translation/tasks/batch"}
FLUSH_PATH = "/api/v1/translation/flush"
BATCH_ROWS = 1000
RETRY_WAIT_S = 0.05  # wait before resending a batch answered 503 (if Retry-After is longer)
RECEIVE_BYTES = 65536
IDLE_REOPEN_S = 4.0  # a keep-alive connection idle this long is opened again (the daemon closes it at 5 s)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SEED = 20250601

TARGET_E2E_RATIO = 0.9
TARGET_RSS_MB = 200.0
TARGET_REFUSED_SHARE = 0.05  # body bytes of refused batches, of accepted ones
TARGET_HONOUR_RATIO = 0.9  # a client that sleeps for Retry-After, against one that resends at once
TARGET_CPU_RATIO = 0.5  # daemon CPU a row written, against the --against revision


class BenchError(Exception):
    """Something is missing, wrong or broken: the run fails with this message."""


# ── workload ─────────────────────────────────────────────────────────────────────────

LATIN = ("the brave knight found a rusty sword in old castle Don't forget to visit \"Merchant\" "
         "{player} gains +50 XP! level up quest completed: defeat 3 goblins near village of "
         "Oakvale. HP/MP 100% critical hit; press [A] to continue... it's your turn").split()
CJK = ("勇者 在 古老的 城堡里 找到了 一把 生锈的剑 你确定 要离开吗？ 任务完成！ 获得 金币 经验值 装备 背包 "
       "商店 魔法 攻击 防御 生命值 「传送门」 ようこそ 冒険者さん クエストの 報酬を 受け取る 村の 長老に "
       "話しかけてください。 용사여 마을을 구해 주세요").split()
EMOJI = list("⚔🛡💰✨🔥❤🐉🎉😀🏰🗝🍺🧙👑💎")
TOKENS = [w + " " for w in LATIN] + CJK + EMOJI + ["\n"]
WEIGHTS = [10] * len(LATIN) + [12] * len(CJK) + [3] * len(EMOJI) + [4]
PROVIDERS = ("openai", "anthropic", "deepseek", "qwen")
SHEETS = ("Dialogue", "Items", "Quests", "Skills", "UI")
COLUMNS = ("B", "C", "Description")
BASE_TIME = datetime(2025, 6, 1, tzinfo=timezone.utc)


class Request(NamedTuple):
    path: str
    body: bytes  # msgspec-encoded before the timed phase
    rows: int


@dataclass
class Workload:
    streams: list[list[Request]]  # one per session, in the order it must be sent
    sessions: dict[str, tuple]  # session_id -> (status, completed_tasks, game_info) expected in MySQL
    tasks: dict[str, tuple]  # task_id -> (session_id, status, target_text, confidence) expected

    @property
    def row_writes(self) -> int:
        return sum(request.rows for stream in self.streams for request in stream)


def build_workload(n_sessions: int, tasks_per_session: int) -> Workload:
    rng = random.Random(SEED)
    corpus = "".join(rng.choices(TOKENS, WEIGHTS, k=50_000))
    workload = Workload([], {}, {})
    for n in range(n_sessions):
        session_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        opening = session_row(rng, n, session_id, tasks_per_session)
        closing = {**opening, "status": "completed", "completed_tasks": tasks_per_session}
        pending, completed = task_rows(rng, corpus, n, session_id, tasks_per_session)
        workload.streams.append([request("sessions", [opening]), *batches("tasks", pending),
                                 *batches("tasks", completed), request("sessions", [closing])])
        workload.sessions[session_id] = ("completed", tasks_per_session, closing["game_info"])
        for row in completed:
            workload.tasks[row["task_id"]] = (session_id, "completed", row["target_text"], row["confidence"])
    return workload


def request(key: str, rows: list[dict]) -> Request:
    return Request(PATHS[key], msgspec.json.encode({key: rows}), len(rows))


def batches(key: str, rows: list[dict]) -> list[Request]:
    return [request(key, rows[i:i + BATCH_ROWS]) for i in range(0, len(rows), BATCH_ROWS)]


def text(rng: random.Random, corpus: str, shortest: int, longest: int) -> str:
    length = rng.randint(shortest, longest)
    start = rng.randrange(len(corpus) - length)
    return corpus[start:start + length]


def session_row(rng: random.Random, n: int, session_id: str, tasks: int) -> dict:
    filename = f"star_wanderer_ch{n + 1:02d}.xlsx"
    return {
        "session_id": session_id, "filename": filename, "file_path": f"/data/uploads/2025/06/{session_id}/{filename}",
        "status": "processing", "llm_provider": rng.choice(PROVIDERS),
        "game_info": {
            "title": "星之旅人 Star Wanderer", "chapter": n + 1, "genre": rng.choice(["RPG", "SLG", "ACT"]),
            "platforms": ["PC", "Switch", "PS5"][:rng.randint(1, 3)],
            "source_language": "zh-CN", "target_languages": ["en-US", "ja-JP"],
            "style": {"tone": "epic", "keep_placeholders": True, "max_length_ratio": 1.3},
            "glossary": {"勇者": "Hero", "金币": "Gold", "经验值": "EXP", "传送门": "Waygate ✨"},
            "characters": [{"name": "艾琳", "role": "protagonist"}, {"name": "Grom 🐉", "role": "boss"}],
        },
        "metadata": {"uploaded_by": "loc-team", "sheets": list(SHEETS), "rows": tasks, "priority": 2,
                     "tags": ["beta", "🎮"]},
        "total_tasks": tasks, "completed_tasks": 0, "failed_tasks": 0, "processing_tasks": 0,
    }


def task_rows(rng: random.Random, corpus: str, n: int, session_id: str, tasks: int) -> tuple[list[dict], list[dict]]:
    """The pending and the completed state of one session's tasks."""
    pending, completed = [], []
    for i in range(tasks):
        sheet, column = SHEETS[i * len(SHEETS) // tasks], COLUMNS[i % len(COLUMNS)]
        ident = {"task_id": f"{session_id}-{i:05d}", "session_id": session_id,
                 "batch_id": f"{session_id[:8]}-b{i // 50:03d}", "sheet_name": sheet, "row_index": i + 2,
                 "column_name": column, "source_text": text(rng, corpus, 20, 200),
                 "context": f"{sheet}!{column}{i + 2}"}
        pending.append({**ident, "status": "pending", "retry_count": 0})
        start = BASE_TIME + timedelta(seconds=n * 2 * tasks + i)
        duration_ms = rng.randint(400, 9000)
        completed.append({**ident, "status": "completed", "target_text": text(rng, corpus, 20, 240),
                          "confidence": round(rng.uniform(0.55, 1.0), 4), "retry_count": int(rng.random() < 0.05),
                          "start_time": start, "end_time": start + timedelta(seconds=math.ceil(duration_ms / 1000)),
                          "duration_ms": duration_ms})
    return pending, completed


# ── the database: MariaDB or a SQLite file ───────────────────────────────────────────


def mariadb(*args: str, stdin=None, sql: str | None = None) -> str:
    done = subprocess.run([*MARIADB_CLI, *args], stdin=stdin, input=sql, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"mariadb {shlex.join(args)}: {done.stderr.strip()}")
    return done.stdout


class MySQLDatabase:
    """A database of the local MariaDB server, read here through trio_mysql."""

    backend, server = "mysql", "MariaDB"
    missing = (trio_mysql.OperationalError, trio_mysql.ProgrammingError)  # no such database, no such table

    def __init__(self, name: str) -> None:
        self.name, self.url = name, f"mysql://root@127.0.0.1:3306/{name}"

    def __str__(self) -> str:
        return f"MariaDB database {self.name}"

    @classmethod
    def scratch(cls, name: str) -> MySQLDatabase:
        return cls(name)

    def create(self) -> None:
        """Dropped, created and given the tables of the daemon's mysql.sql (empty)."""
        mariadb("-e", f"DROP DATABASE IF EXISTS `{self.name}`; CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")
        mariadb(self.name, sql=read_schema("mysql.sql"))

    def drop(self) -> None:
        mariadb("-e", f"DROP DATABASE IF EXISTS `{self.name}`")

    async def connect(self) -> MySQLReader:
        conn = trio_mysql.connect(**MYSQL, database=self.name, charset="utf8mb4", use_unicode=True, autocommit=True,
                                  init_command=SESSION_SETUP)
        await conn.connect()
        return MySQLReader(conn)

    @staticmethod
    def server_pid() -> int | None:
        """The local server's process, to account for its CPU; None when it is not local."""
        found = subprocess.run(["pidof", "mariadbd", "mysqld"], capture_output=True, text=True).stdout.split()
        return int(found[0]) if found else None

    @staticmethod
    def info() -> str:
        version, flush_log, pool_mb = mariadb("-N", "-e", "SELECT VERSION(), @@innodb_flush_log_at_trx_commit, "
                                              "@@innodb_buffer_pool_size DIV 1048576").split()
        return (f"MariaDB {version} (innodb_flush_log_at_trx_commit={flush_log}, buffer pool {pool_mb} MB), "
                f"{os.cpu_count()} CPUs shared by client, daemon and server")


class MySQLReader:
    def __init__(self, conn: trio_mysql.Connection) -> None:
        self.conn = conn

    async def rows(self, sql: str, *args: object) -> list[tuple]:
        """The rows of `sql`, whose %s placeholders take `args`."""
        async with self.conn.cursor() as cursor:
            await cursor.execute(sql, args or None)
            return list(await cursor.fetchall())

    def close(self) -> None:
        self.conn.close()


class SQLiteDatabase:
    """A file persistd.db alone in its directory (with its -wal and -shm), read and written
    here through the standard library's sqlite3."""

    backend, server = "sqlite", None  # no server: SQLite runs inside the process that opens the file
    missing = (sqlite3.OperationalError,)  # no such file, no such table

    def __init__(self, path: Path) -> None:
        self.path, self.url = path, f"sqlite:///{path}"  # an absolute path: sqlite:////dir/persistd.db

    def __str__(self) -> str:
        return f"SQLite file {self.path}"

    @classmethod
    def scratch(cls, name: str) -> SQLiteDatabase:
        """persistd.db in a fresh temporary directory."""
        return cls(Path(tempfile.mkdtemp(prefix=f"{name}-")) / "persistd.db")

    def create(self) -> None:
        """The directory emptied, the file created in WAL mode with the tables of the daemon's sqlite.sql (empty)."""
        self.drop()
        self.path.parent.mkdir(parents=True)
        self.writer().close()

    def drop(self) -> None:
        if self.path.parent.exists():
            shutil.rmtree(self.path.parent)

    def writer(self) -> sqlite3.Connection:
        """A connection with the pragmas of persistd's writer (foreign keys, synchronous=FULL, WAL)
        that leaves transactions to BEGIN and COMMIT; creates the tables that are missing."""
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(read_schema("sqlite.sql"))
        return conn

    async def connect(self) -> SQLiteReader:
        return SQLiteReader(sqlite3.connect(f"{self.path.as_uri()}?mode=rw", uri=True))

    @staticmethod
    def server_pid() -> None:
        return None

    @staticmethod
    def info() -> str:
        return (f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=FULL) inside the daemon's process, "
                f"{os.cpu_count()} CPUs shared by client and daemon")


class SQLiteReader:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def rows(self, sql: str, *args: object) -> list[tuple]:
        """MySQLReader.rows() on SQLite: %s becomes ?, a datetime (naive: UTC) its seconds since 1970."""
        values = [calendar.timegm(a.utctimetuple()) if isinstance(a, datetime) else a for a in args]
        return self.conn.execute(sql.replace("%s", "?"), values).fetchall()

    def close(self) -> None:
        self.conn.close()


Database = MySQLDatabase | SQLiteDatabase
DATABASES = {"mysql": MySQLDatabase, "sqlite": SQLiteDatabase}


COUNTS_SQL = """SELECT
    (SELECT COUNT(*) FROM translation_sessions),
    (SELECT COUNT(*) FROM translation_sessions WHERE status = 'completed'),
    (SELECT COUNT(*) FROM translation_tasks),
    (SELECT COUNT(*) FROM translation_tasks WHERE status = 'completed' AND target_text IS NOT NULL)"""


async def confirm_counts(conn: MySQLReader | SQLiteReader, db: Database, workload: Workload) -> None:
    """The quick check that closes the end-to-end interval."""
    (counts,) = await conn.rows(COUNTS_SQL)
    expected = (len(workload.sessions),) * 2 + (len(workload.tasks),) * 2
    if tuple(map(int, counts)) != expected:
        raise BenchError(f"after /flush the {db} holds (sessions, completed, tasks, completed with target_text) "
                         f"= {tuple(counts)}, expected {expected}")


async def verify_rows(db: Database, workload: Workload) -> None:
    """Every session and task is stored once, with its final status and values."""
    conn = await db.connect()
    try:
        sessions = await conn.rows("SELECT session_id, status, completed_tasks, game_info FROM translation_sessions")
        tasks = await conn.rows("SELECT task_id, session_id, status, target_text, confidence FROM translation_tasks")
    finally:
        conn.close()
    stored_sessions = {sid: (status, done, msgspec.json.decode(info)) for sid, status, done, info in sessions}
    stored_tasks = {tid: (sid, status, target, None if conf is None else float(conf))
                    for tid, sid, status, target, conf in tasks}
    problems = compare("session", workload.sessions, stored_sessions) + compare("task", workload.tasks, stored_tasks)
    if problems:
        raise BenchError(f"{len(problems)} rows missing or wrong in the {db}, e.g.:\n  " + "\n  ".join(problems[:10]))


def compare(kind: str, expected: dict, stored: dict) -> list[str]:
    problems = [f"{kind} {key}: expected {want!r}, stored {stored.get(key)!r}"
                for key, want in expected.items() if stored.get(key) != want]
    return problems + [f"unexpected {kind} {key}" for key in stored.keys() - expected.keys()]


# ── CPU and memory of processes ──────────────────────────────────────────────────────


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a running process."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores; idle, iowait and steal excluded)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU of this script's finished child processes (the mariadb client)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuUse(NamedTuple):
    """CPU seconds used by the subject (the daemon, or the mariadb client for the MySQL ceiling;
    none for the SQLite ceiling, which this script runs), the MariaDB server (none for SQLite,
    which runs inside the daemon), this script and the whole machine. What is left over was
    used by other processes: on a shared machine, a sign that the figures were disturbed."""
    subject: float
    server: float
    script: float
    machine: float

    @classmethod
    def now(cls, subject: float, server_pid: int | None) -> CpuUse:
        return cls(subject, cpu_seconds(server_pid), time.process_time(), machine_busy_seconds())

    def __sub__(self, other: CpuUse) -> CpuUse:
        return CpuUse(*(a - b for a, b in zip(self, other)))

    def describe(self, subject: str | None, seconds: float, server: str | None) -> str:
        """`subject` None: the work was this script's own; `server` None: there is none (SQLite)."""
        named = [(subject, self.subject), (server, self.server), ("this script", self.script),
                 ("other processes", self.machine - self.subject - self.server - self.script)]
        used = ", ".join(f"{name} {cpu:.1f}" for name, cpu in named if name is not None)
        return f"CPU seconds ({os.cpu_count()} cores x {seconds:.1f} s): {used}"


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


# ── ceiling: the same upserts, straight into the database ────────────────────────────

ROW_TYPES = {PATHS["sessions"]: (SESSIONS, "sessions", SessionIn), PATHS["tasks"]: (TASKS, "tasks", TaskIn)}


VERSIONS = itertools.count(1)  # each request's rows newer than the last's, as the buffer gives them


def entries(req: Request, at: datetime) -> tuple[Table, list[Entry]]:
    """The request's rows as the buffer hands them to a flush, accepted at `at`."""
    table, key, row_type = ROW_TYPES[req.path]
    rows = msgspec.json.decode(req.body, type=dict[str, list[row_type]])[key]
    version = next(VERSIONS)
    return table, [Entry(row, at, at, 0, version=version) for row in rows]


def mysql_statements(req: Request, at: datetime, stored: set[str] | None = None) -> list[bytes]:
    """The upserts persistd's MySQL backend builds for this request's rows; with `stored`
    (the task ids written before, kept up to date) the tasks' statements as the flusher
    sends them, in a transaction: the lock of the stored tasks, then for those the
    count-out, the upsert and the count-in, for the others an INSERT and their count."""
    table, accepted = entries(req, at)
    found = chunks(table, accepted)
    assert len(found) == len(group_by_shape(table, accepted)), "persistd would split this statement"
    if stored is None or table is not TASKS:
        return [chunk.upsert() for chunk in found]
    ids = {e.row.task_id for e in accepted}
    statements = [lock_tasks_sql(accepted)] + [sql for chunk in found for sql, _ in chunk.task_statements(ids & stored, 0)]
    stored |= ids
    return [b"BEGIN", *(sql if isinstance(sql, bytes) else sql.encode() for sql in statements), b"COMMIT"]


def sqlite_statements(req: Request, at: datetime) -> list[tuple[str, list[tuple]]]:
    """(statement, rows) as persistd's SQLite upsert binds them for this request's rows."""
    table, accepted = entries(req, at)
    statements = []
    for shape, group in group_by_shape(table, accepted).items():
        columns = table.required + shape
        statements.append((upsert_sql(table, shape), [
            (*[db_value(getattr(e.row, c)) for c in columns], seconds(e.created_at), seconds(e.updated_at),
             *version_values(e, shape)) for e in group]))
    return statements


def write_ceiling_sql(workload: Workload, path: Path, counts: bool) -> int:
    """The .sql file; returns the row-writes in it."""
    at = datetime.now(timezone.utc).replace(microsecond=0)
    stored: set[str] | None = set() if counts else None
    with open(path, "wb") as f:
        f.write(SESSION_SETUP.encode() + b";\n")
        for stream in workload.streams:
            for req in stream:
                for statement in mysql_statements(req, at, stored):
                    f.write(statement + b";\n")
    return workload.row_writes


@dataclass
class Ceiling:
    how: str  # what was timed, as the table names it
    detail: str  # and how, for the line printed
    row_writes: int
    seconds: float
    cpu: str  # the CPU used over the timed interval, described

    @property
    def rate(self) -> float:
        return self.row_writes / self.seconds


def measure_ceiling(workload: Workload, tmp: Path, db: Database, keep: bool, counts: bool = False) -> Ceiling:
    """Its database is dropped at once (unless `keep`), so that its pages do not linger in
    the buffer pool or the page cache while the daemon runs."""
    db.create()
    ceiling = mysql_ceiling(workload, tmp, db, counts) if db.backend == "mysql" else sqlite_ceiling(workload, db)
    trio.run(verify_rows, db, workload)
    if not keep:
        db.drop()
    return ceiling


def mysql_ceiling(workload: Workload, tmp: Path, db: MySQLDatabase, counts: bool = False) -> Ceiling:
    path = tmp / "ceiling.sql"
    row_writes = write_ceiling_sql(workload, path, counts)
    server_pid = db.server_pid()
    with open(path, "rb") as sql:
        cpu_before = CpuUse.now(children_cpu_seconds(), server_pid)
        started = time.perf_counter()
        mariadb(db.name, stdin=sql)
        elapsed = time.perf_counter() - started
        cpu = CpuUse.now(children_cpu_seconds(), server_pid) - cpu_before
    if counts:
        return Ceiling("`mariadb < file.sql` with task_counts", f"{path.stat().st_size / 2**20:.0f} MB of SQL, one"
                       f" transaction per {BATCH_ROWS}-row request, the daemon's task_counts statements in it",
                       row_writes, elapsed, cpu.describe("mariadb client", elapsed, db.server))
    return Ceiling("`mariadb < file.sql`", f"{path.stat().st_size / 2**20:.0f} MB of SQL, autocommit: one commit per "
                   f"{BATCH_ROWS}-row statement", row_writes, elapsed, cpu.describe("mariadb client", elapsed, db.server))


def sqlite_ceiling(workload: Workload, db: SQLiteDatabase) -> Ceiling:
    """Each request's statements run as one transaction by this script, their rows bound beforehand."""
    at = datetime.now(timezone.utc).replace(microsecond=0)
    transactions = [sqlite_statements(req, at) for stream in workload.streams for req in stream]
    conn = db.writer()
    try:
        cpu_before = CpuUse.now(0.0, None)
        started = time.perf_counter()
        for statements in transactions:
            conn.execute("BEGIN IMMEDIATE")
            for sql, rows in statements:
                conn.executemany(sql, rows)
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
        cpu = CpuUse.now(0.0, None) - cpu_before
    finally:
        conn.close()
    row_writes = sum(len(rows) for statements in transactions for _, rows in statements)
    return Ceiling("sqlite3 `executemany`, in-process", f"sqlite3 executemany in this process, one transaction per "
                   f"request of up to {BATCH_ROWS} rows", row_writes, elapsed, cpu.describe(None, elapsed, None))


# ── HTTP client ──────────────────────────────────────────────────────────────────────


class Response(NamedTuple):
    status: int
    headers: dict[bytes, bytes]  # lower-case names
    body: bytes


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: h11 frames the messages, trio moves the bytes. It
    is opened again, as a pooling client does, after an answer that closed it (a batch
    refused before its body was read, with `Connection: close`: the daemon stops reading
    it) and after 4 s idle (a client that slept for Retry-After: the daemon closes a
    keep-alive connection after 5 s idle). The connect counts in that request's latency."""

    def __init__(self, stream: trio.SocketStream, port: int) -> None:
        self.stream, self.port = stream, port
        self.h11 = h11.Connection(h11.CLIENT)
        self.used = trio.current_time()

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        return cls(await trio.open_tcp_stream("127.0.0.1", port), port)

    async def request(self, method: str, target: str, body: bytes = b"") -> Response:
        if self.h11.our_state is not h11.IDLE or trio.current_time() - self.used > IDLE_REOPEN_S:
            await self.stream.aclose()
            self.stream, self.h11 = await trio.open_tcp_stream("127.0.0.1", self.port), h11.Connection(h11.CLIENT)
        headers = [("Host", f"127.0.0.1:{self.port}"), ("Content-Type", "application/json"),
                   ("Content-Length", str(len(body)))]
        try:
            await self.stream.send_all(self.h11.send(h11.Request(method=method, target=target, headers=headers)))
            for chunk in self.h11.send_with_data_passthrough(h11.Data(data=body)):
                await self.stream.send_all(chunk)
            self.h11.send(h11.EndOfMessage())
        except trio.BrokenResourceError:  # answered and closed before all was sent: read the answer
            pass
        response = await self.receive()
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        elif b"close" not in response.headers.get(b"connection", b""):
            raise BenchError(f"{method} {target}: the connection cannot be reused, and the answer did not say close")
        self.used = trio.current_time()
        return response

    async def receive(self) -> Response:
        status, headers, chunks = 0, {}, []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(RECEIVE_BYTES))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, headers, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise BenchError("persistd closed the connection")

    async def aclose(self) -> None:
        await self.stream.aclose()


async def get(port: int, target: str) -> Response:
    conn = await HttpConnection.open(port)
    try:
        return await conn.request("GET", target)
    finally:
        await conn.aclose()


# ── one concurrency level ────────────────────────────────────────────────────────────


@dataclass
class SendStats:
    honour_retry_after: bool
    rows_acked: int = 0
    bytes_acked: int = 0
    bytes_refused: int = 0  # bodies of batches answered 503 (sent, whether or not the daemon read them)
    retries: int = 0
    latencies: list[float] = field(default_factory=list)  # first send to 202, task batches only (s)
    attempts: list[float] = field(default_factory=list)  # each task-batch request, 503s included (s)


async def send_streams(conn: HttpConnection, streams, stats: SendStats) -> None:
    """One worker: takes the next session stream from the shared iterator, sends it in order."""
    for stream in streams:
        for req in stream:
            await send_until_accepted(conn, req, stats)


async def send_until_accepted(conn: HttpConnection, req: Request, stats: SendStats) -> None:
    started = time.perf_counter()
    while (response := await timed_post(conn, req, stats)).status == 503:
        if b"retry-after" not in response.headers:
            raise BenchError(f"POST {req.path}: 503 without Retry-After: {response.body[:300]!r}")
        stats.retries += 1
        stats.bytes_refused += len(req.body)
        retry_after = float(response.headers[b"retry-after"])
        await trio.sleep(retry_after if stats.honour_retry_after else min(retry_after, RETRY_WAIT_S))
    if response.status != 202 or msgspec.json.decode(response.body)["count"] != req.rows:
        raise BenchError(f"POST {req.path}: HTTP {response.status}: {response.body[:500]!r}")
    if req.path == PATHS["tasks"]:
        stats.latencies.append(time.perf_counter() - started)
    stats.rows_acked += req.rows
    stats.bytes_acked += len(req.body)


async def timed_post(conn: HttpConnection, req: Request, stats: SendStats) -> Response:
    started = time.perf_counter()
    response = await conn.request("POST", req.path, req.body)
    if req.path == PATHS["tasks"]:
        stats.attempts.append(time.perf_counter() - started)
    return response


async def flush(port: int) -> int:
    """POST /flush until it answers 200; returns how many times it answered 503."""
    conn = await HttpConnection.open(port)
    timeouts = 0
    try:
        while (response := await conn.request("POST", FLUSH_PATH)).status == 503:
            timeouts += 1
        if response.status != 200:
            raise BenchError(f"POST /flush: HTTP {response.status}: {response.body[:500]!r}")
    finally:
        await conn.aclose()
    return timeouts


@dataclass
class Level:
    concurrency: int
    code: str  # which persistd: "this" (the files measured) or the --against revision
    stats: SendStats
    send_s: float
    e2e_s: float
    row_writes: int
    flush_503s: int
    peak_rss_mb: float = 0.0
    cpu: CpuUse | None = None  # over the timed interval
    metrics: dict[str, float] = field(default_factory=dict)
    log_problems: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # the daemon's CPU seconds by stage

    @property
    def client(self) -> str:
        return "honours Retry-After" if self.stats.honour_retry_after else "resends at once"

    @property
    def refused_share(self) -> float:
        return self.stats.bytes_refused / max(self.stats.bytes_acked, 1)

    @property
    def rows_written(self) -> float:
        return sum(self.metrics.get(f'persistence_rows_written_total{{type="{t}"}}', 0) for t in ("session", "task"))

    @property
    def daemon_us_per_row(self) -> float:
        return 1e6 * self.cpu.subject / max(self.rows_written, 1)

    def stage_us_per_row(self, stage: str) -> float:
        return 1e6 * self.stages[stage] / max(self.rows_written, 1)

    @property
    def server_us_per_row(self) -> float:
        return 1e6 * self.cpu.server / max(self.rows_written, 1)

    @property
    def accepted_rate(self) -> float:
        return self.stats.rows_acked / self.send_s

    @property
    def e2e_rate(self) -> float:
        return self.row_writes / self.e2e_s

    def latency_ms(self, quantile: float, attempts: bool = False) -> float:
        """Nearest-rank quantile of the ack latencies (or of the single requests)."""
        ordered = sorted(self.stats.attempts if attempts else self.stats.latencies)
        return 1000 * ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


async def drive_level(workload: Workload, port: int, concurrency: int, pid: int, db: Database, code: str,
                      honour_retry_after: bool) -> Level:
    """The timed phase (send, /flush, count query), then the full check and the daemon's figures."""
    if (health := await get(port, "/health")).status != 200:
        raise BenchError(f"GET /health: {health.status} {health.body[:300]!r}")
    reader, server_pid = await db.connect(), db.server_pid()
    workers = [await HttpConnection.open(port) for _ in range(min(concurrency, len(workload.streams)))]
    stats, streams = SendStats(honour_retry_after), iter(workload.streams)
    cpu_before = CpuUse.now(cpu_seconds(pid), server_pid)
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for conn in workers:
            nursery.start_soon(send_streams, conn, streams, stats)
    sent = time.perf_counter()
    flush_503s = await flush(port)
    await confirm_counts(reader, db, workload)
    confirmed = time.perf_counter()
    level = Level(concurrency, code, stats, sent - started, confirmed - started, workload.row_writes, flush_503s)
    level.cpu = CpuUse.now(cpu_seconds(pid), server_pid) - cpu_before
    reader.close()
    for conn in workers:
        await conn.aclose()
    await verify_rows(db, workload)
    level.metrics = parse_metrics((await get(port, "/api/v1/system/metrics")).body.decode())
    level.peak_rss_mb = proc_status_kb(pid, "VmHWM") / 1024
    return level


def parse_metrics(text: str) -> dict[str, float]:
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


# ── the daemon process ───────────────────────────────────────────────────────────────


@dataclass
class Daemon:
    process: subprocess.Popen
    log_path: Path
    state_dir: Path


def log_file(backend: str, journal: str, concurrency: int) -> Path:
    return RESULTS_DIR / f"write_path-{backend}-{journal}-c{concurrency}.log"


def start_daemon(port: int, concurrency: int, journal: str, tmp: Path, db: Database,
                 source: Path = DAEMON_FILE.parents[1], log_path: Path | None = None) -> Daemon:
    """persistd from `source` (a directory holding the package persistd, persistd.sql in it),
    its log in `log_path` (default: this script's, by backend, journal and concurrency)."""
    state_dir = tmp / f"state-c{concurrency}"
    shutil.rmtree(state_dir, ignore_errors=True)
    config = tmp / f"persistd-c{concurrency}.toml"
    config.write_text(f'[server]\nport = {port}\n[database]\nurl = "{db.url}"\n'
                      f'[state]\ndir = "{state_dir}"\n[journal]\nmode = "{journal}"\n')
    log_path = log_path or log_file(db.backend, journal, concurrency)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSISTD_")}  # the config file rules
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-P", "-m", "persistd", "--config", str(config)],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    daemon = Daemon(process, log_path, state_dir)
    wait_listening(daemon)
    return daemon


def wait_listening(daemon: Daemon, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while b"listening on" not in daemon.log_path.read_bytes():
        if daemon.process.poll() is not None:
            raise BenchError(f"persistd exited with {daemon.process.returncode} at start; see {daemon.log_path}")
        if time.monotonic() > deadline:
            raise BenchError(f"persistd did not listen within {timeout:g} s; see {daemon.log_path}")
        time.sleep(0.05)


def stop_daemon(daemon: Daemon) -> list[str]:
    """SIGTERM, exit 0 and no dead letters required; returns the log's warnings and errors."""
    daemon.process.send_signal(signal.SIGTERM)
    try:
        returncode = daemon.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        raise BenchError(f"persistd did not stop within 60 s of SIGTERM; see {daemon.log_path}") from None
    if returncode != 0:
        raise BenchError(f"persistd exited with {returncode}; see {daemon.log_path}")
    if (daemon.state_dir / "dead-letter.jsonl").exists():
        raise BenchError(f"persistd wrote dead letters to {daemon.state_dir / 'dead-letter.jsonl'}")
    lines = daemon.log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if " WARNING " in line or " ERROR " in line or "Traceback" in line]


def run_level(workload: Workload, port: int, concurrency: int, journal: str, tmp: Path, db: Database,
              code: str, source: Path, honour_retry_after: bool, profile: bool) -> Level:
    db.create()
    daemon = start_daemon(port, concurrency, journal, tmp, db, source)
    sampler = Sampler.start(daemon.process.pid, tmp / "samples.txt") if profile else None
    try:
        level = trio.run(drive_level, workload, port, concurrency, daemon.process.pid, db, code, honour_retry_after)
    finally:
        if sampler is not None:
            samples = sampler.stop()
        log_problems = stop_daemon(daemon)
    level.log_problems = log_problems
    if sampler is not None:
        level.stages = stage_seconds(samples, level.cpu.subject)
    return level


# ── the daemon's CPU by stage ────────────────────────────────────────────────────────
# py-spy samples, 100 times a second from its own process and without stopping the daemon,
# the Python stack of the thread that holds the GIL (--gil; none: no sample). So a stage's
# samples / 100 are the seconds it held the GIL, C code it called while holding it included
# (msgspec, the str methods); what the daemon's CPU seconds (from /proc) leave over is work
# done without the GIL: system calls (sockets, the journal's write and fdatasync), and for
# SQLite the library itself ("no GIL" below). Each sample counts for the first stage below
# that one of its frames belongs to. Frames are named `qualname (file.py:line)`.

STAGES = (
    ("checks", ("check_row ", "row_errors ", "json_depth ", "_without_unset ")),
    ("decode", ("decode_batch ", "whole_numbers_as_integers ", "explain_batch ")),
    ("SQL text", ("chunks ", "count_new_tasks_sql ", "row_literal ", "upsert_sql ", "db_value ",
                  "group_by_shape ")),
    ("journal", ("Journal.", "journal_actor ", "frame (daemon")),
    ("merge", ("Buffer.", "combine ", "put (daemon", "buffer_actor ")),
    ("driver", ("trio_mysql", "(sqlite.py", "(mysql.py", "(storage.py")),
    ("HTTP", ("hypercorn", "h11", "quart", "werkzeug", "create_app", "guard.", "json_response ", "(asgi")),
)
OTHER_STAGE = "trio, other"
NO_GIL = "no GIL"
STAGE_NAMES = [name for name, _ in STAGES] + [OTHER_STAGE, NO_GIL]
SAMPLE_RATE = 100


class Sampler(NamedTuple):
    process: subprocess.Popen
    output: Path

    @classmethod
    def start(cls, pid: int, output: Path) -> Sampler:
        py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
        if py_spy is None:
            raise BenchError("--stages needs py-spy: pip install -c deploy/constraints.txt '.[bench]'")
        process = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE), "--gil", "--nonblocking",
                                    "--format", "raw", "--output", str(output)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # attached
        return cls(process, output)

    def stop(self) -> dict[str, int]:
        """{stack: samples}"""
        self.process.send_signal(signal.SIGINT)
        _, err = self.process.communicate(timeout=60)
        if not self.output.exists():
            raise BenchError(f"py-spy wrote no samples: {err.decode(errors='replace')[-500:]}")
        stacks = {}
        for line in self.output.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            stacks[stack] = stacks.get(stack, 0) + int(count)
        return stacks


def stage_of(stack: str) -> str:
    frames = stack.split(";")
    for name, marks in STAGES:
        if any(mark in frame for frame in frames for mark in marks):
            return name
    return OTHER_STAGE


def stage_seconds(samples: dict[str, int], cpu_seconds: float) -> dict[str, float]:
    """CPU seconds by stage: GIL-held samples, and the rest of the daemon's CPU."""
    seconds = dict.fromkeys(STAGE_NAMES, 0.0)
    for stack, count in samples.items():
        seconds[stage_of(stack)] += count / SAMPLE_RATE
    seconds[NO_GIL] = max(0.0, cpu_seconds - sum(seconds.values()))
    return seconds


# ── report ───────────────────────────────────────────────────────────────────────────


def verdict(ok: bool) -> str:
    return "✓" if ok else "✗"


def describe_level(level: Level, ceiling: Ceiling, server: str | None, log_path: Path) -> str:
    m = level.metrics
    flushes = m.get("persistence_flush_total", 0)
    sessions_written = m.get('persistence_rows_written_total{type="session"}', 0)
    tasks_written = m.get('persistence_rows_written_total{type="task"}', 0)
    mean_flush_ms = 1000 * m.get("persistence_flush_duration_seconds_sum", 0) / max(flushes, 1)
    lines = [
        f"concurrency {level.concurrency}: {level.stats.rows_acked:,} rows acknowledged in {level.send_s:.2f} s "
        f"= {level.accepted_rate:,.0f} rows/s",
        f"  ack latency of {len(level.stats.latencies)} task batches: p50 {level.latency_ms(0.5):.1f} ms, "
        f"p99 {level.latency_ms(0.99):.1f} ms, max {level.latency_ms(1.0):.1f} ms; 503 retries {level.stats.retries}",
        f"  single requests ({len(level.stats.attempts)}, 503 answers included): p50 {level.latency_ms(0.5, True):.1f} ms, "
        f"p99 {level.latency_ms(0.99, True):.1f} ms, max {level.latency_ms(1.0, True):.1f} ms",
        f"  end-to-end: {level.row_writes:,} row-writes in {level.e2e_s:.2f} s = {level.e2e_rate:,.0f} row-writes/s "
        f"= {level.e2e_rate / ceiling.rate:.2f}x ceiling (/flush answered 503 {level.flush_503s} times)",
        f"  {level.cpu.describe('daemon', level.e2e_s, server)}",
        f"  daemon: peak RSS {level.peak_rss_mb:.0f} MB; "
        f"wrote {sessions_written:,.0f} session and {tasks_written:,.0f} task row-writes in {flushes:.0f} flushes "
        f"(mean {mean_flush_ms:.0f} ms), {m.get('persistence_flush_errors_total', 0):.0f} failed flushes",
        f"  client {level.client}: {level.stats.retries} answers 503, their bodies {level.stats.bytes_refused:,} bytes"
        f" = {level.refused_share:.2%} of the {level.stats.bytes_acked:,} accepted; the daemon read"
        f" {m.get('persistence_refused_body_bytes_read_total', 0):,.0f} bytes of refused bodies",
        f"  CPU a row written: daemon {level.daemon_us_per_row:.1f} µs"
        + ("" if server is None else f", {server} {level.server_us_per_row:.1f} µs"),
        *(["  daemon CPU by stage, µs a row written: " + ", ".join(
            f"{name} {level.stage_us_per_row(name):.1f}" for name in level.stages)]
          if level.stages else []),
        f"  daemon log {log_path.relative_to(REPO)}: {len(level.log_problems)} warning/error lines",
    ]
    return "\n".join(lines + [f"    {line}" for line in level.log_problems[:10]])


def table(levels: list[Level], ceilings: list[Ceiling]) -> str:
    """Closed loop: the ack latencies are those of a saturated queue (Little's law: about
    concurrency x 1000 rows / throughput), a throughput figure, not the daemon's own latency."""
    rows = [
        "| code | client | concurrency | accepted rows/s | ack p50 ms | ack p99 ms | end-to-end row-writes/s "
        "| × ceiling (target ≥ 0.9) | rows written | 503s | refused bytes / accepted | daemon µs a row written "
        "| server µs a row written | peak RSS MB (target ≤ 200) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ceiling = ceilings[0]
    for level in levels:
        ratio = level.e2e_rate / ceiling.rate
        rows.append(f"| {level.code} | {level.client} | {level.concurrency} | {level.accepted_rate:,.0f} "
                    f"| {level.latency_ms(0.5):.1f} | {level.latency_ms(0.99):.1f} | {level.e2e_rate:,.0f} "
                    f"| {ratio:.2f} {verdict(ratio >= TARGET_E2E_RATIO)} | {level.rows_written:,.0f} "
                    f"| {level.stats.retries} | {level.refused_share:.2%} {verdict(level.refused_share < TARGET_REFUSED_SHARE)} "
                    f"| {level.daemon_us_per_row:.1f} | {level.server_us_per_row:.1f} "
                    f"| {level.peak_rss_mb:.0f} {verdict(level.peak_rss_mb <= TARGET_RSS_MB)} |")
    for each in ceilings:
        rows.append(f"| ceiling: {each.how} | – | – | – | – | – | {each.rate:,.0f} | {each.rate / ceiling.rate:.2f} "
                    "| – | – | – | – | – | – |")
    return "\n".join(rows)


def stage_table(levels: list[Level]) -> str:
    rows = ["| code | client | concurrency | " + " | ".join(STAGE_NAMES) + " | all |",
            "|---|---|---:|" + "---:|" * (len(STAGE_NAMES) + 1)]
    for level in levels:
        if level.stages:
            rows.append(f"| {level.code} | {level.client} | {level.concurrency} | " + " | ".join(
                f"{level.stage_us_per_row(name):.1f}" for name in STAGE_NAMES)
                + f" | {level.daemon_us_per_row:.1f} |")
    return "\n".join(rows)


def comparisons(levels: list[Level]) -> list[str]:
    """The issue's ratios, each between two runs of this one invocation."""
    found = {(level.code, level.client, level.concurrency): level for level in levels}
    lines = []
    for (code, client, concurrency), level in found.items():
        resend = found.get((code, "resends at once", concurrency))
        if client != "resends at once" and resend is not None:
            ratio = level.e2e_rate / resend.e2e_rate
            lines.append(f"{verdict(ratio >= TARGET_HONOUR_RATIO)} {code}, c{concurrency}: the client that honours "
                         f"Retry-After reaches {ratio:.2f}x the end-to-end rate of the one that resends at once")
        if code != "this":
            mine = found.get(("this", client, concurrency))
            if mine is not None:
                ratio = mine.daemon_us_per_row / level.daemon_us_per_row
                lines.append(f"{verdict(ratio <= TARGET_CPU_RATIO)} {client}, c{concurrency}: daemon CPU a row written "
                             f"{mine.daemon_us_per_row:.1f} µs, {ratio:.2f}x {code}'s {level.daemon_us_per_row:.1f} µs; "
                             f"server {mine.server_us_per_row:.1f} vs {level.server_us_per_row:.1f} µs")
    return lines


def checkout(rev: str, into: Path) -> Path:
    """persistd and its schema files as they were at `rev`, laid out as the wheel installs them."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "persistd", "sql"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "sql").rename(into / "persistd" / "sql")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True)
    print(f"--against {rev}: commit {commit.stdout.strip()}, unpacked in {into}", flush=True)
    return into


def measured_files() -> list[Path]:
    """What the daemon runs: persistd's modules (the daemon, the storage seam, both backends)
    and the schema files."""
    return sorted(DAEMON_FILE.parent.glob("*.py")) + sorted(SQL_DIR.glob("*.sql"))


def code_version() -> str:
    """Which persistd is measured (the daemon runs the same files): results go with a version."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(DAEMON_FILE.parent), *args], capture_output=True, text=True).stdout.strip()
    files = measured_files()
    digest = hashlib.sha256(b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in files)).hexdigest()[:12]
    commit = git("rev-parse", "--short", "HEAD")
    state = "modified since" if git("status", "--porcelain", "--", *map(str, files)) else "as in"
    return (f"{DAEMON_FILE.parent}/*.py and {SQL_DIR}/*.sql sha256 {digest}"
            + (f" ({state} commit {commit})" if commit else ""))


# ── main ─────────────────────────────────────────────────────────────────────────────


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=list(DATABASES), default="mysql",
                        help="the daemon's database: MariaDB here, or a SQLite file (default mysql)")
    parser.add_argument("--levels", default="1,4,16", type=lambda s: [int(n) for n in s.split(",")],
                        help="concurrency levels, comma-separated (default 1,4,16)")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--tasks-per-session", type=int, default=5000)
    parser.add_argument("--port", type=int, default=18001)
    parser.add_argument("--journal", choices=["fsync", "write", "off"], default="fsync",
                        help="the daemon's [journal] mode (default fsync, the daemon's default)")
    parser.add_argument("--clients", default="resend,honour", type=lambda s: s.split(","),
                        help="resend: a 503 is resent after min(Retry-After, 50 ms); honour: after Retry-After "
                             "seconds, as told (default both, each level run with each)")
    parser.add_argument("--against", metavar="REV",
                        help="also run the daemon of this git revision (e.g. HEAD~1), level by level, and compare")
    parser.add_argument("--stages", action="store_true",
                        help="sample the daemon with py-spy and split its CPU a row by stage")
    parser.add_argument("--keep", action="store_true",
                        help=f"keep {BENCH_DB} and {CEILING_DB} (SQLite: their directories) at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    version, kind = code_version(), DATABASES[args.backend]
    print(f"$ {command}\n{version}\n{kind.info()}", flush=True)
    started = time.perf_counter()
    workload = build_workload(args.sessions, args.tasks_per_session)
    requests = [req for stream in workload.streams for req in stream]
    print(f"workload: {args.sessions} sessions x {args.tasks_per_session} tasks, {len(requests)} requests, "
          f"{workload.row_writes:,} row-writes, {sum(len(r.body) for r in requests) / 2**20:.0f} MB of request bodies "
          f"(built in {time.perf_counter() - started:.1f} s)", flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="persistd-bench-") as tmp:
        ceiling = measure_ceiling(workload, Path(tmp), kind.scratch(CEILING_DB), args.keep)
        ceilings = [ceiling]
        if args.backend == "mysql":  # what the server can do with the exact totals' statements too
            ceilings.append(measure_ceiling(workload, Path(tmp), kind.scratch(CEILING_DB), args.keep, counts=True))
        for each in ceilings:
            print(f"ceiling: {each.row_writes:,} row-writes ({each.detail}) in {each.seconds:.2f} s "
                  f"= {each.rate:,.0f} row-writes/s\n  {each.cpu}", flush=True)
        sources = {"this": DAEMON_FILE.parents[1]}
        if args.against:
            sources[args.against] = checkout(args.against, Path(tmp) / "against")
        levels = []
        for concurrency in args.levels:
            for code, source in sources.items():
                for client in args.clients:
                    db = kind.scratch(BENCH_DB)
                    levels.append(run_level(workload, args.port, concurrency, args.journal, Path(tmp), db, code,
                                            source, client == "honour", args.stages))
                    print(f"[{code}, client {client}] " + describe_level(
                        levels[-1], ceiling, db.server, log_file(db.backend, args.journal, concurrency)), flush=True)
                    if not args.keep:
                        db.drop()
    print(f"\nAll {len(levels)} levels verified: every session and task is in the database ({args.backend}) "
          "with its final status.\n")
    print(table(levels, ceilings))
    if args.stages:
        print("\nThe daemon's CPU a row written, µs, by stage (py-spy samples):\n")
        print(stage_table(levels))
    print("\n" + "\n".join(comparisons(levels)))
    print(f"\nCommand: `{command}`; {version}")
    if code_version() != version:
        print("WARNING: persistd's code changed during the run; the levels may have run different code")


def run_bench(main: typing.Callable[[], None]) -> None:
    """A benchmark script's entry point: a BenchError ends it with its message and exit 1."""
    try:
        main()
    except BenchError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_bench(main)
