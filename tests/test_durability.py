"""Durability: every row acknowledged with 202 reaches MySQL, and each key's final state is
its last acknowledged write, through kill -9, a MySQL outage and restarts. A batch refused
(any answer but 202) has none of its rows stored. A batch whose request got no answer (the
kill reset the connection) may or may not be stored.

persistd runs as a real process (`python -m persistd --config <toml>`, tests/processes.py).
The load comes from concurrent clients in the test process, each on its own connection.
Every write is recorded, key by key in the order it was sent, with its outcome: acked
(202), refused (any other answer) or unknown (no answer). Writes to one key never overlap:
a key is written again only once the outcome of its previous write is known. Every request
carries its own batch_id, so each write leaves a state of its own in MySQL, and the state
found there tells which write it came from.

The stored state of a key must be one of these:
- the state of its last acked write;
- the state of an unknown write sent after the last acked write;
- if it has no acked write: no row at all, or the state of one of its unknown writes.
Never the state of a refused write, and never an older state than the last acked one.
"""

import os
import random
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import httpx
import pytest
import trio

from conftest import SESSION_ID, session, task
from processes import encode, persistd_process
from proxy import database_outage

SESSIONS = "/api/v1/translation/sessions/batch"
TASKS = "/api/v1/translation/tasks/batch"
FLUSH = "/api/v1/translation/flush"

JOURNAL = {"mode": "fsync"}  # the [journal] section of the outage test's daemon

# The seed fixes each round's config, client count and moment of the kill; set
# PERSISTD_TEST_SEED to repeat them. What the clients send also depends on timing.
SEED = int(os.environ.get("PERSISTD_TEST_SEED") or random.SystemRandom().randrange(2**32))

SOURCES = ("Hello, adventurer!", "勇者よ、目を覚ませ。", "The dragon sleeps beneath the mountain.",
           "传说中的剑就在这里 ⚔️", "Press any key to continue", "Il était une fois…", "체력이 부족합니다!",
           "Quest complete: 🗝️ the old key")

ACKED, REFUSED, UNKNOWN = "acked", "refused", "unknown"
ABSENT = None  # the stored "state" of a key that has no row

RETRY_CAP_S = 0.5  # clients respect Retry-After, but never sleep longer than this


# ── what was sent, and what it may have left in MySQL ─────────────────────────────────


@dataclass(slots=True)
class Write:
    state: tuple
    outcome: str
    round: int
    at: float  # trio.current_time() when the outcome was known


@dataclass
class Ledger:
    """Every write sent, per key ("task"/"session", id) in the order sent, with its outcome;
    the answers that break the interface; the keys whose completing write is still due."""

    writes: dict[tuple[str, str], list[Write]] = field(default_factory=lambda: defaultdict(list))
    unexpected: list[str] = field(default_factory=list)
    awaiting_second_write: list[str] = field(default_factory=list)
    rows: Counter = field(default_factory=Counter)  # outcome -> rows
    answers: Counter = field(default_factory=Counter)  # "202", "503 BUFFER_FULL", ...
    kills: dict[int, float] = field(default_factory=dict)  # round -> trio.current_time() of its kill
    session_counter: int = 0

    def record(self, states: dict, outcome: str, round_no: int) -> None:
        now = trio.current_time()
        for key, state in states.items():
            self.writes[key].append(Write(state, outcome, round_no, now))
        self.rows[outcome] += len(states)

    def allowed(self, key) -> list:
        """The states MySQL may hold for `key` (ABSENT for no row)."""
        writes = self.writes[key]
        acked = [i for i, w in enumerate(writes) if w.outcome == ACKED]
        if acked:
            last = acked[-1]
            return [writes[last].state] + [w.state for w in writes[last + 1:] if w.outcome == UNKNOWN]
        return [ABSENT] + [w.state for w in writes if w.outcome == UNKNOWN]


def task_state(row: dict) -> tuple:
    confidence = row.get("confidence")
    return (row["status"], row["batch_id"], row.get("target_text"),
            None if confidence is None else f"{confidence:.4f}")


def session_state(row: dict) -> tuple:
    return (row["status"], row["completed_tasks"])


async def stored_states(db) -> dict:
    stored = {}
    for task_id, status, batch_id, target_text, confidence in await db.query(
            "SELECT task_id, status, batch_id, target_text, confidence FROM translation_tasks"):
        stored[("task", task_id)] = (status, batch_id, target_text, None if confidence is None else f"{confidence:.4f}")
    for session_id, *state in await db.query("SELECT session_id, status, completed_tasks FROM translation_sessions"):
        stored[("session", session_id)] = tuple(state)
    return stored


def judge(ledger: Ledger, stored: dict) -> str:
    """'' if every key holds an allowed state; otherwise what is wrong, by kind, with examples."""
    problems: dict[str, list] = defaultdict(list)
    for key, writes in ledger.writes.items():
        got = stored.get(key, ABSENT)
        if got in ledger.allowed(key):
            continue
        sent = defaultdict(list)  # outcome -> states
        for w in writes:
            sent[w.outcome].append(w.state)
        if got is ABSENT:
            kind = "acknowledged, not in MySQL (lost)"
        elif got in sent[ACKED] or got in sent[UNKNOWN]:
            kind = "an older state than the last acknowledged write"
        elif got in sent[REFUSED]:
            kind = "the state of a refused batch"
        else:
            kind = "a state that was never sent"
        problems[kind].append((key, got, writes))
    for key in stored.keys() - ledger.writes.keys():
        problems["a row that was never sent"].append((key, stored[key], []))
    if not problems:
        return ""

    lines = [f"seed {SEED}: {sum(map(len, problems.values()))} keys hold a state they may not"
             + f" ({len(ledger.writes)} keys written)"]
    for kind, cases in problems.items():
        lines.append(f"- {len(cases)} keys: {kind}")
        if kind.endswith("(lost)"):
            # When were the lost writes acknowledged, relative to the kill that ended their round?
            by_round = Counter()
            before_kill = []
            for _, _, writes in cases:
                last_ack = [w for w in writes if w.outcome == ACKED][-1]
                by_round[last_ack.round] += 1
                if last_ack.round in ledger.kills:
                    before_kill.append(max(0.0, ledger.kills[last_ack.round] - last_ack.at))
            lines.append("    by round of the lost acknowledgement: "
                         + ", ".join(f"round {r}: {n}" for r, n in sorted(by_round.items())))
            if before_kill:
                lines.append(f"    acknowledged {min(before_kill):.2f}..{max(before_kill):.2f} s before the kill")
        for key, got, writes in cases[:4]:
            history = "; ".join(f"{w.outcome} in round {w.round}: {w.state}" for w in writes[-4:])
            if len(writes) > 4:
                history = f"({len(writes) - 4} earlier) ... {history}"
            lines.append(f"    {key[0]} {key[1]}: stored {got}; writes: {history}")
    return "\n".join(lines)


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP-date); None if missing or malformed."""
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# ── the load ─────────────────────────────────────────────────────────────────────────


class Load:
    """Clients sending task batches of 100..1000 rows: first writes of new keys ("pending"),
    and completing writes ("completed", with target_text and confidence) of keys whose first
    write has an outcome. Every task key is written at most twice. One more client updates
    the session now and then (its completed_tasks counts up, so each write is its own state).

    With `retry`, a client resends a refused batch after Retry-After (capped at
    RETRY_CAP_S) until it is acknowledged or the load stops; without, it moves on to the next
    batch. `invalid_ratio` of the batches carry one invalid row, and must be refused whole."""

    def __init__(self, ledger: Ledger, round_no: int, url: str, *, retry: bool, invalid_ratio: float) -> None:
        self.ledger, self.round, self.url = ledger, round_no, url
        self.retry, self.invalid_ratio = retry, invalid_ratio
        self.stop = trio.Event()  # no new batches after this
        self.killed = trio.Event()  # set just before the kill: transport errors are expected after it

    def client(self):
        return httpx.AsyncClient(base_url=self.url, timeout=30, limits=httpx.Limits(max_connections=1))

    def task_batch(self, rng: random.Random, c: int, n: int) -> tuple[list[dict], dict, bool, bool]:
        """(rows, their states by key, whether all rows are valid, whether these are first writes)"""
        batch_id = f"r{self.round:02d}-c{c}-b{n:04d}"
        size = rng.randint(100, 1000)
        pool = self.ledger.awaiting_second_write
        rows = []
        first_writes = not (len(pool) >= size // 2 and rng.random() < 0.5)
        if not first_writes:
            for _ in range(min(size, len(pool))):
                i = rng.randrange(len(pool))
                pool[i], pool[-1] = pool[-1], pool[i]
                task_id = pool.pop()
                number = int(task_id.rsplit("-", 1)[1])
                source = SOURCES[number % len(SOURCES)]
                rows.append(task(task_id, batch_id=batch_id, row_index=number, source_text=source,
                                 status="completed", target_text=f"«{source}» ({batch_id})",
                                 confidence=rng.randint(5000, 10000) / 10000, duration_ms=rng.randint(50, 5000)))
        else:
            for i in range(size):
                rows.append(task(f"{batch_id}-{i:04d}", batch_id=batch_id, row_index=i,
                                 sheet_name=f"Sheet{c}", source_text=SOURCES[i % len(SOURCES)]))
        valid = rng.random() >= self.invalid_ratio
        if not valid:
            rows[rng.randrange(len(rows))]["status"] = "finished"  # not a task status: 422
        return rows, {("task", row["task_id"]): task_state(row) for row in rows}, valid, first_writes

    async def send(self, http: httpx.AsyncClient, path: str, key: str, rows: list[dict], states: dict,
                   valid: bool) -> tuple[str, httpx.Response | None]:
        try:
            response = await http.post(path, content=encode(key, rows), headers={"content-type": "application/json"})
        except httpx.TransportError as exc:
            if not self.killed.is_set():
                self.ledger.unexpected.append(f"{path}: no answer while the daemon was running: {exc!r}")
            self.ledger.record(states, UNKNOWN, self.round)
            return UNKNOWN, None
        self.check_answer(path, response, valid)
        outcome = ACKED if response.status_code == 202 else REFUSED
        self.ledger.record(states, outcome, self.round)
        return outcome, response

    def check_answer(self, path: str, response: httpx.Response, valid: bool) -> None:
        """202; 503 BUFFER_FULL with Retry-After; 422 VALIDATION_ERROR for an invalid row."""
        code = response.status_code
        error_code = response.json().get("error_code") if code != 202 else None
        self.ledger.answers[f"{code} {error_code or ''}".strip()] += 1
        if code == 202 and valid:
            return
        if code == 503 and error_code == "BUFFER_FULL":
            if retry_after_seconds(response.headers.get("retry-after")) is None:
                self.ledger.unexpected.append(f"{path}: 503 without a valid Retry-After: {dict(response.headers)}")
            return
        if code == 422 and error_code == "VALIDATION_ERROR" and not valid:
            return
        what = "a batch with an invalid row" if not valid else "a valid batch"
        self.ledger.unexpected.append(f"{path}: {code} for {what}: {response.text[:300]}")

    async def tasks(self, c: int, rng: random.Random) -> None:
        async with self.client() as http:
            n = 0
            while not self.stop.is_set():
                rows, states, valid, first_writes = self.task_batch(rng, c, n)
                n += 1
                while True:
                    outcome, response = await self.send(http, TASKS, "tasks", rows, states, valid)
                    if outcome != REFUSED or not self.retry or response.status_code != 503 or self.stop.is_set():
                        break
                    await trio.sleep(min(retry_after_seconds(response.headers.get("retry-after")) or 0, RETRY_CAP_S))
                if first_writes:  # these keys may now be completed
                    self.ledger.awaiting_second_write.extend(row["task_id"] for row in rows)
                if outcome == UNKNOWN:
                    return
                if outcome == REFUSED:
                    await trio.sleep(rng.uniform(0.02, 0.2))

    async def sessions(self) -> None:
        async with self.client() as http:
            while not self.stop.is_set():
                self.ledger.session_counter += 1
                row = session(status="processing", total_tasks=1_000_000, completed_tasks=self.ledger.session_counter)
                while True:
                    outcome, response = await self.send(http, SESSIONS, "sessions", [row],
                                                         {("session", SESSION_ID): session_state(row)}, True)
                    if outcome != REFUSED or not self.retry or response.status_code != 503 or self.stop.is_set():
                        break
                    await trio.sleep(min(retry_after_seconds(response.headers.get("retry-after")) or 0, RETRY_CAP_S))
                if outcome == UNKNOWN:
                    return
                await trio.sleep(0.2)

    def start(self, nursery: trio.Nursery, clients: int, seed: str) -> None:
        for c in range(clients):
            nursery.start_soon(self.tasks, c, random.Random(f"{seed}-client-{c}"))
        nursery.start_soon(self.sessions)


async def write_first_session(ledger: Ledger, process) -> None:
    """The session, acknowledged and written, so that its tasks are written, not held."""
    async with httpx.AsyncClient(base_url=process.url, timeout=30) as http:
        row = session(status="processing", total_tasks=1_000_000, completed_tasks=0)
        response = await http.post(SESSIONS, content=encode("sessions", [row]),
                                   headers={"content-type": "application/json"})
        assert response.status_code == 202, response.text
        ledger.record({("session", SESSION_ID): session_state(row)}, ACKED, 0)
        assert (await http.post(FLUSH)).status_code == 200


def summary(ledger: Ledger) -> str:
    return (f"rows acked {ledger.rows[ACKED]}, refused {ledger.rows[REFUSED]}, unknown {ledger.rows[UNKNOWN]}; "
            f"answers {dict(ledger.answers)}")


# ── kill -9 in a loop ────────────────────────────────────────────────────────────────

ROUNDS = 12


# A client whose upload the kill cuts off leaves httpx's body iterator to the garbage
# collector; that is the client's side of an unanswered request, not a defect.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object ByteStream.__aiter__:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("mode", ["fsync", "write"])  # both promise that a 202 survives kill -9
async def test_kill_9_in_a_loop_loses_no_acknowledged_row(db, tmp_path, mode):
    """Twelve rounds of: start persistd on the state dir the last one left, load it from
    2..4 clients, kill -9 at a random moment (0.1..2 s into the load), wait for the exit.
    The rounds vary flush_interval (0.5..2 s), flush_rows and max_rows (3,000 in some rounds,
    so that batches are refused with 503), so the kill finds acknowledged rows that are only
    in memory and the journal, and sometimes a flush in progress. Then a last start and
    POST /flush: every acknowledged row is in MySQL with its last acknowledged state (or
    the state of a later unanswered write), and no row of a refused batch is."""
    print(f"seed {SEED} (PERSISTD_TEST_SEED={SEED} repeats the rounds' configs and kill moments)")
    ledger = Ledger()
    started = trio.current_time()
    for round_no in range(ROUNDS):
        rng = random.Random(f"{SEED}-round-{round_no}")
        buffer = {"flush_interval": round(rng.uniform(0.5, 2.0), 2),
                  "flush_rows": rng.choice([1000, 100_000]),
                  "max_rows": rng.choice([3000, 20_000]),
                  "flush_timeout": 20.0}
        clients, kill_after = rng.randint(2, 4), rng.uniform(0.1, 2.0)
        with trio.fail_after(60):
            starting = trio.current_time()
            async with persistd_process(tmp_path, journal={"mode": mode}, buffer=buffer) as process:
                start_s = trio.current_time() - starting  # including the replay of the journal
                if round_no == 0:
                    await write_first_session(ledger, process)
                load = Load(ledger, round_no, process.url, retry=False, invalid_ratio=0.05)
                before = Counter(ledger.rows)
                async with trio.open_nursery() as nursery:
                    load.start(nursery, clients, f"{SEED}-{round_no}")
                    await trio.sleep(kill_after)
                    load.stop.set()
                    load.killed.set()
                    ledger.kills[round_no] = trio.current_time()
                    code = await process.kill()
                assert code == -signal.SIGKILL, f"persistd exited {code} before the kill\n{process.log()[-4000:]}"
        rows = Counter(ledger.rows)
        rows.subtract(before)
        print(f"round {round_no}: healthy after {start_s:.2f} s; {buffer}, {clients} clients,"
              f" kill -9 after {kill_after:.2f} s: rows acked {rows[ACKED]}, refused {rows[REFUSED]},"
              f" unknown {rows[UNKNOWN]}")

    starting = trio.current_time()
    async with persistd_process(tmp_path, journal={"mode": mode}, buffer={"flush_timeout": 30.0}) as process:
        print(f"last start: healthy after {trio.current_time() - starting:.2f} s")
        async with httpx.AsyncClient(base_url=process.url, timeout=60) as http:
            response = await http.post(FLUSH)
            assert response.status_code == 200, response.text
            assert response.json()["tasks_waiting_for_session"] == 0, response.text
        stored = await stored_states(db)
    print(f"{ROUNDS} rounds in {trio.current_time() - started:.1f} s; {summary(ledger)}; {len(stored)} rows stored")

    problems = judge(ledger, stored)
    assert not problems, f"{problems}\n{summary(ledger)}\nlog: {tmp_path / 'persistd.log'}"
    await db.assert_counts_exact()
    assert not ledger.unexpected, f"seed {SEED}: answers outside the interface:\n" + "\n".join(ledger.unexpected[:20])
    assert ledger.rows[ACKED] and ledger.rows[REFUSED], \
        f"the load must have had batches acknowledged and refused: {summary(ledger)}"


# ── MySQL unreachable for 30 s ───────────────────────────────────────────────────────

OUTAGE_S = 30
OUTAGE_BUFFER = {"max_rows": 20_000, "max_bytes": 32 * 1024 * 1024}
PEAK_RSS_BOUND = 300 * 1024 * 1024  # ~50 MB of process + 20,000 buffered rows (~2 KB each) + generous slack


@dataclass
class HealthSample:
    phase: str
    code: int
    status: str
    total_count: int


async def watch_health(process, phase: list[str], samples: list[HealthSample], stop: trio.Event) -> None:
    async with httpx.AsyncClient(base_url=process.url, timeout=30) as http:
        while not stop.is_set():
            during = phase[0]
            try:
                response = await http.get("/health")
            except httpx.TransportError as exc:
                await trio.sleep(0.5)  # time to notice an exit
                pytest.fail(f"/health got no answer {during} the outage: {exc!r}; persistd exit code"
                            f" {process.proc.returncode}\n--- log ---\n{process.log()[-6000:]}")
            body = response.json()
            samples.append(HealthSample(during, response.status_code, body["status"], body["buffer"]["total_count"]))
            await trio.sleep(0.2)


async def test_database_unreachable_for_30_s_under_load_loses_no_acknowledged_row(db, tmp_path):
    """The database away for 30 s in the middle of a load (MySQL: a TCP proxy the test
    cuts, new connections refused; SQLite: another connection holds the file's write lock,
    writes fail after write_timeout). Clients keep sending and resend refused batches after
    Retry-After (capped at 0.5 s here). Every answer is 202, or 503 BUFFER_FULL with a
    Retry-After header. /health turns degraded (503) during the outage and healthy (200)
    after it. The buffer never holds more than max_rows, and the process's peak RSS stays
    under 300 MB with max_rows = 20,000. After the outage and POST /flush, every
    acknowledged row is in MySQL with its last acknowledged state, and no row that was
    only refused is."""
    ledger = Ledger()
    samples: list[HealthSample] = []
    phase = ["before"]  # before, during, after
    buffer = {"flush_interval": 0.5, "flush_rows": 1000, "flush_timeout": 30.0, **OUTAGE_BUFFER}
    async with database_outage(db) as outage:
        async with persistd_process(tmp_path, journal=JOURNAL, buffer=buffer,
                                    database={"url": outage.url(), "connect_timeout": 2.0, "write_timeout": 5.0}) as process:
            await write_first_session(ledger, process)
            load = Load(ledger, 0, process.url, retry=True, invalid_ratio=0)
            watching = trio.Event()
            async with trio.open_nursery() as nursery:
                load.start(nursery, 3, f"{SEED}-outage")
                nursery.start_soon(watch_health, process, phase, samples, watching)
                await trio.sleep(3)

                await outage.cut()
                phase[0] = "during"
                acked_at_cut = ledger.rows[ACKED]
                await trio.sleep(OUTAGE_S)
                acked_during_cut = ledger.rows[ACKED] - acked_at_cut
                phase[0] = "after"
                await outage.restore()

                with trio.fail_after(30):  # a generous bound on reconnecting and writing the backlog
                    while not any(s.phase == "after" and s.code == 200 for s in samples):
                        await trio.sleep(0.1)
                await trio.sleep(3)
                load.stop.set()  # the clients finish the request in flight, then stop
                watching.set()

            async with httpx.AsyncClient(base_url=process.url, timeout=60) as http:
                response = await http.post(FLUSH)
                assert response.status_code == 200, response.text
            peak_rss = process.peak_rss_bytes()
        stored = await stored_states(db)

    print(f"{summary(ledger)}; acked during the outage: {acked_during_cut} rows; peak RSS {peak_rss / 2**20:.0f} MB; "
          f"health samples {Counter((s.phase, s.code) for s in samples)}")
    assert not ledger.unexpected, "answers other than 202 and 503 + Retry-After:\n" + "\n".join(ledger.unexpected[:20])
    assert ledger.rows[UNKNOWN] == 0
    problems = judge(ledger, stored)
    assert not problems, f"{problems}\n{summary(ledger)}\nlog: {tmp_path / 'persistd.log'}"
    await db.assert_counts_exact()

    assert all((s.code, s.status) in {(200, "healthy"), (503, "degraded")} for s in samples), samples
    assert any(s.phase == "during" and (s.code, s.status) == (503, "degraded") for s in samples), \
        "/health never said degraded while MySQL was unreachable"
    assert any(s.phase == "after" and (s.code, s.status) == (200, "healthy") for s in samples)
    in_cut = [s.total_count for s in samples if s.phase == "during"]
    assert in_cut and max(in_cut) <= OUTAGE_BUFFER["max_rows"], f"buffered rows during the outage: max {max(in_cut)}"
    assert ledger.answers["503 BUFFER_FULL"] > 0, "the buffer never filled during the outage: the test tested nothing"
    assert peak_rss < PEAK_RSS_BOUND, f"peak RSS {peak_rss / 2**20:.0f} MB"
