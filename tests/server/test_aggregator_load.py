"""The aggregation server under bounded load: 200 holders submit to one round at the same moment, on both stores.

Each holder has its own node identity (certificate), its own channel (its own TLS connection) and its own
thread; the channels are connected first and a barrier then releases every submission at once, so the
calls really overlap in the server. Every update must be accepted exactly once: the server hands out the
counts 1..200 (one at a time, under the round's lock), the store holds 200 updates from 200 distinct
clients, a second submission by each of them (all at once again) is refused with ALREADY_EXISTS and
changes nothing, and finalising gives the exact mean of what was sent, every update weighing the same
(half of the holders claim weights of their own on the wire; the server ignores them).

One call per holder and phase stays far below the default rate limit (50/s, burst 100 per identity).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from aggregator_harness import RunningAggregator

from fedprompt import certs
from fedprompt.protocols import aggregator_pb2 as pb
from fedprompt.protocols import convert
from fedprompt.protocols.aggregator_client import AggregatorClient, AggregatorError
from fedprompt.protocols.records import ModelRef
from fedprompt.server.aggregation.store import tensor_bytes

pytest_plugins = ["pg"]
pytestmark = pytest.mark.slow  # a load test: 200 holders at once

N = 200
NAMES = [f"load-{i:03d}" for i in range(N)]
MODEL = ModelRef("tiny-llama", "c" * 64)
SHAPE = (20, 64)


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    certs.create(d, nodes=NAMES, hosts=["localhost"])  # about a second for 200 nodes
    return d


def delta(i: int) -> np.ndarray:
    """Distinct per holder, and dyadic: every sum below is exact in float64."""
    return (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) % 64) / 64 + np.float32(i / 4 - 20)


def claimed_weight(i: int) -> float:
    """The weight holder i sends: AggregatorClient's 1.0 (even i) or one of its own (odd i, on the raw stub).
    The server weighs every update 1.0 whatever it says."""
    return 1.0 if i % 2 == 0 else float(2 + i % 3)


def all_at_once(clients: list[AggregatorClient], call: Callable[[int, AggregatorClient], object]) -> list:
    """``call(i, client)`` in one thread per client, all released together; the result or exception of each."""
    barrier = threading.Barrier(len(clients))
    results: list = [None] * len(clients)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=120)
            results[i] = call(i, clients[i])
        except BaseException as exc:  # reported by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads)
    return results


def test_200_concurrent_holders_fill_one_round_exactly_once(cert_dir, store_target):
    with RunningAggregator(cert_dir, store_target) as agg, agg.client() as coord:
        base = coord.publish_version(task="load", base_model=MODEL, embeddings=np.zeros(SHAPE, np.float32))
        r = coord.open_round(
            task="load", base_model=MODEL, shape=SHAPE, expected_clients=N, base_version_id=base.version_id,
            participants=NAMES,
        )  # fmt: skip
        clients = [agg.client(name) for name in NAMES]
        try:
            t0 = time.perf_counter()
            connected = all_at_once(clients, lambda i, c: grpc.channel_ready_future(c.channel).result(timeout=60))
            assert [x for x in connected if x is not None] == []  # 200 mutual-TLS handshakes, concurrently
            t1 = time.perf_counter()

            def submit(i: int, c: AggregatorClient) -> int:
                if i % 2 == 0:
                    return c.submit_update(round_id=r.round_id, base_model=MODEL, delta=delta(i))
                req = pb.SubmitUpdateRequest(  # a weight of its own on the wire
                    round_id=r.round_id, base_model=convert.model_ref_to_proto(MODEL),
                    delta=convert.tensor_to_proto(delta(i)), weight=claimed_weight(i),
                )  # fmt: skip
                return c.rounds.SubmitUpdate(req, timeout=60).received

            counts = all_at_once(clients, submit)
            t2 = time.perf_counter()
            failed = [(NAMES[i], x) for i, x in enumerate(counts) if not isinstance(x, int)]
            assert failed == []
            assert sorted(counts) == list(range(1, N + 1))  # each accepted once, counted one at a time

            got = coord.get_round(r.round_id)
            assert (got.state, got.received) == ("open", N)
            stored = agg.server.store.dump()
            updates = [u for u in stored["updates"] if u[0] == r.round_id]
            assert len(updates) == N and {u[1] for u in updates} == set(NAMES)
            by_client = {u[1]: u for u in updates}
            for i, name in enumerate(NAMES):
                assert by_client[name][2] == tensor_bytes(delta(i)) and by_client[name][3] == 1.0, name

            def resubmit(i: int, c: AggregatorClient) -> object:
                return c.submit_update(round_id=r.round_id, base_model=MODEL, delta=delta(i) * 0)

            again = all_at_once(clients, resubmit)
            t3 = time.perf_counter()
            codes = [x.code if isinstance(x, AggregatorError) else x for x in again]
            assert codes == [grpc.StatusCode.ALREADY_EXISTS] * N
            assert agg.server.store.dump() == stored
        finally:
            for c in clients:
                c.close()

        done = coord.finalise_round(r.round_id)
        total = sum(delta(i).astype(np.float64) for i in range(N))
        expected = (total / N).astype(np.float32)  # every update weighs the same
        np.testing.assert_array_equal(done.mean_update, expected)
        claimed = sum(claimed_weight(i) * delta(i).astype(np.float64) for i in range(N))
        claimed /= sum(claimed_weight(i) for i in range(N))
        assert not np.allclose(done.mean_update, claimed, atol=1e-3)  # the weights on the wire had no effect
        assert done.contributors == N and done.round.state == "finalised" and done.round.received == N
        np.testing.assert_array_equal(done.version.embeddings, expected)  # base is zero
        assert [u for u in agg.server.store.dump()["updates"] if u[0] == r.round_id] == []
        backend = "postgres" if store_target.startswith("postgresql") else "sqlite"
        print(
            f"\n{backend}: connect {t1 - t0:.2f}s, {N} submissions {t2 - t1:.2f}s, "
            f"{N} refused resubmissions {t3 - t2:.2f}s"
        )
