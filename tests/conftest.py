"""Shared fixtures: the database of each backend, and persistd started in-process by `run()`
on a free port, spoken to over real HTTP.

Every test that takes the `db` fixture runs once per backend: SQLite (a file in the test's
tmp_path) always, and MySQL/MariaDB too when PERSISTD_TEST_DATABASE_URL names one (.ci/run
sets it). Tests marked `mysql` exercise what only a server has (its privileges, a proxy
that cuts the connection, its statements); they run only when the variable is set, and
are reported as deselected otherwise, never skipped."""

import hashlib
import os
import sqlite3
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import pytest
import trio

from persistd.daemon import (Admit, Claim, Config, DatabaseConfig, DeadLetters, Metrics, SessionIn, TaskIn, Write, micros,
                             buffer_actor, run)

MYSQL_URL = os.environ.get("PERSISTD_TEST_DATABASE_URL", "")
BACKENDS = ["sqlite", "mysql"] if MYSQL_URL else ["sqlite"]
_current: dict[str, str] = {}  # the url of the database the running test's `db` fixture opened


def database_url(tmp_path) -> str:
    """The database a test's daemon writes to: the `db` fixture's, or a SQLite file in
    tmp_path for a test without one."""
    return _current.get("url") or f"sqlite:///{tmp_path / 'persistd.db'}"


def pytest_collection_modifyitems(config, items):
    if not MYSQL_URL:
        mysql_only = [item for item in items if item.get_closest_marker("mysql")]
        if mysql_only:
            config.hook.pytest_deselected(items=mysql_only)
            items[:] = [item for item in items if not item.get_closest_marker("mysql")]

# Spec §1.3, every route there is; {id} stands for any placeholder name.
SPEC_ROUTES = {
    "/api/v1/translation/sessions/batch", "/api/v1/translation/tasks/batch", "/api/v1/translation/flush",
    "/api/v1/translation/sessions", "/api/v1/translation/sessions/{id}", "/api/v1/translation/sessions/{id}/tasks",
    "/api/v1/translation/tasks/{id}", "/api/v1/translation/tasks",
    "/api/v1/translation/recovery/incomplete-sessions", "/api/v1/translation/recovery/restore/{id}",
    "/api/v1/translation/sessions/cleanup", "/api/v1/translation/stats",
    "/health", "/api/v1/system/metrics",
}


def make_config(tmp_path, **sections) -> Config:
    """A test config: port 0, the test's database (database_url), a private state dir, fast flushes."""
    base = {
        "server": {"port": 0, "graceful_timeout": 0.5},
        "database": {"url": database_url(tmp_path), "connect_timeout": 2, "ping_timeout": 1},
        "buffer": {"flush_interval": 0.2, "flush_timeout": 5, "shutdown_timeout": 5, "retry_max": 0.5},
        "state": {"dir": str(tmp_path / "state")},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return msgspec.convert(base, Config)


# task_counts by bucket (the sum of its instances' rows) without the empty ones, and what a
# recount of the tasks makes of it: equal whenever persistd has kept the counts exact.
KEPT_COUNTS = ("SELECT session_id, status, created_hour, SUM(tasks), SUM(duration_ms_sum), SUM(durations)"
               " FROM task_counts GROUP BY 1, 2, 3"
               " HAVING SUM(tasks) <> 0 OR SUM(duration_ms_sum) <> 0 OR SUM(durations) <> 0 ORDER BY 1, 2, 3")
RECOUNT = ("SELECT session_id, status, {hour} AS created_hour, COUNT(*), COALESCE(SUM(duration_ms), 0),"
           " COUNT(duration_ms) FROM translation_tasks GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")


class MysqlDb:
    """Direct SQL for setting up and checking what persistd wrote (MySQL)."""

    backend = "mysql"
    RECOUNTED = RECOUNT.format(hour="TIMESTAMP(DATE_FORMAT(created_at, '%Y-%m-%d %H:00:00'))")

    def __init__(self, url: str = MYSQL_URL) -> None:
        from persistd.mysql import MySQLStore
        self.url = url
        self.store = MySQLStore(msgspec.convert({"url": url}, DatabaseConfig))

    async def query(self, sql: str, *args):
        async with self.store.db.connection() as conn:
            async with conn.cursor() as cursor:
                await cursor.execute(sql, args or None)
                return await cursor.fetchall()

    async def reset(self) -> None:
        await self.store.open()
        for table in ("task_counts", "translation_tasks", "translation_sessions"):
            await self.store.writer.query(f"DELETE FROM {table}")
        self.store.close_writer()

    def close(self) -> None:
        self.store.close()


def naive_utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None)


class SqliteDb:
    """The same for SQLite: `%s` placeholders become `?`, datetimes the INTEGER seconds the
    columns hold, and the time columns come back as naive UTC datetimes, as from MySQL."""

    backend = "sqlite"
    RECOUNTED = RECOUNT.format(hour="created_at / 3600 * 3600")
    TIMES = ("created_at", "updated_at", "start_time", "end_time", "created_hour")

    def __init__(self, path) -> None:
        from persistd.sqlite import SQLiteStore
        self.url = f"sqlite:///{path}"
        self.store = SQLiteStore(msgspec.convert({"url": self.url}, DatabaseConfig))

    async def query(self, sql: str, *args):
        from persistd.sqlite import db_args

        def run_query():
            conn = sqlite3.connect(self.store.path, isolation_level=None)
            try:
                cursor = conn.execute("PRAGMA foreign_keys = ON")
                cursor = conn.execute(sql.replace("%s", "?"), db_args(list(args)))
                names = [c[0] for c in cursor.description or ()]
                return tuple(tuple(naive_utc(v) if n in self.TIMES and isinstance(v, int) else v
                                   for n, v in zip(names, row)) for row in cursor.fetchall())
            finally:
                conn.close()

        return await trio.to_thread.run_sync(run_query)

    async def reset(self) -> None:
        await self.store.open()  # a new file: tmp_path is the test's own
        self.store.close()

    def close(self) -> None:
        self.store.close()


class Db:
    """What every test's database offers, whichever the backend: query(), insert() and the
    check that the kept task counts are exact."""

    def __init__(self, backend: str, tmp_path, url: str = MYSQL_URL) -> None:
        self.impl = MysqlDb(url) if backend == "mysql" else SqliteDb(tmp_path / "persistd.db")
        self.backend, self.url, self.store = self.impl.backend, self.impl.url, self.impl.store

    async def query(self, sql: str, *args):
        return await self.impl.query(sql, *args)

    async def insert(self, table: str, rows: list[dict], chunk: int = 500, recount: bool = True) -> None:
        """Rows straight into a table (old rows, large data sets), bypassing persistd;
        tasks are then counted as persistd counts them at its start, unless `recount` is
        False (rows written behind persistd's back; SQLite's triggers count them anyway)."""
        columns = list(rows[0])
        for i in range(0, len(rows), chunk):
            part = rows[i:i + chunk]
            values = ",".join(["(" + ",".join(["%s"] * len(columns)) + ")"] * len(part))
            await self.query(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}",
                             *[row[c] for row in part for c in columns])
        if table == "translation_tasks" and recount:
            await self.store.recount()

    async def assert_counts_exact(self) -> None:
        assert await self.query(KEPT_COUNTS) == await self.query(self.impl.RECOUNTED)

    async def analyze(self) -> None:
        """Fresh table statistics (MySQL's row estimates in the stats come from them)."""
        await self.query("ANALYZE TABLE translation_sessions, translation_tasks" if self.backend == "mysql" else "ANALYZE")


@asynccontextmanager
async def open_db(backend: str, tmp_path):
    """The test database of `backend`, emptied. Fails (never skips) when it cannot be reached."""
    database = Db(backend, tmp_path)
    try:
        await database.impl.reset()
    except Exception as exc:  # noqa: BLE001 - any failure here means no database
        pytest.fail(f"test database {database.url} is unreachable: {exc}")
    _current["url"] = database.url
    try:
        yield database
    finally:
        _current.clear()
        database.impl.close()


@pytest.fixture(params=BACKENDS)
async def db(request, tmp_path):
    """The test's database, once per backend."""
    async with open_db(request.param, tmp_path) as database:
        yield database


def mysql_only(test):
    """A test of what only a MySQL server has (privileges, a connection cut by a proxy, its
    statements): its `db` is MySQL's alone, and it is deselected when none is configured."""
    return pytest.mark.mysql(pytest.mark.parametrize("db", ["mysql"], indirect=True)(test))


@asynccontextmanager
async def scratch_database(name: str, user: tuple[str, str, str] | None = None):
    """A database of its own, created empty and dropped afterwards, for a test that changes
    its tables or its grants. With `user` (name, password, privileges), an account that
    has just those privileges on it. Yields the url persistd connects with."""
    root = MysqlDb()
    parts = urlsplit(MYSQL_URL)._replace(path=f"/{name}")
    if user is not None:
        login, password, privileges = user
        parts = parts._replace(netloc=f"{login}:{password}@{parts.hostname}:{parts.port or 3306}")
    try:
        await root.query(f"DROP DATABASE IF EXISTS `{name}`")
        await root.query(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        if user is not None:
            await root.query(f"DROP USER IF EXISTS '{login}'@'%'")
            await root.query(f"CREATE USER '{login}'@'%' IDENTIFIED BY '{password}'")
            await root.query(f"GRANT {privileges} ON `{name}`.* TO '{login}'@'%'")
        yield urlunsplit(parts)
    finally:
        if user is not None:
            await root.query(f"DROP USER IF EXISTS '{login}'@'%'")
        await root.query(f"DROP DATABASE IF EXISTS `{name}`")
        root.close()


class Daemon:
    def __init__(self, cfg: Config, port: int, client: httpx.AsyncClient, stop: trio.Event) -> None:
        self.cfg, self.port, self.client, self.stop = cfg, port, client, stop
        self.url = f"http://127.0.0.1:{port}"

    async def post(self, path: str, body=None, **kwargs) -> httpx.Response:
        if body is not None:
            kwargs["content"] = msgspec.json.encode(body)
            kwargs.setdefault("headers", {"content-type": "application/json"})
        return await self.client.post(path, **kwargs)

    async def get(self, path: str, **kwargs) -> httpx.Response:
        return await self.client.get(path, **kwargs)

    async def flush(self) -> dict:
        response = await self.post("/api/v1/translation/flush")
        assert response.status_code == 200, response.text
        return response.json()


@asynccontextmanager
async def running(cfg: Config):
    """persistd on a free port until the block ends, then a clean shutdown."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(run, cfg, stop)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield Daemon(cfg, port, client, stop)
        stop.set()


class BufferAlone:
    """The buffer actor on its own, under the test's clock: the test plays the http actor
    (through `to_buffer`) and the flusher (`jobs`, and Written/Failed into `to_buffer`)."""

    def __init__(self, tmp_path, **buffer) -> None:
        self.cfg = make_config(tmp_path, buffer={"flush_interval": 2, "flush_rows": 1000, **buffer})
        self.to_buffer, self.inbox = trio.open_memory_channel(64)
        self.to_flusher, self.jobs = trio.open_memory_channel(1)
        self.dead_letters = DeadLetters(tmp_path / "dead.jsonl", Metrics())

    def start(self, nursery) -> "BufferAlone":
        nursery.start_soon(buffer_actor, self.cfg, self.inbox, self.to_flusher, None, self.dead_letters)
        return self

    async def ask(self, message_type, *args):
        reply, replies = trio.open_memory_channel(1)
        await self.to_buffer.send(message_type(*args, reply))
        return await replies.receive()

    async def accept(self, key: str, rows: list, at, body: bytes = b"") -> None:
        """As the http actor takes a batch: room claimed first, then the rows in it."""
        claim = await self.ask(Admit, key, len(body))
        assert isinstance(claim, Claim), f"refused, Retry-After {claim} s"
        assert await self.ask(Write, key, rows, body, micros(at), claim) is True

    async def write(self, key: str, rows: list[dict], at) -> None:
        row_type = SessionIn if key == "sessions" else TaskIn
        await self.accept(key, [msgspec.convert(r, row_type) for r in rows], at)


@pytest.fixture
async def daemon(db, tmp_path):
    async with running(make_config(tmp_path)) as d:
        yield d


@pytest.fixture
async def slow_daemon(db, tmp_path):
    """A daemon whose buffer is written only when asked (or after 30 s, or 100,000 rows)."""
    async with running(make_config(tmp_path, buffer={"flush_interval": 30, "flush_rows": 100_000})) as d:
        yield d


# ── raw sockets ──────────────────────────────────────────────────────────────────────

OPEN: list = []  # every client connection of the running test, closed after it


@pytest.fixture
async def close_raw_clients():
    """Closes every Raw connection the test opened."""
    yield
    for stream in OPEN:
        await stream.aclose()
    OPEN.clear()


def raw_request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    """An HTTP/1.1 request as bytes; `headers` add to (or replace) the usual ones."""
    fields = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body)),
              **{k.replace("_", "-"): v for k, v in headers.items()}}
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
            + "\r\n").encode() + body


class Raw:
    """One client connection that sends exactly the bytes it is given."""

    def __init__(self, stream):
        self.stream, self.buf = stream, b""
        OPEN.append(stream)

    @classmethod
    async def open(cls, process) -> "Raw":
        return cls(await trio.open_tcp_stream("127.0.0.1", process.port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def response(self) -> tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin1").split("\r\n")
        headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
        size = int(headers.get("content-length", 0))
        while len(self.buf) < size:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(self.buf)
            self.buf += data
        body, self.buf = self.buf[:size], self.buf[size:]
        return int(lines[0].split()[1]), headers, body

    async def closed_within(self, seconds: float) -> float | None:
        """Seconds until the server closes the connection, or None if it is still open."""
        started = trio.current_time()
        with trio.move_on_after(seconds):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            return trio.current_time() - started
        return None


# ── rows ─────────────────────────────────────────────────────────────────────────────

SESSION_ID = "550e8400-e29b-41d4-a716-446655440000"


def session(session_id: str = SESSION_ID, **fields) -> dict:
    return {"session_id": session_id, "filename": "game.xlsx", "file_path": "/uploads/game.xlsx",
            "status": "processing", "llm_provider": "openai", **fields}


def task(task_id: str = "task_001", session_id: str = SESSION_ID, **fields) -> dict:
    return {"task_id": task_id, "session_id": session_id, "batch_id": "batch_001",
            "sheet_name": "Dialogue", "row_index": 10, "column_name": "Text",
            "source_text": "Hello, adventurer!", "status": "pending", **fields}


# ── credentials ──────────────────────────────────────────────────────────────────────


def key_line(name: str, scopes: str, key: str) -> str:
    """The keys file's line that admits `key` with `scopes` (persistd --new-key prints one)."""
    return f"{name} {scopes} sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def keys_file(tmp_path, *lines: str):
    path = tmp_path / "keys"
    path.write_text("# name scopes hash\n" + "\n".join(lines) + "\n")
    return path
