"""Open-loop latency benchmark for persistd (issue 12 point 4): ack latency where the daemon
decides it - below its capacity, with requests arriving on their own schedule.

One fresh daemon (write_path's config and start, journal fsync unless --journal) on one fresh database:
MariaDB's persistd_bench_open (--backend mysql, the default) or a persistd.db in a temporary
directory (--backend sqlite). Each phase sends fresh task rows (fields cycled from
write_path's completed rows, every task id new) into a session of its own, created and
flushed before it, its bodies msgspec-encoded before it is timed. Ack latency runs from the
request's start (open loop: its scheduled arrival) to the whole 202. The phases, in order:

  capacity   16 keep-alive connections send 1000-row batches back to back (503s resent after
             min(Retry-After, 50 ms)): rows / time from the first request until POST /flush
             answered 200, everything written. --capacity N takes N rows/s instead.
  unloaded   50 requests of 1000 rows, then of 100 rows, one at a time, 100 ms idle between.
  open loop  at 25 %, 50 % and 80 % of capacity, 1000-row and 100-row batches: Poisson
             arrivals (seeded) at fraction x capacity / batch rows requests/s for --seconds,
             over a pool of 16 keep-alive connections. A request arriving while all 16 are
             busy waits for one, its latency counted from its scheduled arrival all the same
             (no coordinated omission). A 503 is counted, not resent, and fails the point.
  c1         2000 requests of 100 rows back to back on one connection (503s counted).

Printed per phase: ack p50/p99/max, the offered rate, 503s, the daemon's flushes, the time of
the POST /flush after it (how far the database was behind), the CPU seconds of the daemon,
MariaDB (SQLite runs inside the daemon), this script and other processes (2 cores shared by
all), and its start in seconds since the daemon's ("at s": the janitor's reconciliation runs
every 60 s of uptime and, on MySQL, reads every task with shared locks). Then the verdicts:
at 50 % load p99 <= 2x the unloaded median (each batch size); 100-row batches at c1 p99 <=
10 ms. Each session's tasks are counted at the end and must equal the rows acknowledged;
if not, or if the daemon does not exit 0 on SIGTERM or wrote dead letters, the exit status
is 1. Daemon log: bench-results/open_loop-BACKEND.log.

Usage:
  .venv/bin/python bench/open_loop.py [--backend mysql|sqlite] [--seconds 10] [--capacity N] [--port 18101]
      [--journal fsync|write|off]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import write_path  # noqa: E402
from write_path import (BenchError, CpuUse, HttpConnection, Request, SendStats, cpu_seconds,  # noqa: E402
                        flush, get, parse_metrics, run_bench, send_streams, start_daemon, stop_daemon, verdict)

BENCH_DB = "persistd_bench_open"
CONNECTIONS = 16
CAPACITY_ROWS = 200_000
UNLOADED_REQUESTS, UNLOADED_PAUSE_S = 50, 0.1
C1_REQUESTS, C1_ROWS = 2000, 100
FRACTIONS = (0.25, 0.5, 0.8)
BATCH_SIZES = (1000, 100)
POOL_ROWS = 5000
FLUSH_METRICS = ("persistence_flush_total", "persistence_flush_duration_seconds_sum")
TARGET_C1_P99_MS = 10.0
TARGET_LOADED_RATIO = 2.0  # p99 at 50 % load <= this x the unloaded median


@dataclass
class Phase:
    name: str
    batch_rows: int
    session: str
    target_rate: float = math.nan  # rows/s asked for (open loop)
    offered_rate: float = 0.0  # rows/s sent: the schedule's, or what the closed loop managed
    at: float = 0.0  # its start, in seconds since the daemon started
    seconds: float = 0.0  # first request to last answer
    flush_s: float = 0.0  # POST /flush afterwards
    latencies: list[float] = field(default_factory=list)  # accepted requests (s)
    refused: int = 0  # 503s
    rows_acked: int = 0
    cpu: CpuUse | None = None
    flushes: tuple[float, float] = (0.0, 0.0)  # the daemon's flushes during the phase, their seconds

    def record(self, req: Request, status: int, body: bytes, latency: float) -> None:
        if status == 503:
            self.refused += 1
        elif status != 202 or msgspec.json.decode(body)["count"] != req.rows:
            raise BenchError(f"{self.name}: POST {req.path}: HTTP {status}: {body[:500]!r}")
        else:
            self.latencies.append(latency)
            self.rows_acked += req.rows

    def p(self, q: float) -> float:
        """Nearest-rank quantile of the ack latencies, in ms (NaN when nothing was accepted)."""
        ordered = sorted(self.latencies)
        return 1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


class Rows:
    """Fresh task rows: every phase a new session, every task id new."""

    def __init__(self) -> None:
        self.rng = random.Random(write_path.SEED)
        corpus = "".join(self.rng.choices(write_path.TOKENS, write_path.WEIGHTS, k=50_000))
        self.pool = write_path.task_rows(self.rng, corpus, 0, str(uuid.UUID(int=0)), POOL_ROWS)[1]

    async def new_session(self, port: int) -> str:
        """A session row sent and flushed, so that its tasks are never held waiting for it."""
        session = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        req = write_path.request("sessions", [write_path.session_row(self.rng, 0, session, 0)])
        conn = await HttpConnection.open(port)
        response = await conn.request("POST", req.path, req.body)
        await conn.aclose()
        if response.status != 202:
            raise BenchError(f"POST {req.path}: HTTP {response.status}: {response.body[:500]!r}")
        await flush(port)
        return session

    def batches(self, session: str, count: int, size: int) -> list[Request]:
        """`count` requests of `size` task rows, encoded."""
        requests = []
        for start in range(0, count * size, size):
            rows = [{**self.pool[i % POOL_ROWS], "task_id": f"{session}-{i:07d}", "session_id": session,
                     "batch_id": f"{session[:8]}-b{i // 50:05d}"} for i in range(start, start + size)]
            requests.append(write_path.request("tasks", rows))
        return requests


@dataclass
class Run:
    port: int
    pid: int
    db: write_path.Database
    started: float  # perf_counter when the daemon listened
    rows: Rows = field(default_factory=Rows)
    phases: list[Phase] = field(default_factory=list)

    async def phase(self, name: str, batch_rows: int, count: int, drive, *args) -> Phase:
        """A fresh session and `count` requests of `batch_rows` rows encoded, then
        `drive(phase, requests, *args)` timed with the CPU, then POST /flush."""
        phase = Phase(name, batch_rows, await self.rows.new_session(self.port))
        requests = self.rows.batches(phase.session, count, batch_rows)
        before = await self.metrics(), CpuUse.now(cpu_seconds(self.pid), self.db.server_pid())
        started = time.perf_counter()
        phase.at = started - self.started
        await drive(phase, requests, *args)
        phase.seconds = time.perf_counter() - started
        phase.cpu = CpuUse.now(cpu_seconds(self.pid), self.db.server_pid()) - before[1]
        after = await self.metrics()
        phase.flushes = tuple(after[k] - before[0][k] for k in FLUSH_METRICS)
        flushed = time.perf_counter()
        await flush(self.port)
        phase.flush_s = time.perf_counter() - flushed
        self.phases.append(phase)
        print(describe(phase, self.db.server), flush=True)
        await trio.sleep(1.0)  # a quiet second between phases
        return phase

    async def metrics(self) -> dict[str, float]:
        return parse_metrics((await get(self.port, "/api/v1/system/metrics")).body.decode())

    async def capacity(self, phase: Phase, requests: list[Request]) -> None:
        stats = SendStats(honour_retry_after=False)
        conns = [await HttpConnection.open(self.port) for _ in range(CONNECTIONS)]
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            streams = iter([[req] for req in requests])
            for conn in conns:
                nursery.start_soon(send_streams, conn, streams, stats)
        await flush(self.port)  # end to end: until everything is written
        phase.offered_rate = stats.rows_acked / (time.perf_counter() - started)
        phase.latencies, phase.rows_acked, phase.refused = stats.latencies, stats.rows_acked, stats.retries
        for conn in conns:
            await conn.aclose()

    async def one_at_a_time(self, phase: Phase, requests: list[Request], pause_s: float) -> None:
        conn = await HttpConnection.open(self.port)
        first = trio.current_time()
        for req in requests:
            started = trio.current_time()
            response = await conn.request("POST", req.path, req.body)
            phase.record(req, response.status, response.body, trio.current_time() - started)
            await trio.sleep(pause_s)
        phase.offered_rate = phase.batch_rows * len(requests) / (trio.current_time() - first)
        await conn.aclose()

    async def open_loop(self, phase: Phase, requests: list[Request], arrivals: list[float], rate: float,
                        seconds: float) -> None:
        phase.target_rate, phase.offered_rate = rate, len(arrivals) * phase.batch_rows / seconds
        conns = [await HttpConnection.open(self.port) for _ in range(CONNECTIONS)]
        send, receive = trio.open_memory_channel(math.inf)  # arrivals wait here for a free connection

        async def worker(conn: HttpConnection) -> None:
            async for scheduled, req in receive:
                response = await conn.request("POST", req.path, req.body)
                phase.record(req, response.status, response.body, trio.current_time() - scheduled)

        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(worker, conn)
            start = trio.current_time()
            async with send:
                for at, req in zip(arrivals, requests):
                    await trio.sleep_until(start + at)
                    send.send_nowait((start + at, req))
        for conn in conns:
            await conn.aclose()


def poisson(rng: random.Random, rate: float, seconds: float) -> list[float]:
    """Arrival times in [0, seconds) with exponential gaps of mean 1/rate."""
    arrivals, at = [], rng.expovariate(rate)
    while at < seconds:
        arrivals.append(at)
        at += rng.expovariate(rate)
    return arrivals


async def drive(run: Run, seconds: float, capacity: float | None) -> None:
    if (health := await get(run.port, "/health")).status != 200:
        raise BenchError(f"GET /health: {health.status} {health.body[:300]!r}")
    how = "measured" if capacity is None else "--capacity"
    if capacity is None:
        measured = await run.phase(f"capacity, c{CONNECTIONS} closed loop, 503s resent", 1000,
                                   CAPACITY_ROWS // 1000, run.capacity)
        capacity = measured.offered_rate
    unloaded = {size: await run.phase("unloaded, one at a time", size, UNLOADED_REQUESTS, run.one_at_a_time,
                                      UNLOADED_PAUSE_S) for size in BATCH_SIZES}
    rng = random.Random(write_path.SEED)
    loaded = {}
    for fraction in FRACTIONS:
        for size in BATCH_SIZES:
            arrivals = poisson(rng, fraction * capacity / size, seconds)
            loaded[fraction, size] = await run.phase(f"open loop {fraction:.0%}, c{CONNECTIONS} pool", size,
                                                     len(arrivals), run.open_loop, arrivals, fraction * capacity, seconds)
    c1 = await run.phase("c1 closed loop, back to back", C1_ROWS, C1_REQUESTS, run.one_at_a_time, 0.0)
    await verify_counts(run)
    print(f"\nAll {sum(p.rows_acked for p in run.phases):,} acknowledged task rows found in the database.\n")
    print(table(run.phases, run.db.server))
    print(f"\ncapacity {capacity:,.0f} rows/s ({how})")
    for size in BATCH_SIZES:
        phase, limit = loaded[0.5, size], TARGET_LOADED_RATIO * unloaded[size].p(0.5)
        ok = phase.refused == 0 and phase.p(0.99) <= limit
        print(f"{verdict(ok)} {size}-row batches at 50 % load: p99 {phase.p(0.99):.1f} ms <= 2 x unloaded median "
              f"{unloaded[size].p(0.5):.1f} = {limit:.1f} ms" + (f", {phase.refused} 503s" if phase.refused else ""))
    refused = [p for p in loaded.values() if p.refused]
    print(f"{verdict(not refused)} open loop: {sum(p.refused for p in refused)} requests refused with 503 (not resent)"
          + "".join(f"; {p.refused} at {p.name}, {p.batch_rows}-row batches" for p in refused))
    ok = c1.refused == 0 and c1.p(0.99) <= TARGET_C1_P99_MS
    print(f"{verdict(ok)} {C1_ROWS}-row batches at c1: p99 {c1.p(0.99):.1f} ms <= {TARGET_C1_P99_MS:g} ms"
          + (f", {c1.refused} 503s" if c1.refused else ""))


async def verify_counts(run: Run) -> None:
    """Each phase's session holds exactly the task rows acknowledged with 202."""
    reader = await run.db.connect()
    stored = dict(await reader.rows("SELECT session_id, COUNT(*) FROM translation_tasks GROUP BY session_id"))
    (sessions,), = await reader.rows("SELECT COUNT(*) FROM translation_sessions")
    reader.close()
    expected = {p.session: p.rows_acked for p in run.phases}
    problems = [f"{p.name} ({p.batch_rows} rows): session {p.session} has {stored.get(p.session, 0)} tasks, "
                f"{p.rows_acked} acknowledged" for p in run.phases if int(stored.get(p.session, 0)) != p.rows_acked]
    problems += [f"unexpected session {s} with {n} tasks" for s, n in stored.items() if s not in expected]
    if int(sessions) != len(run.phases):
        problems.append(f"{sessions} sessions stored, {len(run.phases)} sent")
    if problems:
        raise BenchError(f"the {run.db} does not hold what was acknowledged:\n  " + "\n  ".join(problems))


# ── report ───────────────────────────────────────────────────────────────────────────


def describe(phase: Phase, server: str | None) -> str:
    target = "" if math.isnan(phase.target_rate) else f" (target {phase.target_rate:,.0f})"
    return (f"{phase.name}, {phase.batch_rows}-row batches: {len(phase.latencies)} accepted in {phase.seconds:.1f} s, "
            f"offered {phase.offered_rate:,.0f} rows/s{target}; ack p50 {phase.p(0.5):.1f} / p99 {phase.p(0.99):.1f}"
            f" / max {phase.p(1.0):.1f} ms; 503s {phase.refused}; {phase.flushes[0]:.0f} flushes, mean "
            f"{1000 * phase.flushes[1] / max(phase.flushes[0], 1):.0f} ms; /flush after it {1000 * phase.flush_s:.0f} ms"
            f"\n  {phase.cpu.describe('daemon', phase.seconds, server)}")


def table(phases: list[Phase], server: str | None) -> str:
    rows = ["| phase | at s | batch rows | requests | offered rows/s | ack p50 ms | ack p99 ms | ack max ms | 503s "
            f"| daemon flushes | /flush after, ms | CPU s: daemon / {server or '–'} / script / other |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in phases:
        cpu = p.cpu
        other = cpu.machine - cpu.subject - cpu.server - cpu.script
        rows.append(f"| {p.name} | {p.at:.0f} | {p.batch_rows} | {len(p.latencies) + p.refused} | {p.offered_rate:,.0f} "
                    f"| {p.p(0.5):.1f} | {p.p(0.99):.1f} | {p.p(1.0):.1f} | {p.refused} "
                    f"| {p.flushes[0]:.0f} | {1000 * p.flush_s:.0f} | {cpu.subject:.1f} / "
                    f"{cpu.server:.1f} / {cpu.script:.1f} / {other:.1f} |")
    return "\n".join(rows)


# ── main ─────────────────────────────────────────────────────────────────────────────


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=list(write_path.DATABASES), default="mysql",
                        help="the daemon's database: MariaDB here, or a SQLite file (default mysql)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each open-loop point (default 10)")
    parser.add_argument("--capacity", type=float, metavar="ROWS_PER_S",
                        help="take this capacity instead of measuring it")
    parser.add_argument("--port", type=int, default=18101)
    parser.add_argument("--journal", choices=["fsync", "write", "off"], default="fsync",
                        help="the daemon's [journal] mode (default fsync, the daemon's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    version, kind = write_path.code_version(), write_path.DATABASES[args.backend]
    print(f"$ {command}\n{version}\n{kind.info()}", flush=True)
    write_path.RESULTS_DIR.mkdir(exist_ok=True)
    db = kind.scratch(BENCH_DB)
    db.create()
    with tempfile.TemporaryDirectory(prefix="persistd-open-") as tmp:
        daemon = start_daemon(args.port, CONNECTIONS, args.journal, Path(tmp), db,
                              log_path=write_path.RESULTS_DIR / f"open_loop-{args.backend}.log")
        try:
            run = Run(args.port, daemon.process.pid, db, time.perf_counter())
            trio.run(drive, run, args.seconds, args.capacity)
        finally:
            log_problems = stop_daemon(daemon)
    print(f"\ndaemon stopped with exit 0, no dead letters; log {daemon.log_path.relative_to(write_path.REPO)}: "
          f"{len(log_problems)} warning/error lines" + "".join(f"\n    {line}" for line in log_problems[:10]))
    db.drop()
    print(f"\nCommand: `{command}`; {version}")
    if write_path.code_version() != version:
        print("WARNING: persistd's code changed during the run")


if __name__ == "__main__":
    run_bench(main)
