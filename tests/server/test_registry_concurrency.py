"""The registry under concurrent requests, asynchronous streams, and a server process killed mid-write."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_registry import MODEL, OTHER, emb, open_plain, publish, rejected

from fedprompt.protocols.records import ROUND_FINALISED, ROUND_OPEN, AlreadyExists, Conflict, InvalidInput, NotFound
from fedprompt.server.aggregation.registry import Registry, verify_version
from fedprompt.server.aggregation.store import open_store, tensor_bytes

pytest_plugins = ["pg"]


@pytest.fixture
def reg(store) -> Registry:
    return Registry(store, max_elements=4096, clock=itertools.count(1000).__next__)


def run_threads(n: int, fn) -> list:
    """Run fn(i) on n threads released together; each result is a value or the exception raised."""
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def work(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


# --- rounds -----------------------------------------------------------------------------------------------------


def test_50_concurrent_submissions_are_each_accepted_once(reg, store):
    base = publish(reg, 0)
    names = [f"c{i:02d}" for i in range(50)]
    rid = open_plain(reg, base, expected_clients=50, min_clients=50, participants=names)
    deltas = [emb(100 + i) for i in range(50)]
    out = run_threads(50, lambda i: reg.submit_update(round_id=rid, client=names[i], base_model=MODEL,
                                                      delta=deltas[i]))  # fmt: skip
    assert sorted(out) == list(range(1, 51)), [e for e in out if isinstance(e, Exception)][:3]
    assert reg.get_round(rid).received == 50
    assert {u[3] for u in store.dump()["updates"]} == {1.0}  # the server's weight, the same for every update
    res = reg.finalise_round(round_id=rid, created_by="coord")
    want = sum(deltas[i].astype(np.float64) for i in range(50)) / 50  # equal weights, in client order
    np.testing.assert_array_equal(res.mean_update, want.astype(np.float32))
    claimed = sum((i + 1) * deltas[i].astype(np.float64) for i in range(50)) / sum(range(1, 51))
    assert not np.allclose(res.mean_update, claimed, atol=1e-3)  # what the holders would have claimed: no effect
    assert res.contributors == 50


def test_concurrent_overflow_and_duplicates_are_refused(reg):
    rid = open_plain(reg, None, expected_clients=30, min_clients=1, participants=[f"c{i}" for i in range(40)])
    out = run_threads(40, lambda i: reg.submit_update(round_id=rid, client=f"c{i}", base_model=MODEL,
                                                      delta=emb(i)))  # fmt: skip
    assert sorted(x for x in out if isinstance(x, int)) == list(range(1, 31))
    assert [type(x) for x in out].count(Conflict) == 10 and reg.get_round(rid).received == 30

    dup = open_plain(reg, None, expected_clients=3, min_clients=1, participants=["same", "other", "third"])
    out = run_threads(8, lambda i: reg.submit_update(round_id=dup, client="same", base_model=MODEL,
                                                     delta=emb(i)))  # fmt: skip
    assert out.count(1) == 1 and [type(x) for x in out].count(AlreadyExists) == 7
    assert reg.get_round(dup).received == 1


# --- asynchronous streams ---------------------------------------------------------------------------------------


def merged(head: np.ndarray, lr: float, items: list[tuple[np.ndarray, float, int]], exponent: float) -> np.ndarray:
    """The expected new head: head + lr * sum(w_i delta_i) / sum(w_i), w_i = weight * (1 + staleness) ** -exponent.

    The server's ``weight`` is 1.0 for every update; a test passes another only to show what a caller's weight
    would have done."""
    ws = [w * (1.0 + s) ** (-exponent) for _, w, s in items]
    step = sum(w * d.astype(np.float64) for w, (d, _, _) in zip(ws, items, strict=True)) / sum(ws)
    return (head.astype(np.float64) + lr * step).astype(np.float32)


def test_stream_weights_staleness_and_merges_every_k(reg):
    h0 = publish(reg, 0)
    s = reg.open_stream(task="sst2", base_model=MODEL, head_version_id=h0.version_id[:8], buffer_size=3,
                        staleness_exponent=0.5, server_learning_rate=0.8, created_by="coord")  # fmt: skip
    assert (s.generation, s.buffered, s.head_version_id) == (0, 0, h0.version_id)

    def push(client: str, base: str, delta: np.ndarray):
        return reg.push_update(stream_id=s.stream_id, client=client, base_model=MODEL, base_version_id=base,
                               delta=delta)  # fmt: skip

    # a caller cannot say what its update weighs: the registry takes no weight, and the store is unchanged
    rejected(reg, TypeError, reg.push_update, stream_id=s.stream_id, client="a", base_model=MODEL,
             base_version_id=h0.version_id, delta=emb(1), weight=3.0, match="weight")  # fmt: skip
    r1 = push("a", h0.version_id, emb(1))
    r2 = push("b", h0.version_id, emb(2))
    assert (r1.merged_version_id, r2.merged_version_id, r2.stream.buffered, r2.staleness) == (None, None, 2, 0)
    r3 = push("c", h0.version_id, emb(3))
    assert r3.stream.generation == 1 and r3.stream.buffered == 0 and r3.merged_version_id == r3.stream.head_version_id
    h1 = reg.get_version(r3.merged_version_id)
    want1 = merged(emb(0), 0.8, [(emb(1), 1.0, 0), (emb(2), 1.0, 0), (emb(3), 1.0, 0)], 0.5)
    np.testing.assert_array_equal(h1.embeddings, want1)
    claimed = merged(emb(0), 0.8, [(emb(1), 1.0, 0), (emb(2), 3.0, 0), (emb(3), 2.0, 0)], 0.5)
    assert not np.allclose(h1.embeddings, claimed, atol=1e-3)  # what weights 1, 3, 2 would have given
    assert h1.parent_id == h0.version_id and verify_version(h1) and h1.metadata["generation"] == 1

    r4 = push("d", h0.version_id, emb(4))  # trained from the old head: staleness 1
    r5 = push("e", h1.version_id, emb(5))
    assert (r4.staleness, r5.staleness, r5.merged_version_id) == (1, 0, None)
    r6 = push("a", h0.version_id[:12], emb(6))
    assert r6.staleness == 1 and r6.stream.generation == 2
    h2 = reg.get_version(r6.merged_version_id)
    want2 = merged(want1, 0.8, [(emb(4), 1.0, 1), (emb(5), 1.0, 0), (emb(6), 1.0, 1)], 0.5)
    np.testing.assert_array_equal(h2.embeddings, want2)
    assert h2.metadata["updates"] == [{"client": "d", "staleness": 1}, {"client": "e", "staleness": 0},
                                      {"client": "a", "staleness": 1}]  # fmt: skip
    r7 = push("f", h0.version_id, emb(7))
    assert r7.staleness == 2 and reg.get_stream(s.stream_id).buffered == 1


def test_stream_rejections(reg):
    h0 = publish(reg, 0)
    stranger = publish(reg, 9)
    s = reg.open_stream(task="t", base_model=MODEL, head_version_id=h0.version_id, buffer_size=2,
                        staleness_exponent=1.0, server_learning_rate=1.0, created_by="coord")  # fmt: skip
    reg.push_update(stream_id=s.stream_id, client="a", base_model=MODEL, base_version_id=h0.version_id,
                    delta=emb(1))  # fmt: skip
    ok = {"stream_id": s.stream_id, "client": "b", "base_model": MODEL, "base_version_id": h0.version_id,
          "delta": emb(2)}  # fmt: skip
    nan = emb(2)
    nan[0, 1] = np.nan
    cases = [
        ({"stream_id": "0" * 32}, NotFound),
        ({"base_version_id": stranger.version_id}, Conflict),
        ({"base_version_id": "2" * 64}, NotFound),
        ({"base_version_id": ""}, InvalidInput),
        ({"base_model": OTHER}, Conflict),
        ({"delta": emb(2, (8, 4))}, InvalidInput),
        ({"delta": emb(2).astype(np.float64)}, InvalidInput),
        ({"delta": nan}, InvalidInput),
        ({"weight": 0}, TypeError),  # weights are the server's: there is no parameter for a caller's
        ({"weight": float("inf")}, TypeError),
        ({"client": ""}, InvalidInput),
    ]
    for change, exc in cases:
        rejected(reg, exc, reg.push_update, **{**ok, **change})
    ok_stream = {"task": "t", "base_model": MODEL, "head_version_id": h0.version_id, "buffer_size": 2,
                 "staleness_exponent": 0.5, "server_learning_rate": 1.0, "created_by": "c"}  # fmt: skip
    text = reg.publish_version(task="t", base_model=MODEL, text="p", created_by="a")
    for change, exc in [({"buffer_size": 0}, InvalidInput), ({"staleness_exponent": -1.0}, InvalidInput),
                        ({"server_learning_rate": 0.0}, InvalidInput), ({"head_version_id": "3" * 64}, NotFound),
                        ({"head_version_id": text.version_id}, Conflict),
                        ({"base_model": OTHER}, Conflict)]:  # fmt: skip
        rejected(reg, exc, reg.open_stream, **{**ok_stream, **change})


def test_a_buffer_an_older_server_filled_with_callers_weights_merges_with_the_servers(reg, store):
    h0 = publish(reg, 0)
    s = reg.open_stream(task="t", base_model=MODEL, head_version_id=h0.version_id, buffer_size=2,
                        staleness_exponent=0.5, server_learning_rate=1.0, created_by="coord")  # fmt: skip
    with store.transaction() as tx:  # as an older server buffered it: with the weight its caller sent
        tx.insert_buffered(s.stream_id, 0, "a", tensor_bytes(emb(1)), 1e30, 0)
    done = reg.push_update(stream_id=s.stream_id, client="b", base_model=MODEL, base_version_id=h0.version_id,
                           delta=emb(2))  # fmt: skip
    head = reg.get_version(done.merged_version_id)
    np.testing.assert_array_equal(head.embeddings, merged(emb(0), 1.0, [(emb(1), 1.0, 0), (emb(2), 1.0, 0)], 0.5))


def test_40_concurrent_pushes_lose_nothing(reg):
    h0 = publish(reg, 0)
    lr, exponent = 0.5, 0.7
    s = reg.open_stream(task="async", base_model=MODEL, head_version_id=h0.version_id, buffer_size=4,
                        staleness_exponent=exponent, server_learning_rate=lr, created_by="coord")  # fmt: skip
    deltas = {f"c{i:02d}": emb(200 + i) for i in range(40)}
    weights = {c: 1.0 for c in deltas}  # the server's: every update the same, before its staleness discount

    def push(i: int):
        client = f"c{i:02d}"
        base = reg.get_stream(s.stream_id).head_version_id if i % 2 else h0.version_id  # some are stale on purpose
        return reg.push_update(stream_id=s.stream_id, client=client, base_model=MODEL, base_version_id=base,
                               delta=deltas[client])  # fmt: skip

    out = run_threads(40, push)
    assert not [e for e in out if isinstance(e, Exception)]
    assert sum(r.merged_version_id is not None for r in out) == 10
    final = reg.get_stream(s.stream_id)
    assert (final.generation, final.buffered) == (10, 0)
    # Walk the heads back from the last: each merge is exactly its 4 recorded updates, all 40 appear once.
    chain, vid = [], final.head_version_id
    while vid != h0.version_id:
        v = reg.get_version(vid)
        chain.append(v)
        vid = v.parent_id
    chain.reverse()
    head, seen = emb(0), []
    for g, v in enumerate(chain, 1):
        ups = v.metadata["updates"]
        assert v.metadata["generation"] == g and len(ups) == 4
        head = merged(head, lr, [(deltas[u["client"]], weights[u["client"]], u["staleness"]) for u in ups], exponent)
        np.testing.assert_array_equal(v.embeddings, head)
        seen += [u["client"] for u in ups]
    assert sorted(seen) == sorted(deltas)


# --- a server killed mid-write ----------------------------------------------------------------------------------

CHILD = r"""
import sys, time
import numpy as np
from fedprompt.protocols.records import ModelRef
from fedprompt.server.aggregation.registry import Registry
from fedprompt.server.aggregation.store import Tx, open_store

target, mode = sys.argv[1], sys.argv[2]
reg = Registry(open_store(target))
model = ModelRef("m", "a" * 64)
shape = (64, 256)
rng = np.random.default_rng(0)
base = reg.publish_version(task="t", base_model=model, embeddings=rng.standard_normal(shape).astype(np.float32),
                           created_by="child")
n = 0
if mode == "hang":  # stop inside the finalising transaction of the 3rd round, after every write of it
    close_round = Tx.close_round
    def hang(self, round_id, **kw):
        close_round(self, round_id, **kw)
        if n == 2:
            print("IN_TX", round_id, kw["version_id"], n, flush=True)
            time.sleep(120)
    Tx.close_round = hang
while True:
    r = reg.open_round(task="t", base_model=model, shape=shape, expected_clients=3, min_clients=3,
                       base_version_id=base.version_id, participants=["c0", "c1", "c2"], created_by="child")
    for c in range(3):
        delta = np.random.default_rng(n * 10 + c).standard_normal(shape).astype(np.float32)
        reg.submit_update(round_id=r.round_id, client=f"c{c}", base_model=model, delta=delta)
    base = reg.finalise_round(round_id=r.round_id, metadata={"n": n}, created_by="child").version
    print("FINALISED", r.round_id, base.version_id, n, flush=True)
    n += 1
"""


def kill_child(script: Path, target: str, mode: str, after: int, delay: float) -> list[list[str]]:
    """Run the child until it printed ``after`` lines (then wait ``delay``), SIGKILL it, return its lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(script), target, mode], stdout=subprocess.PIPE, text=True, env=env)
    lines: list[list[str]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.split())
            if len(lines) >= after:
                break
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert len(lines) >= after, f"the child died early: {lines}"
    return lines


def check_consistent(reg: Registry, finalised: list[list[str]]) -> None:
    """Every version verifies; a round is finalised exactly when it has its version; printed rounds are kept."""
    versions = reg.list_versions()
    assert all(verify_version(v) for v in versions)
    with reg.store.transaction(write=False) as tx:
        rounds = tx.execute("SELECT id, state, version_id, received FROM rounds")
    for _rid, state, vid, _received in rounds:
        assert (state == ROUND_FINALISED) == (vid is not None)
        if vid is not None:
            assert verify_version(reg.get_version(vid))
    for _, rid, vid, _n in finalised:
        assert reg.get_round(rid).version_id == vid


@pytest.mark.integration
def test_killed_inside_finalise_leaves_the_round_open(store_target, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    lines = kill_child(script, store_target, "hang", after=3, delay=0.0)
    assert lines[-1][0] == "IN_TX"
    _, rid, lost_vid, n = lines[-1]
    with open_store(store_target) as store:
        reg = Registry(store)
        check_consistent(reg, lines[:-1])
        r = reg.get_round(rid)
        assert (r.state, r.version_id, r.received) == (ROUND_OPEN, None, 3)
        with pytest.raises(NotFound):
            reg.get_version(lost_vid)
        # The updates survived: finalising now writes the very version the killed process was writing.
        res = reg.finalise_round(round_id=rid, metadata={"n": int(n)}, created_by="child")
        assert res.version.version_id == lost_vid and verify_version(res.version)


@pytest.mark.integration
@pytest.mark.parametrize("delays", [(0.0, 0.004, 0.011, 0.023)])
def test_killed_at_arbitrary_points_leaves_a_consistent_store(store_target, tmp_path, delays):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    finalised: list[list[str]] = []
    for delay in delays:
        finalised += kill_child(script, store_target, "loop", after=2, delay=delay)
        with open_store(store_target) as store:
            check_consistent(Registry(store), finalised)
