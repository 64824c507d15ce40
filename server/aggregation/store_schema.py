"""The registry store's tables, one schema for both backends (SQLite and PostgreSQL, ``store_sqlite.py`` and
``store_postgres.py``); ``store.py`` reads and writes them."""

from __future__ import annotations

SCHEMA_VERSION = 1
TABLES = ("versions", "task_vectors", "rounds", "updates", "streams", "stream_versions", "stream_buffer")

# {BLOB} {REAL} {SEQ}: the backend's byte, double and insertion-order column types.
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS versions (
        id TEXT PRIMARY KEY, seq {SEQ}, task TEXT NOT NULL, model_id TEXT NOT NULL,
        weights_sha256 TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('soft', 'text')), shape TEXT,
        data {BLOB}, text TEXT, parent_id TEXT REFERENCES versions (id), metadata TEXT NOT NULL,
        created_unix {REAL} NOT NULL, created_by TEXT NOT NULL,
        CHECK ((kind = 'soft' AND data IS NOT NULL AND text IS NULL)
            OR (kind = 'text' AND text IS NOT NULL AND data IS NULL)))""",
    "CREATE INDEX IF NOT EXISTS versions_seq ON versions (seq)",
    """CREATE TABLE IF NOT EXISTS task_vectors (
        id TEXT PRIMARY KEY, seq {SEQ}, task TEXT NOT NULL, origin_id TEXT NOT NULL REFERENCES versions (id),
        tuned_id TEXT NOT NULL REFERENCES versions (id), model_id TEXT NOT NULL, weights_sha256 TEXT NOT NULL,
        shape TEXT NOT NULL, data {BLOB} NOT NULL, created_unix {REAL} NOT NULL, created_by TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS rounds (
        id TEXT PRIMARY KEY, seq {SEQ}, task TEXT NOT NULL, model_id TEXT NOT NULL, weights_sha256 TEXT NOT NULL,
        shape TEXT NOT NULL, expected_clients INTEGER NOT NULL, secure INTEGER NOT NULL,
        base_version_id TEXT REFERENCES versions (id), state TEXT NOT NULL, received INTEGER NOT NULL,
        version_id TEXT REFERENCES versions (id), min_clients INTEGER NOT NULL, participants TEXT NOT NULL,
        clip_range {REAL} NOT NULL, created_by TEXT NOT NULL, created_unix {REAL} NOT NULL,
        closed_unix {REAL}, abort_reason TEXT)""",
    """CREATE TABLE IF NOT EXISTS updates (
        round_id TEXT NOT NULL REFERENCES rounds (id), client TEXT NOT NULL, data {BLOB} NOT NULL,
        weight {REAL} NOT NULL, UNIQUE (round_id, client))""",
    """CREATE TABLE IF NOT EXISTS streams (
        id TEXT PRIMARY KEY, seq {SEQ}, task TEXT NOT NULL, model_id TEXT NOT NULL, weights_sha256 TEXT NOT NULL,
        head_version_id TEXT NOT NULL REFERENCES versions (id), generation INTEGER NOT NULL,
        buffer_size INTEGER NOT NULL, staleness_exponent {REAL} NOT NULL, server_learning_rate {REAL} NOT NULL,
        created_by TEXT NOT NULL, created_unix {REAL} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS stream_versions (
        stream_id TEXT NOT NULL REFERENCES streams (id), version_id TEXT NOT NULL REFERENCES versions (id),
        generation INTEGER NOT NULL, PRIMARY KEY (stream_id, version_id))""",
    """CREATE TABLE IF NOT EXISTS stream_buffer (
        stream_id TEXT NOT NULL REFERENCES streams (id), position INTEGER NOT NULL, client TEXT NOT NULL,
        data {BLOB} NOT NULL, weight {REAL} NOT NULL, staleness INTEGER NOT NULL,
        PRIMARY KEY (stream_id, position))""",
]

VERSION_COLS = (
    "id, task, model_id, weights_sha256, kind, shape, data, text, parent_id, metadata, created_unix, created_by"
)
ROUND_COLS = (
    "id, task, model_id, weights_sha256, shape, expected_clients, secure, base_version_id, state, received, "
    "version_id, min_clients, participants, clip_range, created_by"
)
STREAM_COLS = (
    "id, task, model_id, weights_sha256, head_version_id, generation, buffer_size, staleness_exponent, "
    "server_learning_rate"
)
