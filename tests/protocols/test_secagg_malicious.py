"""The malicious aggregation server, played against the holders' own code path: each holder is a real
:class:`HolderService` with its node key and its roster from ``fedprompt certs``, asked to train in a secure
round; it trains, then runs its side of SecAgg+ (``client/secure_round.py``) with a server the test plays, one
that lies as a malicious server would.

Each attack is also run with the protection it defeats switched off (a client that skips the signature check; a
threshold and a client policy that do not count a colluder), and there it recovers the victim's exact quantised
update: the harness can break a holder, so the refusals it meets with the real code are what protects them.
"""

from __future__ import annotations

import json
import queue
import threading

import numpy as np
import pytest
from conftest import make_sentiment_rows, round_config
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedprompt import certs
from fedprompt.client.policy import HolderPolicy
from fedprompt.client.service import HolderService
from fedprompt.protocols import aggregator_pb2 as pb
from fedprompt.protocols.secagg import crypto as sc
from fedprompt.protocols.secagg.client import ClientIdentity, SecAggClient
from fedprompt.protocols.secagg.server import SecAggServer
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

NAMES = [f"h{i}" for i in range(1, 6)]
WAIT_S = 300.0


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    certs.create(d, nodes=NAMES, hosts=["localhost"])
    return d


class PlayedServer:
    """Stands where the holder's transport to the aggregation server is (``HolderService.transport``): each
    request the test hands over (``ask``) is the server's answer to the holder's last call; the holder's next
    call brings its reply, or its train request ends with a refusal. The holder runs its real code in a thread."""

    def __init__(self, service: HolderService, config: dict, prompt: np.ndarray) -> None:
        self.service, self.declined, self.over = service, False, False
        self.update: np.ndarray | None = None  # what the holder trained, for the test to compare a theft with
        self._requests: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        service.transport = self
        make_client = service.secagg_client

        def seen(setup, update):  # the test's own view of the victim's update; the holder is unchanged
            self.update = update.copy()
            return make_client(setup, update)

        service.secagg_client = seen
        self.thread = threading.Thread(target=self._train, args=(config, prompt), daemon=True)
        self.thread.start()

    # the holder's calls (what client/secure_round.Transport makes over gRPC)
    def exchange(self, stage: int, message=None):
        if message is not None:
            self._replies.put(message)
        return self._requests.get(timeout=WAIT_S)

    def decline(self) -> None:
        self.declined = True

    def _train(self, config, prompt) -> None:
        header, _ = self.service.handle("train", config, prompt)
        self._replies.put(header)

    # the test's side
    def ask(self, message: SecAggMessage) -> SecAggMessage | str:
        """The holder's reply to ``message``, or the reason it refused (its train request's answer)."""
        assert not self.over, "the holder's part of the round has ended: it reads nothing more"
        self._requests.put(pb.SecAggExchangeResponse(message=message))
        got = self._replies.get(timeout=WAIT_S)
        if isinstance(got, dict):
            assert not got["ok"], got
            self.over = True
            return got["reason"]
        return got

    def ended(self) -> bool:
        """The holder's protocol is over (it refused), its secrets gone with its SecAggClient."""
        self.thread.join(timeout=30)
        return self.over and not self.thread.is_alive()

    def finish(self) -> None:
        if self.thread.is_alive():
            self._requests.put(pb.SecAggExchangeResponse(done=True))
            self.thread.join(timeout=30)


class Cohort:
    """Five holders, each with its own data, ledger, node key and roster."""

    def __init__(self, model, cert_dir, folder) -> None:
        from fedprompt.dp.ledger import PrivacyLedger
        from fedprompt.dp.spend import Budget

        self.model, self.services, self.played = model, {}, {}
        for i, name in enumerate(NAMES):
            data = folder / f"{name}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(40, seed=i)))
            PrivacyLedger.create(folder / name, Budget(50.0, 1e-3))
            peers_dir = certs.node_files(cert_dir, name).private_key.parent / "peers"
            self.services[name] = HolderService(
                data=str(data),
                state_dir=folder / name,
                name=name,
                num_examples=32,
                policy=HolderPolicy(),
                device="cpu",
                precision="fp32",
                signing_key=certs.node_files(cert_dir, name).private_key,
                peers=certs.node_public_keys(peers_dir),
            )

    def config(self, round_id: str, server_round: int = 1) -> dict:
        return round_config(
            self.model, local_steps=1, num_rounds=1, server_round=server_round, secure_aggregation=True
        ) | {"secure_round_id": round_id}

    def start(self, round_id: str, names=NAMES) -> dict[str, PlayedServer]:
        """Ask ``names`` to train in secure round ``round_id``: each trains, then waits for the server's setup."""
        prompt = np.zeros((2, self.model.hidden_size), np.float32)
        for name in names:
            self.played[name] = PlayedServer(self.services[name], self.config(round_id), prompt)
        return {n: self.played[n] for n in names}

    def close(self) -> None:
        for p in self.played.values():
            p.finish()


@pytest.fixture
def cohort(tiny_llama, cert_dir, tmp_path):
    c = Cohort(tiny_llama, cert_dir, tmp_path)
    yield c
    c.close()


def identities(cert_dir) -> dict[int, tuple[str, object]]:
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    keys = certs.node_public_keys(cert_dir)
    return {i: (n, load_ssh_public_key(keys[n].read_bytes())) for i, n in enumerate(NAMES, start=1)}


def vector_length(model) -> int:
    return 2 * model.hidden_size


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
def test_a_server_that_substitutes_neighbours_keys_learns_nothing(cohort, tiny_llama, cert_dir, monkeypatch, client):
    if client != "fedprompt":
        monkeypatch.setattr(sc, "verify", lambda key, message, signature: True)
    length = vector_length(tiny_llama)
    server = SecAggServer("kx", 5, length, 1.0, min_clients=3, identities=identities(cert_dir))
    setups = server.setup()
    victim = cohort.start("kx", ["h1"])["h1"]
    advert = victim.ask(SecAggMessage(setup=setups[1]))
    update = victim.update
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
    reply = victim.ask(SecAggMessage(key_bundle=KeyBundle(neighbours=[f[2] for f in fakes.values()])))
    if client == "fedprompt":
        assert isinstance(reply, str) and "not signed by its identity" in reply
        # the protocol ended on the holder, which told the server it is out: nothing more is asked of it
        assert victim.ended() and victim.declined
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
    masked = victim.ask(SecAggMessage(share_bundle=bundle)).masked_input.masked
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


def _split_view_attack(cohort, cert_dir, *, threshold: int):
    """A server with one colluding holder (h5) tells h1 and h2 that {h1, h2, h5} survived and h3 and h4 that
    {h3, h4, h5} did, to collect both of h1's secrets. Returns what each honest holder answered at each stage,
    and h1's update when the attack got it."""
    length = vector_length(cohort.model)
    server = SecAggServer("split", 5, length, 1.0, min_clients=3, identities=identities(cert_dir), threshold=threshold)
    first = server.step(0, {})
    setups = {i: m.setup for i, m in first.items()}
    played = cohort.start("split", NAMES[:4])
    honest = {i: played[n] for i, n in enumerate(NAMES[:4], start=1)}
    colluder = _colluder(cert_dir, setups[5], length)
    answers: dict[str, dict[int, object]] = {}

    def stage(name: str, messages: dict[int, SecAggMessage]) -> dict[int, SecAggMessage]:
        got = {i: h.ask(messages[i]) for i, h in honest.items() if i in messages and not h.over}
        answers[name] = got
        out = {i: r for i, r in got.items() if isinstance(r, SecAggMessage)}
        if 5 in messages:
            out[5] = colluder.handle(messages[5])
        return out

    replies = stage("setup", first)
    if set(replies) != {1, 2, 3, 4, 5}:
        return answers, None, honest
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
        return answers, None, honest
    b = sc.shamir_combine(dict(list(b_sh.items())[:t]), t)
    s_key = sc.private_from_bytes(sc.shamir_combine(dict(list(s_sh.items())[:t]), t))
    seeds = [
        (sc.agree(s_key, adverts[v].mask_public_key, purpose="mask", round_id="split", a=1, b=v), 1 < v)
        for v in range(2, 6)
    ]
    return answers, (unmasked(masked_h1, b, seeds, length), setups[1], honest[1].update), honest


def test_a_threshold_that_does_not_count_a_colluder_is_refused_at_setup(cohort, cert_dir):
    # the old default (a strict majority, 3 of 5): every holder refuses to start, before it holds any secret
    answers, stolen, honest = _split_view_attack(cohort, cert_dir, threshold=3)
    assert stolen is None and set(answers) == {"setup"}
    assert all("does not resist 1 colluding" in a for a in answers["setup"].values()), answers
    assert all(h.ended() and h.declined for h in honest.values())


def test_split_view_at_the_default_threshold_is_refused_before_any_reveal(cohort, cert_dir):
    answers, stolen, honest = _split_view_attack(cohort, cert_dir, threshold=4)
    assert stolen is None
    for i in range(1, 5):
        assert "fewer than the threshold" in answers[f"sign {i}"][i], answers[f"sign {i}"]
        assert answers[f"unmask {i}"] == {}  # nothing revealed: the holder's protocol had ended
        assert honest[i].ended() and honest[i].declined


def test_without_the_colluder_margin_the_split_view_steals_an_update(cohort, cert_dir, monkeypatch):
    """The harness's power: holders whose policy counts no colluder accept a strict-majority threshold, and the
    same split view then yields h1's update. This is what the refusals above prevent."""
    from dataclasses import replace

    for h in cohort.services.values():
        monkeypatch.setattr(h, "policy", replace(h.policy, secagg_colluders=0))
    _answers, stolen, _ = _split_view_attack(cohort, cert_dir, threshold=3)
    assert stolen is not None, _answers
    recovered, setup, update = stolen
    assert np.max(np.abs(recovered.astype(np.float64) - quantised(update, setup))) <= 1.0


# ------------------------------------------------------------------ one protocol instance, one secret per peer


def test_one_protocol_per_update(cohort, tiny_llama, cert_dir):
    """A server that runs a second protocol instance over the same update could difference the two results."""
    from fedprompt.dp.ledger import PrivacyLedger

    length = vector_length(tiny_llama)
    setups = SecAggServer("rep", 5, length, 1.0, min_clients=3, identities=identities(cert_dir)).step(0, {})
    other = SecAggServer("rep-2", 5, length, 1.0, min_clients=3, identities=identities(cert_dir)).step(0, {})
    h1 = cohort.start("rep", ["h1"])["h1"]
    assert isinstance(h1.ask(setups[1]), SecAggMessage)
    assert "a second, different setup" in h1.ask(other[1])
    assert h1.ended() and h1.declined
    h3 = cohort.start("rep", ["h3"])["h3"]
    assert isinstance(h3.ask(setups[3]), SecAggMessage)
    assert "out of order" in h3.ask(setups[3])  # the same setup again: no second set of keys either
    assert h3.ended() and h3.declined
    # the coordinator asks again for the same run and round (a new update of the same prompt): refused at once,
    # before training, with nothing charged
    service = cohort.services["h1"]
    before = PrivacyLedger(service.state_dir).spent().epsilon
    header, _ = service.handle("train", cohort.config("rep-3"), np.zeros((2, tiny_llama.hidden_size), np.float32))
    assert not header["ok"] and "one protocol per update" in header["reason"]
    assert PrivacyLedger(service.state_dir).spent().epsilon == before
    # and a setup for another round than the one the coordinator named is refused before any secret exists
    h2 = cohort.start("rep", ["h2"])["h2"]
    assert "not the round" in h2.ask(other[2])
    assert h2.ended() and h2.declined


def test_a_request_for_both_secrets_of_a_survivor_is_refused(cohort, tiny_llama, cert_dir):
    server = SecAggServer("both", 5, vector_length(tiny_llama), 1.0, min_clients=3, identities=identities(cert_dir))
    setups = server.step(0, {})
    played = cohort.start("both")
    at = {i: played[n] for i, n in enumerate(NAMES, start=1)}
    # an honest run up to the unmasking, then a request for both secrets of a peer
    bundles = server.step(1, {i: h.ask(setups[i]) for i, h in at.items()})
    shares = server.step(2, {i: at[i].ask(m) for i, m in bundles.items()})
    masked = server.step(3, {i: at[i].ask(m) for i, m in shares.items()})
    requests = server.step(4, {i: at[i].ask(m) for i, m in masked.items()})
    both = SecAggMessage()
    both.unmask_request.CopyFrom(requests[2].unmask_request)
    both.unmask_request.key_owners.append(3)  # 3 survived: its self-mask share is asked for too
    reason = at[2].ask(both)
    assert isinstance(reason, str) and "both secrets" in reason
    assert at[2].ended() and at[2].declined  # refused once, the holder's protocol is over
    honest = at[3].ask(requests[3])  # the same stage asked honestly of another holder is answered
    assert honest.WhichOneof("body") == "unmask_response"
