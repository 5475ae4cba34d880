"""deploy/persistd.service and deploy/persistd.sysusers (issue 9): `systemd-analyze verify`
accepts the unit as committed, its timeouts fit the daemon's defaults, and the sysusers.d
snippet creates the user the unit runs as; and the daemon speaks the notify protocol to a
socket the test binds, as systemd would. The unit tests need systemd's tools (systemd 252 here),
not a running systemd; like the rest of the suite they fail, never skip, without them.

`ExecStart=persistd ...` names a bare executable, which systemd looks up in its fixed search
path (`systemd-path search-binaries-default`, /usr/local/bin included), and `verify` checks
that it is there. So the unit is verified under `--root` in a temporary tree laid out as the
README installs persistd: the unit in /etc/systemd/system, the venv's entry point at
/opt/persistd/bin/persistd linked from /usr/local/bin, and this system's own units for the
targets the unit depends on."""

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
from pathlib import Path

import pytest
import trio

from persistd.daemon import load_config
from processes import clean_environ, persistd_process

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "persistd.service"
SYSUSERS = DEPLOY / "persistd.sysusers"
SYSTEM_UNITS = ("usr/lib/systemd/system", "lib/systemd/system")


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin")
    if path is None:
        pytest.fail(f"{name} is missing: install systemd's tools (package systemd)")
    return path


def run(*argv: str) -> subprocess.CompletedProcess:
    # A caller's SYSTEMD_UNIT_PATH or debug log level would change what verify loads or prints.
    env = {k: v for k, v in os.environ.items() if k not in ("SYSTEMD_UNIT_PATH", "SYSTEMD_LOG_LEVEL")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**env, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"})


def unit_settings() -> configparser.ConfigParser:
    """The unit's sections and keys (case kept; a key given twice keeps its last value)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str
    parser.read(UNIT, encoding="utf-8")
    return parser


def seconds(span: str) -> float:
    """A systemd time span ("45s", "1min 30s", "infinity") as systemd itself reads it."""
    result = run(tool("systemd-analyze"), "timespan", span)
    assert result.returncode == 0, f"systemd-analyze cannot read the time span {span!r}: {result.stderr}"
    for line in result.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key in ("μs", "\u00b5s", "us"):
            usec = value.strip()
            return float("inf") if usec in ("infinity", str(2**64 - 1)) else int(usec) / 1e6
    raise AssertionError(f"no μs line in systemd-analyze timespan's output: {result.stdout!r}")


def installed_root(tmp_path: Path) -> Path:
    """A tree with persistd installed as the README says, for `systemd-analyze --root`."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copyfile(UNIT, root / "etc/systemd/system/persistd.service")
    entry_point = Path(sysconfig.get_path("scripts"), "persistd")
    assert entry_point.is_file(), f"{entry_point} is missing: install persistd (pip install -e .) first"
    (root / "opt/persistd/bin").mkdir(parents=True)
    shutil.copy2(entry_point, root / "opt/persistd/bin/persistd")
    (root / "usr/local/bin").mkdir(parents=True)
    # An absolute link, as on a real system; verify resolves it inside the root.
    (root / "usr/local/bin/persistd").symlink_to("/opt/persistd/bin/persistd")
    # sysinit.target, basic.target, network-online.target, ...: the units the default
    # dependencies and Wants= name. /lib is a link to usr/lib on merged-/usr systems.
    if Path("/lib").is_symlink():
        (root / "lib").symlink_to(os.readlink("/lib"))
    for units in SYSTEM_UNITS:
        if Path("/", units).is_dir() and not (root / units).exists():
            shutil.copytree(Path("/", units), root / units, symlinks=True)
    return root


def verify(root: Path) -> list[str]:
    """What `systemd-analyze verify` says about persistd.service in `root`, as a list of
    complaints (empty: none). Two runs: one loads every dependency, so that the start job
    is built as on a real system, and fails on an error or on any line about the unit (its
    dependencies are this system's units, not ours); one with --recursive-errors=no checks
    the unit alone, whose exit status is non-zero on any warning about it."""
    analyze = tool("systemd-analyze")
    complaints = []
    whole = run(analyze, "verify", f"--root={root}", "persistd.service")
    if whole.returncode != 0:
        complaints.append(f"verify exited with {whole.returncode}")
    complaints += [line for line in (whole.stdout + whole.stderr).splitlines() if "persistd" in line]
    alone = run(analyze, "verify", "--recursive-errors=no", f"--root={root}", "persistd.service")
    if alone.returncode != 0:
        complaints.append(f"verify --recursive-errors=no exited with {alone.returncode}")
    complaints += [line for line in (alone.stdout + alone.stderr).splitlines() if line.strip()]
    return list(dict.fromkeys(complaints))


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    assert verify(installed_root(tmp_path)) == []


@pytest.mark.parametrize(("line", "complaint"), [
    ("TimeoutStopSecs=45s", "Unknown key 'TimeoutStopSecs'"),
    ("RestartPreventExitStatus=two", "Failed to parse value, ignoring: two"),
    (None, "Command persistd is not executable"),
], ids=["misspelt key", "bad value", "no executable"])
def test_verify_as_run_here_reports_a_broken_unit(tmp_path, line, complaint):
    """The check above can fail: a misspelt key, a bad value (in a drop-in, which verify
    reads like the unit), or persistd missing from systemd's search path."""
    root = installed_root(tmp_path)
    if line is None:
        (root / "usr/local/bin/persistd").unlink()
    else:
        dropin = root / "etc/systemd/system/persistd.service.d"
        dropin.mkdir()
        (dropin / "broken.conf").write_text(f"[Service]\n{line}\n")
    complaints = verify(root)
    assert any(complaint in c for c in complaints), complaints
    assert any("exited with" in c for c in complaints), complaints


def test_the_units_timeouts_fit_the_daemons_defaults():
    service = unit_settings()["Service"]
    cfg = load_config(None, {})
    # SIGTERM → requests in flight get graceful_timeout → the final flush gets shutdown_timeout
    # → exit. A TimeoutStopSec that ends first would SIGKILL persistd in the middle of it.
    stop = seconds(service["TimeoutStopSec"])
    assert stop > cfg.server.graceful_timeout + cfg.buffer.shutdown_timeout
    assert stop != float("inf")
    # persistd pings at half of WatchdogSec; systemd only tells it to when it is set.
    assert 0 < seconds(service["WatchdogSec"]) < float("inf")
    # A start that stalls before READY=1 is stopped; a long replay extends it (EXTEND_TIMEOUT_USEC).
    assert 0 < seconds(service["TimeoutStartSec"]) < float("inf")
    assert service["Type"] == "notify"


def test_the_sysusers_snippet_creates_the_user_the_unit_runs_as(tmp_path):
    service = unit_settings()["Service"]
    (tmp_path / "etc").mkdir()
    result = run(tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = users[service["User"]]
    assert user[3] == groups[service["Group"]][2]  # its primary group is the unit's Group=
    assert user[5] == "/var/lib/" + service["StateDirectory"]  # home: the state directory
    assert user[6].endswith("/nologin")
    assert 0 < int(user[2]) < 1000  # a system user


# ── the notify protocol, spoken by the daemon ────────────────────────────────────────


async def listen(sock: trio.socket.SocketType, heard: list[tuple[float, str]]) -> None:
    while True:
        data = await sock.recv(4096)
        heard.extend((trio.current_time(), line) for line in data.decode().splitlines())


def first(heard: list[tuple[float, str]], line: str) -> float:
    return next(at for at, said in heard if said == line)


@pytest.mark.parametrize("address", ["path", "abstract"])
async def test_the_daemon_tells_systemd_ready_status_watchdog_and_stopping(db, tmp_path, address):
    """As systemd starts a Type=notify unit with WatchdogSec=1s: STATUS= lines while it
    starts, READY=1 once the port answers, WATCHDOG=1 every half second, STOPPING=1 at
    SIGTERM, before it exits 0."""
    name = str(tmp_path / "notify") if address == "path" else f"@persistd-test-{os.getpid()}-{id(tmp_path)}"
    heard: list[tuple[float, str]] = []
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind("\0" + name[1:] if name.startswith("@") else name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen, sock, heard)
            env = clean_environ(NOTIFY_SOCKET=name, WATCHDOG_USEC="1000000")
            async with persistd_process(tmp_path, env=env) as process:
                healthy_at = trio.current_time()
                await trio.sleep(2.5)
                signalled_at = trio.current_time()
                process.signal(signal.SIGTERM)
                assert (await process.wait_exit(15))[0] == 0
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    said = [line for _, line in heard]
    ready = first(heard, "READY=1")
    assert ready <= healthy_at, said
    assert said.index("STATUS=connecting to the database") < said.index("READY=1"), said
    assert any(line.startswith("STATUS=listening on") for line in said), said
    assert signalled_at <= first(heard, "STOPPING=1"), said
    pings = [at for at, line in heard if line == "WATCHDOG=1" and ready <= at <= signalled_at]
    assert len(pings) >= 4, said
    assert max(b - a for a, b in zip([ready, *pings], [*pings, signalled_at])) < 0.5 + 0.3, pings
    assert any(line.startswith("STATUS=") and "rows buffered" in line for line in said), said


async def test_no_watchdog_pings_when_the_watchdog_is_another_processs(db, tmp_path):
    """WATCHDOG_PID names the process systemd watches; a child that inherited the
    variables must not ping for it."""
    heard: list[tuple[float, str]] = []
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(str(tmp_path / "notify"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen, sock, heard)
            env = clean_environ(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="1000000", WATCHDOG_PID="1")
            async with persistd_process(tmp_path, env=env) as process:
                await trio.sleep(1.5)
                process.signal(signal.SIGTERM)
                assert (await process.wait_exit(15))[0] == 0
            nursery.cancel_scope.cancel()
    said = [line for _, line in heard]
    assert "READY=1" in said and "STOPPING=1" in said and "WATCHDOG=1" not in said, said
