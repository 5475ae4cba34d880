"""The container's HEALTHCHECK: exit 0 when persistd's /health answers 200, 1 otherwise
(connection refused, a timeout, or 503 while the database is unreachable or a flush fails).

The port is the one persistd listens on: PERSISTD_PORT if set, else the [server] port of
the config that PID 1 was started with (`--config`), else 8001. Only the standard library:
it runs every 30 s and must start fast."""

import os
import sys
import tomllib
import urllib.error
import urllib.request

TIMEOUT_S = 4.0  # under the HEALTHCHECK --timeout, so a hung daemon reads as a failure, not a kill
ANY_ADDRESS = {"", "0.0.0.0", "::"}


def config_path() -> str | None:
    with open("/proc/1/cmdline", "rb") as f:
        args = f.read().decode(errors="replace").split("\0")
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.removeprefix("--config=")
    return None


def server_address() -> tuple[str, int]:
    server = {}
    path = config_path()
    if path:
        with open(path, "rb") as f:
            server = tomllib.load(f).get("server", {})
    host = server.get("host", "127.0.0.1")
    port = int(os.environ.get("PERSISTD_PORT") or server.get("port", 8001))
    return ("127.0.0.1" if host in ANY_ADDRESS else host), port


def main() -> int:
    try:
        host, port = server_address()
    except (OSError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        print(f"cannot tell persistd's port: {exc}")
        return 1
    host = f"[{host}]" if ":" in host else host
    # No proxies: an http_proxy in the container's environment must not carry a local check away.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{port}/health", timeout=TIMEOUT_S) as response:
            print(response.read().decode(errors="replace"))
            return 0
    except urllib.error.HTTPError as exc:  # 503: degraded
        print(f"{exc.code}: {exc.read().decode(errors='replace')}")
    except (OSError, ValueError) as exc:
        print(f"no answer: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
