"""Secure aggregation (SecAgg+): exact sums under dropouts, refusals, and the cryptographic pieces on their own."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from scipy.stats import chi2

from fedprompt.protocols.secagg import crypto as sc
from fedprompt.protocols.secagg.client import ClientIdentity, SecAggClient
from fedprompt.protocols.secagg.protocol import SecAggAbort, SecAggRefused, neighbour_graph, plan
from fedprompt.protocols.secagg.server import SecAggServer
from fedprompt.protocols.secagg_pb2 import (
    MaskedInput,
    SecAggMessage,
    SharePlaintext,
    UnmaskRequest,
)

N, LENGTH, CLIP = 10, 257, 1.0
_KEYS: dict[int, ec.EllipticCurvePrivateKey] = {}


def node_key(i: int) -> ec.EllipticCurvePrivateKey:
    """Client i's node identity key (P-384, as fedprompt certs makes them), made once per test session."""
    if i not in _KEYS:
        _KEYS[i] = ec.generate_private_key(ec.SECP384R1())
    return _KEYS[i]


def identities(n: int) -> dict[int, tuple[str, ec.EllipticCurvePublicKey]]:
    """What the aggregation server knows: each index's node name and registered public key."""
    return {i: (f"node-{i}", node_key(i).public_key()) for i in range(1, n + 1)}


def identity(i: int, n: int, **kw) -> ClientIdentity:
    """What client i knows from its own files: its name and key, and the roster of every node's public key."""
    roster = {f"node-{j}": node_key(j).public_key() for j in range(1, n + 1)}
    return ClientIdentity(f"node-{i}", node_key(i), roster, **kw)


def make_server(round_id: str, n: int, length: int, **kw) -> SecAggServer:
    kw.setdefault("min_clients", 2)
    return SecAggServer(round_id, n, length, CLIP, identities=identities(n), **kw)


def make_clients(setups: dict, inputs: dict, n: int, **kw) -> dict[int, SecAggClient]:
    return {i: SecAggClient(s, inputs[i], identity(i, n, **kw)) for i, s in setups.items()}


def make_inputs(n: int, length: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1.2, 1.2, length).astype(np.float32) for i in range(1, n + 1)}


STAGES = 5  # adverts, shares, masked inputs, consistency signatures, unmask responses


def run_round(n=N, length=LENGTH, *, drop_after=None, min_clients=3, tamper=None, neighbourhood=None, threshold=None):
    """Drive one round through the generic step/handle interface.

    drop_after: {stage: clients} — a client listed under stage s answers stages 0..s−1 and nothing from s on:
    0 = never advertises, 1 = advertises only, 2 = shares keys but sends no masked input, 3 = sends its masked
    input but does not sign the survivors, 4 = signs but sends no unmask response. tamper(stage, replies) may alter
    the replies in transit.
    """
    drop_after = drop_after or {}
    server = make_server(
        "round-1", n, length, min_clients=min_clients, neighbourhood=neighbourhood, threshold=threshold
    )
    inputs = make_inputs(n, length)
    requests = server.step(0, {})
    clients = make_clients({i: m.setup for i, m in requests.items()}, inputs, n)
    for stage in range(STAGES):
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
    # 2 advertises then vanishes, 5 shares keys then vanishes, 9 signs the survivors and vanishes before unmasking
    server, clients, inputs = run_round(drop_after={1: {2}, 2: {5}, 4: {9}})
    total, survivors = server.result
    assert server.done
    assert survivors == [i for i in range(1, N + 1) if i not in (2, 5)]  # 9 sent its masked input
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


def test_thirty_percent_dropouts_spread_over_every_stage_stay_exact():
    # n = 10 (k = 8, t = 6 of 9): 3 of 10 drop, at three different stages
    server, clients, inputs = run_round(drop_after={1: {3}, 3: {6}, 4: {8}})
    _, survivors = server.result
    assert survivors == [i for i in range(1, N + 1) if i != 3]
    q, _ = expected(clients, inputs, survivors)
    assert np.array_equal(server.quantised_sum.astype(np.int64), q)
    # n = 20, 6 of 20 drop, over all five stages (the full graph: t = 11 of 20)
    drops = {0: {1}, 1: {2}, 2: {3, 4}, 3: {5}, 4: {6}}
    server, clients, inputs = run_round(n=20, length=33, drop_after=drops, neighbourhood=19)
    _, survivors = server.result
    assert survivors == list(range(5, 21))  # 5 and 6 sent their masked inputs
    q, _ = expected(clients, inputs, survivors)
    assert np.array_equal(server.quantised_sum.astype(np.int64), q)


def test_sparse_graph_with_dropouts():
    # k = 10, t = 7 of 11: any neighbourhood keeps at least 8 of these 17 survivors
    server, clients, inputs = run_round(n=20, length=33, drop_after={1: {1}, 2: {3}, 4: {4}})
    _, survivors = server.result
    q, _ = expected(clients, inputs, survivors)
    assert server.plan.neighbourhood == 10 and len(server.neighbours[6]) == 10
    assert np.array_equal(server.quantised_sum.astype(np.int64), q)


def test_too_many_dropouts_is_a_clear_error():
    with pytest.raises(SecAggAbort, match="min_clients") as err:
        run_round(drop_after={2: set(range(1, 9))}, min_clients=3)
    assert err.value.status == "ABORTED"
    # enough clients overall, but too few holders of the dropped clients' shares are left to unmask
    with pytest.raises(SecAggAbort, match="live holders"):
        run_round(drop_after={3: {1, 2, 3, 4, 5}}, min_clients=3)
    with pytest.raises(SecAggAbort, match="fewer than 6 shares"):
        run_round(drop_after={4: {1, 2, 3, 4, 5}}, min_clients=3)


def test_masked_vector_is_uniform_and_plain_one_is_not():
    n, length = 3, 50_000
    server = make_server("r", n, length)
    setups = server.setup()
    clients = make_clients(setups, {i: np.zeros(length, np.float32) for i in setups}, n)
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
    """A round driven up to the consistency check: the server, the clients, and each client's check."""
    server = make_server("r", n, length, min_clients=3)
    setups = server.setup()
    clients = make_clients(setups, {i: np.zeros(length, np.float32) for i in setups}, n)
    bundles = server.receive_keys({i: c.advertise() for i, c in clients.items()})
    sb = server.receive_shares({i: c.share_keys(bundles[i]) for i, c in clients.items()})
    checks = server.receive_masked({i: c.masked_input(sb[i]) for i, c in clients.items()})
    return server, clients, checks


def _signed(server, clients, checks, signers=None):
    """Unmask requests after the signers (default: all) signed the survivors."""
    signers = set(clients) if signers is None else signers
    return server.receive_signatures({i: clients[i].sign_survivors(checks[i]) for i in signers})


def test_client_refuses_dangerous_or_out_of_order_requests():
    server, clients, checks = _staged()
    c = clients[1]
    with pytest.raises(SecAggRefused, match="out of order"):
        c.advertise()
    requests = _signed(server, clients, checks)
    peer = min(c.neighbours)
    both = UnmaskRequest(
        self_mask_owners=requests[1].self_mask_owners, key_owners=[peer], signatures=requests[1].signatures
    )
    with pytest.raises(SecAggRefused, match="both secrets"):
        c.unmask(both)
    c = clients[2]
    own = UnmaskRequest(self_mask_owners=sorted(c.neighbours), key_owners=[2], signatures=requests[2].signatures)
    with pytest.raises(SecAggRefused, match="its own masked input"):
        c.unmask(own)
    c = clients[3]
    outsiders = sorted(set(range(1, N + 1)) - c.neighbours - {3})
    if outsiders:
        with pytest.raises(SecAggRefused, match="non-neighbours"):
            c.unmask(UnmaskRequest(self_mask_owners=sorted(c.neighbours | {3}), key_owners=outsiders[:1]))
    c = clients[4]
    with pytest.raises(SecAggRefused, match="does not follow from the survivors"):
        c.unmask(UnmaskRequest(self_mask_owners=[4], key_owners=[], signatures=requests[4].signatures))
    with pytest.raises(SecAggRefused, match="out of order"):
        c.unmask(requests[4])  # a stage never repeats, even after a refusal
    assert clients[5].unmask(requests[5]).self_mask_shares  # the honest request goes through


def test_server_validates_replies_and_drops_the_sender():
    server = make_server("r", 6, 8, min_clients=3)
    setups = server.setup()
    clients = make_clients(setups, {i: np.zeros(8, np.float32) for i in setups}, 6)
    bundles = server.receive_keys({i: c.advertise() for i, c in clients.items()})
    sb = server.receive_shares({i: c.share_keys(bundles[i]) for i, c in clients.items()})
    replies = {i: c.masked_input(sb[i]) for i, c in clients.items()}
    replies[2] = MaskedInput(client_index=2, masked=replies[2].masked[:-4])  # wrong length
    replies[3] = MaskedInput(client_index=4, masked=replies[3].masked)  # names another client
    replies[99] = replies[1]  # never asked
    checks = server.receive_masked(replies)
    assert set(checks) == {1, 4, 5, 6}
    assert {2, 3, 99} <= set(server.rejected)
    requests = _signed(server, clients, checks, signers=set(checks))
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


def test_signatures_forged_or_tampered_drop_the_client():
    forger = ec.generate_private_key(ec.SECP384R1())  # not 4's identity

    def tamper(stage, replies):
        if stage == 0:
            adv = replies[4].key_advertisement
            msg = sc.advertisement_bytes(
                "round-1", 4, adv.encryption_public_key, adv.mask_public_key, adv.self_mask_commitment
            )
            adv.signature = sc.sign(forger, msg)
            adv6 = replies[6].key_advertisement
            adv6.mask_public_key = bytes(b ^ 1 for b in adv6.mask_public_key)  # keys swapped in transit

    server, clients, inputs = run_round(tamper=tamper)
    _, survivors = server.result
    assert survivors == [i for i in range(1, N + 1) if i not in (4, 6)]
    assert "signature" in server.rejected[4] and "signature" in server.rejected[6]
    q, _ = expected(clients, inputs, survivors)
    assert np.array_equal(server.quantised_sum.astype(np.int64), q)


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
    server = make_server("r", 4, 8)
    setups = server.setup()
    clients = make_clients(setups, {i: np.zeros(8, np.float32) for i in setups}, 4)
    bundles = server.receive_keys({i: c.advertise() for i, c in clients.items()})
    sb = server.receive_shares({i: c.share_keys(bundles[i]) for i, c in clients.items()})
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
    # the least t with 2t > k + 1 + 1: a server with one colluding client cannot collect both secrets of anyone
    p = plan(10, 5, 1.0)
    assert (p.neighbourhood, p.threshold) == (8, 6)
    assert plan(4, 5, 1.0).neighbourhood == 3  # full graph for small n
    assert (plan(3, 5, 1.0).threshold, plan(5, 5, 1.0).threshold) == (3, 4)
    p1000 = plan(1000, 5, 1.0)
    assert (p1000.neighbourhood, p1000.threshold) == (20, 12)
    assert plan(10, 5, 1.0, colluders=0).threshold == 5  # a strict majority of 9 against the server alone
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
    server = make_server("r", 3, 4)
    msgs = server.step(0, {})
    c = SecAggClient(msgs[1].setup, np.zeros(4, np.float32), identity(1, 3))
    with pytest.raises(SecAggRefused):
        c.handle(SecAggMessage(masked_input=MaskedInput(client_index=1)))
    assert c.handle(msgs[1]).WhichOneof("body") == "key_advertisement"
    with pytest.raises(SecAggRefused, match="out of order"):
        c.handle(msgs[1])


def test_server_drops_malformed_shares_and_wrong_message_kinds():
    server = make_server("r", 10, 4, min_clients=3)
    msgs = server.step(0, {})
    clients = make_clients({i: m.setup for i, m in msgs.items()}, {i: np.zeros(4, np.float32) for i in msgs}, 10)
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


def _plus_one(share: bytes) -> bytes:
    return sc.share_to_bytes((sc.share_from_bytes(share) + 1) % sc.PRIME)


@pytest.mark.parametrize("checks", ["on", "off"])
def test_a_wrong_share_or_input_aborts_and_without_the_checks_gives_a_wrong_sum(monkeypatch, checks):
    """A malicious client's crafted share (+1 on one self-mask share) or out-of-range masked input: with the
    server's checks (shares against the others and the commitment, the sum's range) the round aborts; with them
    switched off it ends in a wrong sum, which is what the checks are for."""
    from fedprompt.protocols.secagg import unmask as secagg_unmask

    if checks == "off":
        real = sc.shamir_combine
        monkeypatch.setattr(sc, "shamir_combine", lambda shares, t: real(dict(sorted(shares.items())[:t]), t))
        monkeypatch.setattr(secagg_unmask, "check_range", lambda round_id, plan, total, count: None)

    def crafted(stage, replies):
        if stage == 4:  # client 2 reveals a wrong share of client 1's self-mask seed
            share = replies[2].unmask_response.self_mask_shares[0]
            share.share = _plus_one(share.share)
            if checks == "off":  # ... and the commitment check is gone too
                monkeypatch.setattr(sc, "commit_seed", lambda round_id, u, seed: server_adverts[u])

    server_adverts: dict = {}

    def keep_adverts(stage, replies):
        if stage == 0:
            server_adverts.update({i: m.key_advertisement.self_mask_commitment for i, m in replies.items()})
        crafted(stage, replies)

    if checks == "on":
        with pytest.raises(SecAggAbort, match="wrong share"):
            run_round(n=4, length=33, tamper=keep_adverts)
        return
    server, clients, inputs = run_round(n=4, length=33, tamper=keep_adverts)
    _, survivors = server.result
    q, _ = expected(clients, inputs, survivors)
    assert not np.array_equal(server.quantised_sum.astype(np.int64), q)  # finalised, and wrong
