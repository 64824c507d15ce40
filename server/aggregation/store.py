"""The aggregation server's durable store: SQLite (a file, the default) or PostgreSQL (a URL), one interface.

The store only persists and reads; every check lives in the registry (``server/aggregation/registry.py``). What the
store guarantees is atomicity: the registry does each request inside ``with store.transaction() as tx``,
which commits when the block completes and rolls back when it raises, so a rejected request changes nothing
and a process killed mid-request leaves the old state, never half of the new one (a finalised round without
its version, a merged stream buffer that was not cleared).

Write transactions are serialised where they would race. SQLite: one connection behind a lock, and
``BEGIN IMMEDIATE`` takes the database's write lock up front, which also orders writers in other processes.
PostgreSQL: a small pool of connections; ``get_round(..., lock=True)`` and ``get_stream(..., lock=True)``
read with ``SELECT ... FOR UPDATE``, so a read-check-write on one round or stream holds its row until commit.
The UNIQUE keys (one update per client and round, one buffer slot per position) hold even without that.

Tensors are stored as little-endian float32 bytes with their shape as JSON; metadata as JSON text (not
JSONB, which would reorder keys and lose the exact text a version id was computed over).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedprompt.errors import FedPromptError
from fedprompt.protocols.records import ModelRef, Round, Stream, TaskVector, Version
from fedprompt.server.aggregation.store_schema import (
    ROUND_COLS,
    SCHEMA_VERSION,
    STREAM_COLS,
    TABLES,
    VERSION_COLS,
)


class StoreError(FedPromptError):
    """The store cannot be opened or used (an unreachable database, a schema from a newer release)."""


def tensor_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def tensor_from(data: bytes, shape: Any) -> np.ndarray:
    """A read-only float32 array over stored bytes (records are immutable; copy to modify)."""
    return np.frombuffer(bytes(data), dtype="<f4").astype(np.float32, copy=False).reshape(tuple(shape))


class Tx:
    """One open transaction: the storage operations, in SQL both backends accept (``?`` placeholders)."""

    for_update = ""  # PostgreSQL: " FOR UPDATE"

    def __init__(self, cursor: Any) -> None:
        self._cur = cursor

    def _sql(self, sql: str) -> str:
        return sql

    def _seq(self, table: str) -> tuple[str, str]:
        """Column and value that give a new row of ``table`` the next insertion-order number."""
        return "", ""

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        self._cur.execute(self._sql(sql), params)
        return list(self._cur.fetchall()) if self._cur.description else []

    def _changed(self, sql: str, params: tuple) -> int:
        self._cur.execute(self._sql(sql), params)
        return self._cur.rowcount

    # versions
    def insert_version(self, v: Version) -> bool:
        """False when a version with this id exists (content-addressed: it is the same version)."""
        col, val = self._seq("versions")
        soft = v.embeddings is not None
        row = (
            v.version_id,
            v.task,
            v.base_model.model_id,
            v.base_model.weights_sha256,
            "soft" if soft else "text",
            json.dumps(list(v.embeddings.shape)) if soft else None,
            tensor_bytes(v.embeddings) if soft else None,
            None if soft else v.text,
            v.parent_id,
            json.dumps(v.metadata, sort_keys=True),
            v.created_unix,
            v.created_by,
        )
        sql = f"INSERT INTO versions ({col}{VERSION_COLS}) VALUES ({val}{', '.join('?' * len(row))})"
        return self._changed(sql + " ON CONFLICT (id) DO NOTHING", row) == 1

    @staticmethod
    def _version(row: tuple, content: bool = True) -> Version:
        vid, task, model, wsha, kind, shape, data, text, parent, meta, created, by = row
        emb = tensor_from(data, json.loads(shape)) if kind == "soft" and content else None
        return Version(
            vid, task, ModelRef(model, wsha), emb, text if content else None, parent, json.loads(meta), created, by
        )

    def get_version(self, version_id: str) -> Version | None:
        rows = self.execute(f"SELECT {VERSION_COLS} FROM versions WHERE id = ?", (version_id,))
        return self._version(rows[0]) if rows else None

    def version_ids_with_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        """``prefix`` must be plain hex (no LIKE wildcards): the registry checks it."""
        rows = self.execute("SELECT id FROM versions WHERE id LIKE ? ORDER BY id LIMIT ?", (prefix + "%", limit))
        return [r[0] for r in rows]

    def list_versions(self, task: str | None, model_id: str | None, content: bool = True) -> list[Version]:
        where, params = _filters(task=task, model_id=model_id)
        cols = VERSION_COLS if content else VERSION_COLS.replace("data, text", "NULL, NULL")
        rows = self.execute(f"SELECT {cols} FROM versions{where} ORDER BY seq", params)
        return [self._version(r, content) for r in rows]

    # task vectors
    def insert_task_vector(self, tv: TaskVector) -> bool:
        col, val = self._seq("task_vectors")
        row = (
            tv.vector_id,
            tv.task,
            tv.origin_id,
            tv.tuned_id,
            tv.base_model.model_id,
            tv.base_model.weights_sha256,
            json.dumps(list(tv.tau.shape)),
            tensor_bytes(tv.tau),
            tv.created_unix,
            tv.created_by,
        )
        sql = (
            f"INSERT INTO task_vectors ({col}id, task, origin_id, tuned_id, model_id, weights_sha256, shape, data, "
            f"created_unix, created_by) VALUES ({val}{', '.join('?' * len(row))}) ON CONFLICT (id) DO NOTHING"
        )
        return self._changed(sql, row) == 1

    _TV_COLS = "id, task, origin_id, tuned_id, model_id, weights_sha256, shape, data, created_unix, created_by"

    @staticmethod
    def _task_vector(row: tuple) -> TaskVector:
        vid, task, origin, tuned, model, wsha, shape, data, created, by = row
        return TaskVector(
            vid, task, origin, tuned, ModelRef(model, wsha), tensor_from(data, json.loads(shape)), created, by
        )

    def get_task_vector(self, vector_id: str) -> TaskVector | None:
        rows = self.execute(f"SELECT {self._TV_COLS} FROM task_vectors WHERE id = ?", (vector_id,))
        return self._task_vector(rows[0]) if rows else None

    def list_task_vectors(self, origin_id: str | None, task: str | None) -> list[TaskVector]:
        where, params = _filters(origin_id=origin_id, task=task)
        rows = self.execute(f"SELECT {self._TV_COLS} FROM task_vectors{where} ORDER BY seq", params)
        return [self._task_vector(r) for r in rows]

    # rounds
    def insert_round(self, r: Round, created_unix: float) -> None:
        col, val = self._seq("rounds")
        row = (
            r.round_id,
            r.task,
            r.base_model.model_id,
            r.base_model.weights_sha256,
            json.dumps(list(r.shape)),
            r.expected_clients,
            int(r.secure),
            r.base_version_id,
            r.state,
            r.received,
            r.version_id,
            r.min_clients,
            json.dumps(list(r.participants)),
            r.clip_range,
            r.created_by,
            created_unix,
        )
        sql = f"INSERT INTO rounds ({col}{ROUND_COLS}, created_unix) VALUES ({val}{', '.join('?' * len(row))})"
        self._changed(sql, row)

    def get_round(self, round_id: str, *, lock: bool = False) -> Round | None:
        lock_sql = self.for_update if lock else ""
        rows = self.execute(f"SELECT {ROUND_COLS} FROM rounds WHERE id = ?{lock_sql}", (round_id,))
        if not rows:
            return None
        rid, task, model, wsha, shape, expected, secure, base, state, received, vid, min_c, parts, clip, by = rows[0]
        return Round(
            rid,
            task,
            ModelRef(model, wsha),
            tuple(json.loads(shape)),
            expected,
            bool(secure),
            base,
            state,
            received,
            vid,
            min_c,
            tuple(json.loads(parts)),
            clip,
            by,
        )

    def insert_update(self, round_id: str, client: str, data: bytes, weight: float) -> bool:
        """False when this client already has an update in the round (the UNIQUE key decides)."""
        sql = "INSERT INTO updates (round_id, client, data, weight) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
        return self._changed(sql, (round_id, client, data, weight)) == 1

    def list_updates(self, round_id: str) -> list[tuple[str, bytes, float]]:
        """(client, data, weight), ordered by client so a mean never depends on arrival order."""
        rows = self.execute("SELECT client, data, weight FROM updates WHERE round_id = ? ORDER BY client", (round_id,))
        return [(c, bytes(d), w) for c, d, w in rows]

    def delete_updates(self, round_id: str) -> None:
        self._changed("DELETE FROM updates WHERE round_id = ?", (round_id,))

    def set_round_received(self, round_id: str, received: int) -> None:
        self._changed("UPDATE rounds SET received = ? WHERE id = ?", (received, round_id))

    def close_round(
        self,
        round_id: str,
        *,
        state: str,
        received: int,
        version_id: str | None,
        closed_unix: float,
        abort_reason: str | None = None,
    ) -> None:
        sql = (
            "UPDATE rounds SET state = ?, received = ?, version_id = ?, closed_unix = ?, abort_reason = ? WHERE id = ?"
        )
        self._changed(sql, (state, received, version_id, closed_unix, abort_reason, round_id))

    # streams
    def insert_stream(self, s: Stream, created_by: str, created_unix: float) -> None:
        col, val = self._seq("streams")
        row = (
            s.stream_id,
            s.task,
            s.base_model.model_id,
            s.base_model.weights_sha256,
            s.head_version_id,
            s.generation,
            s.buffer_size,
            s.staleness_exponent,
            s.server_learning_rate,
            created_by,
            created_unix,
        )
        sql = (
            f"INSERT INTO streams ({col}id, task, model_id, weights_sha256, head_version_id, generation, "
            f"buffer_size, staleness_exponent, server_learning_rate, created_by, created_unix) "
            f"VALUES ({val}{', '.join('?' * len(row))})"
        )
        self._changed(sql, row)

    def get_stream(self, stream_id: str, *, lock: bool = False) -> Stream | None:
        lock_sql = self.for_update if lock else ""
        rows = self.execute(f"SELECT {STREAM_COLS} FROM streams WHERE id = ?{lock_sql}", (stream_id,))
        if not rows:
            return None
        # Counted in a second statement: on PostgreSQL it then sees the buffer as of after the row lock was
        # granted (a subquery in the locking statement would see it as of before, and a slot could be reused).
        buffered = self.execute("SELECT COUNT(*) FROM stream_buffer WHERE stream_id = ?", (stream_id,))[0][0]
        sid, task, model, wsha, head, gen, size, exp, lr = rows[0]
        return Stream(sid, task, ModelRef(model, wsha), head, gen, buffered, size, exp, lr)

    def set_stream_head(self, stream_id: str, head_version_id: str, generation: int) -> None:
        sql = "UPDATE streams SET head_version_id = ?, generation = ? WHERE id = ?"
        self._changed(sql, (head_version_id, generation, stream_id))

    def add_stream_version(self, stream_id: str, version_id: str, generation: int) -> None:
        sql = "INSERT INTO stream_versions (stream_id, version_id, generation) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
        self._changed(sql, (stream_id, version_id, generation))

    def stream_generation(self, stream_id: str, version_id: str) -> int | None:
        sql = "SELECT generation FROM stream_versions WHERE stream_id = ? AND version_id = ?"
        rows = self.execute(sql, (stream_id, version_id))
        return rows[0][0] if rows else None

    def insert_buffered(
        self, stream_id: str, position: int, client: str, data: bytes, weight: float, staleness: int
    ) -> None:
        sql = (
            "INSERT INTO stream_buffer (stream_id, position, client, data, weight, staleness) VALUES (?, ?, ?, ?, ?, ?)"
        )
        self._changed(sql, (stream_id, position, client, data, weight, staleness))

    def list_buffered(self, stream_id: str) -> list[tuple[str, bytes, float, int]]:
        """(client, data, weight, staleness) in arrival order."""
        sql = "SELECT client, data, weight, staleness FROM stream_buffer WHERE stream_id = ? ORDER BY position"
        return [(c, bytes(d), w, s) for c, d, w, s in self.execute(sql, (stream_id,))]

    def clear_buffer(self, stream_id: str) -> None:
        self._changed("DELETE FROM stream_buffer WHERE stream_id = ?", (stream_id,))


def _filters(**eq: str | None) -> tuple[str, tuple]:
    terms = [(k, v) for k, v in eq.items() if v is not None]
    if not terms:
        return "", ()
    return " WHERE " + " AND ".join(f"{k} = ?" for k, _ in terms), tuple(v for _, v in terms)


class Store:
    """A durable store; use ``open_store``. Every operation happens inside ``transaction()``."""

    backend = ""

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        """Commit when the block completes, roll back when it raises (the exception propagates)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dump(self) -> dict[str, list[tuple]]:
        """Every row of every table, sorted: tests compare dumps to prove a rejected request changed nothing."""
        out: dict[str, list[tuple]] = {}
        with self.transaction(write=False) as tx:
            for table in TABLES:
                rows = tx.execute(f"SELECT * FROM {table}")
                out[table] = sorted(
                    (tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows), key=repr
                )
        return out

    def _check_schema(self, tx: Tx) -> None:
        rows = tx.execute("SELECT version FROM schema_version")
        if not rows:
            tx.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif max(r[0] for r in rows) > SCHEMA_VERSION:
            raise StoreError(
                f"the store has schema version {max(r[0] for r in rows)}; this release reads "
                f"{SCHEMA_VERSION} (upgrade fedprompt)"
            )


def open_store(target: str | Path) -> Store:
    """A ``postgresql://`` or ``postgres://`` URL opens PostgreSQL; anything else is an SQLite file path."""
    text = str(target)
    if text.startswith(("postgresql://", "postgres://")):
        from fedprompt.server.aggregation.store_postgres import PostgresStore

        return PostgresStore(text)
    from fedprompt.server.aggregation.store_sqlite import SqliteStore

    return SqliteStore(Path(text))
