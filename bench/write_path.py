"""Write-path benchmark for persistd: 1000-row HTTP batches in, rows in MariaDB out.

Workload (the issue's): S sessions x T tasks (default 20 x 5000) of realistic rows - source
texts of 20-200 characters mixing CJK, Latin and emoji, JSON game_info and metadata on the
sessions - with every task written twice: first "pending", then "completed" with
target_text and confidence, in batches of 1000 rows. One session stream is, in this order:
the session row ("processing"), its pending batches, its completed batches, the session
row again ("completed"). At concurrency N, N workers - each with one keep-alive HTTP
connection - take the streams one at a time, so N streams run in parallel.

Per concurrency level, each on a freshly dropped and recreated database (with the empty tables
of sql/schema.sql, as for the ceiling) and a fresh daemon process (`python -m persistd
--config FILE`, stopped with SIGTERM, must exit 0):

  accepted rows/s     rows acknowledged with 202 / wall time of the sending phase
  ack p50/p99/max     per 1000-row task batch: from starting to send the request to having
                      the whole 202 response (503 answers, their waits and resends included)
  end-to-end          row-writes sent (sessions and tasks, each written twice) / time from the
                      first request until, after POST /flush, a count query in MariaDB
                      confirmed every row with its final status
  peak RSS            VmHWM of the daemon process at the end
  503 retries         batches answered 503 (buffer full) and resent after min(Retry-After, 50 ms)

Also printed per level: the latency of single requests, the rows the daemon actually wrote
(it coalesces the two writes of a task when both wait in one flush), and the CPU seconds of
the daemon, MariaDB, this script and all other processes over the timed interval - on a
shared 2-core machine a large "other processes" figure means the run was disturbed. The
first lines name the daemon.py measured (path, sha256, commit); a warning follows the table
if that file changed during the run.

After the timed interval every session and task is read back and compared with what was sent;
anything missing or wrong ends the script with a non-zero exit, as does any request refused,
a dead-letter file, or a daemon that does not exit 0. Warnings and errors in the daemon's
log are printed (they do not fail the run).

Ceiling, measured once: the same upserts in the same order (the concurrency-1 order), each
request's rows as one multi-row INSERT ... ON DUPLICATE KEY UPDATE built with persistd's own
statement builder (statement_frame, sql_value, sql_time), are written to a .sql file and timed
as `mariadb --default-character-set=utf8mb4 DB < file.sql` (the client's default, utf8mb3,
cannot carry emoji) into a fresh database created from sql/schema.sql. The file starts
with the daemon's own session setup (time_zone '+00:00', strict sql_mode) and runs with
autocommit: one commit per statement, i.e. per 1000-row batch (the daemon commits once per
flush; flush_rows = 1000 makes most of its flushes 1000 rows or more under this load).

The client is trio + h11 in this process. Every request body is generated and
msgspec-encoded before the timed phase, so that on a 2-core machine the client takes as
little CPU as possible from the daemon and MariaDB. Daemon logs go to bench-results/. The
databases persistd_bench and persistd_bench_ceiling are dropped when done, unless --keep
(after a failure they are left for inspection).

Usage:
  .venv/bin/python bench/write_path.py [--levels 1,4,16] [--sessions 20]
      [--tasks-per-session 5000] [--port 18001] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import operator
import os
import random
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
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

from persistd.daemon import (SESSION_SETUP, SESSIONS, STATEMENT_MAX_BYTES, STATEMENT_MAX_ROWS, TASKS, Entry,
                             SessionIn, TaskIn, group_by_shape, sql_time, sql_value, statement_frame)

REPO = Path(__file__).resolve().parent.parent
DAEMON_FILE = Path(persistd.daemon.__file__).resolve()
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
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SEED = 20250601

TARGET_P99_MS = {1: 10.0, 16: 40.0}
TARGET_E2E_RATIO = 0.9
TARGET_RSS_MB = 200.0


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


# ── MariaDB ──────────────────────────────────────────────────────────────────────────


def mariadb(*args: str, stdin=None) -> str:
    done = subprocess.run([*MARIADB_CLI, *args], stdin=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"mariadb {shlex.join(args)}: {done.stderr.strip()}")
    return done.stdout


def fresh_database(name: str) -> None:
    """Dropped, created and given the tables of sql/schema.sql (empty), for the ceiling and
    the daemon alike: neither pays for creating tables in its timed interval."""
    mariadb("-e", f"DROP DATABASE IF EXISTS `{name}`; CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    with open(REPO / "sql" / "schema.sql", "rb") as schema:
        mariadb(name, stdin=schema)


def drop_database(name: str) -> None:
    mariadb("-e", f"DROP DATABASE IF EXISTS `{name}`")


async def connect_db(name: str) -> trio_mysql.Connection:
    conn = trio_mysql.connect(**MYSQL, database=name, charset="utf8mb4", use_unicode=True, autocommit=True)
    await conn.connect()
    return conn


async def query(conn: trio_mysql.Connection, sql: str) -> tuple:
    async with conn.cursor() as cursor:
        await cursor.execute(sql)
        return await cursor.fetchall()


COUNTS_SQL = """SELECT
    (SELECT COUNT(*) FROM translation_sessions),
    (SELECT COUNT(*) FROM translation_sessions WHERE status = 'completed'),
    (SELECT COUNT(*) FROM translation_tasks),
    (SELECT COUNT(*) FROM translation_tasks WHERE status = 'completed' AND target_text IS NOT NULL)"""


async def confirm_counts(conn: trio_mysql.Connection, workload: Workload) -> None:
    """The quick check that closes the end-to-end interval."""
    (counts,) = await query(conn, COUNTS_SQL)
    expected = (len(workload.sessions),) * 2 + (len(workload.tasks),) * 2
    if tuple(map(int, counts)) != expected:
        raise BenchError(f"after /flush MySQL holds (sessions, completed, tasks, completed with target_text) "
                         f"= {tuple(counts)}, expected {expected}")


async def verify_rows(db_name: str, workload: Workload) -> None:
    """Every session and task is stored once, with its final status and values."""
    conn = await connect_db(db_name)
    try:
        sessions = await query(conn, "SELECT session_id, status, completed_tasks, game_info FROM translation_sessions")
        tasks = await query(conn, "SELECT task_id, session_id, status, target_text, confidence FROM translation_tasks")
    finally:
        conn.close()
    stored_sessions = {sid: (status, done, msgspec.json.decode(info)) for sid, status, done, info in sessions}
    stored_tasks = {tid: (sid, status, target, None if conf is None else float(conf))
                    for tid, sid, status, target, conf in tasks}
    problems = compare("session", workload.sessions, stored_sessions) + compare("task", workload.tasks, stored_tasks)
    if problems:
        raise BenchError(f"{len(problems)} rows missing or wrong in {db_name}, e.g.:\n  " + "\n  ".join(problems[:10]))


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


def mariadbd_pid() -> int | None:
    """The local server's process, to account for its CPU; None when it is not local."""
    found = subprocess.run(["pidof", "mariadbd", "mysqld"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def children_cpu_seconds() -> float:
    """CPU of this script's finished child processes (the mariadb client)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuUse(NamedTuple):
    """CPU seconds used by the subject (the daemon, or the mariadb client for the ceiling),
    the MariaDB server, this script and the whole machine. What is left over was used by other
    processes: on a shared machine, a sign that the figures were disturbed."""
    subject: float
    server: float
    script: float
    machine: float

    @classmethod
    def now(cls, subject: float) -> CpuUse:
        return cls(subject, cpu_seconds(mariadbd_pid()), time.process_time(), machine_busy_seconds())

    def __sub__(self, other: CpuUse) -> CpuUse:
        return CpuUse(*(a - b for a, b in zip(self, other)))

    def describe(self, subject: str, seconds: float) -> str:
        others = self.machine - self.subject - self.server - self.script
        return (f"CPU seconds ({os.cpu_count()} cores x {seconds:.1f} s): {subject} {self.subject:.1f}, "
                f"MariaDB {self.server:.1f}, this script {self.script:.1f}, other processes {others:.1f}")


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


# ── ceiling: the same upserts through the mariadb client ─────────────────────────────

ROW_TYPES = {PATHS["sessions"]: (SESSIONS, "sessions", SessionIn), PATHS["tasks"]: (TASKS, "tasks", TaskIn)}


def upsert_statements(req: Request, at: datetime) -> list[tuple[str, int]]:
    """(statement, rows) as persistd's upsert() builds them for this request's rows."""
    table, key, row_type = ROW_TYPES[req.path]
    rows = msgspec.json.decode(req.body, type=dict[str, list[row_type]])[key]
    statements = []
    for shape, group in group_by_shape(table, [Entry(row, at, at, 0) for row in rows]).items():
        columns = table.required + shape
        head, tail = statement_frame(table, columns)
        values_of = operator.attrgetter(*columns)
        for start in range(0, len(group), STATEMENT_MAX_ROWS):
            literals = ["(" + ",".join(map(sql_value, values_of(e.row))) + "," + sql_time(e.created_at) + ","
                        + sql_time(e.updated_at) + ")" for e in group[start:start + STATEMENT_MAX_ROWS]]
            assert sum(map(len, literals)) < STATEMENT_MAX_BYTES, "persistd would split this statement"
            statements.append((head + ",".join(literals) + tail, len(literals)))
    return statements


def write_ceiling_sql(workload: Workload, path: Path) -> int:
    """The .sql file; returns the row-writes in it."""
    at = datetime.now(timezone.utc).replace(microsecond=0)
    row_writes = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(SESSION_SETUP + ";\n")
        for stream in workload.streams:
            for req in stream:
                for statement, rows in upsert_statements(req, at):
                    f.write(statement + ";\n")
                    row_writes += rows
    return row_writes


@dataclass
class Ceiling:
    row_writes: int
    seconds: float
    file_mb: float
    cpu: CpuUse

    @property
    def rate(self) -> float:
        return self.row_writes / self.seconds


def measure_ceiling(workload: Workload, tmp: Path, keep: bool) -> Ceiling:
    """Its database is dropped at once (unless `keep`), so that its pages do not linger in
    the buffer pool while the daemon runs."""
    path = tmp / "ceiling.sql"
    row_writes = write_ceiling_sql(workload, path)
    fresh_database(CEILING_DB)
    with open(path, "rb") as sql:
        cpu_before = CpuUse.now(children_cpu_seconds())
        started = time.perf_counter()
        mariadb(CEILING_DB, stdin=sql)
        seconds = time.perf_counter() - started
        cpu = CpuUse.now(children_cpu_seconds()) - cpu_before
    trio.run(verify_rows, CEILING_DB, workload)
    if not keep:
        drop_database(CEILING_DB)
    return Ceiling(row_writes, seconds, path.stat().st_size / 2**20, cpu)


# ── HTTP client ──────────────────────────────────────────────────────────────────────


class Response(NamedTuple):
    status: int
    headers: dict[bytes, bytes]  # lower-case names
    body: bytes


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: h11 frames the messages, trio moves the bytes."""

    def __init__(self, stream: trio.SocketStream, port: int) -> None:
        self.stream, self.host = stream, f"127.0.0.1:{port}"
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        return cls(await trio.open_tcp_stream("127.0.0.1", port), port)

    async def request(self, method: str, target: str, body: bytes = b"") -> Response:
        headers = [("Host", self.host), ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        await self.stream.send_all(self.h11.send(h11.Request(method=method, target=target, headers=headers)))
        for chunk in self.h11.send_with_data_passthrough(h11.Data(data=body)):
            await self.stream.send_all(chunk)
        self.h11.send(h11.EndOfMessage())
        response = await self.receive()
        self.h11.start_next_cycle()  # fails loudly if the server did not keep the connection
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
    rows_acked: int = 0
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
        await trio.sleep(min(float(response.headers[b"retry-after"]), RETRY_WAIT_S))
    if response.status != 202 or msgspec.json.decode(response.body)["count"] != req.rows:
        raise BenchError(f"POST {req.path}: HTTP {response.status}: {response.body[:500]!r}")
    if req.path == PATHS["tasks"]:
        stats.latencies.append(time.perf_counter() - started)
    stats.rows_acked += req.rows


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
    stats: SendStats
    send_s: float
    e2e_s: float
    row_writes: int
    flush_503s: int
    peak_rss_mb: float = 0.0
    cpu: CpuUse | None = None  # over the timed interval
    metrics: dict[str, float] = field(default_factory=dict)
    log_problems: list[str] = field(default_factory=list)

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


async def drive_level(workload: Workload, port: int, concurrency: int, pid: int) -> Level:
    """The timed phase (send, /flush, count query), then the full check and the daemon's figures."""
    if (health := await get(port, "/health")).status != 200:
        raise BenchError(f"GET /health: {health.status} {health.body[:300]!r}")
    db = await connect_db(BENCH_DB)
    workers = [await HttpConnection.open(port) for _ in range(min(concurrency, len(workload.streams)))]
    stats, streams = SendStats(), iter(workload.streams)
    cpu_before = CpuUse.now(cpu_seconds(pid))
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for conn in workers:
            nursery.start_soon(send_streams, conn, streams, stats)
    sent = time.perf_counter()
    flush_503s = await flush(port)
    await confirm_counts(db, workload)
    confirmed = time.perf_counter()
    level = Level(concurrency, stats, sent - started, confirmed - started, workload.row_writes, flush_503s)
    level.cpu = CpuUse.now(cpu_seconds(pid)) - cpu_before
    db.close()
    for conn in workers:
        await conn.aclose()
    await verify_rows(BENCH_DB, workload)
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


def start_daemon(port: int, concurrency: int, journal: str, tmp: Path) -> Daemon:
    state_dir = tmp / f"state-c{concurrency}"
    config = tmp / f"persistd-c{concurrency}.toml"
    config.write_text(f'[server]\nport = {port}\n[database]\nurl = "mysql://root@127.0.0.1:3306/{BENCH_DB}"\n'
                      f'[state]\ndir = "{state_dir}"\n[journal]\nmode = "{journal}"\n')
    log_path = RESULTS_DIR / f"write_path-{journal}-c{concurrency}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSISTD_")}  # the config file rules
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(DAEMON_FILE.parents[1]), env.get("PYTHONPATH")]))
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


def run_level(workload: Workload, port: int, concurrency: int, journal: str, tmp: Path) -> Level:
    fresh_database(BENCH_DB)
    daemon = start_daemon(port, concurrency, journal, tmp)
    try:
        level = trio.run(drive_level, workload, port, concurrency, daemon.process.pid)
    finally:
        log_problems = stop_daemon(daemon)
    level.log_problems = log_problems
    return level


# ── report ───────────────────────────────────────────────────────────────────────────


def verdict(ok: bool) -> str:
    return "✓" if ok else "✗"


def describe_level(level: Level, ceiling: Ceiling, log_path: Path) -> str:
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
        f"  {level.cpu.describe('daemon', level.e2e_s)}",
        f"  daemon: peak RSS {level.peak_rss_mb:.0f} MB; "
        f"wrote {sessions_written:,.0f} session and {tasks_written:,.0f} task row-writes in {flushes:.0f} flushes "
        f"(mean {mean_flush_ms:.0f} ms), {m.get('persistence_flush_errors_total', 0):.0f} failed flushes",
        f"  daemon log {log_path.relative_to(REPO)}: {len(level.log_problems)} warning/error lines",
    ]
    return "\n".join(lines + [f"    {line}" for line in level.log_problems[:10]])


def table(levels: list[Level], ceiling: Ceiling) -> str:
    rows = [
        "| concurrency | accepted rows/s | ack p50 ms | ack p99 ms | ack max ms | end-to-end row-writes/s "
        "| × ceiling (target ≥ 0.9) | peak RSS MB (target ≤ 200) | 503 retries |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        p99 = level.latency_ms(0.99)
        target = TARGET_P99_MS.get(level.concurrency)
        p99_cell = f"{p99:.1f}" + ("" if target is None else f" (≤ {target:g} {verdict(p99 <= target)})")
        ratio = level.e2e_rate / ceiling.rate
        rows.append(f"| {level.concurrency} | {level.accepted_rate:,.0f} | {level.latency_ms(0.5):.1f} | {p99_cell} "
                    f"| {level.latency_ms(1.0):.1f} | {level.e2e_rate:,.0f} | {ratio:.2f} {verdict(ratio >= TARGET_E2E_RATIO)} "
                    f"| {level.peak_rss_mb:.0f} {verdict(level.peak_rss_mb <= TARGET_RSS_MB)} | {level.stats.retries} |")
    rows.append(f"| ceiling: `mariadb < file.sql` | – | – | – | – | {ceiling.rate:,.0f} | 1.00 | – | – |")
    return "\n".join(rows)


def code_version() -> str:
    """Which persistd is measured (the daemon runs the same file): results go with a version."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(DAEMON_FILE.parent), *args], capture_output=True, text=True).stdout.strip()
    digest = hashlib.sha256(DAEMON_FILE.read_bytes()).hexdigest()[:12]
    commit = git("rev-parse", "--short", "HEAD")
    state = "modified since" if git("status", "--porcelain", "--", DAEMON_FILE.name) else "as in"
    return f"{DAEMON_FILE} sha256 {digest}" + (f" ({state} commit {commit})" if commit else "")


def server_info() -> str:
    version, flush_log, pool_mb = mariadb("-N", "-e", "SELECT VERSION(), @@innodb_flush_log_at_trx_commit, "
                                          "@@innodb_buffer_pool_size DIV 1048576").split()
    return (f"MariaDB {version} (innodb_flush_log_at_trx_commit={flush_log}, buffer pool {pool_mb} MB), "
            f"{os.cpu_count()} CPUs shared by client, daemon and server")


# ── main ─────────────────────────────────────────────────────────────────────────────


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,16", type=lambda s: [int(n) for n in s.split(",")],
                        help="concurrency levels, comma-separated (default 1,4,16)")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--tasks-per-session", type=int, default=5000)
    parser.add_argument("--port", type=int, default=18001)
    parser.add_argument("--journal", choices=["fsync", "write", "off"], default="fsync",
                        help="the daemon's [journal] mode (default fsync, the daemon's default)")
    parser.add_argument("--keep", action="store_true", help=f"keep {BENCH_DB} and {CEILING_DB} at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    version = code_version()
    print(f"$ {command}\n{version}\n{server_info()}", flush=True)
    started = time.perf_counter()
    workload = build_workload(args.sessions, args.tasks_per_session)
    requests = [req for stream in workload.streams for req in stream]
    print(f"workload: {args.sessions} sessions x {args.tasks_per_session} tasks, {len(requests)} requests, "
          f"{workload.row_writes:,} row-writes, {sum(len(r.body) for r in requests) / 2**20:.0f} MB of request bodies "
          f"(built in {time.perf_counter() - started:.1f} s)", flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="persistd-bench-") as tmp:
        ceiling = measure_ceiling(workload, Path(tmp), args.keep)
        print(f"ceiling: {ceiling.row_writes:,} row-writes ({ceiling.file_mb:.0f} MB of SQL, autocommit: one commit "
              f"per {BATCH_ROWS}-row statement) in {ceiling.seconds:.2f} s = {ceiling.rate:,.0f} row-writes/s\n"
              f"  {ceiling.cpu.describe('mariadb client', ceiling.seconds)}", flush=True)
        levels = []
        for concurrency in args.levels:
            levels.append(run_level(workload, args.port, concurrency, args.journal, Path(tmp)))
            print(describe_level(levels[-1], ceiling, RESULTS_DIR / f"write_path-{args.journal}-c{concurrency}.log"),
                  flush=True)
    if not args.keep:
        drop_database(BENCH_DB)
    print(f"\nAll {len(levels)} levels verified: every session and task is in MySQL with its final status.\n")
    print(table(levels, ceiling))
    print(f"\nCommand: `{command}`; {version}")
    if code_version() != version:
        print(f"WARNING: {DAEMON_FILE} changed during the run; the levels may have run different code")


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        sys.exit(1)
