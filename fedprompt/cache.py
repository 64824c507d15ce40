"""Cache folder, checksums and atomic writes shared by the model zoo, datasets and artifacts."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedprompt.errors import FedPromptError


def cache_dir() -> Path:
    """``$FEDPROMPT_CACHE``, else ``$XDG_CACHE_HOME/fedprompt``, else ``~/.cache/fedprompt``."""
    env = os.environ.get("FEDPROMPT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fedprompt"


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """An exclusive inter-process lock around materialising one cache entry.

    Several processes on one machine (data-holder daemons, test workers) may pull the same model or
    dataset at once; the second waits and then finds the first one's complete entry.
    """
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch folder beside ``final`` that replaces it only if the block completes.

    An interrupted conversion or download therefore never leaves a half-written cache entry.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield scratch
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def check_out_folder(out: Path, force: bool = False, *, flag: str = "--out") -> None:
    """Refuse an output folder that is a file, or that already holds files (unless ``force``): a command writes
    its result as a new folder and must not bury or delete what is there."""
    if out.exists() and not out.is_dir():
        raise FedPromptError(f"{out} is a file; {flag} must name a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise FedPromptError(f"{out} exists and is not empty; choose another {flag} or pass --force")


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sqlite_backup(conn: sqlite3.Connection, dest: str | Path) -> Path:
    """A consistent copy of an open SQLite database (its online backup API, safe while others write),
    written beside ``dest`` and moved into place: an interrupted backup leaves no partial file."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with contextlib.closing(sqlite3.connect(tmp)) as out:
        conn.backup(out)
    os.replace(tmp, dest)
    return dest
