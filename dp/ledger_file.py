"""The privacy ledger's file: what it must be before the ledger trusts it, and who owns an open reservation.

SQLite treats a missing or zero-byte file as a new, empty database: a ledger that was truncated, deleted or
replaced would read as "nothing spent" and a job it should refuse would run. So the ledger never creates its
file implicitly: ``PrivacyLedger.create`` writes a new one (with its budget) only where no file is, and opening
checks that the file is a SQLite database that passes ``quick_check`` and holds the ledger's tables. Anything
else is refused with one line that names the file and the way back (``fedprompt budget restore``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from fedprompt.errors import FedPromptError

LEDGER_FILE = "privacy-ledger.sqlite3"
SCHEMA_VERSION = 2
_SQLITE_MAGIC = b"SQLite format 3\x00"
# status: reserved (nothing has left the holder yet; cancelled at the next start when its owner is gone),
# releasing (the result may have left: counted, settled later), committed, cancelled (kept, never counted)
STATUSES = ("reserved", "releasing", "committed", "cancelled")
RELEASES_TABLE = f"""
CREATE TABLE releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    task TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL DEFAULT 0,
    mechanism TEXT NOT NULL,
    accountant TEXT,                -- NULL: only (epsilon, delta) is known, composed by adding
    noise_multiplier REAL,
    sample_rate REAL,
    steps INTEGER,
    delta REAL NOT NULL,            -- the delta this release reported its own epsilon at
    epsilon REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    owner TEXT NOT NULL DEFAULT ''  -- boot id / pid / start time of the process that reserved it
);
"""
SCHEMA = "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);\n" + RELEASES_TABLE
COLUMNS = (
    "id created_at task run_id round mechanism accountant noise_multiplier sample_rate steps delta epsilon status owner"
).split()


class LedgerError(FedPromptError):
    """The ledger file is missing, damaged or not a ledger: nothing was read from it or written to it."""


def restore_hint(path: Path) -> str:
    return (
        f"move it aside (mv {path} {path}.broken) and restore your last backup: "
        f"fedprompt budget restore BACKUP --state {path.parent}"
    )


def check(path: Path) -> int:
    """The schema version of the ledger at ``path``; :class:`LedgerError` when it is not one to trust."""
    if not path.exists():
        raise LedgerError(
            f"{path}: no privacy ledger here; a new one is made only by `fedprompt budget set --budget-epsilon E "
            f"--state {path.parent}` (or the first start with --budget-epsilon)"
        )
    size = path.stat().st_size
    if size == 0:
        raise LedgerError(f"{path} is empty (0 bytes): refusing to treat it as a new ledger; {restore_hint(path)}")
    with open(path, "rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if head != _SQLITE_MAGIC:
        raise LedgerError(f"{path} is not a SQLite database; {restore_hint(path)}")
    try:
        # immutable: the check reads the file as it is and creates nothing beside it (no -wal, no -shm)
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)) as conn:
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise LedgerError(f"{path} is damaged ({ok}); {restore_hint(path)}")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"settings", "releases"} <= tables:
                raise LedgerError(f"{path} is a SQLite file but not a privacy ledger; {restore_hint(path)}")
            row = conn.execute("SELECT value FROM settings WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path} cannot be read as a ledger ({exc}); {restore_hint(path)}") from None
    if row is None:
        raise LedgerError(f"{path} has no schema version: not a ledger fedprompt wrote; {restore_hint(path)}")
    version = int(row[0])
    if version > SCHEMA_VERSION:
        raise LedgerError(f"{path} was written by a newer fedprompt (schema {version}); upgrade fedprompt")
    return version


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring a ledger of an older schema to this one, inside the caller's transaction."""
    if version < 2:  # v1: statuses reserved/committed only, no owner
        conn.execute("ALTER TABLE releases RENAME TO releases_v1")
        conn.execute(RELEASES_TABLE)
        cols = ", ".join(COLUMNS[:-1])
        conn.execute(f"INSERT INTO releases ({cols}) SELECT {cols} FROM releases_v1")
        conn.execute("DROP TABLE releases_v1")
    conn.execute("UPDATE settings SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


def create(path: Path, settings: dict[str, str]) -> None:
    """Write a new ledger with ``settings`` (its budget) where there is no file, atomically."""
    if path.exists() or Path(f"{path}-wal").exists():
        raise LedgerError(f"{path} exists: a ledger is never created over another (fedprompt budget show)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(tmp, isolation_level=None)) as conn:  # a private file until linked
        conn.executescript(SCHEMA)
        conn.execute("INSERT INTO settings VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        for key, value in settings.items():
            conn.execute("INSERT INTO settings VALUES (?, ?)", (key, value))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)  # fails if a file appeared meanwhile: never replaces a ledger
    except FileExistsError:
        raise LedgerError(f"{path} appeared while a new ledger was being made; nothing was changed") from None
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ owners of reservations


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def this_process() -> str:
    """An id of this process that a pid reused after its death, or a reboot, does not repeat."""
    return f"{_boot_id()}/{os.getpid()}/{_start_time(os.getpid())}"


def alive(owner: str) -> bool:
    """Whether the process that made a reservation still runs (unknown owners count as alive: never cancel
    what might still be in flight)."""
    try:
        boot, pid, start = owner.split("/")
    except ValueError:
        return True
    if not boot or boot != _boot_id():
        return not boot  # another boot: gone; no boot id known (not Linux): assume alive
    return _start_time(int(pid)) == start
