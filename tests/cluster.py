"""Real processes for tests and benchmarks: a MariaDB Galera cluster, and HAProxy.

    async with GaleraCluster(tmp_path / "galera", base_port=3311) as cluster:
        url = cluster.url("persistd")   # mysql://root@127.0.0.1:3311,127.0.0.1:3312,127.0.0.1:3313/persistd
        await cluster.kill(1)           # kill -9 node 1; the other two carry on without it
        await cluster.restart(1)        # it rejoins by IST; await cluster.status(1) -> {"cluster_size": 3, ...}
    async with HAProxy(tmp_path / "haproxy", port, [("127.0.0.1", p1), ("127.0.0.1", p2)]) as proxy:
        ...                             # proxy.url; await proxy.servers() -> {"s0": "UP", "s1": "DOWN"}

Node i of a cluster listens on base+i for clients and on base+nodes+3i (galera), +1 (IST), +2
(SST): ports base .. base+4*nodes-1 in all, on 127.0.0.1. Its my.cnf, data dir, socket, pid file
and log are under root_dir/node<i>. Root runs it all. Needs Debian's mariadb-server (10.11),
galera-4, socat and mariadb-backup: the SST/IST script that works as root (rsync's daemon drops
root's rights to nobody's, and cannot write a root-owned data dir); and haproxy for HAProxy."""

import functools
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import trio

MARIADBD = "/usr/sbin/mariadbd"
GALERA = "/usr/lib/galera/libgalera_smm.so"
START_TIMEOUT_S = 90  # an SST included
STOP_TIMEOUT_S = 30   # SIGTERM, then SIGKILL


class ProcessError(RuntimeError):
    pass


def log_tail(path: Path, lines: int = 25) -> str:
    """The end of a log, after the errors of its last start (a crash's backtrace can be long)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    last = text[max(text.rfind("#### cluster.py"), 0):].splitlines()
    errors = [line for line in last[:-lines] if "[ERROR]" in line][:10]
    return "\n".join(errors + ["[...]"] * bool(errors) + last[-lines:])


async def run(*args: str) -> str:
    """Runs a command to its end: its stdout, or a ProcessError with all that it printed."""
    result = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    if result.returncode:
        output = (result.stdout + result.stderr).decode(errors="replace").strip()
        raise ProcessError(f"{args[0]} exited with {result.returncode}: {output}")
    return result.stdout.decode()


async def mariadb(port: int, sql: str) -> list[list[str]]:
    """Runs `sql` as root with the mariadb CLI over TCP: the rows, each a list of strings."""
    out = await run("mariadb", "--no-defaults", "--protocol=tcp", "-h127.0.0.1", f"-P{port}", "-uroot",
                    "--connect-timeout=2", "-N", "-B", "-e", sql)
    return [line.split("\t") for line in out.splitlines()]


async def launch(args: list[str], log_path: Path) -> trio.Process:
    """Starts a child whose stdout and stderr are appended to log_path, in a process group of
    its own: killing the group also kills its helpers (a joiner's SST script and socat would
    outlive a kill -9 and keep listening on the SST port)."""
    with open(log_path, "ab") as log:
        log.write(f"\n#### cluster.py {time.strftime('%H:%M:%S')}: {' '.join(args)}\n".encode())
        log.flush()
        return await trio.lowlevel.open_process(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: trio.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone
        pass


async def stop_process(proc: trio.Process | None, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, SIGKILL after `timeout`; shielded, so that a cancelled test still cleans up."""
    if proc is None:
        return
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(timeout):
                await proc.wait()
        kill_group(proc)
        await proc.wait()


class Children:
    """`async with` for start() and stop(): a start that fails or is cancelled leaves no process."""
    async def __aenter__(self):
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


class GaleraCluster(Children):
    def __init__(self, root_dir: Path, base_port: int, nodes: int = 3) -> None:
        self.root_dir, self.nodes = Path(root_dir), nodes
        self.ports = [base_port + i for i in range(nodes)]
        self.galera_ports = [base_port + nodes + 3 * i for i in range(nodes)]  # +1: IST, +2: SST
        self.procs: list[trio.Process | None] = [None] * nodes
        self.synced: set[int] = set()  # the nodes that were synced when last seen

    def url(self, database: str) -> str:
        return f"mysql://root@{','.join(f'127.0.0.1:{port}' for port in self.ports)}/{database}"

    def dir(self, i: int) -> Path:
        return self.root_dir / f"node{i}"

    def log_path(self, i: int) -> Path:
        return self.dir(i) / "mariadbd.log"

    def running(self) -> list[int]:
        return [i for i, proc in enumerate(self.procs) if proc is not None and proc.returncode is None]

    async def sql(self, i: int, statement: str) -> list[list[str]]:
        return await mariadb(self.ports[i], statement)

    async def status(self, i: int) -> dict:
        """A few of node i's wsrep status variables, without the wsrep_ prefix; numbers as ints."""
        rows = await self.sql(i, "SHOW GLOBAL STATUS LIKE 'wsrep%'")
        values = {name.removeprefix("wsrep_"): value for name, value in rows}
        return {key: int(values[key]) if values.get(key, "").isdigit() else values.get(key)
                for key in ("cluster_size", "cluster_status", "local_state_comment", "ready", "connected",
                            "local_cert_failures", "local_bf_aborts", "last_committed")}

    def _write_cnf(self, i: int) -> Path:
        d, g = self.dir(i), self.galera_ports[i]
        provider = ";".join([f"base_port={g}", f"gmcast.listen_addr=tcp://127.0.0.1:{g}",
                             f"ist.recv_addr=127.0.0.1:{g + 1}",
                             # A node killed -9 is evicted after 3 s (by default 5 s); until then the
                             # others' commits wait. Not shorter: a loaded 2-core machine stalls.
                             "evs.suspect_timeout=PT3S", "gcache.size=64M"])
        (d / "my.cnf").write_text(f"""[mysqld]
user = root
datadir = {d / "data"}
socket = {d / "mysqld.sock"}
pid-file = {d / "mysqld.pid"}
port = {self.ports[i]}
bind-address = 127.0.0.1
skip-name-resolve
max_connections = 500
# Small, to start three nodes fast on a 2-core machine. flush_log_at_trx_commit = 2: a commit
# reaches the OS, not the disk: fine for tests, where a crash is a kill -9, never a power cut.
innodb_buffer_pool_size = 128M
innodb_log_file_size = 48M
innodb_flush_log_at_trx_commit = 2
binlog_format = ROW
default_storage_engine = InnoDB
innodb_autoinc_lock_mode = 2
wsrep_on = ON
wsrep_provider = {GALERA}
wsrep_provider_options = "{provider}"
wsrep_cluster_name = persistd-test
wsrep_cluster_address = gcomm://{','.join(f'127.0.0.1:{port}' for port in self.galera_ports)}
wsrep_node_name = node{i}
wsrep_node_address = 127.0.0.1:{g}
wsrep_sst_method = mariabackup
wsrep_sst_auth = root:
wsrep_sst_receive_address = 127.0.0.1:{g + 2}
wsrep_slave_threads = 2
""")
        return d / "my.cnf"

    async def _launch(self, i: int, bootstrap: bool) -> None:
        """Starts node i: as a new cluster's first node (installing a data dir if it has none), or
        as a joiner, which a node killed -9 must be even if it once bootstrapped the cluster."""
        data = self.dir(i) / "data"
        data.mkdir(parents=True, exist_ok=True)
        args, grastate = [MARIADBD, f"--defaults-file={self._write_cnf(i)}"], data / "grastate.dat"
        if bootstrap:
            if not (data / "mysql").exists():  # root@localhost and root@127.0.0.1, no password
                await run("mariadb-install-db", args[1], "--auth-root-authentication-method=normal",
                          "--skip-test-db", "--wsrep-on=OFF")
            if grastate.exists():  # a stopped cluster starts again
                grastate.write_text(grastate.read_text().replace("safe_to_bootstrap: 0", "safe_to_bootstrap: 1"))
            args.append("--wsrep-new-cluster")
        elif grastate.exists() and re.search(r"seqno:\s+-1", grastate.read_text()):
            # After a kill -9 grastate.dat has no position (and no uuid either if the node had
            # just joined or donated), and the node would ask for an SST of everything (12 s:
            # mariabackup's script sleeps 10 s). As Debian's galera_recovery does, trust InnoDB:
            # --wsrep-recover reads the last committed position, written down here as a clean
            # shutdown would, and the node asks for an IST of just what it missed.
            recover_log = self.dir(i) / "recover.log"
            recover_log.unlink(missing_ok=True)
            await trio.run_process([*args, "--wsrep-recover", f"--log-error={recover_log}"], check=False,
                                   capture_stdout=True, capture_stderr=True)
            text = recover_log.read_text(errors="replace") if recover_log.exists() else ""
            for uuid, seqno in re.findall(r"Recovered position: ([0-9a-f-]{36}):(\d+)", text)[-1:]:
                if uuid != "00000000-0000-0000-0000-000000000000":
                    grastate.write_text(f"# GALERA saved state\nversion: 2.1\nuuid:    {uuid}\n"
                                        f"seqno:   {seqno}\nsafe_to_bootstrap: 0\n")
        self.synced.discard(i)
        self.procs[i] = await launch(args, self.log_path(i))

    async def _wait_synced(self, size: int) -> None:
        """Until every running node is ready, synced, and in a primary component of `size` nodes."""
        deadline = trio.current_time() + START_TIMEOUT_S
        while True:
            pending = []
            for i in [i for i, proc in enumerate(self.procs) if proc is not None]:
                if self.procs[i].returncode is not None:
                    raise ProcessError(f"node{i} exited ({self.procs[i].returncode}); its log ends:\n"
                                       + log_tail(self.log_path(i)))
                try:
                    status = await self.status(i)
                except ProcessError as e:  # not listening yet (a joiner listens after its SST)
                    status = {"error": str(e)}
                state = [status.get(key) for key in ("cluster_size", "local_state_comment", "ready")]
                if state != [size, "Synced", "ON"]:
                    pending.append((i, status))
            if not pending:
                self.synced = set(self.running())
                return
            if trio.current_time() > deadline:
                i, status = pending[0]
                raise ProcessError(f"node{i} not synced in a cluster of {size} after {START_TIMEOUT_S} s: "
                                   f"{status}; its log ends:\n" + log_tail(self.log_path(i)))
            await trio.sleep(0.2)

    async def start(self) -> None:
        """Bootstraps node 0, then lets the others join one at a time. The first time, node 0 is
        started and stopped once, and the others' data dirs are copies of its own: a joiner whose
        grastate.dat matches the cluster's history joins by IST in 2 s; an SST takes 12 s."""
        if not (self.dir(self.nodes - 1) / "data" / "mysql").exists():
            await self._launch(0, bootstrap=True)
            await self._wait_synced(1)
            await stop_process(self.procs[0])
            for i in range(1, self.nodes):
                await trio.to_thread.run_sync(functools.partial(
                    shutil.copytree, self.dir(0) / "data", self.dir(i) / "data", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("galera.cache", "gvwstate.dat", "*.pid")))
        for i in range(self.nodes):
            await self._launch(i, bootstrap=i == 0)
            await self._wait_synced(i + 1)

    async def kill(self, i: int) -> None:
        """kill -9 node i; returns once the other nodes have formed a primary component without it."""
        assert i in self.running(), f"node{i} is not running"
        proc, self.procs[i] = self.procs[i], None
        kill_group(proc)
        await proc.wait()
        await self._wait_synced(len(self.running()))

    async def restart(self, i: int) -> None:
        """Starts node i again as a joiner; returns once every running node is synced with it."""
        assert i not in self.running(), f"node{i} is running"
        await self._launch(i, bootstrap=False)
        await self._wait_synced(len(self.running()))

    async def stop(self) -> None:
        """Stops every node, node 0 last, so that it is the one safe to bootstrap from. A node
        still joining is killed at once: it would ignore SIGTERM until the end of its transfer."""
        for i in reversed(range(self.nodes)):
            proc, self.procs[i] = self.procs[i], None  # stopping twice is a no-op
            await stop_process(proc, STOP_TIMEOUT_S if i in self.synced else 0)


class HAProxy(Children):
    """Debian's haproxy (2.6) in the foreground, balancing HTTP requests over `backends`. It
    balances each request, even on a kept-alive client connection (prefer-last-server is off by
    default): a client's requests on one connection alternate between two servers."""

    def __init__(self, root_dir: Path, port: int, backends: list[tuple[str, int]]) -> None:
        self.dir, self.port, self.backends = Path(root_dir), port, backends
        self.url = f"http://127.0.0.1:{port}"
        self.socket_path = self.dir / "haproxy.sock"  # the runtime API: see command()
        self.log_path = self.dir / "haproxy.log"      # a line per request, and the checks' news
        self.proc: trio.Process | None = None

    def config(self) -> str:
        servers = "".join(f"    server s{i} {host}:{port}\n" for i, (host, port) in enumerate(self.backends))
        return f"""global
    log stdout format raw local0 info
    maxconn 4096
    # Without it haproxy binds with SO_REUSEPORT: a stray haproxy on the same port would
    # silently take half of the connections instead of this one failing to start.
    noreuseport
    stats socket {self.socket_path} mode 600 level admin
defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 30s
    timeout check 2s
    # Only a request that could not be sent is retried (retry-on's default, conn-failure), and
    # on another server (redispatch at each retry): a POST that reached a server is never sent
    # again. A server that dies with a request costs its client a 502 or, on a kept-alive
    # connection's later request, a connection closed without any response.
    retries 2
    option redispatch 1
frontend api
    bind 127.0.0.1:{self.port}
    default_backend persistd
backend persistd
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    default-server check inter 500ms fall 2 rise 1
{servers}"""

    async def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(self.config())
        await run("haproxy", "-c", "-q", "-f", str(cfg))
        self.proc = await launch(["haproxy", "-db", "-f", str(cfg)], self.log_path)  # -db: foreground
        # Ready once its own runtime socket answers: haproxy opens it after binding every
        # listener (probing the port could reach another process listening there).
        deadline = trio.current_time() + 10
        while True:
            if self.proc.returncode is not None:
                raise ProcessError(f"haproxy exited ({self.proc.returncode}):\n" + log_tail(self.log_path))
            try:
                await self.command("show info")
                return
            except OSError:
                if trio.current_time() > deadline:
                    raise ProcessError("haproxy does not answer:\n" + log_tail(self.log_path)) from None
                await trio.sleep(0.05)

    async def command(self, line: str) -> str:
        """A runtime API command's answer, e.g. of "show stat" or "disable server persistd/s1"."""
        async with await trio.open_unix_socket(str(self.socket_path)) as stream:
            await stream.send_all(line.encode() + b"\n")
            chunks = []
            while chunk := await stream.receive_some():
                chunks.append(chunk)
        return b"".join(chunks).decode()

    async def servers(self) -> dict[str, str]:
        """Each backend server's state as the health checks see it: "UP", "DOWN", "UP 1/2"..."""
        header, *lines = (await self.command("show stat")).removeprefix("# ").splitlines()
        rows = [dict(zip(header.split(","), line.split(","))) for line in lines if line]
        return {row["svname"]: row["status"] for row in rows
                if row["pxname"] == "persistd" and row["svname"] not in ("BACKEND", "FRONTEND")}

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        await stop_process(proc)
