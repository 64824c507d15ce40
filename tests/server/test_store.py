"""The durable store on both backends: round trips, idempotent inserts, atomic transactions, keys, thread safety."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from fedprompt.protocols.records import ModelRef, Round, Stream, TaskVector, Version
from fedprompt.server.aggregation.store import SCHEMA_VERSION, TABLES, StoreError, open_store

pytest_plugins = ["pg"]

MODEL = ModelRef("tiny-llama", "ab" * 32)


def version(vid: str, emb: np.ndarray | None = None, text: str | None = None, parent: str | None = None,
            task: str = "sst2") -> Version:  # fmt: skip
    return Version(vid, task, MODEL, emb, text, parent, {"z": 1, "a": [1.5, "x"]}, 12.5, "alice")


def round_(rid: str) -> Round:
    return Round(rid, "sst2", MODEL, (2, 3), 3, False, None, "open", 0, None, 2, ("a", "b"), 0.5, "coord")


def test_schema_is_idempotent_and_versioned(store_target):
    for _ in range(2):
        with open_store(store_target) as s:
            assert s.dump() == {t: [] for t in TABLES}
            with s.transaction(write=False) as tx:
                assert tx.execute("SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    with open_store(store_target) as s, s.transaction() as tx:
        tx.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="schema version"):
        open_store(store_target)


def test_version_round_trip_and_idempotent_insert(store):
    emb = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    with store.transaction() as tx:
        assert tx.insert_version(version("aa" * 32, emb=emb))
        assert tx.insert_version(version("bb" * 32, text="Classify: {x}", parent="aa" * 32, task="agnews"))
        assert not tx.insert_version(version("aa" * 32, emb=emb * 0))  # same id: kept as it was
    with store.transaction(write=False) as tx:
        v = tx.get_version("aa" * 32)
        np.testing.assert_array_equal(v.embeddings, emb)
        assert v.embeddings.dtype == np.float32 and not v.embeddings.flags.writeable
        assert (v.task, v.base_model, v.text, v.parent_id, v.created_unix, v.created_by) == (
            "sst2", MODEL, None, None, 12.5, "alice")  # fmt: skip
        assert v.metadata == {"z": 1, "a": [1.5, "x"]}
        t = tx.get_version("bb" * 32)
        assert (t.embeddings, t.text, t.parent_id) == (None, "Classify: {x}", "aa" * 32)
        assert tx.get_version("cc" * 32) is None
        assert tx.version_ids_with_prefix("aaaa") == ["aa" * 32]
        assert [v.version_id for v in tx.list_versions(None, None)] == ["aa" * 32, "bb" * 32]
        assert [v.version_id for v in tx.list_versions("agnews", "tiny-llama")] == ["bb" * 32]
        assert tx.list_versions(None, "other") == []


def test_failed_transaction_leaves_nothing(store):
    before = store.dump()
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as tx:
        tx.insert_version(version("aa" * 32, text="x"))
        tx.insert_round(round_("r1"), 1.0)
        assert tx.get_round("r1") is not None
        raise RuntimeError("boom")
    assert store.dump() == before
    with store.transaction() as tx:  # the store is usable afterwards
        tx.insert_round(round_("r1"), 1.0)
    assert len(store.dump()["rounds"]) == 1


def test_round_updates_are_unique_per_client_and_need_their_round(store):
    with store.transaction() as tx:
        tx.insert_round(round_("r1"), 1.0)
        assert tx.insert_update("r1", "a", b"\x00" * 24, 1.0)
        assert not tx.insert_update("r1", "a", b"\x01" * 24, 2.0)
        assert tx.insert_update("r1", "b", b"\x02" * 24, 3.0)
        tx.set_round_received("r1", 2)
    with store.transaction(write=False) as tx:
        assert tx.list_updates("r1") == [("a", b"\x00" * 24, 1.0), ("b", b"\x02" * 24, 3.0)]
        r = tx.get_round("r1", lock=False)
        assert (r.received, r.shape, r.participants, r.secure, r.clip_range) == (2, (2, 3), ("a", "b"), False, 0.5)
    before = store.dump()
    with pytest.raises(Exception, match=r"(?i)foreign key"), store.transaction() as tx:
        tx.insert_update("no-such-round", "a", b"", 1.0)
    assert store.dump() == before
    with store.transaction() as tx:
        tx.close_round("r1", state="finalised", received=2, version_id=None, closed_unix=2.0)
        tx.delete_updates("r1")
        assert tx.get_round("r1", lock=True).state == "finalised"
    assert store.dump()["updates"] == []


def test_task_vectors_and_streams_round_trip(store):
    tau = np.ones((2, 3), np.float32)
    with store.transaction() as tx:
        tx.insert_version(version("aa" * 32, emb=tau))
        tx.insert_version(version("bb" * 32, emb=tau * 2))
        assert tx.insert_task_vector(TaskVector("cc" * 32, "sst2", "aa" * 32, "bb" * 32, MODEL, tau, 3.0, "a"))
        assert not tx.insert_task_vector(TaskVector("cc" * 32, "x", "aa" * 32, "bb" * 32, MODEL, tau, 4.0, "b"))
        tx.insert_stream(Stream("s1", "sst2", MODEL, "aa" * 32, 0, 0, 2, 0.5, 1.0), "coord", 1.0)
        tx.add_stream_version("s1", "aa" * 32, 0)
        tx.insert_buffered("s1", 0, "a", b"\x00" * 24, 0.5, 1)
    with store.transaction(write=False) as tx:
        tv = tx.get_task_vector("cc" * 32)
        assert (tv.task, tv.origin_id, tv.tuned_id, tv.created_by) == ("sst2", "aa" * 32, "bb" * 32, "a")
        np.testing.assert_array_equal(tv.tau, tau)
        assert [v.vector_id for v in tx.list_task_vectors("aa" * 32, "sst2")] == ["cc" * 32]
        assert tx.list_task_vectors("bb" * 32, None) == []
        assert tx.get_stream("s1") == Stream("s1", "sst2", MODEL, "aa" * 32, 0, 1, 2, 0.5, 1.0)
        assert tx.stream_generation("s1", "aa" * 32) == 0 and tx.stream_generation("s1", "bb" * 32) is None
        assert tx.list_buffered("s1") == [("a", b"\x00" * 24, 0.5, 1)]
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"), store.transaction() as tx:
        tx.insert_buffered("s1", 0, "b", b"\x01" * 24, 1.0, 0)  # one slot per position, even without the row lock
    with store.transaction() as tx:
        tx.set_stream_head("s1", "bb" * 32, 1)
        tx.clear_buffer("s1")
        assert tx.get_stream("s1", lock=True) == Stream("s1", "sst2", MODEL, "bb" * 32, 1, 0, 2, 0.5, 1.0)


def test_threads_share_one_store(store):
    def work(i: int) -> None:
        for j in range(5):
            with store.transaction() as tx:
                tx.insert_version(version(f"{i:02x}{j:02x}" * 16, text=f"prompt {i} {j}"))
            with store.transaction(write=False) as tx:
                assert tx.get_version(f"{i:02x}{j:02x}" * 16).text == f"prompt {i} {j}"

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(store.dump()["versions"]) == 80


def test_closed_store_refuses_work(store_target):
    s = open_store(store_target)
    s.close()
    with pytest.raises(StoreError, match="closed"), s.transaction():
        pass


def test_sqlite_file_settings(tmp_path):
    path = tmp_path / "deep" / "er" / "registry.db"
    with open_store(str(path)) as s:
        assert s.backend == "sqlite" and path.exists()
        with s.transaction(write=False) as tx:
            assert tx.execute("PRAGMA journal_mode") == [("wal",)]
            assert tx.execute("PRAGMA synchronous") == [(2,)]  # FULL
            assert tx.execute("PRAGMA foreign_keys") == [(1,)]
            assert tx.execute("PRAGMA busy_timeout")[0][0] > 0


def test_postgres_urls_select_postgres(postgres_url):
    with open_store(postgres_url) as s:
        assert s.backend == "postgres"
    with open_store(postgres_url.replace("postgresql://", "postgres://", 1)) as s:
        assert s.backend == "postgres"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreError, match=r"cannot open the PostgreSQL store postgresql://u:\*\*\*@127"):
        open_store(f"postgresql://u:secret@127.0.0.1:{port}/db")
