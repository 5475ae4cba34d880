"""What a reconciliation pass (issue 12: task_counts recounted and repaired, a slice of
sessions a transaction, compared without locks and recounted under them only where it
drifted) costs on a database: wall time, the daemon-side CPU of this
process, and the slices, on the read benchmark's data set (10,000 sessions, 1,000,000
tasks; load it first with bench/read_path.py --backend BACKEND). Nothing is changed when
the counts are right; with --drift N, the task_counts rows of N sessions are first made
wrong by hand, and the first pass repairs them.

Usage:
  .venv/bin/python bench/reconcile.py URL [--drift N] [--passes 3]
  e.g. mysql://root@127.0.0.1:3306/persistd_readbench
       sqlite:////abs/path/bench-results/persistd_readbench/persistd.db
"""

import argparse
import resource
import time

import msgspec
import trio

from persistd.daemon import RECONCILE_SESSIONS, RECONCILE_TASKS, DatabaseConfig, open_store
from persistd.storage import TASKS


async def one_pass(store) -> tuple[int, int]:
    after, slices, repaired = None, 0, 0
    while True:
        after, wrong = await store.reconcile(after, RECONCILE_SESSIONS, RECONCILE_TASKS)
        repaired += wrong
        if after is None:
            return slices, repaired
        slices += 1


async def main(url: str, drift: int, passes: int) -> None:
    store = open_store(msgspec.convert({"url": url}, DatabaseConfig))
    await store.open()
    tasks = await store.count_rows(TASKS)
    print(f"{url}: {tasks:,} tasks, slices of at most {RECONCILE_SESSIONS} sessions and {RECONCILE_TASKS:,} kept tasks")
    if drift:
        sql = ("UPDATE task_counts SET tasks = tasks + 1 WHERE session_id IN"
               f" (SELECT session_id FROM (SELECT session_id FROM translation_sessions ORDER BY session_id LIMIT {drift}) AS s)")

        async def by_hand(conn) -> None:
            await conn.query(sql)

        await (store._act(lambda conn: conn.execute(sql)) if store.backend == "sqlite" else store._act(by_hand))
    for n in range(passes):
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        slices, repaired = await one_pass(store)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        used = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
        print(f"pass {n + 1}: {wall:.2f} s wall, {used:.2f} CPU s in this process, {slices} slices, {repaired} rows repaired")
    store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--drift", type=int, default=0)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.url, args.drift, args.passes)
