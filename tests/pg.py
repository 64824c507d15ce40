"""A throwaway PostgreSQL server for the store and registry tests, and fixtures over both store backends.

Use from a test module with ``pytest_plugins = ["pg"]``. The server is started once per session in a
temporary folder (initdb + pg_ctl, trust authentication on 127.0.0.1 only, a free port, fsync off: nothing
here tests PostgreSQL's own crash safety) and removed at the end; each test gets a fresh schema. Without
the binaries the PostgreSQL cases are skipped, unless ``CI`` is set: CI must run them, so there they fail.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# the PostgreSQL case carries the ``postgres`` marker (make test-fast leaves it out)
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def find_pg_bin() -> Path | None:
    """The folder with initdb and pg_ctl: PATH first, then the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent

    def major(path: str) -> int:
        m = re.search(r"/postgresql/(\d+)/", path)
        return int(m.group(1)) if m else 0

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major)
    for initdb in reversed(candidates):
        if (Path(initdb).parent / "pg_ctl").exists():
            return Path(initdb).parent
    return None


def _unavailable(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{msg}; CI must run the PostgreSQL tests (install the postgresql package)", pytrace=False)
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a superuser's connection to the session's server (database ``postgres``)."""
    bindir = find_pg_bin()
    if bindir is None:
        _unavailable("PostgreSQL binaries (initdb, pg_ctl) not found in PATH or /usr/lib/postgresql/*/bin")
    prefix: list[str] = []
    # Outside pytest's tmp folders: those are private to root, and PostgreSQL refuses to run as root.
    base = Path(tempfile.mkdtemp(prefix="fedprompt-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            _unavailable("running as root and there is no 'postgres' user to run PostgreSQL as")
        if not shutil.which("runuser"):
            shutil.rmtree(base)
            _unavailable("running as root and runuser is missing (needed to run PostgreSQL as 'postgres')")
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data = base / "data"

    def run(*args: str | Path) -> None:
        done = subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, timeout=120)
        if done.returncode:
            log = base / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}{tail}")

    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        (data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        for attempt in range(3):
            port = _free_port()
            opts = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200"
            )
            try:
                run(bindir / "pg_ctl", "-D", data, "-l", base / "server.log", "-w", "-t", "60", "-o", opts, "start")
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A URL whose connections see only a fresh, empty schema (dropped after the test).

    A schema per test rather than a database: creating a database costs half a second, a schema milliseconds.
    """
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{postgres_server}?options=-csearch_path%3D{schema}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=BACKENDS)
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store for this test lives: an SQLite file path or a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "store" / "registry.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_target: str) -> Iterator:
    from fedprompt.server.aggregation.store import open_store

    s = open_store(store_target)
    yield s
    s.close()
