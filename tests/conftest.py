"""Shared fixtures: the real MariaDB/MySQL at PERSISTD_TEST_DATABASE_URL, and persistd
started in-process by `run()` on a free port, spoken to over real HTTP."""

import hashlib
import os
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import pytest
import trio

from persistd.daemon import (Config, Database, DatabaseConfig, DeadLetters, Metrics, SessionIn, TaskIn, Write,
                             buffer_actor, ensure_schema, read_schema, recount_tasks, run)

DATABASE_URL = os.environ.get("PERSISTD_TEST_DATABASE_URL", "mysql://root@127.0.0.1:3306/persistd_test")

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
    """A test config: port 0, the test database, a private state dir, fast flushes."""
    base = {
        "server": {"port": 0, "graceful_timeout": 0.5},
        "database": {"url": DATABASE_URL, "connect_timeout": 2, "ping_timeout": 1},
        "buffer": {"flush_interval": 0.2, "flush_timeout": 5, "shutdown_timeout": 5, "retry_max": 0.5},
        "state": {"dir": str(tmp_path / "state")},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return msgspec.convert(base, Config)


# task_counts without its empty rows, and what a recount of the tasks makes of it: equal
# whenever persistd has kept the counts exact.
KEPT_COUNTS = ("SELECT session_id, status, created_hour, tasks, duration_ms_sum, durations FROM task_counts"
               " WHERE tasks <> 0 OR duration_ms_sum <> 0 OR durations <> 0 ORDER BY 1, 2, 3")
RECOUNTED = ("SELECT session_id, status, TIMESTAMP(DATE_FORMAT(created_at, '%Y-%m-%d %H:00:00')), COUNT(*),"
             " COALESCE(SUM(duration_ms), 0), COUNT(duration_ms) FROM translation_tasks GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")


class Db:
    """Direct SQL for setting up and checking what persistd wrote."""

    def __init__(self, url: str = DATABASE_URL) -> None:
        self.database = Database(msgspec.convert({"url": url}, DatabaseConfig))

    async def query(self, sql: str, *args):
        async with self.database.connection() as conn:
            async with conn.cursor() as cursor:
                await cursor.execute(sql, args or None)
                return await cursor.fetchall()

    async def insert(self, table: str, rows: list[dict], chunk: int = 1000) -> None:
        """Rows straight into a table (old rows, large data sets), bypassing persistd;
        tasks are then counted as persistd counts them at its start."""
        columns = list(rows[0])
        for i in range(0, len(rows), chunk):
            part = rows[i:i + chunk]
            values = ",".join(["(" + ",".join(["%s"] * len(columns)) + ")"] * len(part))
            await self.query(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}",
                             *[row[c] for row in part for c in columns])
        if table == "translation_tasks":
            async with self.database.connection() as conn:
                await recount_tasks(conn)

    async def assert_counts_exact(self) -> None:
        assert await self.query(KEPT_COUNTS) == await self.query(RECOUNTED)

    async def reset(self) -> None:
        conn = await self.database.connect(create=True)
        try:
            await ensure_schema(conn, read_schema())
            await conn.query("DELETE FROM task_counts")
            await conn.query("DELETE FROM translation_tasks")
            await conn.query("DELETE FROM translation_sessions")
        finally:
            conn.close()


@pytest.fixture
async def db():
    """The test database, emptied. Fails (never skips) when it cannot be reached."""
    database = Db()
    try:
        await database.reset()
    except Exception as exc:  # noqa: BLE001 - any failure here means no database
        pytest.fail(f"test database {DATABASE_URL} is unreachable: {exc}")
    yield database
    database.database.close()


@asynccontextmanager
async def scratch_database(name: str, user: tuple[str, str, str] | None = None):
    """A database of its own, created empty and dropped afterwards, for a test that changes
    its tables or its grants. With `user` (name, password, privileges), an account that
    has just those privileges on it. Yields the url persistd connects with."""
    root = Db()
    parts = urlsplit(DATABASE_URL)._replace(path=f"/{name}")
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
        root.database.close()


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

    async def write(self, key: str, rows: list[dict], at) -> None:
        row_type = SessionIn if key == "sessions" else TaskIn
        assert await self.ask(Write, key, [msgspec.convert(r, row_type) for r in rows], b"", at)


@pytest.fixture
async def daemon(db, tmp_path):
    async with running(make_config(tmp_path)) as d:
        yield d


@pytest.fixture
async def slow_daemon(db, tmp_path):
    """A daemon whose buffer is written only when asked (or after 30 s, or 100,000 rows)."""
    async with running(make_config(tmp_path, buffer={"flush_interval": 30, "flush_rows": 100_000})) as d:
        yield d


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
