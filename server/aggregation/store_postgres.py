"""The PostgreSQL backend of ``server/aggregation/store.py``: several server processes (or a replicated
database) share it.

A small pool of connections, so the gRPC worker threads run their transactions side by side; the rows a
read-check-write depends on are locked with ``SELECT ... FOR UPDATE`` (``Tx.get_round(lock=True)``,
``Tx.get_stream(lock=True)``), which serialises requests on one round or stream across threads and
processes while others proceed. READ COMMITTED (the default) is enough under those row locks.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

from fedprompt.server.aggregation.store import Store, StoreError, Tx
from fedprompt.server.aggregation.store_schema import SCHEMA

# Any constant: schema creation by several processes at once would race on the catalogue without it.
_SCHEMA_LOCK_KEY = 0x66656470726F6D70


class PostgresTx(Tx):
    for_update = " FOR UPDATE"

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")


def redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class PostgresStore(Store):
    backend = "postgres"

    def __init__(self, url: str, *, max_connections: int = 8, connect_timeout_s: int = 10) -> None:
        import psycopg

        self._psycopg = psycopg
        self.url = url
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[Any] = []
        self._mutex = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = False
        try:
            with self.transaction() as tx:
                tx.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK_KEY,))
                for stmt in SCHEMA:
                    tx.execute(
                        stmt.format(BLOB="BYTEA", REAL="DOUBLE PRECISION", SEQ="BIGINT GENERATED ALWAYS AS IDENTITY")
                    )
                self._check_schema(tx)
        except psycopg.Error as e:
            self.close()
            raise StoreError(f"cannot open the PostgreSQL store {redact(url)}: {e}") from e

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        self._slots.acquire()
        try:
            with self._mutex:
                if self._closed:
                    raise StoreError(f"the PostgreSQL store {redact(self.url)} is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout_s)
            try:
                yield conn
            finally:
                idle = self._psycopg.pq.TransactionStatus.IDLE
                reusable = not (conn.closed or conn.broken) and conn.info.transaction_status == idle
                with self._mutex:
                    if reusable and not self._closed:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        with self._connection() as conn, conn.transaction():
            if not write:
                conn.execute("SET TRANSACTION READ ONLY")
            with conn.cursor() as cur:
                yield PostgresTx(cur)

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
