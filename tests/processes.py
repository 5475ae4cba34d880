"""persistd as a real process: `python -m persistd --config <tmp>/persistd.toml` on a free
port, and the few helpers the process tests share to talk to it over HTTP.

    async with persistd_process(tmp_path, database={"url": proxy.url()}) as process:
        ...                                  # healthy and listening on process.url
        await process.kill()                 # kill -9, as a crash would
    async with persistd_process(tmp_path) as process:   # the same tmp_path: the same state dir
        ...

Leaving the block stops a process that is still running; one that already exited is left
alone, so a killed daemon can be started again on the state it left behind.

    proc = await persistd_exits(tmp_path, state={"dir": "/nowhere"})   # a start that must fail
    assert_one_line_error(proc, 1, "state dir")"""

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from functools import partial

import httpx
import msgspec
import pytest
import trio

from conftest import database_url

START_TIMEOUT_S = 20
# The persistd that the test run imports. -P: the working directory is not put on sys.path,
# so that a test started in the checkout runs the installed package, as users do (the
# checkout's persistd/ lacks persistd/sql, which only the wheel lays out).
PERSISTD = [sys.executable, "-P", "-m", "persistd"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml(sections: dict) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class Process:
    def __init__(self, proc: trio.Process, port: int, cfg: dict, log_path) -> None:
        self.proc, self.port, self.cfg, self.log_path = proc, port, cfg, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.state_dir = cfg["state"]["dir"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def kill(self) -> int:
        """kill -9: no handler runs, nothing is flushed. Returns once the process is gone."""
        self.proc.kill()
        return await self.proc.wait()

    def peak_rss_bytes(self) -> int:
        """The process's peak resident set size so far (VmHWM in /proc/<pid>/status)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    value, unit = line.split()[1:3]
                    assert unit == "kB", line
                    return int(value) * 1024
        raise AssertionError(f"no VmHWM in /proc/{self.proc.pid}/status")

    async def wait_exit(self, timeout: float) -> tuple[int, float]:
        """(exit code, seconds waited); fails (after killing it) if it outlives `timeout`."""
        started = trio.current_time()
        with trio.move_on_after(timeout):
            code = await self.proc.wait()
            return code, trio.current_time() - started
        self.proc.kill()
        await self.proc.wait()
        pytest.fail(f"persistd still running {timeout:.1f} s after the signal\n--- log ---\n{self.log()[-4000:]}")

    async def accepts_connections(self) -> bool:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError:
            return False
        await stream.aclose()
        return True


def process_config(tmp_path, port: int, sections: dict) -> tuple[dict, str]:
    """The test config (`sections` merged over the defaults below, key by key), written to
    <tmp_path>/persistd.toml, and that file's path."""
    cfg = {
        "server": {"port": port, "graceful_timeout": 1.0},
        "database": {"url": database_url(tmp_path), "connect_timeout": 2.0},
        "buffer": {"flush_interval": 5.0, "shutdown_timeout": 10.0, "retry_max": 0.5},
        "state": {"dir": str(tmp_path / "state")},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "persistd.toml"
    config_path.write_text(toml(cfg))
    return cfg, str(config_path)


def clean_environ(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PERSISTD_")}, **extra}


@asynccontextmanager
async def persistd_process(tmp_path, command: list[str] = PERSISTD, env: dict | None = None, port: int | None = None,
                           **sections):
    """`python -m persistd --config <tmp>/persistd.toml` on a free port, healthy.

    `sections` are merged over the defaults of process_config(), key by key (e.g.
    `database={"url": proxy.url()}`). The state dir is `<tmp_path>/state`, so starting again
    with the same tmp_path finds what the previous process left there; the log
    (`<tmp_path>/persistd.log`) is appended to, one start after the other. `command` runs
    another persistd (an installed wheel's), `env` replaces the environment, `port` is one
    to listen on instead of a free one (a restart behind a load balancer)."""
    port = port or free_port()
    cfg, config_path = process_config(tmp_path, port, sections)
    log_path = tmp_path / "persistd.log"
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start on port {port} ---\n".encode())
        log.flush()
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(partial(
                trio.run_process, [*command, "--config", config_path],
                check=False, stdout=log, stderr=subprocess.STDOUT, env=env or clean_environ(), cwd=str(tmp_path)))
            process = Process(proc, port, cfg, log_path)
            await wait_healthy(process)
            yield process
            if proc.returncode is None:
                nursery.cancel_scope.cancel()  # stops it (SIGTERM) if a test left it running


async def wait_healthy(process: Process) -> None:
    async with httpx.AsyncClient(base_url=process.url, timeout=2) as client:
        with trio.move_on_after(START_TIMEOUT_S):
            while process.proc.returncode is None:
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)
    pytest.fail(f"persistd did not become healthy (exit code {process.proc.returncode})\n{process.log()[-4000:]}")


async def persistd_exits(tmp_path, command: list[str] = PERSISTD, env: dict | None = None,
                         **sections) -> subprocess.CompletedProcess:
    """A start that must fail: persistd with the test config, run until it exits (within
    START_TIMEOUT_S), its stderr captured."""
    _, config_path = process_config(tmp_path, free_port(), sections)
    with trio.fail_after(START_TIMEOUT_S):
        return await trio.run_process([*command, "--config", config_path], check=False, capture_stderr=True,
                                      env=env or clean_environ(), cwd=str(tmp_path))


def assert_one_line_error(proc, code: int, *words: str) -> None:
    """Exit status `code`, and stderr ends with one line that says what is wrong (each of
    `words` in it), without a traceback."""
    stderr = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else proc.stderr
    assert proc.returncode == code, stderr
    last = stderr.strip().splitlines()[-1]
    assert "persistd: " in last and "Traceback" not in stderr, stderr
    assert all(word in last for word in words), last


def encode(key: str, rows: list[dict]) -> bytes:
    return msgspec.json.encode({key: rows})


async def post(client: httpx.AsyncClient, path: str, rows_key: str, rows: list[dict]) -> httpx.Response:
    return await client.post(path, content=encode(rows_key, rows), headers={"content-type": "application/json"})

