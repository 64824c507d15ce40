"""Secure aggregation (SecAgg+): exact sums under dropouts, refusals, and the cryptographic pieces on their own."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from scipy.stats import chi2

from fedprompt.protocols import secagg_crypto as sc
from fedprompt.protocols.secagg import SecAggAbort, SecAggRefused, neighbour_graph, plan
from fedprompt.protocols.secagg_client import SecAggClient
from fedprompt.protocols.secagg_pb2 import (
    MaskedInput,
    SecAggMessage,
    SharePlaintext,
    UnmaskRequest,
)
from fedprompt.protocols.secagg_server import SecAggServer
from fedprompt.server.records import Conflict

N, LENGTH, CLIP = 10, 257, 1.0


def make_inputs(n: int, length: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1.2, 1.2, length).astype(np.float32) for i in range(1, n + 1)}


def run_round(
    n=N,
    length=LENGTH,
    *,
    drop_after=None,
    min_clients=3,
    signing=None,
    verify=None,
    tamper=None,
    neighbourhood=None,
    threshold=None,
):
    """Drive one round through the generic step/handle interface.

    drop_after: {stage: clients} — a client listed under stage s answers stages 0..s−1 and nothing from s on:
    0 = never advertises, 1 = advertises only, 2 = shares keys but sends no masked input, 3 = sends its masked
    input but no unmask response. tamper(stage, replies) may alter the replies in transit.
    """
    drop_after = drop_after or {}
    server = SecAggServer(
        "round-1",
        n,
        length,
        CLIP,
        min_clients=min_clients,
        neighbourhood=neighbourhood,
        threshold=threshold,
        verify_keys=verify,
    )
    inputs = make_inputs(n, length)
    requests = server.step(0, {})
    clients = {i: SecAggClient(m.setup, inputs[i], signing_key=(signing or {}).get(i)) for i, m in requests.items()}
    for stage in range(4):
        gone = set().union(*(drop_after.get(s, set()) for s in range(stage + 1)))
        replies = {i: clients[i].handle(m) for i, m in requests.items() if i not in gone}
        if tamper:
            tamper(stage, replies)
        requests = server.step(stage + 1, replies)
    return server, clients, inputs


def expected(clients, inputs, survivors):
    q = sum(clients[i].quantised.astype(np.int64) for i in survivors)
    f = sum(inputs[i].astype(np.float64).clip(-CLIP, CLIP) for i in survivors)
    return q, f


def test_dropouts_at_every_stage_give_the_exact_sum():
    # client 2 advertises then vanishes, 5 shares keys then vanishes, 7 sends its masked input and vanishes in unmask
    server, clients, inputs = run_round(drop_after={1: {2}, 2: {5}, 3: {7}})
    total, survivors = server.result
    assert server.done
    assert survivors == [i for i in range(1, N + 1) if i not in (2, 5)]
    q, f = expected(clients, inputs, survivors)
    assert np.array_equal(server.quantised_sum.astype(np.int64), q)  # exact integer equality
    step = server.plan.quantisation_step
    assert np.max(np.abs(total - f)) <= len(survivors) * step + 1e-9
    assert server.rejected == {}


def test_no_dropout():
    server, clients, inputs = run_round()
    total, survivors = server.result
    assert survivors == list(range(1, N + 1))
    q, f = expected(clients, inputs, survivors)
    assert np.array_equal(server.quantised_sum.astype(np.int64), q)
    assert np.max(np.abs(total - f)) <= N * server.plan.quantisation_step + 1e-9


def test_sparse_graph_with_dropouts():
    server, clients, inputs = run_round(n=20, length=33, drop_after={1: {1, 2}, 2: {3}, 3: {4, 5}})
    _, survivors = server.result
    q, _ = expected(clients, inputs, survivors)
    assert server.plan.neighbourhood == 10 and len(server.neighbours[6]) == 10
    assert np.array_equal(server.quantised_sum.astype(np.int64), q)


def test_too_many_dropouts_is_a_clear_error():
    with pytest.raises(SecAggAbort, match="min_clients") as err:
        run_round(drop_after={2: set(range(1, 9))}, min_clients=3)
    assert isinstance(err.value, Conflict)
    # enough clients overall, but too few holders of the dropped clients' shares answer the unmask request
    with pytest.raises(SecAggAbort, match="shares"):
        run_round(drop_after={3: {1, 2, 3, 4, 5, 6}}, min_clients=3)


def test_masked_vector_is_uniform_and_plain_one_is_not():
    n, length = 3, 50_000
    server = SecAggServer("r", n, length, CLIP, min_clients=2)
    setups = server.setup()
    clients = {i: SecAggClient(s, np.zeros(length, np.float32)) for i, s in setups.items()}
    bundles = server.receive_keys({i: c.advertise() for i, c in clients.items()})
    share_bundles = server.receive_shares({i: c.share_keys(bundles[i]) for i, c in clients.items()})
    masked = np.frombuffer(clients[1].masked_input(share_bundles[1]).masked, "<u4")
    plain = clients[1].quantised

    def chi2_p(words):
        counts = np.bincount((words >> 24).astype(np.int64), minlength=256)
        expected = len(words) / 256
        stat = float(((counts - expected) ** 2 / expected).sum())
        return chi2.sf(stat, 255)

    assert chi2_p(masked) > 1e-4
    assert chi2_p(plain) < 1e-4


def _staged(n=N, length=8):
    server = SecAggServer("r", n, length, CLIP, min_clients=3)
    setups = server.setup()
    clients = {i: SecAggClient(s, np.zeros(length, np.float32)) for i, s in setups.items()}
    bundles = server.receive_keys({i: c.advertise() for i, c in clients.items()})
    sb = server.receive_shares({i: c.share_keys(bundles[i]) for i, c in clients.items()})
    return server, clients, sb


def test_client_refuses_dangerous_or_out_of_order_requests():
    _server, clients, sb = _staged()
    c = clients[1]
    with pytest.raises(SecAggRefused, match="out of order"):
        c.advertise()
    c.masked_input(sb[1])
    peer = min(c.neighbours)
    alive = sorted(c.neighbours | {1})
    with pytest.raises(SecAggRefused, match="both secrets"):
        c.unmask(UnmaskRequest(self_mask_owners=alive, key_owners=[peer]))

    _server, clients, sb = _staged()
    c = clients[1]
    c.masked_input(sb[1])
    with pytest.raises(SecAggRefused, match="its own masked input"):
        c.unmask(UnmaskRequest(self_mask_owners=sorted(c.neighbours), key_owners=[1]))
    c = clients[2]
    c.masked_input(sb[2])
    outsiders = sorted(set(range(1, N + 1)) - c.neighbours - {2})
    if outsiders:
        with pytest.raises(SecAggRefused, match="non-neighbours"):
            c.unmask(UnmaskRequest(self_mask_owners=sorted(c.neighbours | {2}), key_owners=outsiders[:1]))
    c = clients[3]
    c.masked_input(sb[3])
    with pytest.raises(SecAggRefused, match="fewer than the threshold"):
        c.unmask(UnmaskRequest(self_mask_owners=[3], key_owners=sorted(c.neighbours)))
    with pytest.raises(SecAggRefused, match="out of order"):
        c.unmask(UnmaskRequest(self_mask_owners=sorted(c.neighbours | {3})))  # a stage never repeats


def test_server_validates_replies_and_drops_the_sender():
    server, clients, sb = _staged(n=6)
    replies = {i: c.masked_input(sb[i]) for i, c in clients.items()}
    replies[2] = MaskedInput(client_index=2, masked=replies[2].masked[:-4])  # wrong length
    replies[3] = MaskedInput(client_index=4, masked=replies[3].masked)  # names another client
    replies[99] = replies[1]  # never asked
    requests = server.receive_masked(replies)
    assert set(requests) == {1, 4, 5, 6}
    assert {2, 3, 99} <= set(server.rejected)
    # 2 and 3 are now treated as dropped after sharing: their key shares are asked for, never their self masks
    for req in requests.values():
        assert not set(req.self_mask_owners) & {2, 3}
        assert set(req.key_owners) <= {2, 3}
    _total, survivors = server.receive_unmask({i: clients[i].unmask(r) for i, r in requests.items()})
    assert survivors == [1, 4, 5, 6]
    q = sum(clients[i].quantised.astype(np.int64) for i in survivors)
    assert np.array_equal(server.quantised_sum.astype(np.int64), q)
    with pytest.raises(SecAggAbort, match="expects stage"):
        server.receive_keys({})


def test_signatures_required_forged_and_tampered_drop_the_client():
    idk = {i: ec.generate_private_key(ec.SECP384R1()) for i in range(1, N + 1)}
    verify = {i: k.public_key() for i, k in idk.items()}
    signing = dict(idk)
    signing[4] = ec.generate_private_key(ec.SECP384R1())  # forged: signed with a key that is not 4's identity

    def tamper(stage, replies):
        if stage == 0:
            adv = replies[6].key_advertisement
            adv.mask_public_key = bytes(b ^ 1 for b in adv.mask_public_key)  # keys swapped in transit

    server, clients, inputs = run_round(signing=signing, verify=verify, tamper=tamper)
    _, survivors = server.result
    assert survivors == [i for i in range(1, N + 1) if i not in (4, 6)]
    assert "signature" in server.rejected[4] and "signature" in server.rejected[6]
    q, _ = expected(clients, inputs, survivors)
    assert np.array_equal(server.quantised_sum.astype(np.int64), q)
    with pytest.raises(SecAggRefused, match="signing key"):
        SecAggClient(SecAggServer("x", 3, 4, 1.0, min_clients=2, verify_keys=verify).setup()[1], np.zeros(4))


def test_tampered_ciphertext_fails_to_decrypt():
    key = bytes(range(32))
    blob = sc.encrypt(key, b"share", round_id="r", sender=1, receiver=2)
    assert sc.decrypt(key, blob, round_id="r", sender=1, receiver=2) == b"share"
    bad = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(sc.CryptoError):
        sc.decrypt(key, bad, round_id="r", sender=1, receiver=2)
    with pytest.raises(sc.CryptoError):  # replayed into another round, or with sender and receiver swapped
        sc.decrypt(key, blob, round_id="r2", sender=1, receiver=2)
    with pytest.raises(sc.CryptoError):
        sc.decrypt(key, blob, round_id="r", sender=2, receiver=1)
    # inside the protocol: a relay flipping one bit makes the receiving client refuse
    _server, clients, sb = _staged(n=4)
    ct = bytearray(sb[1].shares[0].ciphertext)
    ct[20] ^= 0x40
    sb[1].shares[0].ciphertext = bytes(ct)
    with pytest.raises(SecAggRefused, match="authentication"):
        clients[1].masked_input(sb[1])


def test_share_plaintext_round_trip():
    p = SharePlaintext(sender=1, receiver=2, self_mask_share=sc.share_to_bytes(5), key_share=sc.share_to_bytes(7))
    assert SharePlaintext.FromString(p.SerializeToString()) == p


def test_shamir_any_t_reconstruct_and_t_minus_1_do_not():
    secret = b"\xff" * 32  # the full 256 bits survive
    xs = [3, 5, 8, 9, 11, 12, 20]
    t = 4
    shares = sc.shamir_split(secret, t, xs)
    assert all(len(s) == sc.SHARE_BYTES for s in shares.values())
    for subset in itertools.combinations(xs, t):
        assert sc.shamir_combine({x: shares[x] for x in subset}, t) == secret
    value = int.from_bytes(secret, "big")
    for subset in itertools.combinations(xs, t - 1):
        pts = {x: sc.share_from_bytes(shares[x]) for x in subset}
        assert sc.lagrange_at_zero(pts) != value
    with pytest.raises(sc.CryptoError):
        sc.shamir_combine({x: shares[x] for x in xs[: t - 1]}, t)


def test_quantisation_is_unbiased_and_cannot_overflow():
    qb = sc.quant_bits_for(1000)
    assert qb == 32 - math.ceil(math.log2(1001))
    value = 0.123456789
    reps = sc.quantise(np.full(200_000, value), 1.0, 8)  # coarse grid: rounding noise is large
    step = sc.quantisation_step(1.0, 8)
    mean = float(sc.dequantise_sum(reps.astype(np.int64).sum(keepdims=True), 1.0, 8, len(reps))[0]) / len(reps)
    assert abs(mean - value) < 5 * step / math.sqrt(len(reps))
    assert len(np.unique(reps)) == 2  # it did round both ways
    for n in (2, 10, 100, 1000):
        p = plan(n, 4, 0.5)
        top = sc.quantise(np.full(4, 0.5 + 1.0), 0.5, p.quant_bits)  # clipped to the top level
        assert int(top[0]) == (1 << p.quant_bits) - 1
        assert n * int(top[0]) < 2**32
        bottom = sc.quantise(np.full(4, -7.0), 0.5, p.quant_bits)
        assert int(bottom[0]) == 0
        total = np.full(4, n * int(top[0]), dtype=np.uint32)
        np.testing.assert_allclose(sc.dequantise_sum(total, 0.5, p.quant_bits, n), n * 0.5, rtol=1e-12)


def test_plan_defaults_and_graph():
    p = plan(10, 5, 1.0)
    assert (p.neighbourhood, p.threshold) == (8, 5)
    assert plan(4, 5, 1.0).neighbourhood == 3  # full graph for small n
    p1000 = plan(1000, 5, 1.0)
    assert (p1000.neighbourhood, p1000.threshold) == (20, 11)
    with pytest.raises(ValueError, match="strict majority"):
        plan(10, 5, 1.0, threshold=4)  # 4 of 9 holders: two disjoint sets of 4 exist
    with pytest.raises(ValueError, match="even"):
        plan(10, 5, 1.0, neighbourhood=5)
    g = neighbour_graph(50, 12)
    assert all(len(g[i]) == 12 and i not in g[i] for i in g)
    assert all(i in g[j] for i in g for j in g[i])


def test_masks_come_from_the_full_seed():
    a, b = bytes(32), bytes(31) + b"\x01"
    assert not np.array_equal(sc.expand(a, 16, pairwise=False), sc.expand(b, 16, pairwise=False))
    assert not np.array_equal(sc.expand(a, 16, pairwise=False), sc.expand(a, 16, pairwise=True))
    both = sc.expand(a, 16, pairwise=True) + sc.expand(b, 16, pairwise=True)
    assert np.array_equal(sc.expand_sum([a, b], 16, pairwise=True, block=1), both)


def test_handle_rejects_wrong_messages():
    server = SecAggServer("r", 3, 4, 1.0, min_clients=2)
    msgs = server.step(0, {})
    c = SecAggClient(msgs[1].setup, np.zeros(4, np.float32))
    with pytest.raises(SecAggRefused):
        c.handle(SecAggMessage(masked_input=MaskedInput(client_index=1)))
    assert c.handle(msgs[1]).WhichOneof("body") == "key_advertisement"
    with pytest.raises(SecAggRefused, match="out of order"):
        c.handle(msgs[1])


def test_server_drops_malformed_shares_and_wrong_message_kinds():
    server = SecAggServer("r", 10, 4, 1.0, min_clients=3)
    msgs = server.step(0, {})
    clients = {i: SecAggClient(m.setup, np.zeros(4, np.float32)) for i, m in msgs.items()}
    replies = {i: c.handle(msgs[i]) for i, c in clients.items()}
    replies[6] = SecAggMessage(masked_input=MaskedInput(client_index=6))  # the wrong kind for this stage
    bundles = server.step(1, replies)
    assert set(bundles) == set(range(1, 11)) - {6} and "key_advertisement" in server.rejected[6]
    replies = {i: clients[i].handle(m) for i, m in bundles.items()}
    replies[2].share_keys.shares[0].sender = 3  # a share claiming to come from someone else
    del replies[4].share_keys.shares[-1]  # a neighbour left without its share
    share_bundles = server.step(2, replies)
    assert set(share_bundles) == set(range(1, 11)) - {2, 4, 6}
    assert "sender" in server.rejected[2] and "no share" in server.rejected[4]
    with pytest.raises(SecAggAbort, match="min_clients"):
        server.step(3, {1: clients[1].handle(share_bundles[1])})
