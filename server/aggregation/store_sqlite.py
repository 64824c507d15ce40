"""The SQLite backend of ``server/aggregation/store.py``: one file, the default for a single server process.

One connection behind a lock: the gRPC worker threads take turns, which SQLite would impose anyway (one
writer at a time). WAL lets readers in other processes (a backup, ``sqlite3`` on the command line) see the
last commit while a write is under way; ``synchronous=FULL`` makes each commit survive a power cut, not only
a killed process. ``BEGIN IMMEDIATE`` takes the write lock before the first read, so a read-check-write (is
the round still open? how many updates has it?) cannot interleave with another process's writer.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from fedprompt.server.aggregation.store import Store, StoreError, Tx
from fedprompt.server.aggregation.store_schema import SCHEMA


class SqliteTx(Tx):
    def _seq(self, table: str) -> tuple[str, str]:
        # Writers are serialised (BEGIN IMMEDIATE), so MAX + 1 is unique; rowid would do but VACUUM may renumber.
        return "seq, ", f"(SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}), "


class SqliteStore(Store):
    backend = "sqlite"

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the SQLite store {str(path)!r}: {e}") from e
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreError(f"the SQLite store {str(path)!r} cannot use WAL mode (journal_mode is {mode!r})")
        self._conn: sqlite3.Connection | None = conn
        with self.transaction() as tx:
            for stmt in SCHEMA:
                tx.execute(stmt.format(BLOB="BLOB", REAL="REAL", SEQ="INTEGER NOT NULL"))
            self._check_schema(tx)

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"the SQLite store {str(self.path)!r} is closed")
            cur = conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield SqliteTx(cur)
                    cur.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
