"""persistd: accepts translation progress over HTTP at once, writes it to a database behind.

One trio nursery in `run()` holds the actors. Each is a top-level async function that owns
its state as local variables and talks only through the channel ends it was handed:

    clients ──HTTP──► http actor ──Admit/Write/Flush/Lookup/─► buffer actor ──Job──► flusher actor ──► Store
                      (quart-trio on   Forget/Status/Drain      (sole owner of    ◄──Written/Failed──┘
                       hypercorn's                              unflushed rows)
                       trio worker)    janitor actor ──Flush──►     │ ▲
                                       systemd actor ──Status──►    │ │ Sync answered once on disk
                                                          Append/Release/Sync
                                                                    ▼ │
                                                               journal actor ──► <state dir>/journal/

- http: asks the buffer for room from a batch's Content-Length before reading its body,
  validates it with msgspec at the door and answers 202 once the buffer has taken it and
  the journal has it on disk; nothing the database could refuse is accepted.
  Checks credentials and scopes (Auth, off by default) before a body is read. The app is
  served HTTP/1.1 only, wrapped by guard() (bodies in flight bounded, sends shielded so
  that hypercorn's idle close happens, connections capped), and describes itself at
  /openapi.json and /docs, built at start from the same Structs.
- buffer: coalesces rows by primary key (last accepted write wins), holds tasks whose
  session has not arrived yet, decides when to flush and when to retry, and is the only
  place that knows which rows are not yet in the database, so it tells the journal which
  records may go.
- journal: appends each accepted batch to a segment file before its 202 (group commit:
  one write and one fdatasync for all that arrived meanwhile), deletes segments once
  released. `[journal] mode`: fsync (a 202 survives a power cut), write (a killed
  process), off (no journal: a crash loses what was not yet written).
- flusher: writes one snapshot per job in one transaction over the store's writer
  connection, which is its alone, sessions before tasks, and reports what it wrote or why
  it failed, and whether retrying can help. It has no policy.
- janitor: runs the retention cleanup on a schedule, after the buffer has written out;
  stops between chunks at shutdown.
- systemd (only under systemd's Type=notify): WATCHDOG=1 while the buffer answers, STATUS=.

The database is a Store (persistd/storage.py): MySQL (persistd/mysql.py) or SQLite, the
default (persistd/sqlite.py), picked by the url's scheme; the daemon asks it for operations,
never for connections or SQL. Reads go through the store's small pool; single-row reads lay
the buffer's state over the stored row, and recovery first asks the buffer to write
everything out.

Start: the schema file, the state dir and a database that accepts the schema are checked
first; a fault that is not an outage (`Fatal`) stops the daemon before it listens, and one
found later (the database refusing writes for good) stops it with the journal intact. A
database that does not answer is an outage: batches are accepted and retried. Then the
journal is replayed, then the port is bound (READY=1).

Shutdown is one path: SIGTERM/SIGINT sets `stop` → hypercorn stops accepting and lets
in-flight requests finish → the http actor sends Drain and closes its end → the buffer
hands over its last rows, the flusher writes them (bounded by `shutdown_timeout`; what
cannot be written stays in the journal, or without one goes to the dead-letter file,
never dropped silently) → the buffer closes the flusher's job channel and the journal's
→ the flusher closes its result channel → `run()` returns.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import hashlib
import heapq
import hmac
import importlib.metadata
import importlib.resources
import ipaddress
import itertools
import logging
import math
import operator
import os
import random
import re
import resource
import secrets
import signal
import socket
import stat
import struct
import sys
import time
import tomllib
import typing
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit

import hypercorn.config
import hypercorn.events
import hypercorn.protocol
import hypercorn.protocol.h11
import hypercorn.trio
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import jwt
import werkzeug.routing
import msgspec
import prometheus_client
import trio
from cryptography.hazmat.primitives import serialization
from msgspec import UNSET, Meta, Struct, UnsetType
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

log = logging.getLogger("persistd")

# ── constants ────────────────────────────────────────────────────────────────────────

VERSION = "1.0.0"
UTC = timezone.utc
MAX_BATCH_ROWS = 1000
INT_MAX = 2_147_483_647
TEXT_MAX_BYTES = 65_535  # MySQL TEXT, counted in UTF-8 bytes
JSON_MAX_BYTES = 65_535  # our bound for game_info / metadata, so one row always fits a packet
JSON_MAX_DEPTH = 31  # MariaDB's JSON_VALID refuses 32 levels of nesting; MySQL 8 allows 100
TIMESTAMP_MIN = datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)
TIMESTAMP_MAX = datetime(2038, 1, 19, 3, 14, 7, tzinfo=UTC)
SQLITE_DEFAULT_FILE = "persistd.db"  # in the state dir, when no [database] url is set
INSTANCE_FILE = "instance"  # in the state dir: the instance id chosen at the first start
# A write's version: its accept time in µs since VERSION_EPOCH_US (2020-01-01, so that a
# signed 64-bit integer holds it until 2091), with the id of the instance that accepted it in
# the low INSTANCE_BITS bits. Rows only ever move to a higher version.
INSTANCE_BITS = 12
VERSION_EPOCH_US = 1_577_836_800_000_000
# Versions never go back across restarts either, whatever the wall clock does meanwhile: a
# start gives out versions from <state dir>/clock on, a lease CLOCK_LEASE_S ahead of the
# clock (or of that start's lease), renewed every CLOCK_RENEW_S. A restart more than
# CLOCK_LEASE_S after the last renewal, with a clock that did not step back, is unaffected;
# a quicker one gives out versions up to that much ahead of its clock for as long.
CLOCK_FILE = "clock"
CLOCK_LEASE_S = 1.0
CLOCK_RENEW_S = 0.25
CLOCK_SKEW_WARN_S = 0.05  # an instance whose clock is further from the database's says so

STATEMENT_MAX_ROWS = 1000
STATEMENT_MAX_BYTES = 4 * 1024 * 1024  # well under max_allowed_packet (16 MiB on MariaDB)
SNAPSHOT_MAX_ROWS = 5000  # tasks per flush: bounds the transaction and the event-loop time of one job
RECONCILE_SESSIONS = 200  # sessions one reconciliation transaction recounts, at most
RECONCILE_TASKS = 20_000  # and their tasks, at most (unless one session alone has more)
STATS_CACHE_S = 5.0  # DESIGN.md: stats may be a few seconds old
INBOX_SIZE = 64  # buffer inbox; a full inbox makes request handlers wait, nothing is lost
LOW_WATERMARK = 0.8  # once over a limit, batches are refused until every use is below this share
DRAIN_WINDOW_S = 5.0  # the drain rate behind Retry-After: rows written over this many seconds
RETRY_AFTER_MAX_S = 30
# About the fewest bytes a row takes in a batch body (the required fields, shortest values,
# no whitespace): the first estimate of a batch's rows from its Content-Length.
MIN_ROW_BYTES = {"sessions": 80, "tasks": 120}
ROW_BYTES_BATCHES = 16  # the last batches whose bytes a row estimate the next one's rows
RETRY_BASE_S = 0.25  # first retry after a failed flush; doubles up to [buffer] retry_max
# /health is degraded once this many flush attempts in a row failed: one failure alone is what
# a failover to another server costs (the lost connection; the retry goes to the next one).
DEGRADED_AFTER_FAILED_FLUSHES = 2
ORPHAN_SWEEP_MAX_S = 60.0
STATUS_EVERY_S = 5.0  # systemd's STATUS= line is refreshed this often (and at half WatchdogSec)
BACKPRESSURE_QUIET_S = 10.0  # a backpressure episode ends once no batch was refused for this long
# A client that sends nothing for this long while the server waits for it is dropped. The idle
# keep-alive close (hypercorn's keep_alive_timeout, 5 s) comes first; this is the backstop.
READ_TIMEOUT_S = 30.0
WRITE_TIMEOUT_S = 10.0  # a client that has not taken one whole send of an answer by then is dropped (also
# bounds how long such a client delays shutdown: the unit's TimeoutStopSec is 45 s)
FD_RESERVE = 64  # descriptors kept free of client connections: journal segments, database, logs
TLS_HANDSHAKE_TIMEOUT_S = 5.0  # hypercorn's default, 60 s, would let a silent client hold a connection slot that long
# Session variables for every connection: times are UTC, and nothing is silently truncated.
SESSION_SETUP = (
    "SET time_zone = '+00:00', "
    "sql_mode = 'STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ZERO_IN_DATE,NO_ENGINE_SUBSTITUTION', "
    "innodb_lock_wait_timeout = 10"
)

# ── configuration ────────────────────────────────────────────────────────────────────

Seconds = Annotated[float, Meta(gt=0)]


class ServerConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8001
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024 * 1024
    # request bodies being received at once, all requests together (Content-Length, or
    # max_body_bytes for a chunked body); beyond it 503 + Retry-After. Each byte costs about
    # 2.5 bytes of memory while it is read and decoded.
    max_inflight_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024 * 1024
    # client connections at once (also bounded by RLIMIT_NOFILE minus FD_RESERVE); beyond it a
    # new connection is closed as soon as it is accepted
    max_connections: Annotated[int, Meta(ge=1)] = 1000
    graceful_timeout: Annotated[float, Meta(ge=0)] = 2.0
    certfile: str = ""  # PEM certificate (chain) and its key: HTTPS instead of HTTP when both are set
    keyfile: str = ""


class DatabaseConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = ""  # empty: SQLite, in <state dir>/persistd.db
    connect_timeout: Seconds = 5.0
    write_timeout: Seconds = 30.0
    ping_timeout: Seconds = 1.0
    read_timeout: Seconds = 10.0
    pool_size: Annotated[int, Meta(ge=1, le=64)] = 4


class BufferConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    flush_interval: Annotated[float, Meta(gt=0, le=30)] = 2.0
    flush_rows: Annotated[int, Meta(ge=1)] = 1000
    # ~1.9 KB a buffered task row (measured): 40,000 rows ≈ 76 MB on top of ~50 MB of process,
    # and up to ~60 MB for sixteen 800 KB requests being decoded: under 200 MB in all
    max_rows: Annotated[int, Meta(ge=MAX_BATCH_ROWS)] = 40_000
    # request bytes of the buffered rows: bounds memory when rows carry long texts
    max_bytes: Annotated[int, Meta(ge=1024 * 1024)] = 64 * 1024 * 1024
    flush_timeout: Seconds = 10.0
    shutdown_timeout: Seconds = 30.0
    retry_max: Seconds = 30.0
    orphan_ttl: Seconds = 3600.0
    # A batch that does not fit waits this long for room, its body unread, before its 503.
    # Under the spec client's 2 s timeout.
    admission_wait: Annotated[float, Meta(ge=0, le=10)] = 1.0


class StateConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    dir: str = "state"
    # This instance's id, in the version of every write it accepts: instances that write to one
    # database need different ids. -1: chosen at random at the first start and kept in
    # <dir>/instance.
    instance_id: Annotated[int, Meta(ge=-1, lt=1 << INSTANCE_BITS)] = -1


class JournalConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    # fsync: a 202 means the batch is on disk (survives kill -9 and a power cut);
    # write: in the OS page cache (survives kill -9, not a power cut); off: in memory only.
    mode: Literal["fsync", "write", "off"] = "fsync"
    # unreleased records; over it batch endpoints answer 503 until it falls below LOW_WATERMARK
    max_bytes: Annotated[int, Meta(ge=8 * 1024 * 1024)] = 1024 * 1024 * 1024


class JanitorConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    interval: Annotated[float, Meta(ge=0)] = 3600.0  # 0 turns scheduled cleanup off
    reconcile_interval: Annotated[float, Meta(ge=0)] = 60.0  # a pass over task_counts; 0 turns it off
    completed_days: Annotated[int, Meta(ge=0, le=36500)] = 90
    failed_days: Annotated[int, Meta(ge=0, le=36500)] = 30


class LogConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    format: Literal["text", "json"] = "text"  # one event a line on stderr either way
    level: Literal["debug", "info", "warning", "error"] = "info"


class JwtConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    # Tokens from an identity provider: signature, iss, aud, exp and nbf are checked. On
    # once key_file is set: the HS256 secret, or the issuer's RS256/ES256 public key (PEM).
    algorithm: Literal["HS256", "RS256", "ES256"] = "RS256"
    key_file: str = ""
    issuer: str = ""
    audience: str = ""
    scopes_claim: str = "scope"  # a space-separated string ("read write") or a list
    leeway: Annotated[float, Meta(ge=0, le=300)] = 30.0  # seconds of clock skew allowed on exp and nbf


class AuthConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    # Off until keys_file or [auth.jwt] key_file is set (spec §2.2; Phase 1 clients send
    # no credentials). keys_file: API keys, one a line, `NAME SCOPES sha256:HEX`.
    keys_file: str = ""
    metrics: Literal["open", "read"] = "open"  # whether scraping needs the read scope
    jwt: JwtConfig = msgspec.field(default_factory=JwtConfig)


class Config(Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    janitor: JanitorConfig = msgspec.field(default_factory=JanitorConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)


class ConfigError(Exception):
    """A one-line explanation of why the configuration cannot be used (exit status 2)."""


class Fatal(Exception):
    """A fault that is not an outage: a file missing from the installed package, a state
    directory that cannot be written, a database that refuses the schema or a write for a
    reason that retrying cannot change. The daemon stops with this one line and exit
    status 1, rather than acknowledge batches that it cannot write."""


def load_config(path: str | None, environ: typing.Mapping[str, str]) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if "PERSISTD_DATABASE_URL" in environ:
        data.setdefault("database", {})["url"] = environ["PERSISTD_DATABASE_URL"]
    if environ.get("STATE_DIRECTORY") and "dir" not in data.get("state", {}):
        # systemd's StateDirectory=, where the config does not name one (several are ':'-separated)
        data.setdefault("state", {})["dir"] = environ["STATE_DIRECTORY"].split(":")[0]
    if "PERSISTD_PORT" in environ:
        port = environ["PERSISTD_PORT"]
        if not port.isdigit():
            raise ConfigError(f"PERSISTD_PORT must be a port number, not {port!r}")
        data.setdefault("server", {})["port"] = int(port)
    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None
    if not cfg.database.url:
        cfg.database.url = f"sqlite:///{Path(cfg.state.dir) / SQLITE_DEFAULT_FILE}"
    backend_of(cfg.database.url)
    if cfg.server.max_inflight_bytes < cfg.server.max_body_bytes:
        raise ConfigError("[server] max_inflight_bytes must be at least [server] max_body_bytes, or the largest body never fits")
    if cfg.buffer.max_bytes < cfg.server.max_body_bytes:
        raise ConfigError("[buffer] max_bytes must be at least [server] max_body_bytes, or the largest body never fits")
    if cfg.journal.max_bytes < cfg.buffer.max_bytes:
        raise ConfigError("[journal] max_bytes must be at least [buffer] max_bytes: the journal holds every buffered row")
    if bool(cfg.server.certfile) != bool(cfg.server.keyfile):
        raise ConfigError("[server] certfile and keyfile go together: set both for HTTPS, or neither")
    jwt_cfg = cfg.auth.jwt
    if jwt_cfg.key_file and not (jwt_cfg.issuer and jwt_cfg.audience):
        raise ConfigError("[auth.jwt] needs issuer and audience: a token for another service must not be accepted")
    return cfg


def masked_url(url: str) -> str:
    """The url with its password replaced by ***: for logs and --check-config."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, hostport = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{hostport}"))


def config_toml(cfg: Config) -> str:
    """The effective configuration as TOML, secrets masked: what --check-config prints."""
    lines = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        for key, value in values.items():
            if not isinstance(value, dict):
                value = masked_url(value) if (name, key) == ("database", "url") else value
                lines.append(f"{key} = {msgspec.json.encode(value).decode()}")
        lines.append("")
        for key, value in values.items():
            if isinstance(value, dict):  # [auth.jwt]
                table(f"{name}.{key}", value)

    for section, values in msgspec.to_builtins(cfg).items():
        table(section, values)
    return "\n".join(lines)


def backend_of(url: str) -> str:
    """"mysql" or "sqlite", once the url has been checked for that backend."""
    if url.startswith("sqlite:"):
        sqlite_path(url)
        return "sqlite"
    parse_database_url(url)
    return "mysql"


def sqlite_path(url: str) -> str:
    """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db` (SQLAlchemy's spelling)
    → the file's path."""
    path = url.removeprefix("sqlite:///")
    if path == url or not path or path.endswith("/") or path == ":memory:":
        raise ConfigError(f"database url {url!r} is not sqlite:///relative/path.db or sqlite:////absolute/path.db")
    return path


def parse_database_url(url: str) -> dict[str, Any]:
    """`mysql://user:password@host:port/dbname`, or with several servers (a Galera cluster's
    nodes) `mysql://user:password@host1:port1,host2:port2/dbname` → trio_mysql connection
    arguments, with `hosts` the (host, port) pairs in the url's order."""
    parts = urlsplit(url)
    database = parts.path.lstrip("/")
    userinfo, _, netloc = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    hosts = []
    for server in netloc.split(","):
        address = urlsplit(f"//{server}")
        try:
            hosts.append((address.hostname, address.port or 3306))
        except ValueError:
            raise ConfigError(f"database url {url!r}: bad port") from None
    if parts.scheme != "mysql" or not all(host for host, _ in hosts) or not database or "/" in database:
        raise ConfigError(f"database url {url!r} is not mysql://user:password@host:port[,host:port...]/dbname")
    return {"hosts": hosts, "user": unquote(user or "root"), "password": unquote(password), "database": unquote(database)}


# ── API types ────────────────────────────────────────────────────────────────────────
# One Struct per body. The limits are the database's, so that an accepted row cannot be
# refused when it is flushed. Ids may not contain whitespace: MySQL compares keys with
# PAD SPACE, so "a" and "a " would be one row there and two here.

# ... nor a "/", nor be "." or "..": an id must be one segment of a URL path, or GET and
# DELETE could never reach the row that the batch wrote. Nor "batch" or "cleanup": those
# segments are routes of their own beside /sessions/{session_id} and /tasks/{task_id}.
RESERVED_IDS = ("batch", "cleanup")
NOT_AN_ID = rf"(?!(?:\.\.?|{'|'.join(RESERVED_IDS)})\Z)"
ID_PATTERN = rf"\A{NOT_AN_ID}[^\s/]+\Z"
Id36 = Annotated[str, Meta(min_length=1, max_length=36, pattern=ID_PATTERN)]
Id64 = Annotated[str, Meta(min_length=1, max_length=64, pattern=ID_PATTERN)]
Str50 = Annotated[str, Meta(max_length=50)]
Str64 = Annotated[str, Meta(max_length=64)]
Str255 = Annotated[str, Meta(max_length=255)]
Str512 = Annotated[str, Meta(max_length=512)]
Text = Annotated[str, Meta(max_length=TEXT_MAX_BYTES)]  # UTF-8 bytes checked after decoding
Count = Annotated[int, Meta(ge=0, le=INT_MAX)]
Confidence = Annotated[float, Meta(ge=0, le=1)]
JsonObject = dict[str, Any]
SessionStatus = Literal["pending", "processing", "completed", "failed", "cancelled"]
TaskStatus = Literal["pending", "processing", "completed", "failed"]


class SessionIn(Struct, forbid_unknown_fields=True):
    session_id: Id36
    filename: Str255
    file_path: Str512
    status: SessionStatus
    llm_provider: Str50
    game_info: JsonObject | None | UnsetType = UNSET
    metadata: JsonObject | None | UnsetType = UNSET
    total_tasks: Count | None | UnsetType = UNSET
    completed_tasks: Count | None | UnsetType = UNSET
    failed_tasks: Count | None | UnsetType = UNSET
    processing_tasks: Count | None | UnsetType = UNSET


class TaskIn(Struct, forbid_unknown_fields=True, gc=False):
    task_id: Id64
    session_id: Id36
    batch_id: Str64
    sheet_name: Str255
    row_index: Count
    column_name: Str255
    source_text: Text
    status: TaskStatus
    target_text: Text | None | UnsetType = UNSET
    context: Text | None | UnsetType = UNSET
    confidence: Confidence | None | UnsetType = UNSET
    error_message: Text | None | UnsetType = UNSET
    retry_count: Count | None | UnsetType = UNSET
    start_time: datetime | None | UnsetType = UNSET
    end_time: datetime | None | UnsetType = UNSET
    duration_ms: Count | None | UnsetType = UNSET


TEXT_FIELDS = ("source_text", "target_text", "context", "error_message")
TIME_FIELDS = ("start_time", "end_time")


class SessionBatch(Struct, forbid_unknown_fields=True):
    sessions: Annotated[list[SessionIn], Meta(min_length=1, max_length=MAX_BATCH_ROWS)]


class TaskBatch(Struct, forbid_unknown_fields=True):
    tasks: Annotated[list[TaskIn], Meta(min_length=1, max_length=MAX_BATCH_ROWS)]


class FieldError(Struct):
    field: str
    message: str


class ErrorBody(Struct):
    detail: str
    error_code: str
    errors: list[FieldError]


class Accepted(Struct):
    status: str
    count: int
    timestamp: datetime


class FlushAnswer(Struct):
    status: Literal["flushed", "error"]
    sessions_written: int
    tasks_written: int
    duration_ms: int
    tasks_waiting_for_session: int
    detail: str | UnsetType = UNSET
    error_code: str | UnsetType = UNSET
    errors: list[FieldError] | UnsetType = UNSET


class BufferHealth(Struct):
    sessions_count: int
    tasks_count: int
    total_count: int
    capacity: int
    usage_percent: float
    last_flush: datetime | None
    tasks_waiting_for_session: int
    oldest_waiting_seconds: float | None
    oldest_unwritten_seconds: float | None  # since the oldest batch not yet all in the database was accepted


Backend = Literal["mysql", "sqlite"]


class Health(Struct):
    status: Literal["healthy", "degraded"]
    database: Literal["healthy", "unhealthy"]
    buffer: BufferHealth
    uptime_seconds: int
    version: str
    backend: Backend  # beyond §7.1 (issue 11): which database persistd writes to


Days = Annotated[int, Meta(ge=0, le=36500)]
PageNumber = Annotated[int, Meta(ge=1, le=10_000_000)]  # keeps OFFSET a number MySQL parses
PageSize = Annotated[int, Meta(ge=1, le=100)]


class SessionQuery(Struct, forbid_unknown_fields=True):
    status: SessionStatus | None = None
    from_date: datetime | None = None
    to_date: datetime | None = None
    page: PageNumber = 1
    page_size: PageSize = 20
    sort_by: Literal["created_at", "updated_at"] = "created_at"
    order: Literal["asc", "desc"] = "desc"


class SessionTaskQuery(Struct, forbid_unknown_fields=True):
    status: TaskStatus | None = None
    sheet_name: str | None = None
    page: PageNumber = 1
    page_size: PageSize = 20


class TaskQuery(Struct, forbid_unknown_fields=True):
    session_id: str | None = None
    status: TaskStatus | None = None
    from_date: datetime | None = None
    to_date: datetime | None = None
    page: PageNumber = 1
    page_size: PageSize = 20


def loose_parameter(value: Any, raw: str) -> str | None:
    """What msgspec's lax conversion of a query string lets through that the API does not:
    `null` for "no filter" on an enum or date (leave the parameter out), integers written
    as `1.0` or `1e0`, and numbers as dates. None when `raw` is exactly what `value` means."""
    if value is None:
        return "Has no value; leave the parameter out for no filter"
    if type(value) is int and not (raw.isascii() and raw.isdigit()):
        return "Not a whole number in decimal digits"
    if type(value) is datetime:
        try:
            msgspec.convert(raw, datetime)  # strict: the lax one also reads numbers as Unix times
        except msgspec.ValidationError:
            return "Not an RFC 3339 date-time"
    return None


class CleanupIn(Struct, forbid_unknown_fields=True):
    completed_days: Days = 90
    failed_days: Days = 30
    dry_run: bool = False


class SessionSummary(Struct):  # §4.1 items
    session_id: str
    filename: str
    status: str
    total_tasks: int | None
    completed_tasks: int | None
    failed_tasks: int | None
    processing_tasks: int | None
    pending_tasks: int
    progress: float
    created_at: datetime
    updated_at: datetime


class SessionDetail(Struct):  # §4.2
    session_id: str
    filename: str
    file_path: str
    status: str
    game_info: JsonObject | None
    llm_provider: str
    metadata: JsonObject | None
    total_tasks: int | None
    completed_tasks: int | None
    failed_tasks: int | None
    processing_tasks: int | None
    pending_tasks: int
    progress: float
    created_at: datetime
    updated_at: datetime
    estimated_completion: datetime | None


class SessionPage(Struct):
    total: int
    page: int
    page_size: int
    total_pages: int
    items: list[SessionSummary]


class TaskItem(Struct):  # §4.3 items
    task_id: str
    batch_id: str
    sheet_name: str
    row_index: int
    column_name: str
    source_text: str
    target_text: str | None
    status: str
    error_message: str | None
    retry_count: int | None
    confidence: float | None
    created_at: datetime
    updated_at: datetime


class SessionTaskPage(Struct):
    session_id: str
    total: int
    page: int
    page_size: int
    total_pages: int
    items: list[TaskItem]


class TaskDetail(Struct):  # §4.4, and the items of §4.5
    task_id: str
    session_id: str
    batch_id: str
    sheet_name: str
    row_index: int
    column_name: str
    source_text: str
    target_text: str | None
    context: str | None
    status: str
    confidence: float | None
    error_message: str | None
    retry_count: int | None
    start_time: datetime | None
    end_time: datetime | None
    duration_ms: int | None
    created_at: datetime
    updated_at: datetime


class TaskPage(Struct):
    total: int
    page: int
    page_size: int
    total_pages: int
    items: list[TaskDetail]


class IncompleteSession(Struct):  # §5.1
    session_id: str
    filename: str
    status: str
    total_tasks: int | None
    completed_tasks: int | None
    pending_tasks: int
    failed_tasks: int | None
    created_at: datetime
    updated_at: datetime


class IncompleteSessions(Struct):
    count: int
    sessions: list[IncompleteSession]


class RestoredSession(Struct):  # §5.2 "session"
    session_id: str
    filename: str
    file_path: str
    status: str
    game_info: JsonObject | None
    llm_provider: str
    total_tasks: int | None
    completed_tasks: int | None
    failed_tasks: int | None
    pending_tasks: int


class RestoredTask(Struct):  # §5.2 "tasks" items, as the database writes them (storage.RESTORED_FIELDS)
    task_id: str
    batch_id: str
    sheet_name: str
    row_index: int
    column_name: str
    source_text: str
    status: Literal["pending", "processing"]  # unfinished_tasks() selects only these
    created_at: datetime


class Restored(Struct):
    session_id: str
    session: RestoredSession
    tasks_count: int
    tasks: msgspec.Raw  # a JSON array of RestoredTask objects the database wrote, see unfinished_tasks()
    restored_at: datetime


class DeletedSession(Struct):  # §6.1
    status: str
    session_id: str
    deleted_tasks: int


class CleanupOut(Struct):  # §6.2
    status: str
    deleted_sessions: int
    deleted_tasks: int
    dry_run: bool


class Performance(Struct):
    average_session_time: float | None  # seconds, completed sessions
    average_task_time: float | None  # seconds, from duration_ms of completed tasks
    success_rate: float | None  # completed / (completed + failed) tasks, percent


class Storage(Struct):
    database_size_mb: float
    sessions_table_rows: int
    tasks_table_rows: int
    backend: Backend = "mysql"  # beyond §6.3 (issue 11): which database holds them


class Stats(Struct):  # §6.3
    sessions: dict[str, int]
    tasks: dict[str, int]
    performance: Performance
    storage: Storage


class ApiError(Exception):
    """A refusal rendered in the error format of DESIGN.md."""

    def __init__(self, status: int, code: str, detail: str, errors=(), **extra: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.errors = [FieldError(f, m) for f, m in errors]
        self.extra = extra
        self.headers: dict[str, str] = {}

    def body(self) -> bytes:
        body = msgspec.to_builtins(ErrorBody(self.detail, self.code, self.errors))
        return msgspec.json.encode({**body, **self.extra})


@functools.cache
def _decoder(type_: Any) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(type_)


BATCHES: dict[str, tuple[type, type]] = {"sessions": (SessionBatch, SessionIn), "tasks": (TaskBatch, TaskIn)}


def decode_batch(key: str, body: bytes) -> list:
    """The rows of a batch body, or ApiError naming every offending row and field."""
    batch_type, row_type = BATCHES[key]
    try:
        try:
            rows = getattr(_decoder(batch_type).decode(body), key)
        except (msgspec.DecodeError, UnicodeDecodeError):  # the slow path: whole floats, or a refusal
            body = whole_numbers_as_integers(body, key)
            try:
                rows = getattr(_decoder(batch_type).decode(body), key)
            except (msgspec.DecodeError, UnicodeDecodeError):
                raise explain_batch(key, row_type, body) from None
    except RecursionError:  # msgspec recurses once per level, up to Python's recursion limit (~1000 levels)
        raise ApiError(400, "INVALID_JSON", "Request body is nested too deeply") from None
    errors = [err for i, row in enumerate(rows) for err in check_row(row, f"{key}[{i}]")]
    if errors:
        raise ApiError(422, "VALIDATION_ERROR", f"Invalid {key[:-1]} data", errors)
    return rows


def whole_numbers_as_integers(body: bytes, key: str | None = None) -> bytes:
    """The body with each number of a row's own fields (or, without `key`, of the body's
    own fields) that is a whole float (`236.0`, `1e2`) written as an integer. JSON has one
    number type, and a JSON Schema `integer` includes 236.0; msgspec's strict decoding
    does not. Nested values (game_info, metadata) are left as they were sent."""
    try:
        doc = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return body
    rows = doc.get(key) if key is not None and isinstance(doc, dict) else [doc]
    changed = False
    for row in rows if isinstance(rows, list) else ():
        if isinstance(row, dict):
            for name, value in row.items():
                if type(value) is float and value.is_integer() and abs(value) < 2**63:
                    row[name], changed = int(value), True
    return msgspec.json.encode(doc) if changed else body


def not_json(exc: Exception) -> ApiError:
    return ApiError(400, "INVALID_JSON", f"Request body is not valid JSON: {exc}")


def explain_batch(key: str, row_type: type, body: bytes) -> ApiError:
    """The slow second pass that runs only when the fast typed decode failed."""
    try:
        doc = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return not_json(exc)
    invalid = f"Invalid {key[:-1]} data"
    if not isinstance(doc, dict):
        return ApiError(422, "VALIDATION_ERROR", invalid, [("", "Expected a JSON object")])
    errors = [(name, "Unknown field") for name in doc if name != key]
    rows = doc.get(key)
    if not isinstance(rows, list):
        message = f"{key} is required" if rows is None else "Expected an array"
        return ApiError(422, "VALIDATION_ERROR", invalid, [*errors, (key, message)])
    if len(rows) > MAX_BATCH_ROWS:
        return ApiError(422, "BATCH_TOO_LARGE", f"A batch holds at most {MAX_BATCH_ROWS} {key}",
                        [(key, f"{len(rows)} rows; at most {MAX_BATCH_ROWS} are accepted")])
    if not rows:
        errors.append((key, f"A batch holds at least one of {key}"))
    for i, row in enumerate(rows):
        errors.extend(row_errors(row_type, row, f"{key}[{i}]"))
    return ApiError(422, "VALIDATION_ERROR", invalid, errors or [(key, "Invalid batch")])


def row_errors(row_type: type, row: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(row, dict):
        return [(where, "Expected a JSON object")]
    fields = {f.name: f for f in msgspec.structs.fields(row_type)}
    errors = [(f"{where}.{name}", "Unknown field") for name in row if name not in fields]
    for name, info in fields.items():
        if name not in row:
            if info.required:
                errors.append((f"{where}.{name}", f"{name} is required"))
            continue
        try:
            _decoder(_without_unset(info.type)).decode(msgspec.json.encode(row[name]))
        except msgspec.ValidationError as exc:
            message = validation_error(exc)[1]
            if "matching regex" in message:
                message = "Expected an id without whitespace or '/', and not '.' or '..'"
            errors.append((f"{where}.{name}", message))
    if not errors:
        errors = check_row(_decoder(row_type).decode(msgspec.json.encode(row)), where)
    return errors


def _without_unset(type_: Any) -> Any:
    args = [a for a in typing.get_args(type_) if a is not UnsetType]
    return typing.Union[tuple(args)] if typing.get_origin(type_) is typing.Union else type_


def check_row(row: SessionIn | TaskIn, where: str) -> list[tuple[str, str]]:
    """What msgspec's constraints cannot say: UTF-8 byte lengths, TIMESTAMP range, JSON
    depth. Also normalises the row to what the database will store (UTC, whole seconds,
    four decimals), so that buffered and stored rows read the same. Runs for every row:
    the common case (short texts, times in whole UTC seconds) takes the cheap branches."""
    errors = []
    if type(row) is TaskIn:
        for name in TEXT_FIELDS:
            value = getattr(row, name)
            # A str of n code points has at most 4n UTF-8 bytes: only long ones need encoding.
            if type(value) is str and len(value) > TEXT_MAX_BYTES // 4 and len(value.encode()) > TEXT_MAX_BYTES:
                errors.append((f"{where}.{name}", f"Longer than {TEXT_MAX_BYTES} UTF-8 bytes"))
        for name in TIME_FIELDS:
            value = getattr(row, name)
            if type(value) is datetime:
                if value.tzinfo is not UTC or value.microsecond:
                    value = (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
                    value = value.replace(microsecond=0)
                    setattr(row, name, value)
                if not TIMESTAMP_MIN <= value <= TIMESTAMP_MAX:
                    errors.append((f"{where}.{name}", "Outside the TIMESTAMP range 1970-01-01T00:00:01Z..2038-01-19T03:14:07Z"))
        if type(row.confidence) is float:
            row.confidence = round(row.confidence, 4)
    else:
        for name in ("game_info", "metadata"):
            value = getattr(row, name)
            if type(value) is dict:
                if json_depth(value, JSON_MAX_DEPTH + 1) > JSON_MAX_DEPTH:
                    errors.append((f"{where}.{name}", f"Nested deeper than {JSON_MAX_DEPTH} levels"))
                elif len(msgspec.json.encode(value)) > JSON_MAX_BYTES:
                    errors.append((f"{where}.{name}", f"Longer than {JSON_MAX_BYTES} bytes as JSON"))
    return errors


def json_depth(value: Any, limit: int) -> int:
    """The nesting depth of a decoded JSON value, counted no further than `limit`: the
    recursion never goes deeper than that, however deep the value."""
    if limit <= 0 or not isinstance(value, (dict, list)):
        return 0
    return 1 + max((json_depth(v, limit - 1) for v in (value.values() if isinstance(value, dict) else value)), default=0)


def utc_now() -> datetime:
    """Accept time, in whole seconds like the TIMESTAMP columns that will store it."""
    return datetime.now(UTC).replace(microsecond=0)


# ── derived fields (pure) ────────────────────────────────────────────────────────────

FINISHED = frozenset({"completed", "failed", "cancelled"})


def pending_tasks(s: dict) -> int:
    return max((s["total_tasks"] or 0) - (s["completed_tasks"] or 0) - (s["failed_tasks"] or 0)
               - (s["processing_tasks"] or 0), 0)


def progress(s: dict) -> float:
    total = s["total_tasks"] or 0
    return round(100 * (s["completed_tasks"] or 0) / total, 1) if total else 0.0


def estimated_completion(s: dict) -> datetime | None:
    """Extrapolates the completion rate between created_at and the last update."""
    completed, total = s["completed_tasks"] or 0, s["total_tasks"] or 0
    remaining = total - completed - (s["failed_tasks"] or 0)
    elapsed = (s["updated_at"] - s["created_at"]).total_seconds()
    if s["status"] in FINISHED or completed <= 0 or remaining <= 0 or elapsed <= 0:
        return None
    return (s["updated_at"] + timedelta(seconds=remaining * elapsed / completed)).replace(microsecond=0)


def with_derived(s: dict) -> dict:
    return {**s, "pending_tasks": pending_tasks(s), "progress": progress(s),
            "estimated_completion": estimated_completion(s)}


def total_pages(total: int, page_size: int) -> int:
    return math.ceil(total / page_size)


def as_utc(value: datetime) -> datetime:
    """A query parameter as the naive UTC time the TIMESTAMP columns compare with."""
    try:
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).replace(tzinfo=None)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before the first representable time
        return datetime.min if value.year == 1 else datetime.max


# ── metrics ──────────────────────────────────────────────────────────────────────────
# A private registry per daemon, so that tests can run several in one process.

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what older scrapers expect


class Metrics:
    def __init__(self) -> None:
        r = self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "persistence_api_requests", "Total API requests", ["endpoint", "method"], registry=r)
        self.responses = prometheus_client.Counter(
            "persistence_api_responses", "API responses by status code", ["endpoint", "code"], registry=r)
        self.duration = prometheus_client.Histogram(
            "persistence_api_duration_seconds", "API request duration", ["endpoint"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.buffer_size = prometheus_client.Gauge(
            "persistence_buffer_size", "Current buffer size", ["type"], registry=r)
        self.held_tasks = prometheus_client.Gauge(
            "persistence_held_tasks", "Tasks held until their session arrives", registry=r)
        self.held_oldest = prometheus_client.Gauge(
            "persistence_held_task_oldest_seconds", "Age of the oldest held task", registry=r)
        self.flushes = prometheus_client.Counter(
            "persistence_flush", "Total flush operations", registry=r)
        self.flush_errors = prometheus_client.Counter(
            "persistence_flush_errors", "Flush attempts that failed and will be retried", registry=r)
        self.flush_conflicts = prometheus_client.Counter(
            "persistence_flush_conflicts", "Flush attempts aborted by a concurrent transaction (a deadlock, a"
            " Galera certification conflict) and retried; also counted in persistence_flush_errors", registry=r)
        self.flush_duration = prometheus_client.Histogram(
            "persistence_flush_duration_seconds", "Duration of successful flushes", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.rows_written = prometheus_client.Counter(
            "persistence_rows_written", "Rows written to the database", ["type"], registry=r)
        self.counts_repaired = prometheus_client.Counter(
            "persistence_task_counts_repaired", "task_counts rows the reconciliation found wrong and rewrote "
            "(tasks written, changed or deleted by other means than persistd)", registry=r)
        self.dead_letters = prometheus_client.Counter(
            "persistence_dead_letter_rows", "Rows moved to the dead-letter file", ["reason"], registry=r)
        self.journal_bytes = prometheus_client.Gauge(
            "persistence_journal_bytes", "Journal records not yet released", registry=r)
        self.journal_kept_aside = prometheus_client.Counter(
            "persistence_journal_corrupt_tails", "Torn or corrupt journal tails moved aside at start", registry=r)
        self.replayed_rows = prometheus_client.Counter(
            "persistence_journal_replayed_rows", "Rows replayed from the journal at start", registry=r)
        # for alerts (deploy/prometheus-alerts.yml); the gauges are read at each scrape
        self.database_up = prometheus_client.Gauge(
            "persistence_database_up", "1 when the database answered a ping at this scrape", registry=r)
        self.backend = prometheus_client.Gauge(
            "persistence_database_backend", "1 for the database backend in use", ["backend"], registry=r)
        self.flush_failures_in_a_row = prometheus_client.Gauge(
            "persistence_flush_failures_in_a_row", "Flush attempts failed since the last success", registry=r)
        self.oldest_unwritten = prometheus_client.Gauge(
            "persistence_oldest_unwritten_seconds", "Age of the oldest acknowledged batch not yet all written",
            registry=r)
        self.backpressure = prometheus_client.Gauge(
            "persistence_backpressure", "1 while batches are refused with 503 BUFFER_FULL", registry=r)
        self.refused_batches = prometheus_client.Counter(
            "persistence_batches_refused", "Batches refused with 503 BUFFER_FULL", registry=r)
        self.refused_bytes_read = prometheus_client.Counter(
            "persistence_refused_body_bytes_read", "Bytes of batch bodies read and decoded, then refused with 503"
            " BUFFER_FULL (a batch is refused unread unless it has more rows than its size suggested)", registry=r)
        self.auth_refusals = prometheus_client.Counter(
            "persistence_auth_refusals", "Requests refused with 401 or 403, by reason", ["reason"], registry=r)


# ── authentication (spec §2.2) ───────────────────────────────────────────────────────
# Each route needs one scope: write (batches, flush), read (queries, recovery, stats),
# admin (DELETE, cleanup). A credential is an API key, stored as its SHA-256 only, or a
# JWT verified by PyJWT; either comes as `Authorization: Bearer ...` or `X-API-Key: ...`.

SCOPES = ("read", "write", "admin")
AUTH_RELOAD_S = 1.0  # the keys file (and the JWT key) are read again this soon after a change
KEY_LINE = re.compile(r"(\S+)\s+([a-z,]+)\s+sha256:([0-9a-f]{64})")


class Refused(Exception):
    """No valid credential (401) or not the scope the route needs (403)."""

    def __init__(self, status: int, reason: str, detail: str, scope: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.scope = status, reason, scope


def parse_keys(text: str, where: str) -> dict[bytes, tuple[str, frozenset[str]]]:
    """The keys file: `NAME SCOPES sha256:HEX` a line, # comments. Several keys may share a
    name and scopes (two valid at once while a client moves to the new one)."""
    keys = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = KEY_LINE.fullmatch(line)
        scopes = frozenset(m[2].split(",")) if m else frozenset()
        if not m or not scopes <= set(SCOPES):
            raise ConfigError(f"{where}:{number}: expected NAME SCOPES sha256:HEX with SCOPES from {','.join(SCOPES)}")
        keys[bytes.fromhex(m[3])] = (m[1], scopes)
    return keys


def new_key(name: str, scopes: str) -> tuple[str, str]:
    """A fresh API key for a client, and its line for the keys file."""
    if not set(scopes.split(",")) <= set(SCOPES) or not re.fullmatch(r"\S+", name):
        raise ConfigError(f"a key needs a NAME without spaces and SCOPES from {','.join(SCOPES)}, comma-separated")
    key = "pd_" + secrets.token_urlsafe(32)
    return key, f"{name} {scopes} sha256:{hashlib.sha256(key.encode()).hexdigest()}"


class Auth:
    """The credentials a request may carry, read from the files the config names. `load()`
    reads them (blocking: a worker thread, or before the daemon runs); `scopes()` is what a
    request handler calls."""

    def __init__(self, cfg: AuthConfig) -> None:
        self.cfg = cfg
        self.keys: dict[bytes, tuple[str, frozenset[str]]] = {}
        self.jwt_key: Any = None
        self.seen: tuple = ()  # what the files were at the last load

    @property
    def on(self) -> bool:
        return bool(self.cfg.keys_file or self.cfg.jwt.key_file)

    def load(self) -> bool:
        """Read the files again if they changed since the last load; whether they had. A file
        that cannot be read or parsed raises ConfigError, and the previous keys stay."""
        paths = [p for p in (self.cfg.keys_file, self.cfg.jwt.key_file) if p]
        try:
            seen = tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(os.stat, paths))
            if seen == self.seen:
                return False
            keys = parse_keys(Path(self.cfg.keys_file).read_text(), self.cfg.keys_file) if self.cfg.keys_file else {}
            jwt_key = Path(self.cfg.jwt.key_file).read_bytes().strip() if self.cfg.jwt.key_file else None
        except OSError as exc:
            raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
        if jwt_key is not None and self.cfg.jwt.algorithm != "HS256":
            try:
                jwt_key = serialization.load_pem_public_key(jwt_key)
            except ValueError as exc:
                raise ConfigError(f"{self.cfg.jwt.key_file}: not a PEM public key ({exc})") from None
        self.keys, self.jwt_key, self.seen = keys, jwt_key, seen
        return True

    def scopes(self, headers: typing.Mapping[str, str]) -> frozenset[str]:
        """The scopes the request's credential grants, or Refused."""
        authorization = headers.get("Authorization", "")
        scheme, _, token = authorization.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else headers.get("X-API-Key", "").strip()
        if not token:
            raise Refused(401, "missing", "Credentials are required: Authorization: Bearer <key or token>, or X-API-Key")
        if self.jwt_key is not None and token.count(".") == 2:
            return self._token_scopes(token)
        digest = hashlib.sha256(token.encode(errors="surrogateescape")).digest()
        found = None
        for stored, key in self.keys.items():  # every key compared, in constant time each
            if hmac.compare_digest(stored, digest):
                found = key
        if found is None:
            raise Refused(401, "invalid_key", "The API key is not valid")
        return found[1]

    def _token_scopes(self, token: str) -> frozenset[str]:
        jwt_cfg = self.cfg.jwt
        try:
            claims = jwt.decode(token, self.jwt_key, algorithms=[jwt_cfg.algorithm], audience=jwt_cfg.audience,
                                issuer=jwt_cfg.issuer, leeway=jwt_cfg.leeway,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise Refused(401, "expired", "The token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise Refused(401, "invalid_token", f"The token is not valid: {exc}") from None
        granted = claims.get(jwt_cfg.scopes_claim, ())
        return frozenset(granted.split() if isinstance(granted, str) else granted if isinstance(granted, list) else ())

    def check(self, headers: typing.Mapping[str, str], scope: str) -> None:
        if scope not in self.scopes(headers):
            raise Refused(403, "insufficient_scope", f"The credential lacks the {scope} scope", scope)


async def keys_actor(auth: Auth, stop: trio.Event) -> None:
    """Reads the keys file and the JWT key again within AUTH_RELOAD_S of a change: a key is
    added or revoked, or the identity provider's key rotated, without a restart. A file
    that cannot be read keeps the keys that were loaded."""
    while not stop.is_set():
        with trio.move_on_after(AUTH_RELOAD_S):
            await stop.wait()
        try:
            if await trio.to_thread.run_sync(auth.load):
                event(logging.INFO, "keys_reloaded", "credentials read again: {keys} API keys, JWT {jwt}",
                      keys=len(auth.keys), jwt="on" if auth.jwt_key is not None else "off")
        except ConfigError as exc:
            event(logging.WARNING, "keys_unreadable", "credentials not read again, the previous ones stay: {error}",
                  error=str(exc))


# ── logs and systemd ─────────────────────────────────────────────────────────────────
# One event a line on stderr, where systemd's journal or a container runtime collects it.
# An event is logged once when its state changes (an outage begins, ends), never once per
# request or per retry, with its figures: in the text, and as fields in the JSON format.


def event(level: int, name: str, text: str, **figures: Any) -> None:
    """Log the event `name`: `text` filled in from `figures`."""
    log.log(level, text.format(**figures), extra={"event": name, "figures": figures})


class TextFormatter(logging.Formatter):
    """`time level logger: message`; a traceback is folded into its line as \\n."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, event, message, then the figures."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"time": datetime.fromtimestamp(record.created, UTC), "level": record.levelname.lower(),
                  "logger": record.name, "event": getattr(record, "event", None), "message": record.getMessage(),
                  **getattr(record, "figures", {})}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(fields).decode()


def setup_logging(cfg: LogConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.format == "json" else TextFormatter())
    logging.basicConfig(level=cfg.level.upper(), handlers=[handler], force=True)
    # hypercorn's own "Running on ..." says again what the "ready" event says
    logging.getLogger("hypercorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))


class Notifier:
    """systemd's notify protocol (sd_notify(3)), with the standard library: each message
    is a datagram of `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET (a
    leading @ names the abstract namespace). Without that variable (not started by
    systemd with Type=notify) it sends nothing. $WATCHDOG_USEC, for this process when
    $WATCHDOG_PID names it or is unset, says how often systemd expects WATCHDOG=1."""

    def __init__(self, environ: typing.Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        mine = pid in ("", str(os.getpid()))
        self.watchdog_s = int(usec) / 1e6 if self.sock and mine and usec.isdigit() and int(usec) else None

    def send(self, *lines: str) -> None:
        if self.sock is None or not lines:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:  # systemd gone, or its queue full: the next message says it again
            log.debug("notify: %s", exc)


# ── the buffer's state (pure: no I/O, no clock) ──────────────────────────────────────


class Entry(Struct, gc=False):
    """A buffered row with what the service adds to it. `seq` orders writes: the entry
    with the higher seq was accepted later and wins. `first_seq` is the oldest write
    merged into it: the journal keeps every record from there on until it is written.
    `version` is the latest write's (see INSTANCE_BITS); `versions` holds the older one
    of each optional field that an earlier write set and the latest left out."""

    row: Any  # SessionIn | TaskIn
    created_at: datetime
    updated_at: datetime
    seq: int
    held_since: float = 0.0  # trio clock, for tasks waiting for their session
    first_seq: int = 0
    size: int = 0  # request bytes, for the buffer's byte limit
    version: int = 0
    versions: dict[str, int] | None = None

    def field_version(self, name: str) -> int:
        return self.version if self.versions is None else self.versions.get(name, self.version)


OPTIONAL_FIELDS = {
    t: tuple(f.name for f in msgspec.structs.fields(t) if not f.required) for t in (SessionIn, TaskIn)
}


def combine(a: Entry, b: Entry) -> Entry:
    """Two states of one row → one. The later accepted wins field by field; a field it
    left out keeps the earlier value; created_at is the first. `b` wins ties."""
    older, newer = (b, a) if a.seq > b.seq else (a, b)
    for name in OPTIONAL_FIELDS[type(newer.row)]:
        if getattr(newer.row, name) is UNSET and (value := getattr(older.row, name)) is not UNSET:
            setattr(newer.row, name, value)
            if newer.versions is None:
                newer.versions = {}
            newer.versions[name] = older.field_version(name)
    newer.created_at = older.created_at
    newer.held_since = older.held_since or newer.held_since
    newer.first_seq = min(older.first_seq, newer.first_seq)
    newer.size = max(older.size, newer.size)
    return newer


def put(rows: dict[str, Entry], key: str, entry: Entry) -> int:
    """Store `entry`, merged with the row's earlier state; returns the change in bytes."""
    old = rows.get(key)
    if old is None:
        rows[key] = entry
        return entry.size
    before = old.size
    rows[key] = combine(old, entry)
    return rows[key].size - before


WAITING_CLAIM, HELD_CLAIM, GONE_CLAIM = range(3)


class Claim:
    """Room asked for a batch before its body is read (see Buffer.claim). Only the buffer
    actor changes it; the request handler hands it back with the batch, or when it fails."""

    def __init__(self, rows: int, nbytes: int, deadline: float, reply: trio.MemorySendChannel) -> None:
        self.rows, self.nbytes, self.deadline, self.reply = rows, nbytes, deadline, reply
        self.state = WAITING_CLAIM


class Snapshot(NamedTuple):
    seq: int  # every write accepted up to here is in it, or held
    sessions: dict[str, Entry]
    tasks: dict[str, Entry]


class FlushWaiter:
    """A /flush call waiting for every write accepted before it (`target`)."""

    def __init__(self, reply: trio.MemorySendChannel) -> None:
        self.reply = reply
        self.target = 0
        self.sessions_written = 0
        self.tasks_written = 0
        self.held_tried = True  # False while tasks held for their session wait to be tried again


class Buffer:
    """The unflushed rows and the flush schedule. Only the buffer actor holds one.

    Rows are `pending` (not yet handed to the flusher), `in_flight` (handed over in a
    snapshot the flusher is writing or will retry), or `held` (tasks whose session is not
    in the database yet, grouped by session id). A failed snapshot is retried as it was,
    before anything newer, so the newer pending state still wins when it is written after.

    It also knows which journal records are still needed: every record from the oldest
    write merged into an unwritten row on (`floor()`), and their size.
    """

    def __init__(self, cfg: BufferConfig, journal_max_bytes: float = math.inf, instance: int = 0,
                 clock_us: int = 0) -> None:
        self.cfg = cfg
        self.journal_max_bytes = journal_max_bytes
        self.instance = instance
        self.clock_us = clock_us  # the accept time of the last version given out or replayed, or the lease
        self.sessions: dict[str, Entry] = {}
        self.tasks: dict[str, Entry] = {}
        self.held: dict[str, dict[str, Entry]] = {}
        self.in_flight: Snapshot | None = None
        self.flusher_busy = False
        self.retry_at = math.inf
        self.failures = 0
        self.first_pending_at = math.inf
        self.held_retry_at = 0.0  # when held tasks next go with a snapshot, to find their session written meanwhile
        self.held_in_flight = 0  # held tasks in the snapshot in flight: still waiting for their session
        self.held_tried_for: list[FlushWaiter] = []  # the /flush calls that the held tasks in flight answer
        self.seq = 0  # the last seq given out, or replayed
        self.durable_seq = 0  # every write up to here is in the database
        self.bytes = 0  # request bytes of every row in memory
        self.refusing = False  # over a limit, and not yet below the low watermark
        self.records: collections.deque[tuple[int, int]] = collections.deque()  # (seq, bytes) in the journal
        self.accepted: collections.deque[tuple[int, float]] = collections.deque()  # (seq, when) not yet durable
        self.journal_bytes = 0
        self.released = 0  # the floor the journal was last told
        self.replaying = False  # the journal's records are being handed over; nothing new is accepted
        self.draining = False
        self.last_flush: datetime | None = None
        self.last_error: str | None = None
        self.waiters: list[FlushWaiter] = []
        self.admitting: collections.deque[Claim] = collections.deque()  # batches waiting for room, in turn
        self.reserved_rows = 0  # held by claims: admitted batches whose rows have not arrived yet
        self.reserved_bytes = 0
        # request bytes a row took in each of the last batches, by key: claims estimate with the least
        self.row_bytes = {key: collections.deque(maxlen=ROW_BYTES_BATCHES) for key in MIN_ROW_BYTES}
        self.drained: collections.deque[tuple[float, int]] = collections.deque()  # (when, rows written)
        self.pins: collections.Counter[int] = collections.Counter()  # first_seq -> unwritten rows
        self.pin_heap: list[int] = []  # the keys of `pins`, and some gone since (see floor)
        self.forgetting: list[tuple[trio.MemorySendChannel, str, bool, list[str]]] = []  # DELETEs waiting for in_flight

    # size
    def held_count(self) -> int:
        return sum(map(len, self.held.values()))

    def waiting_for_session(self) -> int:
        return self.held_count() + self.held_in_flight

    def counts(self) -> tuple[int, int]:
        """(sessions, tasks) held in memory, in flight included."""
        s, t = len(self.sessions), len(self.tasks) + self.held_count()
        if self.in_flight is not None:
            s, t = s + len(self.in_flight.sessions), t + len(self.in_flight.tasks)
        return s, t

    def has_room(self, rows: int, nbytes: int) -> bool:
        """Whether a batch of `rows` rows and `nbytes` request bytes may be accepted. Once
        a limit is reached, nothing is until rows, bytes and journal are all below the
        low watermark: clients back off instead of filling every gap a flush opens."""
        used = ((sum(self.counts()) + self.reserved_rows, self.cfg.max_rows),
                (self.bytes + self.reserved_bytes, self.cfg.max_bytes),
                (self.journal_bytes + self.reserved_bytes, self.journal_max_bytes))
        if self.refusing:
            self.refusing = any(n > LOW_WATERMARK * limit for n, limit in used)
        if not self.refusing:
            self.refusing = any(n + more > limit for (n, limit), more in zip(used, (rows, nbytes, nbytes)))
        return not self.refusing

    # admission: a batch is given room before its body is read
    def claim(self, key: str, nbytes: int, deadline: float, reply: trio.MemorySendChannel) -> Claim | None:
        """Room for a batch of `nbytes` bytes: the claim, held at once, or None while it
        waits its turn (admissions() answers it). Its rows are estimated high: at 3/4 of the
        fewest bytes a row took in the last batches (rows of one client's batches differ:
        pending rows are half the size of completed ones, and batches of one kind a few % from
        each other); the exact count is checked once the body has been decoded."""
        least = min(self.row_bytes[key], default=MIN_ROW_BYTES[key])
        rows = min(MAX_BATCH_ROWS, max(1, nbytes * 4 // (least * 3)))
        claim = Claim(rows, nbytes, deadline, reply)
        if not self.admitting and self.has_room(rows, nbytes):
            return self._hold(claim)
        self.admitting.append(claim)
        return None

    def _hold(self, claim: Claim) -> Claim:
        claim.state = HELD_CLAIM
        self.reserved_rows += claim.rows
        self.reserved_bytes += claim.nbytes
        return claim

    def arrived(self, claim: Claim, rows: int, nbytes: int) -> bool:
        """The claim's batch has been decoded: whether it may be taken. Always when it is
        within what its claim held; one with more rows than estimated only if it fits."""
        within = claim.state == HELD_CLAIM and rows <= claim.rows and nbytes <= claim.nbytes
        self.let_go(claim)
        return within or self.has_room(rows, nbytes)

    def let_go(self, claim: Claim) -> None:
        """The claim's batch has arrived, or never will: its room is no longer reserved."""
        if claim.state == HELD_CLAIM:
            self.reserved_rows -= claim.rows
            self.reserved_bytes -= claim.nbytes
        claim.state = GONE_CLAIM

    def admissions(self, now: float) -> list[tuple[trio.MemorySendChannel, Claim | int]]:
        """The waiting batches answered now, in turn: each is given room (its claim) or,
        once its wait is over, refused (the Retry-After seconds)."""
        answers: list[tuple[trio.MemorySendChannel, Claim | int]] = []
        while self.admitting:
            claim = self.admitting[0]
            if claim.state == GONE_CLAIM:
                self.admitting.popleft()
            elif not self.draining and self.has_room(claim.rows, claim.nbytes):
                answers.append((self.admitting.popleft().reply, self._hold(claim)))
            elif now >= claim.deadline or self.draining:
                self.admitting.popleft().state = GONE_CLAIM
                answers.append((claim.reply, self.retry_after(now)))
            else:
                break
        return answers

    def retry_after(self, now: float) -> int:
        """Whole seconds until the buffer is likely below its low watermark again, at the
        rate rows were written lately; while flushes fail, the time of the next attempt."""
        while self.drained and self.drained[0][0] < now - DRAIN_WINDOW_S:
            self.drained.popleft()
        rate = sum(rows for _, rows in self.drained) / DRAIN_WINDOW_S
        if self.failures:
            wait = self.retry_at - now
        elif rate == 0:
            wait = self.cfg.flush_interval
        else:
            waiting = sum(c.rows for c in self.admitting if c.state != GONE_CLAIM)
            wait = (sum(self.counts()) + self.reserved_rows + waiting - LOW_WATERMARK * self.cfg.max_rows) / rate
        return min(RETRY_AFTER_MAX_S, max(1, math.ceil(wait)))

    # writes
    def write(self, key: str, rows: list, at_us: int, now: float, nbytes: int) -> tuple[int, int]:
        """Take a batch accepted at `at_us` (µs since the epoch); returns its seq and version.
        Versions only go up, whatever the wall clock does."""
        self.row_bytes[key].append(max(MIN_ROW_BYTES[key], -(-nbytes // max(len(rows), 1))))  # rounded up
        self.seq += 1
        self.accepted.append((self.seq, now))
        self.clock_us = max(at_us, self.clock_us + 1)
        version = version_of(self.clock_us, self.instance)
        at = accept_time(version)
        size = nbytes // max(len(rows), 1)
        self._take(key, [Entry(row, at, at, self.seq, 0.0, self.seq, size, version) for row in rows], now)
        return self.seq, version

    def replay(self, key: str, entries: list[Entry], seq: int, now: float, wall: datetime) -> None:
        """Take a journal record's rows, with the seq and accept times they had. A task's
        wait for its session counts from when it was accepted (`wall` is the time now), so
        orphan_ttl runs on across restarts."""
        for entry in entries:
            entry.held_since = now - max(0.0, (wall - entry.created_at).total_seconds())
            self.clock_us = max(self.clock_us, version_us(entry.version))
        self.seq = max(self.seq, seq)
        self.accepted.append((seq, now))
        self._take(key, entries, now)

    def _take(self, key: str, entries: list[Entry], now: float) -> None:
        if not (self.sessions or self.tasks):
            self.first_pending_at = now
        grew = 0
        if key == "sessions":
            for entry in entries:
                grew += self._put(self.sessions, entry.row.session_id, entry)
                for task_id, held in self.held.pop(entry.row.session_id, {}).items():
                    self._unpin(held)
                    grew += self._put(self.tasks, task_id, held) - held.size
        else:
            for entry in entries:
                group = self.held.get(entry.row.session_id)
                if group is not None:
                    entry.held_since = entry.held_since or now
                    grew += self._put(group, entry.row.task_id, entry)
                else:
                    grew += self._put(self.tasks, entry.row.task_id, entry)
        self.bytes += grew

    def _put(self, rows: dict[str, Entry], key: str, entry: Entry) -> int:
        """put(), keeping `pins`: the rows that still need each journal record."""
        old = rows.get(key)
        if old is not None:
            self._unpin(old)
        grew = put(rows, key, entry)
        self._pin(rows[key])
        return grew

    def _pin(self, entry: Entry) -> None:
        if not self.pins[entry.first_seq]:
            heapq.heappush(self.pin_heap, entry.first_seq)
        self.pins[entry.first_seq] += 1

    def _unpin(self, *entries: Entry) -> None:
        for entry in entries:
            self.pins[entry.first_seq] -= 1
            if not self.pins[entry.first_seq]:
                del self.pins[entry.first_seq]

    def next_seq(self) -> int:
        """A seq for a journal record that is not a batch (a DELETE, held tasks copied forward)."""
        self.seq += 1
        return self.seq

    def held_pinning_the_journal(self) -> list[Entry]:
        """The held tasks, when one of them is the oldest row the journal keeps records
        for. A task whose session never comes would keep every later record until
        orphan_ttl: copied into a record of their own, they let the journal go on."""
        held = [e for group in self.held.values() for e in group.values()]
        if self.replaying or not held or min(e.first_seq for e in held) > self.floor():
            return []  # (during a replay, a new seq would be one the journal still holds)
        seq = self.next_seq()
        self._unpin(*held)
        for entry in held:
            entry.first_seq = seq
            self._pin(entry)
        return held

    def replay_done(self, last_seq: int) -> None:
        """Every unreleased record is replayed; new writes go on after the journal's last."""
        self.replaying = False
        self.seq = max(self.seq, last_seq)

    def journaled(self, seq: int, nbytes: int) -> None:
        self.records.append((seq, nbytes))
        self.journal_bytes += nbytes

    def floor(self) -> int:
        """The oldest journal record still needed: every row not yet written keeps the
        records of its writes since it was last written. While a replay runs, `seq` is
        the last record replayed: the records after it are kept too. The heap's smallest
        seq that still pins a row; seqs no row pins any more are dropped on the way."""
        while self.pin_heap and self.pin_heap[0] not in self.pins:
            heapq.heappop(self.pin_heap)
        return self.pin_heap[0] if self.pin_heap else self.seq + 1

    def release(self) -> int | None:
        """The new floor for the journal, when it has moved."""
        floor = self.floor()
        if floor <= self.released:
            return None
        self.released = floor
        while self.records and self.records[0][0] < floor:
            self.journal_bytes -= self.records.popleft()[1]
        return floor

    # flushing
    def take_snapshot(self, now: float) -> Snapshot | None:
        """The next snapshot for the flusher, if one is due and the flusher is idle."""
        if self.flusher_busy:
            return None
        if self.in_flight is not None:
            if now < self.retry_at:
                return None
        else:
            # Held tasks go with a snapshot every flush_interval: their session may have been
            # written meanwhile by another instance (or by other means).
            held_due = bool(self.held) and now >= self.held_retry_at
            pending = len(self.sessions) + len(self.tasks)
            if not pending and not held_due:
                return None
            due = held_due or now >= self.first_pending_at + self.cfg.flush_interval
            # Over a limit, batches are refused until a flush makes room: that flush is due now.
            if not (due or self.draining or self.waiters or self.refusing or pending >= self.cfg.flush_rows):
                return None
            if held_due:
                self.held_in_flight = self.held_count()
                self.held_tried_for = list(self.waiters)
                self.first_pending_at = min(self.first_pending_at, now)  # what this snapshot leaves is due
                for group in self.held.values():
                    for task_id, entry in group.items():
                        self._unpin(entry)
                        self.bytes += self._put(self.tasks, task_id, entry) - entry.size
                self.held = {}
            if len(self.tasks) <= SNAPSHOT_MAX_ROWS:
                tasks, self.tasks = self.tasks, {}
                self.first_pending_at = math.inf
            else:  # the oldest first; the rest stays due
                tasks = {k: self.tasks.pop(k) for k in list(itertools.islice(self.tasks, SNAPSHOT_MAX_ROWS))}
            # seq: what the snapshot makes durable once written; all of it only if nothing is left
            seq = self.durable_seq if self.tasks else self.seq
            self.in_flight = Snapshot(seq, self.sessions, tasks)
            self.sessions = {}
        self.flusher_busy = True
        return self.in_flight

    def request_flush(self, waiter: FlushWaiter) -> bool:
        """Register a /flush call; False when everything accepted is already written, which
        counts as a flush done now (/health's last_flush says when all was last written).
        Tasks held for their session are tried again first: another instance may have
        written their session meanwhile."""
        self._settle()
        if self.held or self.held_in_flight:
            waiter.held_tried = False
            self.held_retry_at = -math.inf
        elif self.durable_seq >= self.seq:
            self.last_flush = utc_now()
            return False
        waiter.target = self.seq
        self.waiters.append(waiter)
        return True

    def _settle(self) -> list[FlushWaiter]:
        """The /flush calls that are answered now: all they waited for is written (rows
        still held for their session once tried again do not count: they cannot be written yet)."""
        if self.idle():
            self.durable_seq = self.seq
        nothing_held = not (self.held or self.held_in_flight)
        done = [w for w in self.waiters if w.target <= self.durable_seq and (w.held_tried or nothing_held)]
        self.waiters = [w for w in self.waiters if w not in done]
        return done

    def written(self, sessions: int, tasks: int, held: list[Entry], now: float) -> list[tuple[trio.MemorySendChannel, Any]]:
        """The snapshot in flight is in the database; returns the replies now due."""
        snapshot = self.in_flight
        assert snapshot is not None and self.flusher_busy
        self.in_flight, self.flusher_busy = None, False
        self.held_in_flight = 0
        for waiter in self.held_tried_for:
            waiter.held_tried = True
        self.held_tried_for = []
        if held:  # at once if a /flush came while they were in flight, as it would have
            waiting = any(not w.held_tried for w in self.waiters)
            self.held_retry_at = -math.inf if waiting else now + self.cfg.flush_interval
        self.durable_seq = snapshot.seq
        self.failures, self.retry_at, self.last_error = 0, math.inf, None
        self.last_flush = utc_now()
        self.drained.append((now, len(snapshot.sessions) + len(snapshot.tasks) - len(held)))
        self.bytes -= sum(e.size for rows in (snapshot.sessions, snapshot.tasks) for e in rows.values())
        self._unpin(*snapshot.sessions.values(), *snapshot.tasks.values())
        forgotten = {f[1]: f[3] for f in self.forgetting}
        for entry in held:
            session_id = entry.row.session_id
            if session_id in forgotten:
                forgotten[session_id].append(entry.row.task_id)
            elif session_id in self.sessions:
                self.bytes += self._put(self.tasks, entry.row.task_id, entry)
            else:
                entry.held_since = entry.held_since or now
                self.bytes += self._put(self.held.setdefault(session_id, {}), entry.row.task_id, entry)
        for waiter in self.waiters:
            waiter.sessions_written += sessions
            waiter.tasks_written += tasks
        due = [(reply, (had_session, dropped)) for reply, _, had_session, dropped in self.forgetting]
        self.forgetting = []
        return due + [(waiter.reply, waiter) for waiter in self._settle()]

    def failed(self, error: str, now: float) -> float:
        """Schedule the retry of the snapshot in flight; returns the delay."""
        assert self.in_flight is not None and self.flusher_busy
        self.flusher_busy = False
        self.failures += 1
        self.last_error = error
        delay = min(self.cfg.retry_max, RETRY_BASE_S * 2 ** (self.failures - 1))
        delay *= random.uniform(0.5, 1.0)  # jitter: many daemons must not retry in step
        self.retry_at = now + delay
        return delay

    def expire_orphans(self, now: float) -> list[Entry]:
        """Held tasks whose session has not arrived within orphan_ttl."""
        expired = []
        for session_id in list(self.held):
            group = self.held[session_id]
            for task_id in [k for k, e in group.items() if now - e.held_since >= self.cfg.orphan_ttl]:
                expired.append(group.pop(task_id))
            if not group:
                del self.held[session_id]
        self.bytes -= sum(e.size for e in expired)
        self._unpin(*expired)
        return expired

    def oldest_unwritten(self, now: float) -> float | None:
        """Seconds since the oldest batch not yet all in the database was accepted (or
        replayed): how far the writes are behind. Held rows do not count (see oldest_held)."""
        while self.accepted and self.accepted[0][0] <= self.durable_seq:
            self.accepted.popleft()
        return now - self.accepted[0][1] if self.accepted else None

    def oldest_held(self, now: float) -> float | None:
        since = [e.held_since for group in self.held.values() for e in group.values()]
        return now - min(since) if since else None

    def lookup(self, key: str, row_id: str) -> list[Entry]:
        """Every buffered state of one row, oldest first: what a GET lays over the database."""
        found = [self.sessions.get(row_id)] if key == "sessions" else [self.tasks.get(row_id)]
        if self.in_flight is not None:
            found.append((self.in_flight.sessions if key == "sessions" else self.in_flight.tasks).get(row_id))
        if key == "tasks":
            found.extend(group.get(row_id) for group in self.held.values())
        return sorted((e for e in found if e is not None), key=operator.attrgetter("seq"))

    def forget(self, session_id: str, reply: trio.MemorySendChannel) -> list[tuple[trio.MemorySendChannel, Any]]:
        """Drop a deleted session's pending and held rows, so no later flush brings it back.
        The answer, (whether its session row was buffered, ids of the tasks dropped), is
        due once no snapshot with its older rows is in flight: the database delete that
        follows cannot be overtaken by them, and tasks of it that come back from that
        snapshot held are dropped too."""
        session = self.sessions.pop(session_id, None)
        had_session = session is not None
        if session is not None:
            self.bytes -= session.size
            self._unpin(session)
        dropped = [k for k, e in self.tasks.items() if e.row.session_id == session_id]
        for task_id in dropped:
            entry = self.tasks.pop(task_id)
            self.bytes -= entry.size
            self._unpin(entry)
        held = self.held.pop(session_id, {})
        self.bytes -= sum(e.size for e in held.values())
        self._unpin(*held.values())
        dropped.extend(held)
        if self.in_flight is None:
            return [(reply, (had_session, dropped))]
        had_session = had_session or session_id in self.in_flight.sessions
        self.forgetting.append((reply, session_id, had_session, dropped))
        return []

    def idle(self) -> bool:
        """Nothing left that the flusher could write."""
        return self.in_flight is None and not (self.sessions or self.tasks)

    def take_all(self) -> list[tuple[str, Entry]]:
        """Everything still in memory, for the dead-letter file when the daemon must go,
        in the order it was accepted: replaying the file line by line ends with the
        state accepted last."""
        rows = [("translation_sessions", e) for e in self.sessions.values()]
        if self.in_flight is not None:
            rows += [("translation_sessions", e) for e in self.in_flight.sessions.values()]
            rows += [("translation_tasks", e) for e in self.in_flight.tasks.values()]
        rows += [("translation_tasks", e) for e in self.tasks.values()]
        rows += [("translation_tasks", e) for g in self.held.values() for e in g.values()]
        self.sessions, self.tasks, self.held, self.in_flight = {}, {}, {}, None
        self.bytes = 0
        self.pins.clear()
        return sorted(rows, key=lambda row: row[1].seq)

    def next_wakeup(self) -> float:
        admitting = self.admitting[0].deadline if self.admitting else math.inf
        if self.in_flight is not None:
            return min(admitting, self.retry_at if not self.flusher_busy else math.inf)
        held = self.held_retry_at if self.held else math.inf
        if not (self.sessions or self.tasks):
            return min(admitting, held)
        return min(admitting, held, self.first_pending_at + self.cfg.flush_interval)


# ── the journal: accepted batches on disk until the database has them ───────────────
# Segment files <state dir>/journal/<number>.journal, only ever appended to. A record is
#   header: payload length (u32), CRC-32 of seq, kind and payload (u32), seq (u64), kind (u8)
#   payload: SESSIONS / TASKS: the batch's version (u64, see INSTANCE_BITS) + request body
#            FORGET: a deleted session's id; its rows in records before this one are void
#            RELEASED: every record below this seq (u64) is in the database (the record's seq is 0)
#            HELD: held tasks copied forward, JSON [[created_at, updated_at, version, versions, task], ...]
# Journals of persistd 1.0.x hold kinds 1, 2 and 5 instead, without versions: they are replayed
# with the accept time as the version (instance 0), older than anything written since.
# A segment is deleted once every record in it is released. Replay reads the segments in
# order and applies each batch still needed as it was accepted, so each key ends at its
# last acknowledged write.

RECORD = struct.Struct("<IIQB")
SEQ_KIND = struct.Struct("<QB")
MICROS = struct.Struct("<q")
VERSION_FIELD = struct.Struct("<Q")
FLOOR = struct.Struct("<Q")
SESSIONS_1_0, TASKS_1_0, FORGET, RELEASED, HELD_1_0, SESSIONS_BATCH, TASKS_BATCH, HELD = range(1, 9)
HELD_DECODER = msgspec.json.Decoder(list[tuple[datetime, datetime, int, dict[str, int] | None, TaskIn]])
HELD_1_0_DECODER = msgspec.json.Decoder(list[tuple[datetime, datetime, TaskIn]])
HELD_COPY_SHARE = 0.25  # held tasks pinning a journal this full (of max_bytes) are copied forward
BATCH_KINDS = {"sessions": SESSIONS_BATCH, "tasks": TASKS_BATCH}
SESSION_KINDS = (SESSIONS_BATCH, SESSIONS_1_0)
ROW_KINDS = (SESSIONS_BATCH, TASKS_BATCH, HELD, SESSIONS_1_0, TASKS_1_0, HELD_1_0)
SEGMENT_MAX_BYTES = 64 * 1024 * 1024
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
REPLAY_WAIT_S = 0.1  # replay waits this long for room when its backlog fills the buffer


def frame(seq: int, kind: int, parts: tuple[bytes, ...]) -> list[bytes]:
    """A record as the pieces to write: header, then the payload's parts."""
    crc = zlib.crc32(SEQ_KIND.pack(seq, kind))
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [RECORD.pack(sum(map(len, parts)), crc, seq, kind), *parts]


def micros(at: datetime) -> int:
    return (at - EPOCH) // timedelta(microseconds=1)


def version_of(at_us: int, instance: int) -> int:
    """The version of a write accepted at `at_us` (µs since 1970) by `instance`."""
    return max(0, at_us - VERSION_EPOCH_US) << INSTANCE_BITS | instance


def version_us(version: int) -> int:
    return (version >> INSTANCE_BITS) + VERSION_EPOCH_US


def accept_time(version: int) -> datetime:
    """A version's accept time, in whole seconds like the TIMESTAMP columns that store it."""
    return EPOCH + timedelta(seconds=version_us(version) // 1_000_000)


class Journal:
    """The write-ahead journal's files. Every method blocks on the disk and runs in a
    worker thread: `open()` before the actors start, then `commit()` from the journal
    actor, one at a time. A replay's `replay()` reads meanwhile; it only reads segments
    the buffer keeps (it releases nothing past the last record replayed)."""

    def __init__(self, path: Path, cfg: JournalConfig) -> None:
        self.path, self.mode = path, cfg.mode
        self.segment_bytes = min(SEGMENT_MAX_BYTES, cfg.max_bytes // 8)
        self.segments: list[tuple[Path, int]] = []  # (file, last seq in it), oldest first
        self.fd: int | None = None  # the last segment, while it is appended to
        self.size = 0  # its bytes
        self.number = 0  # of the last segment
        self.last_seq = 0
        self.floor = 0  # records below it were released before the last stop
        self.forgotten: dict[str, int] = {}  # deleted session id → seq of the deletion
        self.kept_aside = 0  # bad tails moved to <journal>/corrupt/

    def open(self) -> None:
        """Check every record of every segment, move a torn or corrupt tail aside, and
        learn the release floor, the last seq and the deletions, for `replay()`."""
        (self.path / "corrupt").mkdir(parents=True, exist_ok=True)
        for segment in sorted(self.path.glob("*.journal")):
            last = 0
            for seq, kind, payload in self._records(segment, keep_aside=True):
                last = max(last, seq)
                if kind == FORGET:
                    self.forgotten[payload.decode()] = seq
                elif kind == RELEASED:
                    self.floor = max(self.floor, FLOOR.unpack(payload)[0])
            self.segments.append((segment, last))
            self.last_seq = max(self.last_seq, last)
            self.number = max(self.number, int(segment.stem))

    def replay(self) -> typing.Iterator[tuple[int, int, bytes]]:
        """The batches not released yet, oldest first, read one at a time."""
        for segment, last in list(self.segments):
            if last < self.floor:  # released, or release marks only: it may be deleted meanwhile
                continue
            for seq, kind, payload in self._records(segment, keep_aside=False):
                if kind in ROW_KINDS and seq >= self.floor:
                    yield seq, kind, payload

    def batch(self, seq: int, kind: int, payload: bytes) -> tuple[str, list[Entry], int]:
        """A replayed record's rows as the buffer holds them, with their accept times,
        without the rows of sessions deleted after it; and the record's size."""
        if kind == HELD:
            key, items = "tasks", HELD_DECODER.decode(payload)
        elif kind == HELD_1_0:
            key, items = "tasks", [(created, updated, version_of(micros(updated), 0), None, row)
                                   for created, updated, row in HELD_1_0_DECODER.decode(payload)]
        else:
            key = "sessions" if kind in SESSION_KINDS else "tasks"
            version = VERSION_FIELD.unpack_from(payload)[0]
            if kind != BATCH_KINDS[key]:  # 1.0: the accept time
                version = version_of(MICROS.unpack_from(payload)[0], 0)
            at = accept_time(version)
            items = [(at, at, version, None, row) for row in decode_batch(key, payload[VERSION_FIELD.size:])]
        size = len(payload) // max(len(items), 1)
        return key, [Entry(row, created, updated, seq, 0.0, seq, size, version, versions)
                     for created, updated, version, versions, row in items
                     if self.forgotten.get(row.session_id, 0) < seq], len(payload)

    def _records(self, segment: Path, keep_aside: bool) -> typing.Iterator[tuple[int, int, bytes]]:
        with open(segment, "rb") as f:
            end = os.fstat(f.fileno()).st_size
            offset = 0
            while offset < end:
                header = f.read(RECORD.size)
                if len(header) < RECORD.size:
                    break
                length, crc, seq, kind = RECORD.unpack(header)
                if length > end - offset - RECORD.size:
                    break
                payload = f.read(length)
                if crc != zlib.crc32(payload, zlib.crc32(SEQ_KIND.pack(seq, kind))):
                    break
                yield seq, kind, payload
                offset += RECORD.size + length
        if offset < end and keep_aside:
            self._keep_aside(segment, offset, end)

    def _keep_aside(self, segment: Path, offset: int, end: int) -> None:
        """A record that is cut short or fails its checksum ends what can be trusted of
        its segment: that tail is copied to corrupt/ and cut off."""
        aside = self.path / "corrupt" / f"{segment.name}.{offset}"
        with open(segment, "r+b") as f:
            f.seek(offset)
            aside.write_bytes(f.read())
            f.truncate(offset)
            os.fsync(f.fileno())
        self.kept_aside += 1
        event(logging.ERROR, "journal_corrupt_tail", "journal {segment}: {bytes} bytes from offset {offset} are torn"
              " or corrupt; moved to {moved_to}", segment=segment.name, bytes=end - offset, offset=offset,
              moved_to=str(aside))

    def commit(self, records: list[tuple[int, int, tuple[bytes, ...]]], floor: int | None) -> None:
        """Delete the segments released below `floor`, then append `records` and, in
        fsync mode, make them durable: one write and one fsync for all of them."""
        if floor is not None:
            self._release(floor)
            if self.segments:
                records = [*records, (0, RELEASED, (FLOOR.pack(floor),))]
        if not records:
            return
        if self.fd is None:
            self.number += 1
            segment = self.path / f"{self.number:012d}.journal"
            self.fd = os.open(segment, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self.segments.append((segment, 0))
            self.size = 0
            self._sync_dir()
        data = b"".join(part for record in records for part in frame(*record))
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        if self.mode == "fsync":
            os.fdatasync(self.fd)
        self.size += len(data)
        segment, last = self.segments[-1]
        self.segments[-1] = (segment, max(last, *(seq for seq, _, _ in records)))
        if self.size >= self.segment_bytes:
            self.close()

    def _release(self, floor: int) -> None:
        while self.segments and self.segments[0][1] < floor:
            segment, _ = self.segments.pop(0)
            if not self.segments:
                self.close()
            segment.unlink()
            self._sync_dir()  # oldest first, each durable: an older record never outlives a newer one

    def _sync_dir(self) -> None:
        if self.mode == "fsync":
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class DeadLetters:
    """Rows that could not be written, as JSON lines with a reason each: never dropped."""

    def __init__(self, path: Path, metrics: Metrics) -> None:
        self.path, self.metrics = path, metrics

    async def write(self, reason: str, rows: list[tuple[str, Entry]], error: str | None = None) -> None:
        extra = {} if error is None else {"error": error}
        await self._append(reason, [{"table": table, "row": e.row, "created_at": e.created_at,
                                     "updated_at": e.updated_at, **extra} for table, e in rows])

    async def write_body(self, reason: str, table: str, body: bytes, error: str) -> None:
        """A journal record that no longer decodes (a later version validates more)."""
        await self._append(reason, [{"table": table, "error": error, "body": body.decode(errors="replace")}])

    async def _append(self, reason: str, records: list[dict]) -> None:
        """Appended and fsynced in a worker thread, never on the event loop; shielded: rows
        on their way out of memory are written whole even while the daemon is stopping."""
        if not records:
            return
        at = utc_now()
        data = b"".join(msgspec.json.encode({"reason": reason, "at": at, **record}) + b"\n" for record in records)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._append_bytes, data)
        self.metrics.dead_letters.labels(reason).inc(len(records))
        event(logging.ERROR, "dead_letter", "{rows} rows moved to {file}: {reason}", rows=len(records),
              file=str(self.path), reason=reason)

    def _append_bytes(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            if not stat.S_ISFIFO(os.fstat(f.fileno()).st_mode):  # a FIFO cannot be synced: its reader has the bytes
                os.fsync(f.fileno())


# ── storage: the seam ────────────────────────────────────────────────────────────────
# The daemon speaks to its database only through a Store (persistd/storage.py): operations,
# never connections or SQL. persistd/mysql.py and persistd/sqlite.py hold the two dialects;
# the URL's scheme picks one, imported when it is used (each imports this module's types).


def open_store(cfg: DatabaseConfig, instance: int = 0) -> Any:
    """The backend `cfg.url` names: a persistd.storage.Store. `instance` is the id that
    the MySQL backend's task_counts rows of this instance carry."""
    if backend_of(cfg.url) == "sqlite":
        from persistd.sqlite import SQLiteStore
        return SQLiteStore(cfg)
    from persistd.mysql import MySQLStore
    return MySQLStore(cfg, instance)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Reachability:
    """What reads and /health's pings found of the database: the log tells when that
    changes, not at every request."""

    def __init__(self) -> None:
        self.unreachable_since: float | None = None

    def answered(self, error: str | None = None) -> None:
        if error is not None and self.unreachable_since is None:
            self.unreachable_since = time.monotonic()
            event(logging.WARNING, "database_unreachable", "the database does not answer reads: {error}", error=error)
        elif error is None and self.unreachable_since is not None:
            event(logging.INFO, "database_reachable", "the database answers reads again after {seconds:.1f} s",
                  seconds=round(time.monotonic() - self.unreachable_since, 3))
            self.unreachable_since = None


# What the columns hold for a row that never carried an optional field.
DB_DEFAULTS = {**{name: None for t in (SessionIn, TaskIn) for name in OPTIONAL_FIELDS[t]},
               "total_tasks": 0, "completed_tasks": 0, "failed_tasks": 0, "processing_tasks": 0, "retry_count": 0}


def overlay(stored: dict | None, buffered: list[Entry]) -> dict | None:
    """The latest accepted state of a row: its buffered states laid over the stored one,
    each field where the buffer's version of it is the newer (another instance may have
    written a newer one). `stored` has the versions (storage.version_columns)."""
    if not buffered:
        return stored
    state = dict(stored) if stored is not None else {**DB_DEFAULTS, "created_at": buffered[0].created_at}
    optional = OPTIONAL_FIELDS[type(buffered[0].row)]
    for entry in buffered:
        for name, value in msgspec.structs.asdict(entry.row).items():
            if value is UNSET:
                continue
            if name not in optional:
                if entry.version > state.get("row_version", 0):
                    state[name] = value
            elif entry.field_version(name) > state.get(f"{name}_version", 0):
                state[name], state[f"{name}_version"] = value, entry.field_version(name)
        if entry.version > state.get("row_version", 0):
            state["updated_at"], state["row_version"] = entry.updated_at, entry.version
    return state


def clock_lease(now_us: int, floor_us: int) -> int:
    """The accept time (µs) that versions given out after a restart start from."""
    return max(now_us, floor_us) + int(CLOCK_LEASE_S * 1_000_000)


def read_clock(state_dir: Path) -> int:
    """The last lease written to the state dir; 0 when there is none (a first start)."""
    try:
        return int((state_dir / CLOCK_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return 0


def write_file(path: Path, text: str) -> None:
    """Written whole, then renamed over `path`: a crash leaves the old text or the new."""
    partial = path.with_suffix(".new")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    partial.rename(path)


async def renew_clock(state_dir: Path, floor_us: int) -> None:
    lease = clock_lease(time.time_ns() // 1000, floor_us)
    await trio.to_thread.run_sync(write_file, state_dir / CLOCK_FILE, f"{lease}\n")


async def clock_actor(state_dir: Path, floor_us: int, stop: trio.Event) -> None:
    """Renews the lease in <state dir>/clock every CLOCK_RENEW_S until `stop`."""
    while not stop.is_set():
        with trio.move_on_after(CLOCK_RENEW_S):
            await stop.wait()
        await renew_clock(state_dir, floor_us)


def instance_id(state_dir: Path, configured: int) -> int:
    """[state] instance_id, or the id chosen at random at the first start and kept in the
    state dir (written whole, then renamed: a crash leaves no half-written id)."""
    if configured >= 0:
        return configured
    path = state_dir / INSTANCE_FILE
    try:
        return int(path.read_text())
    except FileNotFoundError:
        chosen = random.randrange(1 << INSTANCE_BITS)
        write_file(path, f"{chosen}\n")
        return chosen
    except ValueError:
        raise ConfigError(f"{path} does not hold an instance id; remove it to have one chosen,"
                          " or set [state] instance_id") from None


def cleanup_cutoffs(now: datetime, completed_days: int, failed_days: int) -> tuple[datetime, datetime]:
    """Naive UTC cut-offs: completed sessions older than completed_days, failed and
    cancelled ones older than failed_days (by their last update) are expired."""
    now = now.astimezone(UTC).replace(tzinfo=None)
    return now - timedelta(days=completed_days), now - timedelta(days=failed_days)


# ── messages between actors ──────────────────────────────────────────────────────────


class Admit(NamedTuple):  # http → buffer: room for a batch before its body is read; answered
    key: str                                      # with its Claim, or the Retry-After seconds
    nbytes: int  # Content-Length
    reply: trio.MemorySendChannel


class LetGo(NamedTuple):  # http → buffer: the claim's batch will not come (a no-op once it came)
    claim: Claim


class Write(NamedTuple):  # http → buffer: a batch for its claim's room; answered True once journaled, or
    # with the Retry-After seconds if its rows were more than the claim's estimate and do not fit
    key: str
    rows: list
    body: bytes  # as received: the journal's record of the batch
    at_us: int  # accept time, µs since the epoch
    claim: Claim
    reply: trio.MemorySendChannel


class Replayed(NamedTuple):  # replay → buffer: a journal record; answered True
    key: str
    entries: list[Entry]
    nbytes: int
    seq: int
    reply: trio.MemorySendChannel


class ReplayDone(NamedTuple):  # replay → buffer: every unreleased record was handed over
    last_seq: int  # the journal's: new writes go on from there


class Room(NamedTuple):  # http, replay → buffer; answered whether a batch this big would fit
    rows: int
    nbytes: int
    reply: trio.MemorySendChannel


class Flush(NamedTuple):  # http → buffer; answered with the FlushWaiter once written
    waiter: FlushWaiter


class Status(NamedTuple):  # http → buffer; answered with BufferStatus
    reply: trio.MemorySendChannel


class Lookup(NamedTuple):  # http → buffer; answered with copies of the row's buffered states
    key: str
    row_id: str
    reply: trio.MemorySendChannel


class Forget(NamedTuple):  # http → buffer; answered (had_session, dropped task ids)
    session_id: str
    reply: trio.MemorySendChannel


class Drain(NamedTuple):  # http → buffer: no more requests will come
    pass


class Job(NamedTuple):  # buffer → flusher
    snapshot: Snapshot
    # The flusher gives up (and reports Failed) when this scope's deadline passes. The
    # buffer keeps it, so that at shutdown it can shorten an attempt already running.
    scope: trio.CancelScope


class Written(NamedTuple):  # flusher → buffer
    sessions: int
    tasks: int
    held: list[Entry]
    refused: list[tuple[str, Entry, str]]  # (table, row, the database's reason)


class Failed(NamedTuple):  # flusher → buffer
    error: str
    transient: bool  # False: retrying cannot help, the daemon stops (see Fatal)


class Append(NamedTuple):  # buffer → journal
    seq: int
    kind: int
    parts: tuple[bytes, ...]  # the payload


class Release(NamedTuple):  # buffer → journal: records below `floor` are no longer needed
    floor: int


class Sync(NamedTuple):  # buffer → journal; `reply` gets `value` once all appended before is durable
    reply: trio.MemorySendChannel
    value: Any


class BufferStatus(NamedTuple):
    health: BufferHealth
    held_tasks: int
    last_error: str | None
    journal_bytes: int
    failures: int  # flushes failed in a row
    refusing: bool  # batches get 503 BUFFER_FULL


async def ask_buffer(to_buffer: trio.MemorySendChannel, message: typing.Callable[..., Any], *args: Any,
                     timeout: float = math.inf) -> Any:
    """Send `message(*args, reply)` to the buffer actor and wait for its answer; None when
    none came within `timeout` (the buffer waits for the database: a flush that keeps failing)."""
    reply, replies = trio.open_memory_channel(1)
    async with replies:
        await to_buffer.send(message(*args, reply))
        with trio.move_on_after(timeout):
            return await replies.receive()
    return None


def flush_request(reply: trio.MemorySendChannel) -> Flush:
    return Flush(FlushWaiter(reply))


def answer(reply: trio.MemorySendChannel, value: Any) -> bool:
    """Reply to a request whose handler may have given up waiting (and closed its end);
    whether the reply was delivered."""
    try:
        reply.send_nowait(value)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


def buffer_status(buf: Buffer, now: float) -> BufferStatus:
    sessions, tasks = buf.counts()
    held = buf.waiting_for_session()
    oldest, unwritten = buf.oldest_held(now), buf.oldest_unwritten(now)
    health = BufferHealth(
        sessions_count=sessions, tasks_count=tasks, total_count=sessions + tasks,
        capacity=buf.cfg.max_rows, usage_percent=round(100 * (sessions + tasks) / buf.cfg.max_rows, 1),
        last_flush=buf.last_flush, tasks_waiting_for_session=held,
        oldest_waiting_seconds=None if oldest is None else round(oldest, 3),
        oldest_unwritten_seconds=None if unwritten is None else round(unwritten, 3))
    return BufferStatus(health, held, buf.last_error, buf.journal_bytes, buf.failures, buf.refusing)


# ── HTTP ─────────────────────────────────────────────────────────────────────────────

JSON = "application/json"
JSON_WHITESPACE = b" \t\r\n"  # RFC 8259's; bytes.strip() would also take \x0b and \x0c
HTTP_ERROR_CODES = {400: "BAD_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
                    408: "REQUEST_TIMEOUT", 413: "PAYLOAD_TOO_LARGE"}
BUSY = "persistd.busy"  # scope key: the body would pass max_inflight_bytes (see guard())


def validation_error(exc: msgspec.ValidationError, where: str = "") -> tuple[str, str]:
    """msgspec's "message - at `$.path`" as (field, message)."""
    text = str(exc)
    if m := re.fullmatch(r"(.*) - at `\$\.?(.*)`", text):
        return where + m[2], m[1]
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", text):
        return where + m[1], "Unknown field"
    return where, text


def decode_body(type_: type, body: bytes) -> Any:
    """A small body (cleanup's): 400 when it is not JSON at all, even where the typed
    decoder stopped at a wrong type first (`[1,`), 422 when it is JSON of the wrong shape."""
    try:
        try:
            return _decoder(type_).decode(body)
        except msgspec.ValidationError:
            return _decoder(type_).decode(whole_numbers_as_integers(body))
    except msgspec.ValidationError as exc:
        wrong_shape = ApiError(422, "VALIDATION_ERROR", "Invalid request body", [validation_error(exc)])
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise not_json(exc) from None
    try:
        msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise not_json(exc) from None
    raise wrong_shape


def json_response(status: int, body: Any) -> Response:
    return Response(msgspec.json.encode(body), status=status, content_type=JSON)


class IdConverter(werkzeug.routing.BaseConverter):
    """`<id:session_id>`: one path segment that can be an id. /sessions/batch is then only the
    batch endpoint: GET there is a 405 naming POST, as the description says, not the session
    whose id is `batch`."""
    regex = f"{NOT_AN_ID}[^/]+"


@functools.cache
def endpoint_label(rule: str) -> str:
    """The route template, in the spec's spelling: never a raw id."""
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)


# ── OpenAPI: the API described, from the types that validate and shape it ─────────────
# Built at start: the components come from msgspec.json.schema_components() over the same
# Structs the door decodes with and the answers are encoded from; what a type cannot say
# (which route answers what, the limits checked after decoding, patterns in the dialect of
# JSON Schema) is derived here from the same constants. The build refuses a route without
# an operation, and an operation without a route. Served at /openapi.json, and read by
# Swagger UI at /docs from assets that ship in a package (flask-swagger-ui): no CDN.

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{name}"


# ── what each route answers ──────────────────────────────────────────────────────────
# Error responses by name: (status, error codes, description). The codes are the API's.


class Err(NamedTuple):
    status: int
    codes: tuple[str, ...]
    description: str
    id_field: str | None = None  # 404: the body also carries the id asked for
    retry_after: bool = False


ERRORS = {
    "InvalidJson": Err(400, ("INVALID_JSON",), "The body is not JSON."),
    "PayloadTooLarge": Err(413, (HTTP_ERROR_CODES[413],), "The body is larger than `[server] max_body_bytes`."),
    # Quart's BODY_TIMEOUT (60 s) for a body that arrives too slowly.
    "BodyTimeout": Err(408, (HTTP_ERROR_CODES.get(408, "HTTP_ERROR"),), "The body did not arrive within 60 s."),
    "InvalidBatch": Err(422, ("VALIDATION_ERROR", "BATCH_TOO_LARGE"), (
        "The batch is refused whole: every offending row and field is listed in `errors`"
        " (`tasks[3].confidence`). More than 1000 rows is `BATCH_TOO_LARGE`.")),
    "InvalidBody": Err(422, ("VALIDATION_ERROR",), "The body does not match the schema."),
    "InvalidQuery": Err(422, ("VALIDATION_ERROR",), (
        "A query parameter is unknown or out of its range (page >= 1, page_size 1..100,"
        " an unknown status/sort_by/order, a date that is not an RFC 3339 date-time).")),
    "SessionNotFound": Err(404, (HTTP_ERROR_CODES[404],), "No such session, stored or buffered.", id_field="session_id"),
    "TaskNotFound": Err(404, (HTTP_ERROR_CODES[404],), "No such task, stored or buffered.", id_field="task_id"),
    "BufferFull": Err(503, ("BUFFER_FULL",), (
        "Backpressure: the buffer or the journal is over a limit, and the batch found no room within"
        " `[buffer] admission_wait`; nothing of it was kept. Usually answered before the body was read,"
        " with `Connection: close`. Send it again after `Retry-After` seconds (from the rate rows are"
        " being written)."), retry_after=True),
    "DatabaseUnavailable": Err(503, ("DATABASE_UNAVAILABLE",), (
        "The database did not answer within `[database] read_timeout`; retry later.")),
    "WriteOutFailed": Err(503, ("FLUSH_TIMEOUT", "DATABASE_UNAVAILABLE"), (
        "`FLUSH_TIMEOUT`: the buffer could not be written out within `[buffer] flush_timeout`"
        " (rows are kept and retried); `DATABASE_UNAVAILABLE`: the read that follows timed out.")),
    # Only when authentication is on (the before_request of create_app answers them).
    "Unauthorized": Err(401, ("UNAUTHORIZED",), "No credential, or one that is not valid (unknown key, bad or expired token)."),
    "Forbidden": Err(403, ("FORBIDDEN",), "The credential is valid but lacks the scope this operation needs."),
}
AUTH_ERRORS = ("Unauthorized", "Forbidden")
METHOD_NOT_ALLOWED = Err(405, (HTTP_ERROR_CODES[405],), "The path exists, the method does not; `Allow` lists the methods.")


class Op(NamedTuple):
    tag: str
    summary: str
    ok: int
    answer: type | None  # None: text/plain (metrics)
    errors: tuple[str, ...] = ()
    body: type | None = None
    body_required: bool = True
    query: type | None = None
    description: str = ""


BATCH_ERRORS = ("InvalidJson", "BodyTimeout", "PayloadTooLarge", "InvalidBatch", "BufferFull")
BATCH_NOTE = (
    "Answers 202 once every row passed validation and the batch is in the journal; the rows reach"
    " MySQL within `[buffer] flush_interval`. Rows are upserts by primary key; the last accepted write"
    " wins. An optional field that is absent keeps its stored value, `null` clears it. Unknown fields"
    " are refused. Integers must be written without a fraction or exponent (`1`, not `1.0`).")
OPERATIONS: dict[str, Op] = {  # keyed by the route's endpoint name, which is also the operationId
    "sessions_batch": Op("Batch writes", "Write a batch of sessions (spec §3.1)", 202, Accepted,
                         BATCH_ERRORS, body=SessionBatch, description=BATCH_NOTE),
    "tasks_batch": Op("Batch writes", "Write a batch of tasks (spec §3.2)", 202, Accepted,
                      BATCH_ERRORS, body=TaskBatch, description=BATCH_NOTE + (
                          " A task whose session has not arrived yet is accepted and held until it does"
                          " (at most `[buffer] orphan_ttl`, then the dead-letter file).")),
    "flush": Op("Batch writes", "Write out everything accepted (spec §3.3)", 200, FlushAnswer,
                description="Returns once every row accepted before the call is in the database, or after"
                            " `[buffer] flush_timeout` with 503 and `status: error` (rows are kept)."),
    "sessions_list": Op("Queries", "List sessions (spec §4.1)", 200, SessionPage,
                        ("InvalidQuery", "DatabaseUnavailable"), query=SessionQuery,
                        description="Reads the database (not the buffer). Ties are broken by session_id."),
    "session_detail": Op("Queries", "One session (spec §4.2)", 200, SessionDetail,
                         ("SessionNotFound", "DatabaseUnavailable"),
                         description="The latest accepted state: buffered state laid over the stored row."),
    "session_tasks": Op("Queries", "A session's tasks, in sheet order (spec §4.3)", 200, SessionTaskPage,
                        ("SessionNotFound", "InvalidQuery", "DatabaseUnavailable"), query=SessionTaskQuery,
                        description="Ordered by sheet_name, row_index, column_name, task_id."),
    "task_detail": Op("Queries", "One task (spec §4.4)", 200, TaskDetail,
                      ("TaskNotFound", "DatabaseUnavailable"),
                      description="The latest accepted state: buffered state laid over the stored row."),
    "tasks_list": Op("Queries", "List tasks across sessions (spec §4.5)", 200, TaskPage,
                     ("InvalidQuery", "DatabaseUnavailable"), query=TaskQuery,
                     description="Newest first (created_at DESC, task_id DESC); reads the database."),
    "recovery_incomplete": Op("Recovery", "Sessions still pending or processing (spec §5.1)", 200,
                              IncompleteSessions, ("WriteOutFailed",),
                              description="Writes the buffer out first, so no accepted row is missed."),
    "recovery_restore": Op("Recovery", "A session and its unfinished tasks (spec §5.2)", 200, Restored,
                           ("SessionNotFound", "WriteOutFailed"),
                           description="Writes the buffer out first. `tasks` holds the pending and processing"
                                       " tasks in sheet order."),
    "session_delete": Op("Management", "Delete a session and its tasks (spec §6.1)", 200, DeletedSession,
                         ("SessionNotFound", "WriteOutFailed"),
                         description="Also drops the session's buffered and held rows."),
    "sessions_cleanup": Op("Management", "Delete expired sessions (spec §6.2)", 200, CleanupOut,
                           ("InvalidJson", "BodyTimeout", "PayloadTooLarge", "InvalidBody", "WriteOutFailed"),
                           body=CleanupIn, body_required=False,
                           description="Ages sessions by updated_at: completed ones older than completed_days,"
                                       " failed and cancelled ones older than failed_days. An empty body uses the"
                                       " defaults. `dry_run` counts without deleting."),
    "stats": Op("Management", "Statistics (spec §6.3)", 200, Stats, ("DatabaseUnavailable",),
                description="From the database, reused for up to 5 s. `storage` row counts are InnoDB estimates."),
    "health": Op("System", "Health (spec §7.1)", 200, Health,
                 description="200 healthy; 503 (same body, `status: degraded`) while the database does not"
                             " answer a ping or flushes fail."),
    "system_metrics": Op("System", "Prometheus metrics (spec §7.2)", 200, None,
                         description="Prometheus text exposition format 0.0.4."),
}
# Request examples (spec §3.1, §3.2, §6.2). Checked at build time by the daemon's own door,
# so an example can never be one the daemon refuses.
SPEC_SESSION = "550e8400-e29b-41d4-a716-446655440000"
EXAMPLES: dict[type, dict] = {
    SessionBatch: {"sessions": [{
        "session_id": SPEC_SESSION, "filename": "game_translation.xlsx", "file_path": "/uploads/game_translation.xlsx",
        "status": "processing", "game_info": {"game_name": "Fantasy RPG", "source_language": "en",
                                              "target_language": "zh", "game_type": "RPG"},
        "llm_provider": "openai", "metadata": {"user_id": "user_123", "project_id": "proj_456"},
        "total_tasks": 1000, "completed_tasks": 0, "failed_tasks": 0, "processing_tasks": 0}]},
    TaskBatch: {"tasks": [{
        "task_id": "task_001", "session_id": SPEC_SESSION, "batch_id": "batch_001", "sheet_name": "Dialogue",
        "row_index": 10, "column_name": "Text", "source_text": "Hello, adventurer!", "target_text": "你好，冒险者！",
        "context": "NPC greeting dialogue", "status": "completed", "confidence": 0.95, "error_message": None,
        "retry_count": 0, "start_time": "2025-09-30T10:10:00Z", "end_time": "2025-09-30T10:10:05Z",
        "duration_ms": 5000}]},
    CleanupIn: {"completed_days": 90, "failed_days": 30, "dry_run": True},
}


def _checked_example(type_: type) -> dict:
    value = EXAMPLES[type_]
    body = msgspec.json.encode(value)
    key = next((k for k, (batch, _) in BATCHES.items() if batch is type_), None)
    decode_batch(key, body) if key else decode_body(type_, body)  # raises ApiError if refused
    return {"spec": {"summary": "The example of the spec", "value": value}}


NOT_IN_DOCUMENT = frozenset({"openapi_json", "docs", "docs_asset"})  # the description describes the API
TAGS = {
    "Batch writes": "Sessions and tasks in batches of up to 1000 rows, acknowledged at once, written behind.",
    "Queries": "Sessions and tasks as accepted.",
    "Recovery": "What a restarted translation backend needs to resume.",
    "Management": "Deletion, retention and statistics.",
    "System": "Health and metrics.",
}
SECURITY_SCHEMES = {
    "apiKey": {"type": "http", "scheme": "bearer", "bearerFormat": "persistd API key",
               "description": "`Authorization: Bearer <API key>`; keys are issued with scopes read, write, admin."},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                     "description": "The same API key in the `X-API-Key` header."},
    "jwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
            "description": "A token of the configured issuer and audience; its scope claim grants read, write, admin."},
}


# ── regular expressions in the dialect of JSON Schema (ECMA-262) ─────────────────────


@functools.cache
def python_whitespace() -> str:
    """Python's `\\s` for str as an explicit ECMA-262 class body (it has no member above U+FFFF)."""
    points = [c for c in range(0x10000) if re.match(r"\s", chr(c))]
    ranges: list[list[int]] = []
    for c in points:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)


def ecma_pattern(python: str) -> str:
    """msgspec's Meta(pattern=) is Python `re.search` syntax; JSON Schema's is ECMA-262.
    The daemon's patterns use \\A, \\Z, \\s, \\S, escaped literals, classes and
    lookaheads; anything else must be looked at, not guessed."""
    ws = python_whitespace()
    out, i, in_class = [], 0, False
    while i < len(python):
        c = python[i]
        if c == "\\":
            escaped = python[i + 1]
            if escaped == "s":
                out.append(ws if in_class else f"[{ws}]")
            elif escaped in "SAZ" and not in_class:
                out.append({"S": f"[^{ws}]", "A": "^", "Z": "$"}[escaped])
            elif escaped in ".\\/-[]()":
                out.append("\\" + escaped)
            else:
                raise ValueError(f"no ECMA-262 translation for \\{escaped} in {python!r}")
            i += 2
            continue
        if c == "$":  # Python's also matches before a final newline
            raise ValueError(f"no ECMA-262 translation for {c!r} in {python!r}")
        in_class = (in_class or c == "[") and c != "]"
        out.append(c)
        i += 1
    return "".join(out)


def digits_range(lo: int, hi: int, width: int) -> str:
    """A regex for the zero-padded numbers lo..hi of `width` digits."""
    def klass(a: int, b: int) -> str:
        return str(a) if a == b else f"[{a}-{b}]"

    def rec(a: str, b: str) -> str:
        n = len(a)
        if n == 0:
            return ""
        if a[0] == b[0]:
            return a[0] + group(rec(a[1:], b[1:]))
        low_full, high_full = a[1:] == "0" * (n - 1), b[1:] == "9" * (n - 1)
        first, last = int(a[0]) + (not low_full), int(b[0]) - (not high_full)
        parts = [] if low_full else [a[0] + group(rec(a[1:], "9" * (n - 1)))]
        if first <= last:
            parts.append(klass(first, last) + ("" if n == 1 else "[0-9]" if n == 2 else f"[0-9]{{{n - 1}}}"))
        parts += [] if high_full else [b[0] + group(rec("0" * (n - 1), b[1:]))]
        return "|".join(parts)

    def group(r: str) -> str:
        return f"(?:{r})" if "|" in r else r

    return group(rec(f"{lo:0{width}}", f"{hi:0{width}}"))


def is_leap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


@functools.cache
def datetime_pattern(first_year: int = 1, last_year: int = 9999) -> str:
    """Exactly the strings msgspec decodes as a datetime, for the years first..last:
    RFC 3339 date-times with `T`, `t` or a space, any fraction, `Z`, `z`, ±HH:MM, ±HHMM or
    no offset (the daemon reads that as UTC); real calendar dates; no leap second."""
    year = digits_range(first_year, last_year, 4)
    if (first_year, last_year) == (1, 9999):
        leap = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
    else:
        leap = "(?:" + "|".join(f"{y:04}" for y in range(first_year, last_year + 1) if is_leap(y)) + ")"
    date = (f"(?:{year}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
            f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{leap}-02-29)")
    time = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?"
    offset = "(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):?[0-5][0-9])?"
    return f"^{date}[Tt ]{time}{offset}$"


# ── schema refinements derived from the types ────────────────────────────────────────

FIELD_NOTE_OPTIONAL = "Optional: absent keeps the stored value, `null` clears it."


def _union_members(t: msgspec.inspect.Type) -> list[msgspec.inspect.Type]:
    return list(t.types) if isinstance(t, msgspec.inspect.UnionType) else [t]


def _non_null(schema: dict) -> dict:
    """The schema of a field without its null branch (a query parameter cannot be null)."""
    if "anyOf" in schema:
        rest = [s for s in schema["anyOf"] if s != {"type": "null"}]
        out = {k: v for k, v in schema.items() if k != "anyOf"}
        return {**rest[0], **out} if len(rest) == 1 else {**out, "anyOf": rest}
    return schema


def _patch_string(schema: dict, patch: dict) -> None:
    """Apply `patch` to the string branch of a (possibly nullable) field schema."""
    for s in schema.get("anyOf", [schema]):
        if s.get("type") == "string":
            s.update(patch)


def _refine_struct(info: msgspec.inspect.StructType, schema: dict, incoming: bool) -> None:
    props = schema.get("properties", {})
    defaults = {f.name: f.default for f in msgspec.structs.fields(info.cls)}  # inspect hides UNSET
    for field in info.fields:
        prop = props[field.encode_name]
        members = _union_members(field.type)
        kinds = {type(m) for m in members}
        if msgspec.inspect.DateTimeType in kinds:
            if not incoming:
                _patch_string(prop, {"format": "date-time"})
            elif info.cls is TaskIn and field.name in TIME_FIELDS:
                lo, hi = TIMESTAMP_MIN, TIMESTAMP_MAX
                _patch_string(prop, {"pattern": datetime_pattern(lo.year + 1, hi.year - 1)})
                prop["description"] = (
                    f"A time from {lo:%Y-%m-%dT%H:%M:%SZ} to {hi:%Y-%m-%dT%H:%M:%SZ} (MySQL TIMESTAMP); without an"
                    f" offset it is UTC; fractions of a second are dropped. The pattern admits the years"
                    f" {lo.year + 1}..{hi.year - 1}, inside that range whatever the offset.")
            else:
                _patch_string(prop, {"pattern": datetime_pattern()})
                prop["description"] = "An RFC 3339 date-time; without an offset it is UTC."
        for m in members:
            if isinstance(m, msgspec.inspect.StrType) and m.pattern is not None:
                _patch_string(prop, {"pattern": ecma_pattern(m.pattern)})
                prop.setdefault("description", "No whitespace. Compared case-sensitively.")
        if incoming and info.cls is TaskIn and field.name in TEXT_FIELDS:
            _patch_string(prop, {"x-persistd-max-utf8-bytes": TEXT_MAX_BYTES})
            prop["description"] = (f"At most {TEXT_MAX_BYTES:,} bytes in UTF-8 (a TEXT column), checked at the door;"
                                   f" maxLength counts characters, so it holds for ASCII and bounds the rest.")
        if incoming and msgspec.inspect.DictType in kinds:
            for s in prop.get("anyOf", [prop]):
                if s.get("type") == "object":
                    s.update({"x-persistd-max-depth": JSON_MAX_DEPTH, "x-persistd-max-json-bytes": JSON_MAX_BYTES})
            prop["description"] = (f"Any JSON object of at most {JSON_MAX_DEPTH} levels and {JSON_MAX_BYTES:,}"
                                   f" bytes as JSON (checked at the door; not expressible in JSON Schema).")
        if isinstance(field.type, msgspec.inspect.RawType) and info.cls is Restored:
            props[field.encode_name] = {"type": "array", "items": {"$ref": REF.format(name="RestoredTask")}}
        if incoming and defaults[field.name] is msgspec.UNSET and msgspec.inspect.NoneType in kinds:
            prop["description"] = f"{prop.get('description', '')} {FIELD_NOTE_OPTIONAL}".strip()


def _refine(components: dict, request_types: list[type], response_types: list[type]) -> None:
    roles: dict[type, bool] = {}
    for incoming, roots in ((True, request_types), (False, response_types)):
        for info in _structs(roots):
            if roles.setdefault(info.cls, incoming) != incoming:
                raise ValueError(f"{info.cls.__name__} is both a request and a response type")
            _refine_struct(info, components[info.cls.__name__], incoming)
    # Stats' two dicts always hold the total and every status (stats_from).
    for key, statuses in (("sessions", SessionStatus), ("tasks", TaskStatus)):
        names = ["total", *typing.get_args(statuses)]
        components["Stats"]["properties"][key].update(
            {"properties": {n: {"type": "integer", "minimum": 0} for n in names}, "required": names})


def _structs(roots: list[type]) -> list[msgspec.inspect.StructType]:
    seen: dict[type, msgspec.inspect.StructType] = {}

    def walk(t: msgspec.inspect.Type) -> None:
        if isinstance(t, msgspec.inspect.StructType):
            if t.cls in seen:
                return
            seen[t.cls] = t
            for f in t.fields:
                walk(f.type)
        for attr in ("types", "item_type", "value_type", "key_type"):
            inner = getattr(t, attr, None)
            for x in (inner if isinstance(inner, tuple) else (inner,) if inner is not None else ()):
                walk(x)

    for t in msgspec.inspect.multi_type_info(roots):
        walk(t)
    return list(seen.values())


def _typed_enums(node: Any) -> None:
    """msgspec writes a str Literal as a bare enum; say "string" too, for the tools that look."""
    if isinstance(node, dict):
        if "enum" in node and "type" not in node and all(isinstance(v, str) for v in node["enum"]):
            node["type"] = "string"
        for v in node.values():
            _typed_enums(v)
    elif isinstance(node, list):
        for v in node:
            _typed_enums(v)


# ── the document ─────────────────────────────────────────────────────────────────────


def _error_response(err: Err) -> dict:
    refine: dict[str, Any] = {"type": "object", "properties": {"error_code": {"enum": list(err.codes)}}}
    if err.id_field:  # not required: the router's own 404 (an id with `/`, see _path_parameter) has none
        refine["properties"][err.id_field] = {"type": "string", "description": (
            "The id asked for; absent when the path matched no route (an id containing `/`).")}
    response: dict[str, Any] = {"description": f"`{'`, `'.join(err.codes)}`: {err.description}", "content": {
        JSON: {"schema": {"allOf": [{"$ref": REF.format(name="ErrorBody")}, refine]}}}}
    if err.retry_after:
        response["headers"] = {"Retry-After": {"required": True, "description": "Seconds to wait before sending again.",
                                               "schema": {"type": "integer", "minimum": 1}}}
    if err.status in (401, 403):
        response["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}, "description": (
            "`Bearer realm=\"persistd\"`, with `error=\"invalid_token\"` or `error=\"insufficient_scope\"` and the"
            " `scope` needed (RFC 6750).")}}
    if err.status == 405:
        response["headers"] = {"Allow": {"required": True, "schema": {"type": "string"}}}
    return response


def _parameters(query: type) -> list[dict]:
    _, components = msgspec.json.schema_components([query], ref_template=REF)
    schema = components[query.__name__]
    info = msgspec.inspect.type_info(query)
    _refine_struct(info, schema, incoming=True)
    params = []
    for name, prop in schema["properties"].items():
        prop = _non_null(prop)
        if prop.get("default", ...) is None:  # None is "no filter": the parameter is absent
            del prop["default"]
        description = prop.pop("description", None)
        param = {"name": name, "in": "query", "required": False, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def _path_parameter(rule: Any, name: str) -> dict:
    """An id is one path segment, percent-decoded by the server, and never a reserved word
    (IdConverter); the batch endpoints refuse the ids no path can address."""
    if not isinstance(rule._converters[name], IdConverter):
        raise ValueError(f"{rule.rule}: no path parameter schema for converter {rule._converters[name]!r}")
    what = "session" if name == "session_id" else "task"
    reserved = ", ".join(f"`{word}`" for word in RESERVED_IDS)
    return {"name": name, "in": "path", "required": True, "description": (
                f"The {what}'s id, exactly as written; never `.`, `..`, {reserved} (routes of their own),"
                f" which the batch endpoints refuse as ids."),
            "schema": {"type": "string", "minLength": 1, "pattern": ecma_pattern(rf"\A{IdConverter.regex}\Z")}}


def openapi_document(url_map: Any, *, security: bool, metrics_scope: str | None = None) -> dict:
    """The OpenAPI 3.1 document of the app whose werkzeug routing Map is `url_map`
    (app.url_map, once every route is registered).

    security: whether authentication is on (401/403 and the security schemes appear);
    metrics_scope: None when /api/v1/system/metrics is open, else the scope it needs."""
    rules = [r for r in url_map.iter_rules() if r.endpoint not in NOT_IN_DOCUMENT]
    documented, routed = set(OPERATIONS), {r.endpoint for r in rules}
    if documented != routed:
        raise ValueError(f"routes without an operation: {sorted(routed - documented)};"
                         f" operations without a route: {sorted(documented - routed)}")
    request_types = [op.body for op in OPERATIONS.values() if op.body is not None]
    response_types = [op.answer for op in OPERATIONS.values() if op.answer is not None]
    response_types += [ErrorBody, RestoredTask]
    _, components = msgspec.json.schema_components(request_types + response_types, ref_template=REF)
    _refine(components, request_types, response_types)

    paths: dict[str, dict] = {}
    order = list(OPERATIONS)
    for rule in sorted(rules, key=lambda r: order.index(r.endpoint)):  # the spec's order
        op = OPERATIONS[rule.endpoint]
        methods = sorted(rule.methods - {"HEAD", "OPTIONS"})
        (method,) = methods
        path = endpoint_label(rule.rule)
        item = paths.setdefault(path, {})
        scope = metrics_scope if rule.endpoint == "system_metrics" else ROUTE_SCOPES.get(rule.endpoint)
        operation: dict[str, Any] = {"operationId": rule.endpoint, "tags": [op.tag], "summary": op.summary}
        if op.description:
            operation["description"] = op.description
        params = [_path_parameter(rule, name) for name in sorted(rule.arguments)]
        if op.query is not None:
            params += _parameters(op.query)
        if params:
            operation["parameters"] = params
        if op.body is not None:
            media = {"schema": {"$ref": REF.format(name=op.body.__name__)}}
            if op.body in EXAMPLES:
                media["examples"] = _checked_example(op.body)
            operation["requestBody"] = {"required": op.body_required, "content": {JSON: media}}
        responses: dict[str, Any] = {}
        if op.answer is None:
            responses[str(op.ok)] = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
        elif op.answer is FlushAnswer:
            responses["200"] = _variant("FlushAnswer", "Everything accepted before the call is written.",
                                        {"status": {"const": "flushed"}})
            responses["503"] = _variant("FlushAnswer", "`FLUSH_TIMEOUT`: not everything was written within"
                                        " `[buffer] flush_timeout`; the rows are kept and retried.",
                                        {"status": {"const": "error"}, "error_code": {"const": "FLUSH_TIMEOUT"}},
                                        ["detail", "error_code", "errors"])
        elif op.answer is Health:
            responses["200"] = _variant("Health", "Healthy.", {"status": {"const": "healthy"}})
            responses["503"] = _variant("Health", "Degraded: the database does not answer, or flushes fail.",
                                        {"status": {"const": "degraded"}})
        else:
            responses[str(op.ok)] = {"description": "Accepted." if op.ok == 202 else "OK", "content": {
                JSON: {"schema": {"$ref": REF.format(name=op.answer.__name__)}}}}
        errors = list(op.errors) + (list(AUTH_ERRORS) if security and scope is not None else [])
        for name in sorted(errors, key=lambda n: ERRORS[n].status):
            status = str(ERRORS[name].status)
            if status in responses:
                raise ValueError(f"{rule.endpoint}: two responses for {status}")
            responses[status] = {"$ref": f"#/components/responses/{name}"}
        operation["responses"] = responses
        if security:
            operation["security"] = [] if scope is None else [{name: [scope]} for name in SECURITY_SCHEMES]
        item[method.lower()] = operation
    _describe_other_methods(url_map, paths)

    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {"title": "persistd: Translation Persistence API", "version": VERSION,
                 "description": _info_description(security)},
        "tags": [{"name": n, "description": t} for n, t in TAGS.items()],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "responses": {name: _error_response(err) for name, err in ERRORS.items()
                          if security or name not in AUTH_ERRORS} | {"MethodNotAllowed": _error_response(METHOD_NOT_ALLOWED)},
        },
    }
    if security:
        document["components"]["securitySchemes"] = SECURITY_SCHEMES
    _typed_enums(document)
    return document


def _describe_other_methods(url_map: Any, paths: dict[str, dict]) -> None:
    """What the methods not documented on a path get: 405 with the path's `Allow`, which
    must name only documented methods (IdConverter keeps /sessions/batch from also being
    a session's path)."""
    adapter = url_map.bind("localhost")
    for path, item in paths.items():
        allowed = sorted(adapter.allowed_methods(re.sub(r"\{(\w+)\}", "x", path)))
        if stray := [m for m in allowed if m.lower() not in item and m not in ("HEAD", "OPTIONS")]:
            raise ValueError(f"{path}: {stray} routed but not documented here")
        item["description"] = f"Other methods: 405 `METHOD_NOT_ALLOWED` with `Allow: {', '.join(allowed)}`."


def _variant(name: str, description: str, properties: dict, required: list[str] | None = None) -> dict:
    refine: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        refine["required"] = required
    return {"description": description, "content": {JSON: {"schema": {"allOf": [{"$ref": REF.format(name=name)}, refine]}}}}


def _info_description(security: bool) -> str:
    codes = sorted({c for e in (*ERRORS.values(), METHOD_NOT_ALLOWED) for c in e.codes
                    if security or e.status not in (401, 403)})
    text = (
        "persistd accepts translation progress (sessions and their tasks) in batches, answers at once,"
        " and writes it to MySQL behind. Times in answers are UTC with `Z`; times without an offset in"
        " requests are UTC.\n\n"
        "Every refusal has the body `{\"detail\": str, \"error_code\": str, \"errors\": [{\"field\": str,"
        " \"message\": str}]}` (`errors` may be empty; a 404 also carries the id asked for). Codes: "
        + ", ".join(f"`{c}`" for c in codes) + ".\n\n"
        "Unknown query parameters and unknown body fields are refused with 422.")
    if security:
        text += ("\n\nCredentials: an API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`, or a"
                 " JWT as `Authorization: Bearer <token>`. Scopes: `write` (batches, flush), `read` (queries,"
                 " recovery, stats), `admin` (delete, cleanup). `/health` is open.")
    return text


DOCS_PACKAGE = "flask_swagger_ui"  # importlib.resources.files(DOCS_PACKAGE) / "dist" / <file>
DOCS_ASSETS = {  # what /docs needs of dist/, and how it is served
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
DOCS_INIT = b"""window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    defaultModelsExpandDepth: 0,
    tryItOutEnabled: false,
    validatorUrl: null
  });
});
"""
DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>persistd API {version}</title>
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/assets/docs-init.js"></script>
</body>
</html>
"""
# Everything from our own origin; Swagger UI sets inline styles and draws some icons as data: URLs.
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
            " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def docs_assets() -> dict[str, tuple[bytes, str]]:
    """The files /docs/assets/ serves, read once at start (2 MB)."""
    dist = importlib.resources.files(DOCS_PACKAGE) / "dist"
    assets = {name: ((dist / name).read_bytes(), ctype) for name, ctype in DOCS_ASSETS.items()}
    assets["docs-init.js"] = (DOCS_INIT, "text/javascript; charset=utf-8")
    return assets


def add_docs_routes(app: QuartTrio, document: bytes, version: str) -> None:
    """GET /openapi.json, GET /docs and GET /docs/assets/<name> on a Quart app."""
    assets = docs_assets()
    swagger_ui = importlib.metadata.version("flask-swagger-ui")  # the asset version, for caches
    page = DOCS_HTML.format(version=version).encode()

    @app.get("/openapi.json")
    async def openapi_json() -> Response:
        return Response(document, content_type=JSON)

    @app.get("/docs")
    async def docs() -> Response:
        return Response(page, content_type="text/html; charset=utf-8", headers={"Content-Security-Policy": DOCS_CSP})

    @app.get("/docs/assets/<name>")
    async def docs_asset(name: str) -> Response:
        if name not in assets:
            raise ApiError(404, "NOT_FOUND", "Not found")
        body, ctype = assets[name]
        return Response(body, content_type=ctype, headers={
            "Cache-Control": "public, max-age=86400", "ETag": f'"{swagger_ui}-{name}"',
            "X-Content-Type-Options": "nosniff"})


# The scope each route needs when auth is on, by handler name; /health and (by default)
# the metrics stay open.
ROUTE_SCOPES = {
    "sessions_batch": "write", "tasks_batch": "write", "flush": "write",
    "sessions_list": "read", "session_detail": "read", "session_tasks": "read", "task_detail": "read",
    "tasks_list": "read", "recovery_incomplete": "read", "recovery_restore": "read", "stats": "read",
    "session_delete": "admin", "sessions_cleanup": "admin",
}


def create_app(cfg: Config, to_buffer: trio.MemorySendChannel, store: Any, metrics: Metrics,
               auth: Auth) -> QuartTrio:
    app = QuartTrio("persistd", static_folder=None)  # no /static/<path> route
    app.url_map.converters["id"] = IdConverter
    app.config["MAX_CONTENT_LENGTH"] = cfg.server.max_body_bytes
    started = time.monotonic()
    scopes = {**ROUTE_SCOPES, **({"system_metrics": "read"} if cfg.auth.metrics == "read" else {})}

    ask = functools.partial(ask_buffer, to_buffer)

    def refused_full(detail: str, field: str, limit: str, retry_after_s: int) -> ApiError:
        """503 BUFFER_FULL: a limit would be passed; nothing of the batch was kept."""
        metrics.refused_batches.inc()
        error = ApiError(503, "BUFFER_FULL", detail, [(field, limit)])
        error.headers["Retry-After"] = str(retry_after_s)
        return error

    @app.before_request
    async def start_timer_and_authenticate() -> None:
        """Before the body is read: a request without the scope never costs a decode."""
        g.started = time.perf_counter()
        scope = scopes.get(request.endpoint)
        if scope is not None and auth.on:
            try:
                auth.check(request.headers, scope)
            except Refused as refused:
                metrics.auth_refusals.labels(refused.reason).inc()
                error = ApiError(refused.status, "UNAUTHORIZED" if refused.status == 401 else "FORBIDDEN", str(refused))
                challenge = 'Bearer realm="persistd"'
                if refused.reason != "missing":
                    kind = "insufficient_scope" if refused.status == 403 else "invalid_token"
                    challenge += f', error="{kind}"' + (f', scope="{refused.scope}"' if refused.scope else "")
                error.headers["WWW-Authenticate"] = challenge
                raise error from None
        if request.scope.get(BUSY):  # see guard(): the body would pass max_inflight_bytes
            raise refused_full("Too many request bodies are being received; retry later", "", (
                f"at most {cfg.server.max_inflight_bytes} bytes of request bodies are received at once"), 1)

    @app.after_request
    async def observe(response: Response) -> Response:
        endpoint = endpoint_label(request.url_rule.rule) if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint, request.method).inc()
        metrics.responses.labels(endpoint, str(response.status_code)).inc()
        metrics.duration.labels(endpoint).observe(time.perf_counter() - g.started)
        return response

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        return Response(exc.body(), status=exc.status, content_type=JSON, headers=exc.headers)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        error = ApiError(code, HTTP_ERROR_CODES.get(code, "HTTP_ERROR"), exc.description or exc.name)
        error.headers.update((k, v) for k, v in exc.get_headers() if k.lower() != "content-type")  # e.g. Allow
        return await api_error(error)

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return await api_error(ApiError(500, "INTERNAL_ERROR", "Internal server error"))

    def buffer_full(key: str, retry_after_s: int) -> ApiError:
        return refused_full("The buffer is full; retry after Retry-After seconds", key, (
            f"at most {cfg.buffer.max_rows} rows and {cfg.buffer.max_bytes} bytes may wait for the database"
            f", and {cfg.journal.max_bytes} bytes in the journal"), retry_after_s)

    async def accept(key: str) -> Response:
        """Room first, from Content-Length alone: a batch that cannot fit waits for it
        (admission_wait), in turn, before its body is read; one that still cannot is refused
        unread and undecoded. The room is held for the batch until it arrives."""
        length = request.content_length
        if length is not None and length > cfg.server.max_body_bytes:
            raise RequestEntityTooLarge()  # what quart's read would raise, without waiting for room first
        room = await ask(Admit, key, cfg.server.max_body_bytes if length is None else length)
        if not isinstance(room, Claim):
            raise buffer_full(key, room)
        try:
            body = await request.get_data(cache=False)
            rows = decode_batch(key, body)
            at_us = time.time_ns() // 1000
            taken = await ask(Write, key, rows, body, at_us, room)
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await to_buffer.send(LetGo(room))
            raise
        if taken is not True:  # more rows than its size suggested, and they do not fit
            metrics.refused_bytes_read.inc(len(body))
            raise buffer_full(key, taken)
        return json_response(202, Accepted("accepted", len(rows), accept_time(version_of(at_us, 0))))

    @app.post("/api/v1/translation/sessions/batch")
    async def sessions_batch() -> Response:
        return await accept("sessions")

    @app.post("/api/v1/translation/tasks/batch")
    async def tasks_batch() -> Response:
        return await accept("tasks")

    def flush_timed_out(status: BufferStatus) -> str:
        return (f"Not everything was written within {cfg.buffer.flush_timeout:g} s "
                f"({status.last_error or 'the database is slow'}); the rows are kept and retried")

    async def write_out() -> None:
        """Recovery reads the database: first everything accepted must be in it."""
        if await ask(flush_request, timeout=cfg.buffer.flush_timeout) is None:
            raise ApiError(503, "FLUSH_TIMEOUT", flush_timed_out(await ask(Status)))

    reach = Reachability()

    async def read(fn: typing.Callable[..., typing.Awaitable[Any]], *args: Any, timeout: float | None = None) -> Any:
        """A store operation for a request: 503 DATABASE_UNAVAILABLE when the database does
        not answer within read_timeout."""
        try:
            with trio.fail_after(timeout or cfg.database.read_timeout):
                result = await fn(*args)
            reach.answered()
            return result
        except store.unavailable as exc:
            reach.answered(describe(exc))
            raise ApiError(503, "DATABASE_UNAVAILABLE", "The database did not answer; retry later") from None

    async def ping() -> bool:
        try:
            await store.ping()
        except store.errors as exc:
            reach.answered(describe(exc))
            return False
        reach.answered()
        return True

    def params(type_: type) -> Any:
        repeated = [name for name in request.args if len(request.args.getlist(name)) > 1]
        if repeated:  # which one would count? Refused rather than guessed
            raise ApiError(422, "VALIDATION_ERROR", "Invalid query parameters",
                           [(name, "Given more than once") for name in repeated])
        given = request.args.to_dict()
        try:
            q = msgspec.convert(given, type_, strict=False)
        except msgspec.ValidationError as exc:
            raise ApiError(422, "VALIDATION_ERROR", "Invalid query parameters", [validation_error(exc)]) from None
        loose = [(name, problem) for name, raw in given.items() if (problem := loose_parameter(getattr(q, name), raw))]
        if loose:
            raise ApiError(422, "VALIDATION_ERROR", "Invalid query parameters", loose)
        return q

    @app.post("/api/v1/translation/flush")
    async def flush() -> Response:
        started_at = trio.current_time()
        waiter = await ask(flush_request, timeout=cfg.buffer.flush_timeout)
        duration_ms = round(1000 * (trio.current_time() - started_at))
        status = await ask(Status)
        if waiter is None:
            return json_response(503, FlushAnswer(
                "error", 0, 0, duration_ms, status.held_tasks, error_code="FLUSH_TIMEOUT",
                detail=flush_timed_out(status), errors=[]))
        return json_response(200, FlushAnswer(
            "flushed", waiter.sessions_written, waiter.tasks_written, duration_ms, status.held_tasks))

    async def latest(key: str, row_id: str, stored: typing.Callable[[str], typing.Awaitable[dict | None]]) -> dict | None:
        buffered = await ask(Lookup, key, row_id)
        return overlay(await read(stored, row_id), buffered)

    @app.get("/api/v1/translation/sessions")
    async def sessions_list() -> Response:
        q = params(SessionQuery)
        total, rows = await read(store.list_sessions, q)
        return json_response(200, SessionPage(total, q.page, q.page_size, total_pages(total, q.page_size),
                                              [msgspec.convert(with_derived(r), SessionSummary) for r in rows]))

    @app.get("/api/v1/translation/sessions/<id:session_id>")
    async def session_detail(session_id: str) -> Response:
        state = await latest("sessions", session_id, store.session)
        if state is None:
            raise ApiError(404, "NOT_FOUND", "Session not found", session_id=session_id)
        return json_response(200, msgspec.convert(with_derived(state), SessionDetail))

    @app.get("/api/v1/translation/sessions/<id:session_id>/tasks")
    async def session_tasks(session_id: str) -> Response:
        q = params(SessionTaskQuery)
        if not (await ask(Lookup, "sessions", session_id) or await read(store.has_session, session_id)):
            raise ApiError(404, "NOT_FOUND", "Session not found", session_id=session_id)
        total, rows = await read(store.list_session_tasks, session_id, q)
        return json_response(200, SessionTaskPage(session_id, total, q.page, q.page_size, total_pages(total, q.page_size),
                                                  [msgspec.convert(r, TaskItem) for r in rows]))

    @app.get("/api/v1/translation/tasks/<id:task_id>")
    async def task_detail(task_id: str) -> Response:
        state = await latest("tasks", task_id, store.task)
        if state is None:
            raise ApiError(404, "NOT_FOUND", "Task not found", task_id=task_id)
        return json_response(200, msgspec.convert(state, TaskDetail))

    @app.get("/api/v1/translation/tasks")
    async def tasks_list() -> Response:
        q = params(TaskQuery)
        total, rows = await read(store.list_tasks, q)
        return json_response(200, TaskPage(total, q.page, q.page_size, total_pages(total, q.page_size),
                                           [msgspec.convert(r, TaskDetail) for r in rows]))

    @app.get("/api/v1/translation/recovery/incomplete-sessions")
    async def recovery_incomplete() -> Response:
        await write_out()
        rows = await read(store.incomplete_sessions)
        return json_response(200, IncompleteSessions(
            len(rows), [msgspec.convert(with_derived(r), IncompleteSession) for r in rows]))

    @app.post("/api/v1/translation/recovery/restore/<id:session_id>")
    async def recovery_restore(session_id: str) -> Response:
        await write_out()
        stored = await read(store.session, session_id)
        if stored is None:
            raise ApiError(404, "NOT_FOUND", "Session not found", session_id=session_id)
        tasks = await read(store.unfinished_tasks, session_id)
        return json_response(200, Restored(
            session_id, msgspec.convert(with_derived(stored), RestoredSession), len(tasks),
            msgspec.Raw(b"[" + b",".join(tasks) + b"]"), utc_now()))

    @app.delete("/api/v1/translation/sessions/<id:session_id>")
    async def session_delete(session_id: str) -> Response:
        # The database must take writes before the buffer drops anything: while it is down
        # the DELETE is a 503 that changes nothing (the buffered rows stay, to be written).
        await read(store.writable)
        forgotten = await ask(Forget, session_id, timeout=cfg.buffer.flush_timeout)
        if forgotten is None:
            raise ApiError(503, "FLUSH_TIMEOUT", flush_timed_out(await ask(Status)))
        had_session, dropped = forgotten
        existed, deleted_tasks = await read(store.delete_session, session_id, dropped)
        if not (existed or had_session or dropped):
            raise ApiError(404, "NOT_FOUND", "Session not found", session_id=session_id)
        return json_response(200, DeletedSession("deleted", session_id, deleted_tasks))

    @app.post("/api/v1/translation/sessions/cleanup")
    async def sessions_cleanup() -> Response:
        body = await request.get_data(cache=False)
        q = decode_body(CleanupIn, body) if body.strip(JSON_WHITESPACE) else CleanupIn()
        await write_out()  # a session's latest update may still be buffered: it is not expired
        cutoffs = cleanup_cutoffs(utc_now(), q.completed_days, q.failed_days)
        sessions, tasks = await read(store.cleanup, cutoffs, q.dry_run, timeout=math.inf)
        return json_response(200, CleanupOut("completed", sessions, tasks, q.dry_run))

    stats_cache: list[Any] = [None, -math.inf]  # (Stats, trio time read)
    stats_lock = trio.Lock()

    @app.get("/api/v1/translation/stats")
    async def stats() -> Response:
        """Read from the database at most every STATS_CACHE_S; while one request reads,
        the others are answered from the previous reading."""
        if trio.current_time() - stats_cache[1] > STATS_CACHE_S and not (stats_lock.locked() and stats_cache[0]):
            async with stats_lock:
                if trio.current_time() - stats_cache[1] > STATS_CACHE_S:
                    stats_cache[:] = [await read(store.stats), trio.current_time()]
        return json_response(200, stats_cache[0])

    @app.get("/health")
    async def health() -> Response:
        status = await ask(Status)
        db_ok = await ping()
        healthy = db_ok and status.failures < DEGRADED_AFTER_FAILED_FLUSHES
        return json_response(200 if healthy else 503, Health(
            "healthy" if healthy else "degraded", "healthy" if db_ok else "unhealthy",
            status.health, int(time.monotonic() - started), VERSION, store.backend))

    @app.get("/api/v1/system/metrics")
    async def system_metrics() -> Response:
        status = await ask(Status)
        metrics.buffer_size.labels("session").set(status.health.sessions_count)
        metrics.buffer_size.labels("task").set(status.health.tasks_count)
        metrics.held_tasks.set(status.held_tasks)
        metrics.journal_bytes.set(status.journal_bytes)
        metrics.held_oldest.set(status.health.oldest_waiting_seconds or 0)
        metrics.oldest_unwritten.set(status.health.oldest_unwritten_seconds or 0)
        metrics.flush_failures_in_a_row.set(status.failures)
        metrics.backpressure.set(status.refusing)
        metrics.database_up.set(await ping())
        return Response(prometheus_client.generate_latest(metrics.registry), content_type=PROMETHEUS_CONTENT_TYPE)

    document = openapi_document(app.url_map, security=auth.on, metrics_scope=scopes.get("system_metrics"))
    add_docs_routes(app, msgspec.json.encode(document), VERSION)
    return app


def guard(app: QuartTrio, max_body_bytes: int, max_inflight_bytes: int) -> Any:
    """The ASGI app hypercorn serves: quart-trio's app with three fixes for what a client
    can do to it.
    - Sends are shielded. The last send of a response runs hypercorn's end of the request
      (close the connection, or start the idle timer that closes it after keep_alive_timeout).
      quart-trio cancels the request's nursery as soon as the http.disconnect that this same
      send queued is received (quart_trio/asgi.py:40), which cancels that work halfway
      (hypercorn/trio/worker_context.py:30-33, tcp_server.py:117-119): without the shield,
      idle keep-alive connections and those answered before their body ended stay open forever.
    - Request bodies being received are bounded, all requests together: a body that would pass
      max_inflight_bytes is refused (503, in the app's before_request) before quart-trio reads it. A chunked
      body counts as max_body_bytes, the most quart reads of it before its 413.
    - A request with both Content-Length and Transfer-Encoding is answered with
      `Connection: close` (RFC 9112 §6.1; h11 frames it by Transfer-Encoding and keeps the
      connection, h11/_connection.py:84-90,126-130); so is one answered before its body has
      all arrived (a 401, 413, 503 before the read): hypercorn closes that connection, and a
      client that pools connections must not send its next request on it."""
    inflight = 0  # bytes of request bodies admitted and not yet answered

    async def asgi(scope: dict, receive: Any, send: Any) -> None:
        nonlocal inflight
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope["headers"])  # names are lower case (h11)
        claim, close = 0, False
        if b"transfer-encoding" in headers:
            claim, close = max_body_bytes, b"content-length" in headers
        elif (length := int(headers.get(b"content-length", 0))) <= max_body_bytes:  # larger: quart's 413 unread
            claim = length
        if inflight + claim > max_inflight_bytes:
            scope, claim = {**scope, BUSY: True}, 0
        body_done = b"transfer-encoding" not in headers and headers.get(b"content-length", b"0") == b"0"

        async def watched_receive() -> dict:
            nonlocal body_done
            message = await receive()
            body_done = body_done or (message["type"] == "http.request" and not message.get("more_body", False))
            return message

        async def shielded_send(message: dict) -> None:
            if (close or not body_done) and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            with trio.CancelScope(shield=True):
                await send(message)

        inflight += claim
        try:
            await app(scope, watched_receive, shielded_send)
        finally:
            inflight -= claim

    return asgi


class HTTP11Only(hypercorn.protocol.h11.H11Protocol):
    """hypercorn switches a cleartext connection to HTTP/2 on `Upgrade: h2c` or on the
    HTTP/2 preface (hypercorn/protocol/h11.py:296-323), with no setting to turn it off; the
    daemon speaks HTTP/1.1 only, so both stay HTTP/1.1 requests."""

    async def _check_protocol(self, event: Any) -> None:
        pass


class GuardedTCPServer(hypercorn.trio.tcp_server.TCPServer):
    """hypercorn has no cap on connections (`backlog` is only the kernel's accept queue): a
    connection accepted while `config.persistd_connections` (a CapacityLimiter) has no token
    left is closed at once, so that descriptors never run out. A connection's slot is freed as
    soon as its client has gone. A send to a client that does not read is bounded: hypercorn
    shields it without a deadline (tcp_server.py:84-90), so that it outlives even shutdown."""

    async def run(self) -> None:
        limiter = getattr(self.config, "persistd_connections", None)
        if limiter is None:
            return await super().run()
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await self.stream.aclose()
            return
        try:
            await super().run()
        finally:
            limiter.release()

    async def _read_data(self) -> None:
        await super()._read_data()
        # The client has gone (or sent nothing for read_timeout): end the idle timer now, which
        # would otherwise keep this connection's slot and socket until keep_alive_timeout.
        await self.idle_task.stop()

    async def protocol_send(self, event: hypercorn.events.Event) -> None:
        if not isinstance(event, hypercorn.events.RawData):
            return await super().protocol_send(event)
        async with self.send_lock:
            try:
                with trio.CancelScope(shield=True), trio.fail_after(WRITE_TIMEOUT_S):
                    await self.stream.send_all(event.data)
            except trio.TooSlowError:
                await self.stream.aclose()
                await self.protocol.handle(hypercorn.events.Closed())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(hypercorn.events.Closed())


# hypercorn builds these by name from its module globals: the daemon's versions are used instead
hypercorn.protocol.H11Protocol = HTTP11Only
hypercorn.trio.run.TCPServer = GuardedTCPServer


def connection_cap(max_connections: int) -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max_connections if soft == resource.RLIM_INFINITY else max(1, min(max_connections, soft - FD_RESERVE))


# ── actors ───────────────────────────────────────────────────────────────────────────


async def http_actor(cfg: Config, to_buffer: trio.MemorySendChannel, store: Any, metrics: Metrics, auth: Auth,
                     shutdown_trigger: typing.Callable[[], typing.Awaitable[Any]],
                     *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serves the API until `shutdown_trigger` returns and in-flight requests have
    finished (or `graceful_timeout` passed: their requests were never acknowledged)."""
    config = hypercorn.config.Config()
    config.bind = [f"{cfg.server.host}:{cfg.server.port}"]
    config.graceful_timeout = cfg.server.graceful_timeout
    if cfg.server.certfile:
        config.certfile, config.keyfile = cfg.server.certfile, cfg.server.keyfile
    config.alpn_protocols = ["http/1.1"]  # no HTTP/2 over TLS either (hypercorn offers h2 by default)
    config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT_S
    config.read_timeout = READ_TIMEOUT_S
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    cap = connection_cap(cfg.server.max_connections)
    config.persistd_connections = trio.CapacityLimiter(cap)
    # The kernel's accept queue holds a burst as large as the cap (hypercorn's default, 100, overflowed
    # under 1000 connections at once on a busy machine: some were reset before they were accepted)
    config.backlog = cap
    app = guard(create_app(cfg, to_buffer, store, metrics, auth), cfg.server.max_body_bytes, cfg.server.max_inflight_bytes)
    async with to_buffer:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(
                hypercorn.trio.serve, app, config, shutdown_trigger=shutdown_trigger))
            task_status.started(int(binds[0].rsplit(":", 1)[1]))
        event(logging.INFO, "http_stopped", "stopped listening; requests in flight have finished")
        await to_buffer.send(Drain())


async def buffer_actor(cfg: Config, inbox: trio.MemoryReceiveChannel, jobs: trio.MemorySendChannel,
                       journal: trio.MemorySendChannel | None, dead_letters: DeadLetters, instance: int = 0,
                       clock_us: int = 0) -> None:
    """Owns every unflushed row. Decides when to flush and when to retry (capped, jittered
    exponential backoff, forever: accepted rows are never dropped). Each batch goes to the
    journal and is answered once the journal has it; the journal is told which records
    are no longer needed as rows are written. On Drain it flushes what is left until
    `shutdown_timeout`; what is still unwritten then stays in the journal for the next
    start (without a journal it goes to the dead-letter file, as it does when any actor
    fails and the daemon stops)."""
    buf = Buffer(cfg.buffer, math.inf if journal is None else cfg.journal.max_bytes, instance, clock_us)
    buf.replaying = journal is not None  # until ReplayDone
    sweep_every = min(cfg.buffer.orphan_ttl / 10, ORPHAN_SWEEP_MAX_S)
    next_sweep = trio.current_time() + sweep_every
    drain_deadline = math.inf
    attempt = trio.CancelScope()  # the job the flusher has, or had last
    # For the log's episodes: each is told once when it begins and once when it ends. Under
    # sustained overload the buffer refuses and accepts in turns, flush by flush: its
    # backpressure episode lasts until no batch was refused for BACKPRESSURE_QUIET_S.
    failing_since = refusing_since = last_refusal = drain_started = 0.0
    refused = 0  # batches refused in the current backpressure episode

    def refusal(now: float) -> None:
        nonlocal refusing_since, last_refusal, refused
        if not refused:
            refusing_since = now
            rows, limits = sum(buf.counts()), cfg.buffer
            event(logging.WARNING, "backpressure", "buffer full, batches get 503 until rows, bytes and journal"
                  " are below {low:.0%} of their limits: {rows} of {max_rows} rows, {bytes} of {max_bytes}"
                  " bytes, {journal_bytes} journal bytes", low=LOW_WATERMARK, rows=rows,
                  max_rows=limits.max_rows, bytes=buf.bytes, max_bytes=limits.max_bytes,
                  journal_bytes=buf.journal_bytes)
        refused += 1
        last_refusal = now

    def refusals_over() -> None:
        nonlocal refused
        event(logging.INFO, "backpressure_over", "backpressure over: the episode lasted {seconds:.1f} s and"
              " refused {refused} batches", seconds=round(last_refusal - refusing_since, 3), refused=refused)
        refused = 0

    def reply_durably(reply: trio.MemorySendChannel, value: Any) -> None:
        """Answers promise what the journal has: they leave after its next fsync."""
        if journal is None:
            answer(reply, value)
        else:
            journal.send_nowait(Sync(reply, value))

    try:
        async with inbox, jobs, journal or contextlib.nullcontext():
            while True:
                settled = False  # rows left memory: the journal may release records
                # While the flusher is busy its answer is what the drain waits for: the
                # deadline is then its attempt's, not a reason to stop listening.
                wakeup = min(buf.next_wakeup(), next_sweep, math.inf if buf.flusher_busy else drain_deadline)
                if refused:
                    wakeup = min(wakeup, last_refusal + BACKPRESSURE_QUIET_S)
                with trio.move_on_at(wakeup):
                    message = await inbox.receive()
                    now = trio.current_time()
                    match message:
                        case Admit(key, nbytes, reply):
                            claim = buf.claim(key, nbytes, now + cfg.buffer.admission_wait, reply)
                            if claim is not None and not answer(reply, claim):
                                buf.let_go(claim)  # its request has gone
                        case LetGo(claim):
                            buf.let_go(claim)
                        case Write(key, rows, body, at_us, claim, reply):
                            if not buf.arrived(claim, len(rows), len(body)):
                                refusal(now)
                                answer(reply, buf.retry_after(now))
                            elif journal is None:
                                buf.write(key, rows, at_us, now, len(body))
                                answer(reply, True)
                            else:
                                seq, version = buf.write(key, rows, at_us, now, len(body))
                                buf.journaled(seq, RECORD.size + VERSION_FIELD.size + len(body))
                                journal.send_nowait(Append(seq, BATCH_KINDS[key], (VERSION_FIELD.pack(version), body)))
                                journal.send_nowait(Sync(reply, True))
                        case Replayed(key, entries, nbytes, seq, reply):
                            buf.replay(key, entries, seq, now, utc_now())
                            buf.journaled(seq, RECORD.size + nbytes)
                            answer(reply, True)
                        case ReplayDone(last_seq):
                            buf.replay_done(last_seq)
                            settled = True
                        case Room(rows, nbytes, reply):
                            fits = buf.has_room(rows, nbytes)
                            if not fits and not buf.replaying:  # a replay waiting for room is no refusal
                                refusal(now)
                            answer(reply, fits)
                        case Flush(waiter):
                            if not buf.request_flush(waiter):
                                answer(waiter.reply, waiter)
                        case Status(reply):
                            answer(reply, buffer_status(buf, now))
                        case Written(sessions, tasks, held, refused_rows):
                            for table, entry, error in refused_rows:
                                await dead_letters.write("refused_by_database", [(table, entry)], error)
                            if buf.failures:
                                event(logging.INFO, "flush_recovered", "flushes succeed again after {seconds:.1f} s"
                                      " and {attempts} failed attempts", seconds=round(now - failing_since, 3),
                                      attempts=buf.failures)
                            for reply, value in buf.written(sessions, tasks, held, now):
                                reply_durably(reply, value)
                            settled = True
                        case Lookup(key, row_id, reply):
                            answer(reply, [msgspec.structs.replace(e, row=msgspec.structs.replace(e.row))
                                           for e in buf.lookup(key, row_id)])
                        case Forget(session_id, reply):
                            if journal is not None:
                                journal.send_nowait(Append(buf.next_seq(), FORGET, (session_id.encode(),)))
                            for due, value in buf.forget(session_id, reply):
                                reply_durably(due, value)
                            settled = True
                        case Failed(error, is_transient) if not is_transient:
                            where = "stays in the journal"
                            if journal is None:
                                await dead_letters.write("database_refused_writes", buf.take_all(), error)
                                where = f"is in {dead_letters.path}"
                            raise Fatal(f"the database refuses persistd's writes ({error}); what was acknowledged {where}")
                        case Failed(error):
                            delay = buf.failed(error, now)
                            if buf.failures == 1:
                                failing_since = now
                                event(logging.WARNING, "flush_failing", "flush failed; {rows} rows are kept and retried"
                                      " with backoff up to {retry_max:g} s: {error}", rows=sum(buf.counts()),
                                      retry_max=cfg.buffer.retry_max, error=error)
                            else:
                                log.debug("flush attempt %d failed, next in %.1f s: %s", buf.failures, delay, error)
                        case Drain():
                            buf.draining = True
                            drain_started, drain_deadline = now, now + cfg.buffer.shutdown_timeout
                            attempt.deadline = min(attempt.deadline, drain_deadline)
                            event(logging.INFO, "draining", "writing out {rows} buffered rows before stopping"
                                  " (at most {timeout:g} s)", rows=sum(buf.counts()), timeout=cfg.buffer.shutdown_timeout)
                now = trio.current_time()
                for reply, value in buf.admissions(now):
                    if not isinstance(value, Claim):
                        refusal(now)
                    if not answer(reply, value) and isinstance(value, Claim):
                        buf.let_go(value)  # its request gave up waiting
                if refused and now >= last_refusal + BACKPRESSURE_QUIET_S:
                    refusals_over()
                if now >= next_sweep:
                    next_sweep = now + sweep_every
                    expired = buf.expire_orphans(now)
                    await dead_letters.write("orphan_ttl_expired", [("translation_tasks", e) for e in expired])
                    settled = settled or bool(expired)
                if settled and journal is not None:
                    if buf.journal_bytes > cfg.journal.max_bytes * HELD_COPY_SHARE and (held := buf.held_pinning_the_journal()):
                        payload = msgspec.json.encode([(e.created_at, e.updated_at, e.version, e.versions, e.row)
                                                       for e in held])
                        buf.journaled(held[0].first_seq, RECORD.size + len(payload))
                        journal.send_nowait(Append(held[0].first_seq, HELD, (payload,)))
                    if (floor := buf.release()) is not None:
                        journal.send_nowait(Release(floor))
                if buf.draining and not buf.flusher_busy and (buf.idle() or now >= drain_deadline):
                    break
                snapshot = buf.take_snapshot(now)
                if snapshot is not None:
                    attempt = trio.CancelScope(deadline=min(now + cfg.database.write_timeout, drain_deadline))
                    jobs.send_nowait(Job(snapshot, attempt))
            if refused:
                refusals_over()
            left = sum(buf.counts())
            if journal is None:
                reason = "session_never_arrived" if buf.idle() else "database_unreachable_at_shutdown"
                await dead_letters.write(reason, buf.take_all())
            elif left:
                event(logging.WARNING, "drained", "{rows} rows stay in the journal for the next start: {why}", rows=left,
                      why="their session has not arrived" if buf.idle() else "the database cannot be reached")
            if not left:
                event(logging.INFO, "drained", "everything acknowledged is written ({seconds:.1f} s)",
                      seconds=round(trio.current_time() - drain_started, 3))

    except BaseException:  # another actor failed (we are cancelled), or this one did
        if journal is None and sum(buf.counts()):  # with a journal, what was acknowledged stays in it
            with trio.CancelScope(shield=True):
                await dead_letters.write("daemon_failed", buf.take_all())
        raise

async def journal_actor(journal: Journal, inbox: trio.MemoryReceiveChannel) -> None:
    """Appends what the buffer sends and answers each Sync once everything before it is
    on disk: one write and one fsync for all that arrived while the last one ran (group
    commit). A journal that cannot be written stops the daemon: it can promise nothing."""
    async with inbox:
        async for message in inbox:
            group = [message]
            while True:
                try:
                    group.append(inbox.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            records = [m for m in group if isinstance(m, Append)]
            floor = max((m.floor for m in group if isinstance(m, Release)), default=None)
            await trio.to_thread.run_sync(journal.commit, records, floor)
            for m in group:
                if isinstance(m, Sync):
                    answer(m.reply, m.value)
    journal.close()


async def flusher_actor(store: Any, jobs: trio.MemoryReceiveChannel, results: trio.MemorySendChannel,
                        metrics: Metrics) -> None:
    """Writes each job's snapshot in one transaction and reports Written or Failed, and
    whether retrying can help. The store's writer connection is this actor's alone (run()
    opened it at start if the database answered); the store replaces it after a failure.
    No policy lives here."""
    async with jobs, results:
        try:  # before the first write, while requests are accepted
            if (seconds := await store.recount_if_needed()) is not None:
                event(logging.INFO, "recounted", "task_counts recounted in {seconds:.1f} s", seconds=round(seconds, 3))
        except store.errors:  # the first job connects again and reports what it finds
            pass
        async for snapshot, scope in jobs:
            started = trio.current_time()
            outcome: Written | Failed | None = None
            with scope:
                try:
                    outcome = await store.write(snapshot)
                except store.errors as exc:
                    outcome = Failed(describe(exc), store.transient(exc))
                    if store.conflict(exc):
                        metrics.flush_conflicts.inc()
            if outcome is None:
                outcome = Failed(f"gave up after {trio.current_time() - started:.1f} s", True)
            if isinstance(outcome, Failed):
                metrics.flush_errors.inc()
            else:
                metrics.flushes.inc()
                metrics.flush_duration.observe(trio.current_time() - started)
                metrics.rows_written.labels("session").inc(outcome.sessions)
                metrics.rows_written.labels("task").inc(outcome.tasks)
            await results.send(outcome)


async def janitor_actor(cfg: Config, store: Any, to_buffer: trio.MemorySendChannel, metrics: Metrics,
                        stop: trio.Event) -> None:
    """Two schedules until `stop`: the retention cleanup of POST /sessions/cleanup every
    `[janitor] interval` seconds (first the buffer writes out: a session's latest update
    may be there), and a pass of the reconciliation over every session's task_counts
    every `reconcile_interval` seconds. A run in progress stops after its current chunk."""
    async with to_buffer, trio.open_nursery() as nursery:
        if cfg.janitor.reconcile_interval:
            nursery.start_soon(reconciler, cfg, store, metrics, stop)
        while cfg.janitor.interval:
            with trio.move_on_after(cfg.janitor.interval):
                await stop.wait()
                return
            try:
                written_out = await ask_buffer(to_buffer, flush_request, timeout=cfg.buffer.flush_timeout)
            except trio.BrokenResourceError:  # the buffer has finished: we are shutting down
                return
            if written_out is None:
                event(logging.WARNING, "cleanup_skipped", "cleanup skipped: the buffer could not be written out;"
                      " next run in {interval:g} s", interval=cfg.janitor.interval)
                continue
            await janitor_run(cfg, store, stop)


async def reconciler(cfg: Config, store: Any, metrics: Metrics, stop: trio.Event) -> None:
    """Keeps the totals exact whoever writes: recounts task_counts a slice of sessions at a
    time (short transactions), rewriting what drifted, one pass a reconcile_interval."""
    while not stop.is_set():
        with trio.move_on_after(cfg.janitor.reconcile_interval):
            await stop.wait()
            return
        after: str | None = None
        started, repaired = trio.current_time(), 0
        try:
            while not stop.is_set():
                after, wrong = await store.reconcile(after, RECONCILE_SESSIONS, RECONCILE_TASKS)
                repaired += wrong
                if after is None:
                    break
        except store.errors as exc:
            event(logging.WARNING, "reconcile_failed", "task_counts reconciliation failed, next pass in"
                  " {interval:g} s: {error}", interval=cfg.janitor.reconcile_interval, error=describe(exc))
        metrics.counts_repaired.inc(repaired)
        if repaired:
            event(logging.WARNING, "counts_repaired", "task_counts: {rows} rows were wrong (tasks written by other"
                  " means than persistd) and are rewritten; pass of {seconds:.1f} s", rows=repaired,
                  seconds=round(trio.current_time() - started, 3))


async def janitor_run(cfg: Config, store: Any, stop: trio.Event) -> None:
    cutoffs = cleanup_cutoffs(utc_now(), cfg.janitor.completed_days, cfg.janitor.failed_days)
    started = trio.current_time()
    try:
        sessions, tasks = await store.cleanup(cutoffs, False, stop)
        event(logging.INFO, "cleanup", "cleanup: {sessions} sessions and {tasks} tasks deleted in {seconds:.1f} s",
              sessions=sessions, tasks=tasks, seconds=round(trio.current_time() - started, 3))
    except store.errors as exc:
        event(logging.WARNING, "cleanup_failed", "cleanup failed, next run in {interval:g} s: {error}",
              interval=cfg.janitor.interval, error=describe(exc))


# ── run() and the command line ───────────────────────────────────────────────────────


async def replay(journal: Journal, to_buffer: trio.MemorySendChannel, dead_letters: DeadLetters,
                 metrics: Metrics, stop: trio.Event) -> None:
    """Hand the journal's unreleased batches to the buffer as they were accepted, one
    record at a time, waiting for room when the backlog is larger than the buffer. A
    signal stops it between records: what was not handed over stays in the journal."""
    started = trio.current_time()
    records = journal.replay()
    replayed = replayed_bytes = 0
    while not stop.is_set() and (record := await trio.to_thread.run_sync(next, records, None)) is not None:
        seq, kind, payload = record
        try:
            key, entries, nbytes = journal.batch(seq, kind, payload)
        except (ApiError, msgspec.ValidationError) as exc:
            table = "translation_sessions" if kind in SESSION_KINDS else "translation_tasks"
            await dead_letters.write_body("refused_at_replay", table, payload, str(exc))
            continue
        while not await ask_buffer(to_buffer, Room, len(entries), nbytes):
            if stop.is_set():
                break
            await trio.sleep(REPLAY_WAIT_S)
        else:
            await ask_buffer(to_buffer, Replayed, key, entries, nbytes, seq)
            replayed += len(entries)
            replayed_bytes += nbytes
    metrics.replayed_rows.inc(replayed)
    figures = {"rows": replayed, "bytes": replayed_bytes, "seconds": round(trio.current_time() - started, 3)}
    if stop.is_set():
        event(logging.WARNING, "replay_stopped", "stopped during the replay after {rows} rows ({bytes} bytes,"
              " {seconds:.1f} s); the rest stays in the journal", **figures)
        return
    await to_buffer.send(ReplayDone(journal.last_seq))
    if replayed:
        event(logging.INFO, "replayed", "journal replayed: {rows} rows, {bytes} bytes in {seconds:.1f} s", **figures)


def loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_state_dir(path: Path) -> None:
    """The journal and the dead-letter file live here: a directory that cannot be created
    or written stops the start, before anything is acknowledged."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"persistd")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise Fatal(f"state dir {path} cannot be written: {exc.strerror or exc}") from None


async def open_writer(store: Any, url: str) -> None:
    """The flusher's connection, opened before the daemon listens, with the tables in place.
    A database that does not answer yet is an outage: batches are accepted and written
    once it does. One that answers and refuses (a bad password, no privilege to create
    the tables) would refuse every write too: that is Fatal, before anything is accepted."""
    try:
        await store.open()
    except store.errors as exc:
        if not store.transient(exc):
            raise Fatal(f"the database {masked_url(url)} refuses persistd: {describe(exc)}") from None
        event(logging.WARNING, "database_unreachable_at_start", "the database does not answer yet; batches are"
              " accepted and written once it does: {error}", error=describe(exc))
        return
    if store.migrated:
        event(logging.INFO, "schema_migrated", "added the columns of persistd {version}: {columns}", version=VERSION,
              columns=", ".join(store.migrated))
    if abs(store.clock_offset) > CLOCK_SKEW_WARN_S:
        event(logging.WARNING, "clock_skew", "this machine's clock is {seconds:+.3f} s from the database's: instances"
              " whose clocks differ by more than the time between two writes of one row may order them wrongly"
              " (README, Scaling out)", seconds=round(-store.clock_offset, 3))


async def systemd_actor(notifier: Notifier, to_buffer: trio.MemorySendChannel, ready: trio.Event,
                        stop: trio.Event) -> None:
    """Tells systemd how the daemon is doing until `stop`, then STOPPING=1. WATCHDOG=1 goes
    at half the unit's WatchdogSec and only when the buffer actor has answered, so that a
    stuck event loop or a stuck buffer gets the daemon restarted. STATUS= says what it is
    doing; until `ready` (a long replay) EXTEND_TIMEOUT_USEC keeps TimeoutStartSec away."""
    tick = min(STATUS_EVERY_S, notifier.watchdog_s / 2 if notifier.watchdog_s else math.inf)
    shown = None
    async with to_buffer:
        while not stop.is_set():
            status = await ask_buffer(to_buffer, Status, timeout=tick)
            if stop.is_set():  # systemd stops watching at SIGTERM; a ping now would re-arm it
                break
            if status is not None:
                h = status.health
                doing = ("writing to the database" if status.last_error is None
                         else f"waiting for the database ({status.last_error})")
                line = (f"{h.total_count} rows buffered, {h.tasks_waiting_for_session} waiting for their session;"
                        f" {doing}" if ready.is_set() else f"replaying the journal: {h.total_count} rows buffered")
                lines = ["WATCHDOG=1"] if notifier.watchdog_s else []
                lines += [] if line == shown else [f"STATUS={line}"]
                lines += [] if ready.is_set() else [f"EXTEND_TIMEOUT_USEC={int(3 * tick * 1e6)}"]
                notifier.send(*lines)
                shown = line
            with trio.move_on_after(tick):
                await stop.wait()
    notifier.send("STOPPING=1", "STATUS=stopping: writing out the buffer")


async def run(cfg: Config, stop: trio.Event, *, notifier: Notifier | None = None,
              task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """The whole daemon until `stop` is set and everything is written. Checks what a start
    needs (the schema file, the state dir, a database that accepts the schema) and
    replays the journal before it listens; reports the bound port through `task_status`,
    so tests can start it in-process on port 0. `notifier` speaks to systemd."""
    started = trio.current_time()
    notifier = notifier or Notifier({})
    state_dir = Path(cfg.state.dir)
    await trio.to_thread.run_sync(check_state_dir, state_dir)
    instance = await trio.to_thread.run_sync(instance_id, state_dir, cfg.state.instance_id)
    clock_us = await trio.to_thread.run_sync(read_clock, state_dir)  # the last run's lease
    await renew_clock(state_dir, clock_us)
    store = open_store(cfg.database, instance)  # reads its schema: a copy missing from the package stops the start
    event(logging.INFO, "starting", "persistd {version} starting: instance {instance}, database {database},"
          " state dir {state_dir}, journal {journal}", version=VERSION, instance=instance,
          database=masked_url(cfg.database.url), state_dir=str(state_dir.resolve()), journal=cfg.journal.mode)
    metrics = Metrics()
    metrics.backend.labels(store.backend).set(1)
    dead_letters = DeadLetters(state_dir / "dead-letter.jsonl", metrics)
    journal = None
    if cfg.journal.mode == "off" and any((state_dir / "journal").glob("*.journal")):
        raise ConfigError(f"{state_dir / 'journal'} holds acknowledged rows not yet written; "
                          "start with [journal] mode fsync or write once to write them")
    if cfg.journal.mode != "off":
        notifier.send("STATUS=reading the journal")
        journal = Journal(state_dir / "journal", cfg.journal)
        await trio.to_thread.run_sync(journal.open)
        metrics.journal_kept_aside.inc(journal.kept_aside)
    auth = Auth(cfg.auth)
    await trio.to_thread.run_sync(auth.load)
    if not auth.on and not loopback(cfg.server.host):
        event(logging.WARNING, "auth_off", "listening on {host} with auth off: anyone who reaches the port may"
              " write, read and delete; set [auth] keys_file or [auth.jwt] key_file", host=cfg.server.host)
    notifier.send("STATUS=connecting to the database")
    await open_writer(store, cfg.database.url)
    to_buffer, buffer_inbox = trio.open_memory_channel(INBOX_SIZE)
    to_flusher, flusher_inbox = trio.open_memory_channel(1)
    # Unbounded: every message in it stands for rows the buffer already counts against its limits.
    to_journal, journal_inbox = trio.open_memory_channel(math.inf) if journal else (None, None)
    ready = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher_actor, store, flusher_inbox, to_buffer.clone(), metrics)
            if journal is not None:
                nursery.start_soon(journal_actor, journal, journal_inbox)
            nursery.start_soon(buffer_actor, cfg, buffer_inbox, to_flusher, to_journal, dead_letters, instance, clock_us)
            nursery.start_soon(clock_actor, state_dir, clock_us, stop)
            if notifier.sock is not None:
                nursery.start_soon(systemd_actor, notifier, to_buffer.clone(), ready, stop)
            if journal is not None:
                await replay(journal, to_buffer, dead_letters, metrics, stop)
            nursery.start_soon(janitor_actor, cfg, store, to_buffer.clone(), metrics, stop)
            if auth.on:
                nursery.start_soon(keys_actor, auth, stop)
            port = await nursery.start(http_actor, cfg, to_buffer, store, metrics, auth, stop.wait)
            if not stop.is_set():  # (a signal during the replay: hypercorn stops as it starts)
                ready.set()
                notifier.send("READY=1", f"STATUS=listening on {cfg.server.host}:{port}")
                event(logging.INFO, "ready", "listening on {host}:{port}, ready in {seconds:.1f} s",
                      host=cfg.server.host, port=port, seconds=round(trio.current_time() - started, 3))
            task_status.started(port)
    finally:
        store.close()


async def serve_until_signalled(cfg: Config) -> None:
    stop = trio.Event()
    stopped_at = math.inf
    # The receiver is open from the start, so that a signal during a long replay stops it,
    # and stays open until run() returns: a second signal during the final flush is
    # absorbed here instead of killing the process.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(run, cfg, stop, notifier=Notifier(os.environ)))
            async for signum in signals:
                event(logging.INFO, "stopping", "{signal}: stopping; requests in flight get {grace:g} s",
                      signal=signal.Signals(signum).name, grace=cfg.server.graceful_timeout)
                stop.set()
                stopped_at = trio.current_time()
                break
    event(logging.INFO, "stopped", "stopped in {seconds:.1f} s", seconds=round(trio.current_time() - stopped_at, 3))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="persistd", description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE", help="TOML file (see persistd.toml); built-in defaults without it")
    parser.add_argument("--check-config", metavar="FILE", help="validate FILE with the environment's overrides,"
                        " print the effective configuration (secrets masked) and exit: 0, or 2 when invalid")
    parser.add_argument("--print-schema", action="store_true", help="print the DDL persistd applies to the"
                        " configured database (--config) and exit")
    parser.add_argument("--new-key", nargs=2, metavar=("NAME", "SCOPES"), help="make an API key for a client"
                        " (SCOPES: read,write,admin, comma-separated), print it and its line for [auth] keys_file")
    parser.add_argument("--version", action="version", version=f"persistd {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    copy = commands.add_parser("copy-data", help="copy every session and task to another database", description=(
        "Copy every session and task from one database to another (sqlite:///... to mysql://... as a deployment"
        " grows), in chunks; run it again after an interruption to go on where it stopped. Checks the row"
        " counts at the end: exit 0 when they match, 1 otherwise. Stop persistd first."))
    copy.add_argument("from_url")
    copy.add_argument("to_url")
    args = parser.parse_args(argv)
    try:
        if args.command == "copy-data":
            sys.exit(trio.run(copy_data, args.from_url, args.to_url))
        if args.new_key:
            key, line = new_key(*args.new_key)
            print(f"key (give it to the client; it is not stored): {key}\nline for the keys file: {line}")
            return
        cfg = load_config(args.check_config or args.config, os.environ)
        if args.print_schema:
            print(open_store(cfg.database).schema, end="")
            return
    except ConfigError as exc:
        print(f"persistd: {exc}", file=sys.stderr)
        sys.exit(2)
    except Fatal as exc:
        print(f"persistd: {exc}", file=sys.stderr)
        sys.exit(1)
    if args.check_config:
        print(f"# backend: {backend_of(cfg.database.url)}\n{config_toml(cfg)}", end="")
        return
    setup_logging(cfg.log)
    prometheus_client.disable_created_metrics()
    gc.freeze()  # the modules' objects never die: keep them out of every collection's scan
    sys.setswitchinterval(0.001)  # the flusher's worker thread yields the GIL to the loop within 1 ms
    try:
        trio.run(serve_until_signalled, cfg)
    except* ConfigError as group:  # found at start: the state dir does not fit the config
        event(logging.CRITICAL, "config_error", "{error}", error=str(first_leaf(group)))
        sys.exit(2)
    except* (Fatal, OSError) as group:  # e.g. the port is taken, the journal cannot be written
        event(logging.CRITICAL, "fatal", "{error}", error=str(first_leaf(group)))
        sys.exit(1)


async def copy_data(from_url: str, to_url: str) -> int:
    """`persistd copy-data`: progress and the verdict on stderr, one line each."""
    from persistd import storage

    def say(line: str) -> None:
        print(f"persistd copy-data: {line}", file=sys.stderr, flush=True)

    source, target = (open_store(DatabaseConfig(url=url)) for url in (from_url, to_url))
    try:
        counts = await storage.copy_data(source, target, say)
    except (*source.errors, *target.errors) as exc:
        raise Fatal(f"copy-data stopped (run it again to go on): {describe(exc)}") from None
    finally:
        source.close()
        target.close()
    for table, (copied_from, copied_to) in counts.items():
        say(f"{table}: {copied_from} rows in {masked_url(from_url)}, {copied_to} in {masked_url(to_url)}")
    same = all(a == b for a, b in counts.values())
    say("done: the counts match" if same else "the counts differ: the target held other rows, or the source changed")
    return 0 if same else 1


def first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):  # nurseries inside nurseries
        group = group.exceptions[0]
    return group
