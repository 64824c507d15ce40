"""The malicious aggregation server (and relay), played against the holders' own code path: each holder is a
real :class:`HolderService` with its node key and its roster from ``fedprompt certs``, holding an update it
trained; the test drives SecAgg+ at it as a server that lies would.

Each attack is also run with the protection it defeats switched off (a client that skips the signature check; a
threshold and a client policy that do not count a colluder), and there it recovers the victim's exact quantised
update: the harness can break a holder, so the refusals it meets with the real code are what protects them.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from conftest import make_sentiment_rows, round_config
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedprompt import certs
from fedprompt.client.policy import HolderPolicy
from fedprompt.client.service import HolderService
from fedprompt.protocols import secagg_crypto as sc
from fedprompt.protocols.secagg_client import ClientIdentity, SecAggClient
from fedprompt.protocols.secagg_pb2 import (
    ConsistencyCheck,
    EncryptedShare,
    KeyAdvertisement,
    KeyBundle,
    SecAggMessage,
    ShareBundle,
    SharePlaintext,
    UnmaskRequest,
)
from fedprompt.protocols.secagg_server import SecAggServer

NAMES = [f"h{i}" for i in range(1, 6)]
RUN, ROUND = "r", 1


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    certs.create(d, nodes=NAMES, hosts=["localhost"])
    return d


@pytest.fixture
def holders(tiny_llama, cert_dir, tmp_path) -> dict[str, HolderService]:
    """Five holders, each with its own data, ledger, node key and roster, each holding a trained update."""
    from fedprompt.dp.ledger import Budget, PrivacyLedger

    services = {}
    for i, name in enumerate(NAMES):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(40, seed=i)))
        PrivacyLedger.create(tmp_path / name, Budget(50.0, 1e-3))
        peers_dir = certs.node_files(cert_dir, name).private_key.parent / "peers"
        services[name] = HolderService(
            data=str(data),
            state_dir=tmp_path / name,
            name=name,
            num_examples=32,
            policy=HolderPolicy(),
            device="cpu",
            precision="fp32",
            signing_key=certs.node_files(cert_dir, name).private_key,
            peers=certs.node_public_keys(peers_dir),
        )
        prompt = np.zeros((2, tiny_llama.hidden_size), np.float32)
        config = round_config(tiny_llama, local_steps=1, num_rounds=1, secure_aggregation=True)
        reply, _ = services[name].handle("train", config, prompt)
        assert reply["ok"] and reply["secure"], reply
    return services


def ask(service: HolderService, message: SecAggMessage) -> SecAggMessage | str:
    """One SecAgg message to a holder, as the relay delivers it: its reply, or the reason it refused."""
    config = {"run_id": RUN, "server_round": ROUND, "message": base64.b64encode(message.SerializeToString()).decode()}
    header, _ = service.handle("secagg", config, None)
    if not header["ok"]:
        return header["reason"]
    return SecAggMessage.FromString(base64.b64decode(header["message"]))


def identities(cert_dir) -> dict[int, tuple[str, object]]:
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    keys = certs.node_public_keys(cert_dir)
    return {i: (n, load_ssh_public_key(keys[n].read_bytes())) for i, n in enumerate(NAMES, start=1)}


def vector_length(holders) -> int:
    return next(iter(holders.values()))._pending[(RUN, ROUND)].size


def pending(holders, name) -> np.ndarray:
    return holders[name]._pending[(RUN, ROUND)].copy()


def unmasked(masked: bytes, b: bytes, pair_seeds: list[tuple[bytes, bool]], length: int) -> np.ndarray:
    """What a server that holds b_u and every pairwise seed of u computes from u's masked input: u's own
    quantised update. ``pair_seeds``: (seed, added) for each pairwise mask u put on its input."""
    x = np.frombuffer(masked, "<u4").astype(np.uint32) - sc.expand(b, length, pairwise=False)
    for seed, added in pair_seeds:
        x = x - sc.expand(seed, length, pairwise=True) if added else x + sc.expand(seed, length, pairwise=True)
    return x


def quantised(update: np.ndarray, setup) -> np.ndarray:
    """The victim's update as it would go into the sum (up to the stochastic rounding: ±1 per value)."""
    levels = (1 << setup.quant_bits) - 1
    x = np.clip(update.astype(np.float64), -setup.clip_range, setup.clip_range)
    return (x + setup.clip_range) * (levels / (2.0 * setup.clip_range))


# ------------------------------------------------------------------ key substitution


@pytest.mark.parametrize("client", ["fedprompt", "without the signature check"])
def test_a_server_that_substitutes_neighbours_keys_learns_nothing(holders, cert_dir, monkeypatch, client):
    if client != "fedprompt":
        monkeypatch.setattr(sc, "verify", lambda key, message, signature: True)
    length = vector_length(holders)
    server = SecAggServer("kx", 5, length, 1.0, min_clients=3, identities=identities(cert_dir))
    setups = server.setup()
    victim = holders["h1"]
    update = pending(holders, "h1")
    advert = ask(victim, SecAggMessage(setup=setups[1]))
    assert isinstance(advert, SecAggMessage), advert
    mine = advert.key_advertisement
    # the server's own keys in place of every neighbour's, under the neighbours' indices
    fakes = {}
    for v in sorted(setups[1].neighbours):
        enc_sk, enc_pk = sc.new_keypair()
        mask_sk, mask_pk = sc.new_keypair()
        fakes[v] = (enc_sk, mask_sk)
        fake = KeyAdvertisement(client_index=v, encryption_public_key=enc_pk, mask_public_key=mask_pk)
        fake.self_mask_commitment = bytes(32)
        fake.signature = b"not a signature of the node's key"
        fakes[v] = (enc_sk, mask_sk, fake)
    reply = ask(victim, SecAggMessage(key_bundle=KeyBundle(neighbours=[f[2] for f in fakes.values()])))
    if client == "fedprompt":
        assert isinstance(reply, str) and "not signed by its identity" in reply
        # the protocol ended on the holder: it answers nothing more for this round
        assert "not running" in ask(victim, SecAggMessage(share_bundle=ShareBundle()))
        return
    # the broken client encrypted its shares to the server's keys: the server opens them, ...
    b_shares, s_shares = {}, {}
    for es in reply.share_keys.shares:
        enc_sk = fakes[es.receiver][0]
        key = sc.agree(enc_sk, mine.encryption_public_key, purpose="share", round_id="kx", a=es.receiver, b=1)
        plain = SharePlaintext.FromString(sc.decrypt(key, es.ciphertext, round_id="kx", sender=1, receiver=es.receiver))
        b_shares[es.receiver], s_shares[es.receiver] = plain.self_mask_share, plain.key_share
    t = setups[1].threshold
    b = sc.shamir_combine(dict(list(b_shares.items())[:t]), t)
    # ... feeds it shares of its own so that it masks its input, and unmasks it alone
    bundle = ShareBundle()
    for v, (enc_sk, _, _) in fakes.items():
        key = sc.agree(enc_sk, mine.encryption_public_key, purpose="share", round_id="kx", a=v, b=1)
        plain = SharePlaintext(
            sender=v, receiver=1, self_mask_share=sc.share_to_bytes(1), key_share=sc.share_to_bytes(1)
        )
        ct = sc.encrypt(key, plain.SerializeToString(), round_id="kx", sender=v, receiver=1)
        bundle.shares.append(EncryptedShare(sender=v, receiver=1, ciphertext=ct))
    masked = ask(victim, SecAggMessage(share_bundle=bundle)).masked_input.masked
    seeds = [
        (sc.agree(mask_sk, mine.mask_public_key, purpose="mask", round_id="kx", a=v, b=1), 1 < v)
        for v, (_, mask_sk, _) in fakes.items()
    ]
    recovered = unmasked(masked, b, seeds, length).astype(np.float64)
    assert np.max(np.abs(recovered - quantised(update, setups[1]))) <= 1.0  # the victim's exact update


# ------------------------------------------------------------------ split view of the survivors


def _colluder(cert_dir, setup, length) -> SecAggClient:
    """h5, a registered holder working with the server: its own key, everything it holds revealed."""
    key = load_ssh_private_key(certs.node_files(cert_dir, "h5").private_key.read_bytes(), None)
    roster = {n: k for n, (_, k) in zip(NAMES, identities(cert_dir).values(), strict=True)}
    return SecAggClient(setup, np.zeros(length, np.float32), ClientIdentity("h5", key, roster, colluders=0))


def _split_view_attack(holders, cert_dir, *, threshold: int):
    """A server with one colluding holder (h5) tells h1 and h2 that {h1, h2, h5} survived and h3 and h4 that
    {h3, h4, h5} did, to collect both of h1's secrets. Returns what each honest holder answered at each stage,
    and h1's update when the attack got it."""
    length = vector_length(holders)
    server = SecAggServer("split", 5, length, 1.0, min_clients=3, identities=identities(cert_dir), threshold=threshold)
    first = server.step(0, {})
    setups = {i: m.setup for i, m in first.items()}
    honest = {i: holders[n] for i, n in enumerate(NAMES[:4], start=1)}
    colluder = _colluder(cert_dir, setups[5], length)
    answers: dict[str, dict[int, object]] = {}

    def stage(name: str, messages: dict[int, SecAggMessage]) -> dict[int, SecAggMessage]:
        got = {i: ask(h, messages[i]) for i, h in honest.items() if i in messages}
        answers[name] = got
        out = {i: r for i, r in got.items() if isinstance(r, SecAggMessage)}
        if 5 in messages:
            out[5] = colluder.handle(messages[5])
        return out

    replies = stage("setup", first)
    if set(replies) != {1, 2, 3, 4, 5}:
        return answers, None
    replies = stage("keys", server.step(1, replies))
    replies = stage("masked", server.step(2, replies))
    adverts = {i: server._adverts[i] for i in range(1, 6)}
    masked_h1 = replies[1].masked_input.masked
    server.step(3, replies)  # the honest server's view: all five survived
    views = {1: [1, 2, 5], 2: [1, 2, 5], 3: [3, 4, 5], 4: [3, 4, 5]}
    signed = {}
    for i, members in views.items():
        r = stage(f"sign {i}", {i: SecAggMessage(consistency_check=ConsistencyCheck(survivors=members))}).get(i)
        if r is not None:
            signed[i] = (members, r.consistency_signature.signature)
    for members in ([1, 2, 5], [3, 4, 5]):
        msg = sc.consistency_bytes("split", members)
        signed[("colluder", tuple(members))] = (members, sc.sign(colluder._signing_key, msg))
    revealed: dict[int, object] = {}
    for i, members in views.items():
        alive = [u for u in range(1, 6) if u in members]
        dead = [u for u in range(1, 6) if u not in members and u != i]
        sigs = [(j, s) for j, (m, s) in signed.items() if m == members]
        request = UnmaskRequest(self_mask_owners=alive, key_owners=dead)
        for j, s in sigs:
            request.signatures.add(signer=5 if isinstance(j, tuple) else j, signature=s)
        revealed[i] = stage(f"unmask {i}", {i: SecAggMessage(unmask_request=request)}).get(i)
    got = {i: r.unmask_response for i, r in revealed.items() if r is not None}
    b_sh = {i: {s.owner: s.share for s in r.self_mask_shares}.get(1) for i, r in got.items()}
    s_sh = {i: {s.owner: s.share for s in r.key_shares}.get(1) for i, r in got.items()}
    b_sh = {i: s for i, s in b_sh.items() if s is not None} | {5: colluder._b_shares[1]}
    s_sh = {i: s for i, s in s_sh.items() if s is not None} | {5: colluder._s_shares[1]}
    t = setups[1].threshold
    if len(b_sh) < t or len(s_sh) < t:
        return answers, None
    b = sc.shamir_combine(dict(list(b_sh.items())[:t]), t)
    s_key = sc.private_from_bytes(sc.shamir_combine(dict(list(s_sh.items())[:t]), t))
    seeds = [
        (sc.agree(s_key, adverts[v].mask_public_key, purpose="mask", round_id="split", a=1, b=v), 1 < v)
        for v in range(2, 6)
    ]
    return answers, (unmasked(masked_h1, b, seeds, length), setups[1])


def test_a_threshold_that_does_not_count_a_colluder_is_refused_at_setup(holders, cert_dir):
    # the old default (a strict majority, 3 of 5): every holder refuses to start, before it holds any secret
    answers, stolen = _split_view_attack(holders, cert_dir, threshold=3)
    assert stolen is None and set(answers) == {"setup"}
    assert all("does not resist 1 colluding" in a for a in answers["setup"].values()), answers


def test_split_view_at_the_default_threshold_is_refused_before_any_reveal(holders, cert_dir):
    answers, stolen = _split_view_attack(holders, cert_dir, threshold=4)
    assert stolen is None
    for i in range(1, 5):
        assert "fewer than the threshold" in answers[f"sign {i}"][i], answers[f"sign {i}"]
        assert isinstance(answers[f"unmask {i}"][i], str)  # nothing revealed: the holder's protocol has ended


def test_without_the_colluder_margin_the_split_view_steals_an_update(holders, cert_dir, monkeypatch):
    """The harness's power: holders whose policy counts no colluder accept a strict-majority threshold, and the
    same split view then yields h1's update. This is what the refusals above prevent."""
    from dataclasses import replace

    for h in holders.values():
        monkeypatch.setattr(h, "policy", replace(h.policy, secagg_colluders=0))
    update = pending(holders, "h1")
    _answers, stolen = _split_view_attack(holders, cert_dir, threshold=3)
    assert stolen is not None, _answers
    recovered, setup = stolen
    assert np.max(np.abs(recovered.astype(np.float64) - quantised(update, setup))) <= 1.0


# ------------------------------------------------------------------ one protocol instance, one secret per peer


def test_a_repeated_setup_and_a_request_for_both_secrets_are_refused(holders, cert_dir):
    length = vector_length(holders)
    server = SecAggServer("rep", 5, length, 1.0, min_clients=3, identities=identities(cert_dir))
    setups = server.step(0, {})
    h1 = holders["h1"]
    assert isinstance(ask(h1, setups[1]), SecAggMessage)
    again = ask(h1, setups[1])
    assert "one protocol per update" in again
    other = SecAggServer("rep-2", 5, length, 1.0, min_clients=3, identities=identities(cert_dir)).step(0, {})
    assert "one protocol per update" in ask(h1, other[1])
    # an honest run of the other holders up to the unmasking, then a request for both secrets of a peer
    answers = {i: ask(holders[n], setups[i]) for i, n in enumerate(NAMES, start=1) if i != 1}
    assert all(isinstance(a, SecAggMessage) for a in answers.values()), answers
    bundles = server.step(1, answers)
    shares = server.step(2, {i: ask(holders[NAMES[i - 1]], m) for i, m in bundles.items()})
    masked = server.step(3, {i: ask(holders[NAMES[i - 1]], m) for i, m in shares.items()})
    requests = server.step(4, {i: ask(holders[NAMES[i - 1]], m) for i, m in masked.items()})
    h2 = holders["h2"]
    both = SecAggMessage()
    both.unmask_request.CopyFrom(requests[2].unmask_request)
    both.unmask_request.key_owners.append(3)  # 3 survived: its self-mask share is asked for too
    reason = ask(h2, both)
    assert isinstance(reason, str) and "both secrets" in reason
    assert "not running" in ask(h2, requests[2])  # refused once, the holder's protocol is over
