"""Scale-out benchmark for persistd (issue 13): the write path on one, two and three instances
behind HAProxy, on one MariaDB and on a three-node Galera cluster on this machine.

The workload and the client are write_path.py's (S sessions x T tasks, each task written
"pending" then "completed", 1000-row batches; C workers with a keep-alive connection each,
resending a batch answered 503 after min(Retry-After, 50 ms)), sent to HAProxy (Debian's
haproxy, round robin by request, health checks on /health: tests/cluster.py), which spreads
them over N persistd processes (`python -P -m persistd`, instance ids 1..N, a state dir and
an fsync'd journal each). A session's tasks thus reach instances other than the one that took
the session: they wait for it (held), tried again every flush_interval.

Per configuration, on a fresh database:

  e2e row-writes/s   row-writes sent / time from the first request until /flush on every
                     instance (repeated while one still holds tasks for a session another
                     wrote since) and a count query confirmed every row with its final status
  × 1 instance       against the same database with one instance, in this run
  CPU µs/row-write   of the persistd processes, of the database server(s), of HAProxy
  machine busy       of the 2 cores over the interval
  conflicts          flush attempts aborted by another transaction (1213: a deadlock, on
                     Galera a certification conflict; persistence_flush_conflicts_total) /
                     flush attempts; Galera: the nodes' wsrep_local_cert_failures +
                     wsrep_local_bf_aborts over the interval

--galera-writes spread (default): instance i writes through node i mod 3 (its url lists the
nodes from there), every node takes writes; one: every instance writes through node 0 (the
url's order is the same), the others only apply what it replicates. --one-shard gives every
instance the same instance id, so that all of them change the same task_counts rows (what
persistd did before each instance had rows of its own): the conflicts that costs.
Every session and task is read back and compared with what was sent (through every Galera
node); anything missing or wrong, a daemon that does not exit 0 or a dead letter ends the
script with a non-zero exit.

Usage:
  .venv/bin/python bench/scale_out.py [--databases mariadb,galera] [--instances 1,2,3]
      [--concurrency 8] [--sessions 12] [--tasks-per-session 2500] [--galera-writes spread|one] [--one-shard]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio
import trio_mysql

from write_path import (COUNTS_SQL, REPO, SESSION_SETUP, BenchError, CpuUse, HttpConnection, MySQLReader, SendStats,
                        Workload, build_workload, code_version, cpu_seconds, machine_busy_seconds, mariadb,
                        parse_metrics, run_bench, send_streams, verify_rows)

sys.path.insert(0, str(REPO / "tests"))  # the Galera cluster and HAProxy of the tests
from cluster import GaleraCluster, HAProxy  # noqa: E402

DATABASE = "persistd_scale"
RESULTS_DIR = REPO / "bench-results"
MARIADB_PORT = 3306
GALERA_BASE_PORT = 13_400
FLUSH_PATH = "/api/v1/translation/flush"


class Database:
    """The database under test: the system MariaDB, or a running Galera cluster (read back
    through each node)."""

    def __init__(self, name: str, ports: list[int], pids: list[int], cluster: GaleraCluster | None = None) -> None:
        self.name, self.ports, self.pids, self.cluster = name, ports, pids, cluster
        self.url = self.urls(1)[0]

    def __str__(self) -> str:
        return f"{self.name} database {DATABASE}"

    def urls(self, instances: int, spread: bool = True) -> list[str]:
        """Each instance's url: the servers from node i mod len on (spread), or all from node 0."""
        hosts = [f"127.0.0.1:{port}" for port in self.ports]
        starts = [i % len(hosts) if spread else 0 for i in range(instances)]
        return [f"mysql://root@{','.join(hosts[s:] + hosts[:s])}/{DATABASE}" for s in starts]

    def reset(self) -> None:
        mariadb("-P", str(self.ports[0]), "-e", f"DROP DATABASE IF EXISTS `{DATABASE}`")

    async def connect(self, port: int | None = None) -> MySQLReader:
        conn = trio_mysql.connect(host="127.0.0.1", port=port or self.ports[0], user="root", database=DATABASE,
                                  charset="utf8mb4", use_unicode=True, autocommit=True, init_command=SESSION_SETUP)
        await conn.connect()
        if self.cluster is not None:
            await conn.query("SET SESSION wsrep_sync_wait = 1")
        return MySQLReader(conn)

    async def conflicts(self) -> int:
        """Galera: certification failures and brute-force aborts, all nodes together."""
        if self.cluster is None:
            return 0
        return sum([s["local_cert_failures"] + s["local_bf_aborts"]
                    for s in [await self.cluster.status(i) for i in range(len(self.ports))]])


class Node:
    """One node of the database, as verify_rows() reads it."""

    def __init__(self, db: Database, port: int) -> None:
        self.db, self.port = db, port

    def __str__(self) -> str:
        return f"{self.db} on port {self.port}"

    async def connect(self) -> MySQLReader:
        return await self.db.connect(self.port)


@dataclass
class Run:
    database: str
    instances: int
    e2e_s: float
    row_writes: int
    cpu: CpuUse  # subject: the persistd processes; server: the database server(s)
    haproxy_cpu: float
    flushes: float
    conflicts: float
    galera_conflicts: int
    resent: int

    @property
    def rate(self) -> float:
        return self.row_writes / self.e2e_s

    def us(self, seconds: float) -> float:
        return 1e6 * seconds / self.row_writes


def start_instance(i: int, url: str, port: int, tmp: Path, log_dir: Path, instance_id: int) -> subprocess.Popen:
    tmp.mkdir(parents=True, exist_ok=True)
    state = tmp / f"state{i}"
    config = tmp / f"persistd{i}.toml"
    config.write_text(f'[server]\nport = {port}\n[database]\nurl = "{url}"\n[state]\ndir = "{state}"\n'
                      f'instance_id = {instance_id}\n[buffer]\nflush_interval = 0.5\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSISTD_")}
    with open(log_dir / f"scale_out-instance{i}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-P", "-m", "persistd", "--config", str(config)],
                                cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)


async def healthy(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    with trio.move_on_after(timeout):
        while process.poll() is None:
            with contextlib.suppress(OSError, BenchError):
                conn = await HttpConnection.open(port)
                try:
                    if (await conn.request("GET", "/health")).status == 200:
                        return
                finally:
                    await conn.aclose()
            await trio.sleep(0.1)
    raise BenchError(f"persistd on port {port} did not become healthy (exit code {process.poll()})")


async def flush_every(ports: list[int]) -> None:
    """/flush on every instance, again while one still holds tasks waiting for their session."""
    for _ in ports:
        waiting = 0
        for port in ports:
            conn = await HttpConnection.open(port)
            try:
                response = await conn.request("POST", FLUSH_PATH)
            finally:
                await conn.aclose()
            if response.status != 200:
                raise BenchError(f"POST /flush on port {port}: HTTP {response.status}: {response.body[:300]!r}")
            waiting += int(response.body.split(b'"tasks_waiting_for_session":')[1].split(b"}")[0])
        if not waiting:
            return
    raise BenchError(f"{waiting} tasks still wait for their session after {len(ports)} passes of /flush")


async def metrics(port: int) -> dict[str, float]:
    conn = await HttpConnection.open(port)
    try:
        return parse_metrics((await conn.request("GET", "/api/v1/system/metrics")).body.decode())
    finally:
        await conn.aclose()


async def run_config(db: Database, instances: int, spread: bool, one_shard: bool, workload: Workload,
                     concurrency: int, tmp: Path) -> Run:
    db.reset()
    ports = [18_101 + i for i in range(instances)]
    processes = [start_instance(i, url, port, tmp / f"{db.name}-{instances}", RESULTS_DIR, 1 if one_shard else i + 1)
                 for i, (url, port) in enumerate(zip(db.urls(instances, spread), ports))]
    try:
        for port, process in zip(ports, processes):
            await healthy(port, process)
        async with HAProxy(tmp / f"haproxy-{db.name}-{instances}", 18_100, [("127.0.0.1", p) for p in ports]) as proxy:
            pids = [p.pid for p in processes]
            galera_before = await db.conflicts()
            before = CpuUse(sum(map(cpu_seconds, pids)), sum(map(cpu_seconds, db.pids)), time.process_time(),
                            machine_busy_seconds())
            haproxy_before = cpu_seconds(proxy.proc.pid)
            stats = SendStats(honour_retry_after=False)
            started = time.perf_counter()
            streams = iter(workload.streams)
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    conn = await HttpConnection.open(proxy.port)
                    nursery.start_soon(send_streams, conn, streams, stats)
            await flush_every(ports)
            reader = await db.connect()
            try:
                (counts,) = await reader.rows(COUNTS_SQL)
            finally:
                reader.close()
            e2e = time.perf_counter() - started
            expected = (len(workload.sessions),) * 2 + (len(workload.tasks),) * 2
            if tuple(map(int, counts)) != expected:
                raise BenchError(f"{db}: (sessions, completed, tasks, completed with text) = {counts}, expected {expected}")
            after = CpuUse(sum(map(cpu_seconds, pids)), sum(map(cpu_seconds, db.pids)), time.process_time(),
                           machine_busy_seconds())
            haproxy_cpu = cpu_seconds(proxy.proc.pid) - haproxy_before
            galera = await db.conflicts() - galera_before
            figures = [await metrics(port) for port in ports]
    finally:
        for process in processes:
            process.terminate()
        codes = [process.wait(timeout=60) for process in processes]
    if any(codes) or any((tmp / f"{db.name}-{instances}" / f"state{i}" / "dead-letter.jsonl").exists()
                         for i in range(instances)):
        raise BenchError(f"{db}, {instances} instances: exit codes {codes}, or dead letters; see {RESULTS_DIR}")
    for port in db.ports:
        await verify_rows(Node(db, port), workload)
    total = {name: sum(f.get(name, 0.0) for f in figures) for name in
             ("persistence_flush_total", "persistence_flush_errors_total", "persistence_flush_conflicts_total")}
    return Run(db.name, instances, e2e, workload.row_writes, after - before, haproxy_cpu,
               total["persistence_flush_total"] + total["persistence_flush_errors_total"],
               total["persistence_flush_conflicts_total"], galera, stats.retries)


def table(runs: list[Run]) -> str:
    one = {r.database: r.rate for r in runs if r.instances == 1}
    lines = ["| database | instances | e2e row-writes/s | × 1 instance | CPU µs a row-write: persistd / database /"
             " HAProxy | machine busy | conflicts: flush attempts (Galera aborts) | 503s resent |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        busy = (r.cpu.machine) / (os.cpu_count() * r.e2e_s)
        base = one.get(r.database)
        lines.append(f"| {r.database} | {r.instances} | {r.rate:,.0f} | {r.rate / base if base else float('nan'):.2f} |"
                     f" {r.us(r.cpu.subject):.1f} / {r.us(r.cpu.server):.1f} / {r.us(r.haproxy_cpu):.1f} |"
                     f" {busy:.0%} | {r.conflicts:.0f} of {r.flushes:.0f} ({r.galera_conflicts}) | {r.resent} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default="mariadb,galera", type=lambda s: s.split(","))
    parser.add_argument("--instances", default="1,2,3", type=lambda s: [int(n) for n in s.split(",")])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--tasks-per-session", type=int, default=2500)
    parser.add_argument("--galera-writes", choices=["spread", "one"], default="spread")
    parser.add_argument("--one-shard", action="store_true")
    return parser.parse_args(argv)


async def bench(args: argparse.Namespace, workload: Workload, tmp: Path) -> list[Run]:
    runs = []
    for name in args.databases:
        async with contextlib.AsyncExitStack() as stack:
            if name == "galera":
                cluster = await stack.enter_async_context(GaleraCluster(tmp / "galera", GALERA_BASE_PORT))
                db = Database(name, cluster.ports, [p.pid for p in cluster.procs], cluster)
            else:
                pid = int(subprocess.run(["pidof", "mariadbd"], capture_output=True, text=True).stdout.split()[0])
                db = Database(name, [MARIADB_PORT], [pid])
            for instances in args.instances:
                runs.append(await run_config(db, instances, args.galera_writes == "spread", args.one_shard, workload,
                                             args.concurrency, tmp))
                r = runs[-1]
                print(f"{name}, {instances} instance(s): {r.rate:,.0f} row-writes/s end to end ({r.e2e_s:.1f} s);"
                      f" conflicts {r.conflicts:.0f} of {r.flushes:.0f} flush attempts, Galera {r.galera_conflicts};"
                      f" verified", flush=True)
            db.reset()
    return runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    print(f"$ {command}\n{code_version()}\n{os.cpu_count()} CPUs shared by the client, HAProxy, every persistd"
          " and every database server", flush=True)
    workload = build_workload(args.sessions, args.tasks_per_session)
    print(f"workload: {args.sessions} sessions x {args.tasks_per_session} tasks, {workload.row_writes:,} row-writes,"
          f" concurrency {args.concurrency}, Galera writes {args.galera_writes}"
          f"{', one task_counts shard for all instances' if args.one_shard else ''}", flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="persistd-scale-") as tmp:
        runs = trio.run(bench, args, workload, Path(tmp))
    print("\n" + table(runs) + f"\n\nCommand: `{command}`")


if __name__ == "__main__":
    run_bench(main)
