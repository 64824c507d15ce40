"""Starting and stopping Flower's processes (SuperLink, SuperNode, the ``flwr`` CLI) for fedprompt's daemons.

Each Flower process runs in its own process group (a SuperNode leaves its ``flower-superexec`` child
behind when only the parent is killed) with its own ``FLWR_HOME`` (Flower installs each run's app bundle
there) and the update check off. Runtime dependency installation stays off: a data holder's machine
installs nothing a coordinator asks for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedprompt.errors import FedPromptError

FEDERATION = "fedprompt"


def app_dir() -> Path:
    """The Flower App folder shipped inside the installed package (pyproject.toml + LICENSE only)."""
    from importlib import resources

    return Path(str(resources.files("fedprompt") / "flower_app"))


def flower_bin(name: str) -> str:
    """A Flower executable from the environment fedprompt runs in (not whatever is first on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FedPromptError(f"{name} is not installed beside {sys.executable}; reinstall fedprompt")
    return found


def flower_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM when the daemon that started it dies, even by SIGKILL, so a crashed
    # daemon leaves no SuperLink or SuperNode behind.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, appending its output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [str(c) for c in cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Terminate ``proc`` and everything in its process group; kill what is left after ``timeout``."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            # the group may outlive its leader (flower-superexec, flwr-clientapp): signal it once more
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_matching(fragment: str) -> int:
    """SIGTERM this user's processes whose command line contains ``fragment``; returns how many."""
    me, count = os.getuid(), 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid != me or int(proc.name) == os.getpid():
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if fragment in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGTERM)
                count += 1
    return count


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedPromptError(f"{Path(proc.args[0]).name} exited with code {proc.returncode}:\n{tail(log)}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.3)
    raise FedPromptError(f"nothing listens on {host}:{port} after {timeout:.0f} s:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def write_cli_config(home: Path, address: str, root_cert: Path | None) -> None:
    """The ``flwr`` CLI's connection to the SuperLink (``$FLWR_HOME/config.toml``). Without ``root_cert`` the
    connection is plain HTTP: only for a loopback relay (``server.coordinator.control_relay.ControlRelay``)."""
    home.mkdir(parents=True, exist_ok=True)
    tls = f"root-certificates = {json.dumps(str(root_cert))}\n" if root_cert is not None else "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = {json.dumps(address)}\n{tls}'
    )


def flwr(args: list[str], env: dict[str, str], *, timeout: float = 120.0) -> dict:
    """Run ``flwr ... --format json`` and return its JSON; a failure raises with Flower's message."""
    try:
        r = subprocess.run(
            [flower_bin("flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise FedPromptError(f"flwr {' '.join(args[:2])} did not answer within {timeout:.0f} s") from exc
    try:
        out = json.loads(r.stdout) if r.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {}
    if r.returncode != 0 or not out.get("success", False):
        detail = out.get("error-message") or r.stderr.strip()[-2000:] or r.stdout.strip()[-2000:]
        raise FedPromptError(f"flwr {' '.join(args[:2])} failed: {detail}")
    return out


def toml_value(value: object) -> str:
    """A run-config value in the TOML syntax ``flwr run --run-config`` parses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
