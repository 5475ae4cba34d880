"""A TCP proxy in front of the test database, for simulating outages.

    async with tcp_proxy() as proxy:        # listens on 127.0.0.1:<proxy.port>
        ...                                 # forwards every connection to 127.0.0.1:3306
        await proxy.cut()                   # forwarded connections closed, new ones refused
        await proxy.restore()               # listening again on the same port
        proxy.stall()                       # connections stay open, but no byte gets through
        await proxy.restore()               # bytes flow again

It runs in the test's trio loop, so an in-process daemon and a daemon started as a
subprocess can both be pointed at it.
"""

from __future__ import annotations

import socket
import sqlite3
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import trio

from conftest import MYSQL_URL

COPY_BYTES = 65536


class Proxy:
    def __init__(self, nursery: trio.Nursery, target_host: str, target_port: int) -> None:
        self._nursery = nursery
        self._target = (target_host, target_port)
        self._listening: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._connections: set[trio.CancelScope] = set()
        self._all_closed = trio.Event()
        self._all_closed.set()
        self._flowing = trio.Event()
        self._flowing.set()
        self.port = 0
        self.connections_made = 0

    def url(self, database_url: str = MYSQL_URL) -> str:
        """`database_url` with its host and port replaced by the proxy's."""
        parts = urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def _listen(self) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        listener = trio.SocketListener(sock)
        self._listening, self._stopped = trio.CancelScope(), trio.Event()
        self._nursery.start_soon(self._accept_loop, listener, self._listening, self._stopped)

    async def _accept_loop(self, listener: trio.SocketListener, scope: trio.CancelScope,
                           stopped: trio.Event) -> None:
        try:
            with scope:
                async with listener:
                    while True:
                        client = await listener.accept()
                        self.connections_made += 1
                        # Registered before the task starts, so that cut() reaches it.
                        connection = trio.CancelScope()
                        self._connections.add(connection)
                        self._all_closed = trio.Event()
                        self._nursery.start_soon(self._forward, client, connection)
        finally:
            stopped.set()

    async def _forward(self, client: trio.SocketStream, scope: trio.CancelScope) -> None:
        with scope:
            try:
                async with client:
                    await self._flowing.wait()
                    try:
                        server = await trio.open_tcp_stream(*self._target)
                    except OSError:
                        return
                    async with server, trio.open_nursery() as pumps:
                        pumps.start_soon(self._pump, client, server, pumps.cancel_scope)
                        pumps.start_soon(self._pump, server, client, pumps.cancel_scope)
            finally:
                self._connections.discard(scope)
                if not self._connections:
                    self._all_closed.set()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await source.receive_some(COPY_BYTES)
                if not data:
                    break
                await self._flowing.wait()  # what arrived during a stall waits for restore()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()  # one side hung up: close both

    async def cut(self) -> None:
        """Close every forwarded connection and stop listening: new connections are refused."""
        if self._listening is not None:
            self._listening.cancel()
            await self._stopped.wait()
            self._listening = None
        for scope in list(self._connections):
            scope.cancel()
        await self._all_closed.wait()

    def stall(self) -> None:
        """Keep every connection open and accept new ones, but forward nothing: a database
        that stopped answering (a network partition), not one that refuses."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    async def restore(self) -> None:
        """After cut(): listen again, on the same port. After stall(): forward again."""
        self._flowing.set()
        if self._listening is None:
            await self._listen()


@asynccontextmanager
async def tcp_proxy(target_host: str | None = None, target_port: int | None = None):
    """A Proxy to the test database (by default the host and port of MYSQL_URL)."""
    parts = urlsplit(MYSQL_URL)
    async with trio.open_nursery() as nursery:
        proxy = Proxy(nursery, target_host or parts.hostname or "127.0.0.1", target_port or parts.port or 3306)
        await proxy._listen()
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


class LockedFile:
    """SQLite's outage: another connection holds the file's write lock (BEGIN EXCLUSIVE).
    persistd's writes wait `[database] write_timeout` for it, then fail with SQLITE_BUSY
    and are retried; reads go on (WAL)."""

    def __init__(self, db) -> None:
        self._url, self._path, self._conn = db.url, db.store.path, None

    def url(self) -> str:
        return self._url

    async def cut(self) -> None:
        self._conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        await trio.to_thread.run_sync(self._conn.execute, "BEGIN EXCLUSIVE")

    async def restore(self) -> None:
        conn, self._conn = self._conn, None
        await trio.to_thread.run_sync(conn.rollback)
        conn.close()


@asynccontextmanager
async def database_outage(db):
    """What takes `db`'s database away and gives it back: a Proxy for MySQL (point persistd
    at outage.url()), a LockedFile for SQLite. Either way: `await outage.cut()`,
    `await outage.restore()`."""
    if db.backend == "mysql":
        async with tcp_proxy() as proxy:
            yield proxy
    else:
        outage = LockedFile(db)
        try:
            yield outage
        finally:
            if outage._conn is not None:
                await outage.restore()
