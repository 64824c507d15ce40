"""Secure aggregation after SecAgg+ (Bell et al., CCS 2020): client and server state machines, no transport.

Why this shape: the coordinator relays ``fedprompt.v1`` SecAgg messages inside Flower rounds (or any other relay)
and must never hold a key that opens them, so both sides are plain objects that take the previous stage's
messages and return the next ones. The server learns only the sum of the inputs of the clients whose masked
input arrived; a single masked vector is uniform mod 2^32.

Stages (``SecAggServer.step`` numbers them):

0. setup: the server draws a random sparse neighbour graph (Harary-style ring of degree k ≈ 2·log2 n) and tells
   each client its index, neighbours and parameters; the client answers with two X25519 public keys (one to
   encrypt shares, one to agree pairwise masks), signed with its node identity key when required.
1. keys: each client gets its surviving neighbours' keys and answers with AES-GCM encrypted Shamir shares of its
   self-mask seed b_u and its mask private key s_u, one per neighbour (it keeps its own share).
2. shares: each client gets the shares addressed to it and answers with its quantised input plus PRG(b_u) plus,
   for each neighbour v that shared, ±PRG(agree(s_u, v)) (+ when u < v), all mod 2^32.
3. masked: the server sums the masked inputs and asks each survivor, for each neighbour, EITHER the b share (the
   neighbour's masked input arrived) OR the s share (it shared keys but its masked input never came), never both.
4. unmask: with ``threshold`` shares of each needed secret the server removes the self masks of the survivors and
   the pairwise masks towards the dropped, and dequantises the exact integer sum.

The threshold is a strict majority of the k + 1 holders of a client's shares (its k neighbours and itself): two
disjoint sets of ``threshold`` holders cannot exist, so a server that lies about who dropped cannot collect both
b_u (from some holders) and s_u (from others) and unmask a single client's input, since honest clients reveal
only one of the two per peer. Replies that fail validation drop their sender, as if it had gone offline
(``SecAggServer.rejected`` says why); a stage raises ``SecAggAbort`` when too few remain to finish.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError

from fedprompt.errors import FedPromptError
from fedprompt.protocols import secagg_crypto as sc
from fedprompt.protocols.secagg_pb2 import (
    EncryptedShare,
    KeyAdvertisement,
    KeyBundle,
    MaskedInput,
    RevealedShare,
    SecAggMessage,
    SecAggSetup,
    ShareBundle,
    ShareKeys,
    SharePlaintext,
    UnmaskRequest,
    UnmaskResponse,
)
from fedprompt.server.records import Conflict

__all__ = [
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggPlan",
    "SecAggRefused",
    "SecAggServer",
    "neighbour_graph",
    "plan",
]

STAGE_SETUP, STAGE_KEYS, STAGE_SHARES, STAGE_MASKED, STAGE_UNMASK, STAGE_DONE = range(6)
_MAX_CIPHERTEXT = 1024  # a SharePlaintext is ~150 bytes; anything far larger is not a share


class SecAggError(FedPromptError):
    """Base of the errors secure aggregation raises on purpose."""


class SecAggAbort(Conflict, SecAggError):
    """The round cannot finish: too few clients or shares remain, or a stage is called out of order."""


class SecAggRefused(SecAggError):
    """A client refuses a request that would break its privacy or that does not fit its state."""


# ------------------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class SecAggPlan:
    num_clients: int
    vector_length: int
    clip_range: float
    neighbourhood: int  # k: neighbours per client (n − 1: the full graph)
    threshold: int  # shares out of the k + 1 holders needed to reconstruct a secret
    modulus_bits: int
    quant_bits: int
    require_signatures: bool

    @property
    def quantisation_step(self) -> float:
        return sc.quantisation_step(self.clip_range, self.quant_bits)


def plan(
    num_clients: int,
    vector_length: int,
    clip_range: float,
    *,
    neighbourhood: int | None = None,
    threshold: int | None = None,
    require_signatures: bool = False,
) -> SecAggPlan:
    """The round's parameters, validated.

    neighbourhood: default 2·ceil(log2 n) (even, so each client has k/2 ring neighbours either side), the full
    graph once that reaches n − 1; Bell et al. show O(log n) neighbours keep the sum private and recoverable
    w.h.p. against a constant fraction of dropouts and corruptions. threshold: default ⌊(k+1)/2⌋ + 1, the least
    strict majority of the k + 1 holders (see the module docstring for why a majority is required).
    """
    n = int(num_clients)
    if n < 2:
        raise ValueError("secure aggregation needs at least 2 clients")
    if vector_length < 1:
        raise ValueError("vector_length must be positive")
    if not (clip_range > 0 and math.isfinite(clip_range)):
        raise ValueError("clip_range must be a positive finite number")
    if neighbourhood is None:
        k = min(2 * math.ceil(math.log2(n)), n - 1)
    else:
        k = int(neighbourhood)
        if not 1 <= k <= n - 1:
            raise ValueError(f"neighbourhood must be in 1..{n - 1}")
        if k < n - 1 and k % 2:
            raise ValueError("a neighbourhood smaller than the full graph must be even (k/2 each side of the ring)")
    t = (k + 1) // 2 + 1 if threshold is None else int(threshold)
    if not 2 * t > k + 1 or t > k + 1:
        raise ValueError(f"threshold must be a strict majority of the {k + 1} holders: {(k + 1) // 2 + 1}..{k + 1}")
    return SecAggPlan(
        n, int(vector_length), float(clip_range), k, t, sc.MODULUS_BITS, sc.quant_bits_for(n), bool(require_signatures)
    )


def neighbour_graph(num_clients: int, neighbourhood: int) -> dict[int, frozenset[int]]:
    """A random k-regular Harary-style graph on 1..n: shuffle the indices with the OS CSPRNG and link each to its
    k/2 predecessors and successors on the ring. Symmetric by construction; the shuffle keeps the server from
    choosing who neighbours whom in a way clients could predict or bias."""
    n, k = num_clients, neighbourhood
    order = list(range(1, n + 1))
    if k >= n - 1:
        return {i: frozenset(j for j in order if j != i) for i in order}
    secrets.SystemRandom().shuffle(order)
    graph: dict[int, set[int]] = {i: set() for i in order}
    for pos, i in enumerate(order):
        for off in range(1, k // 2 + 1):
            j = order[(pos + off) % n]
            graph[i].add(j)
            graph[j].add(i)
    return {i: frozenset(s) for i, s in graph.items()}


# ---------------------------------------------------------------------------------------------------- server


class SecAggServer:
    """The aggregation server's side: one method per stage, each fed the replies of the clients that answered."""

    def __init__(
        self,
        round_id: str,
        num_clients: int,
        vector_length: int,
        clip_range: float,
        *,
        min_clients: int,
        neighbourhood: int | None = None,
        threshold: int | None = None,
        verify_keys: dict[int, ec.EllipticCurvePublicKey] | None = None,
    ) -> None:
        if not round_id:
            raise ValueError("round_id must be non-empty: keys and ciphertexts are bound to it")
        self.round_id = str(round_id)
        self.plan = plan(
            num_clients,
            vector_length,
            clip_range,
            neighbourhood=neighbourhood,
            threshold=threshold,
            require_signatures=verify_keys is not None,
        )
        if not 2 <= min_clients <= num_clients:
            raise ValueError(f"min_clients must be in 2..{num_clients} (one survivor's sum is its input)")
        self.min_clients = int(min_clients)
        self.verify_keys = dict(verify_keys) if verify_keys is not None else None
        self.neighbours: dict[int, frozenset[int]] = {}
        self.rejected: dict[int, str] = {}
        self.result: tuple[np.ndarray, list[int]] | None = None
        self.quantised_sum: np.ndarray | None = None
        self._stage = STAGE_SETUP
        self._asked: set[int] = set()
        self._adverts: dict[int, KeyAdvertisement] = {}
        self._u2: set[int] = set()
        self._u3: set[int] = set()
        self._masked_sum: np.ndarray | None = None
        self._requests: dict[int, UnmaskRequest] = {}

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def stage(self) -> int:
        return self._stage

    # -- helpers

    def _enter(self, stage: int) -> None:
        if self._stage != stage:
            raise SecAggAbort(f"secure aggregation round {self.round_id!r} expects stage {self._stage}, not {stage}")

    def _reject(self, idx: int, why: str) -> None:
        self.rejected.setdefault(idx, why)

    def _accept(self, replies: dict, kind: type) -> dict:
        """The replies from clients that were asked, of the right type and naming themselves; others dropped."""
        ok = {}
        for idx, msg in replies.items():
            if idx not in self._asked:
                self._reject(idx, f"stage {self._stage}: reply from a client that was not asked")
            elif not isinstance(msg, kind):
                self._reject(idx, f"stage {self._stage}: expected {kind.__name__}, got {type(msg).__name__}")
            elif msg.client_index != idx:
                self._reject(idx, f"stage {self._stage}: reply names client {msg.client_index}")
            else:
                ok[idx] = msg
        return ok

    def _holders(self, u: int, alive: set[int]) -> int:
        return len(self.neighbours[u] & alive) + 1

    def _prune(self, alive: set[int], stage: str) -> set[int]:
        """Drop clients whose secrets could never be reconstructed (fewer than `threshold` live holders), until
        stable, then insist on min_clients; doing it before masks are fixed keeps the round recoverable."""
        alive = set(alive)
        changed = True
        while changed:
            changed = False
            for u in sorted(alive):
                if self._holders(u, alive) < self.plan.threshold:
                    alive.discard(u)
                    self._reject(u, f"{stage}: fewer than {self.plan.threshold} live holders for its shares")
                    changed = True
        if len(alive) < self.min_clients:
            raise SecAggAbort(
                f"secure aggregation round {self.round_id!r}: {len(alive)} clients left after {stage}, "
                f"fewer than min_clients={self.min_clients}"
            )
        return alive

    # -- stages

    def setup(self) -> dict[int, SecAggSetup]:
        self._enter(STAGE_SETUP)
        p = self.plan
        self.neighbours = neighbour_graph(p.num_clients, p.neighbourhood)
        out = {
            i: SecAggSetup(
                round_id=self.round_id,
                client_index=i,
                num_clients=p.num_clients,
                neighbours=sorted(self.neighbours[i]),
                threshold=p.threshold,
                modulus_bits=p.modulus_bits,
                quant_bits=p.quant_bits,
                clip_range=p.clip_range,
                vector_length=p.vector_length,
                require_signatures=p.require_signatures,
            )
            for i in range(1, p.num_clients + 1)
        }
        self._asked = set(out)
        self._stage = STAGE_KEYS
        return out

    def receive_keys(self, replies: dict[int, KeyAdvertisement]) -> dict[int, KeyBundle]:
        self._enter(STAGE_KEYS)
        good: dict[int, KeyAdvertisement] = {}
        for idx, adv in self._accept(replies, KeyAdvertisement).items():
            if len(adv.encryption_public_key) != sc.KEY_BYTES or len(adv.mask_public_key) != sc.KEY_BYTES:
                self._reject(idx, "keys: a public key is not 32 bytes")
            elif adv.encryption_public_key == adv.mask_public_key:
                self._reject(idx, "keys: the same key for encryption and masks")
            elif self.plan.require_signatures and not self._signed(idx, adv):
                self._reject(idx, "keys: missing or invalid signature")
            else:
                good[idx] = adv
        seen: dict[bytes, list[int]] = {}
        for idx, adv in good.items():
            for key in (adv.encryption_public_key, adv.mask_public_key):
                seen.setdefault(key, []).append(idx)
        for owners in seen.values():
            if len(owners) > 1:  # a copied key would let its copier read shares meant for the original
                for idx in owners:
                    self._reject(idx, "keys: public key advertised by more than one client")
                    good.pop(idx, None)
        alive = self._prune(set(good), "keys")
        self._adverts = {i: good[i] for i in alive}
        self._asked = alive
        self._stage = STAGE_SHARES
        return {u: KeyBundle(neighbours=[self._adverts[v] for v in sorted(self.neighbours[u] & alive)]) for u in alive}

    def _signed(self, idx: int, adv: KeyAdvertisement) -> bool:
        key = (self.verify_keys or {}).get(idx)
        if key is None or not adv.signature:
            return False
        msg = sc.advertisement_bytes(self.round_id, idx, adv.encryption_public_key, adv.mask_public_key)
        return sc.verify(key, msg, adv.signature)

    def receive_shares(self, replies: dict[int, ShareKeys]) -> dict[int, ShareBundle]:
        self._enter(STAGE_SHARES)
        u1 = set(self._adverts)
        good: dict[int, dict[int, EncryptedShare]] = {}
        for u, msg in self._accept(replies, ShareKeys).items():
            expected = self.neighbours[u] & u1
            by_receiver: dict[int, EncryptedShare] = {}
            why = None
            for share in msg.shares:
                if share.sender != u:
                    why = f"shares: a share names sender {share.sender}"
                elif share.receiver not in expected:
                    why = f"shares: a share for {share.receiver}, not a live neighbour"
                elif share.receiver in by_receiver:
                    why = f"shares: two shares for {share.receiver}"
                elif not sc.NONCE_BYTES + 16 < len(share.ciphertext) <= _MAX_CIPHERTEXT:
                    why = f"shares: a ciphertext of {len(share.ciphertext)} bytes"
                if why:
                    break
                by_receiver[share.receiver] = share
            if why is None and set(by_receiver) != expected:
                why = f"shares: no share for {sorted(expected - set(by_receiver))}"
            if why:
                self._reject(u, why)
            else:
                good[u] = by_receiver
        alive = self._prune(set(good), "shares")
        self._u2 = alive
        self._asked = alive
        self._stage = STAGE_MASKED
        return {v: ShareBundle(shares=[good[u][v] for u in sorted(self.neighbours[v] & alive)]) for v in sorted(alive)}

    def receive_masked(self, replies: dict[int, MaskedInput]) -> dict[int, UnmaskRequest]:
        self._enter(STAGE_MASKED)
        length = self.plan.vector_length
        good: dict[int, np.ndarray] = {}
        for u, msg in self._accept(replies, MaskedInput).items():
            if len(msg.masked) != 4 * length:
                self._reject(u, f"masked: {len(msg.masked)} bytes, expected {4 * length}")
            else:
                good[u] = np.frombuffer(msg.masked, dtype="<u4")
        u3 = set(good)
        if len(u3) < self.min_clients:
            raise SecAggAbort(
                f"secure aggregation round {self.round_id!r}: {len(u3)} masked inputs, "
                f"fewer than min_clients={self.min_clients}"
            )
        dropped = self._u2 - u3
        t = self.plan.threshold
        short = [u for u in u3 if self._holders(u, u3) < t]
        short += [u for u in dropped if len(self.neighbours[u] & u3) < t]
        if short:
            raise SecAggAbort(
                f"secure aggregation round {self.round_id!r}: clients {sorted(short)} have fewer than "
                f"{t} live holders of their shares; their masks cannot be removed"
            )
        total = np.zeros(length, dtype=np.uint32)
        for vec in good.values():
            total += vec  # uint32 wraps: the sum is mod 2^32 as the masks require
        self._masked_sum = total
        self._u3 = u3
        self._requests = {
            v: UnmaskRequest(
                self_mask_owners=sorted((self.neighbours[v] | {v}) & u3),
                key_owners=sorted(self.neighbours[v] & dropped),
            )
            for v in sorted(u3)
        }
        self._asked = set(u3)
        self._stage = STAGE_UNMASK
        return dict(self._requests)

    def receive_unmask(self, replies: dict[int, UnmaskResponse]) -> tuple[np.ndarray, list[int]]:
        self._enter(STAGE_UNMASK)
        b_shares: dict[int, dict[int, bytes]] = {}
        s_shares: dict[int, dict[int, bytes]] = {}
        for v, msg in self._accept(replies, UnmaskResponse).items():
            req = self._requests[v]
            parsed = self._parse_unmask(v, msg, req)
            if parsed is None:
                continue
            for owner, share in parsed[0].items():
                b_shares.setdefault(owner, {})[v] = share
            for owner, share in parsed[1].items():
                s_shares.setdefault(owner, {})[v] = share
        t, length, u3 = self.plan.threshold, self.plan.vector_length, self._u3
        dropped = sorted(self._u2 - u3)
        missing = [u for u in u3 if len(b_shares.get(u, {})) < t]
        missing += [u for u in dropped if len(s_shares.get(u, {})) < t]
        if missing:
            raise SecAggAbort(
                f"secure aggregation round {self.round_id!r}: fewer than {t} shares arrived for the secrets "
                f"of clients {sorted(missing)}"
            )
        self_seeds = [sc.shamir_combine(b_shares[u], t) for u in sorted(u3)]
        plus, minus = [], []  # v added +PRG(s_uv) when v < u, −PRG when v > u
        for u in dropped:
            raw = sc.shamir_combine(s_shares[u], t)
            sk = sc.private_from_bytes(raw)
            if sk.public_key().public_bytes_raw() != self._adverts[u].mask_public_key:
                raise SecAggAbort(
                    f"secure aggregation round {self.round_id!r}: the shares of client {u}'s mask key do not "
                    "match its advertised key (a client sent a wrong share)"
                )
            for v in sorted(self.neighbours[u] & u3):
                seed = sc.agree(sk, self._adverts[v].mask_public_key, purpose="mask", round_id=self.round_id, a=u, b=v)
                (plus if v < u else minus).append(seed)
        total = self._masked_sum - sc.expand_sum(self_seeds, length, pairwise=False)
        if plus:
            total -= sc.expand_sum(plus, length, pairwise=True)
        if minus:
            total += sc.expand_sum(minus, length, pairwise=True)
        survivors = sorted(u3)
        self.quantised_sum = total
        result = sc.dequantise_sum(total, self.plan.clip_range, self.plan.quant_bits, len(survivors))
        self.result = (result, survivors)
        self._masked_sum = None
        self._asked = set()
        self._stage = STAGE_DONE
        return self.result

    def _parse_unmask(self, v: int, msg: UnmaskResponse, req: UnmaskRequest):
        """({owner: b share}, {owner: s share}) when the response answers exactly the request, else None."""
        out = []
        for got, want, name in (
            (msg.self_mask_shares, req.self_mask_owners, "self-mask"),
            (msg.key_shares, req.key_owners, "key"),
        ):
            shares = {}
            for rs in got:
                if rs.owner in shares:
                    self._reject(v, f"unmask: two {name} shares for {rs.owner}")
                    return None
                try:
                    sc.share_from_bytes(rs.share)
                except sc.CryptoError as exc:
                    self._reject(v, f"unmask: {name} share for {rs.owner}: {exc}")
                    return None
                shares[rs.owner] = rs.share
            if set(shares) != set(want):
                self._reject(v, f"unmask: {name} shares for {sorted(shares)}, asked {sorted(want)}")
                return None
            out.append(shares)
        return out[0], out[1]

    def step(self, stage: int, replies: dict[int, SecAggMessage]) -> dict[int, SecAggMessage]:
        """Transport-facing dispatcher: stage 0 = setup (no replies), 1..4 = the replies to stage 0..3."""
        if stage == STAGE_SETUP:
            if replies:
                raise SecAggAbort("stage 0 (setup) takes no replies")
            return {i: SecAggMessage(setup=m) for i, m in self.setup().items()}
        table = {
            STAGE_KEYS: ("key_advertisement", self.receive_keys, "key_bundle"),
            STAGE_SHARES: ("share_keys", self.receive_shares, "share_bundle"),
            STAGE_MASKED: ("masked_input", self.receive_masked, "unmask_request"),
            STAGE_UNMASK: ("unmask_response", self.receive_unmask, None),
        }
        if stage not in table:
            raise SecAggAbort(f"unknown secure aggregation stage {stage}")
        self._enter(stage)
        field, method, out_field = table[stage]
        bodies = {}
        for idx, msg in replies.items():
            if not isinstance(msg, SecAggMessage) or msg.WhichOneof("body") != field:
                self._reject(idx, f"stage {stage}: expected a {field} message")
            else:
                bodies[idx] = getattr(msg, field)
        out = method(bodies)
        if out_field is None:
            return {}
        return {i: SecAggMessage(**{out_field: m}) for i, m in out.items()}


# ---------------------------------------------------------------------------------------------------- client


class SecAggClient:
    """One client's side. Holds its secrets for one round only and refuses any request that would reveal both
    secrets of a peer, that concerns a non-neighbour, or that comes out of order."""

    def __init__(
        self,
        setup: SecAggSetup,
        vector: np.ndarray,
        *,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
        peer_keys: dict[int, ec.EllipticCurvePublicKey] | None = None,
    ) -> None:
        """`peer_keys` (optional): the identity keys of the neighbours, to check their signatures as well."""
        n, me = setup.num_clients, setup.client_index
        neighbours = set(setup.neighbours)
        if not setup.round_id:
            raise SecAggRefused("setup without a round id")
        if not 1 <= me <= n or me in neighbours or len(neighbours) != len(setup.neighbours):
            raise SecAggRefused(f"setup: bad client index {me} or neighbour list")
        if any(not 1 <= v <= n for v in neighbours):
            raise SecAggRefused("setup: a neighbour index outside 1..num_clients")
        k = len(neighbours)
        if not (2 * setup.threshold > k + 1 and setup.threshold <= k + 1):
            raise SecAggRefused(f"setup: threshold {setup.threshold} is not a strict majority of {k + 1} holders")
        if setup.modulus_bits != sc.MODULUS_BITS:
            raise SecAggRefused(f"setup: modulus_bits {setup.modulus_bits}; this client supports {sc.MODULUS_BITS}")
        if not 2 <= setup.quant_bits <= sc.quant_bits_for(n):
            raise SecAggRefused(f"setup: quant_bits {setup.quant_bits} lets the sum of {n} inputs overflow")
        if not (setup.clip_range > 0 and math.isfinite(setup.clip_range)):
            raise SecAggRefused("setup: clip_range must be positive and finite")
        vec = np.asarray(vector)
        if vec.ndim != 1 or vec.shape[0] != setup.vector_length:
            raise SecAggRefused(f"vector of shape {vec.shape}, expected ({setup.vector_length},)")
        if not np.all(np.isfinite(vec)):
            raise SecAggRefused("vector holds NaN or infinite values")
        if setup.require_signatures and signing_key is None:
            raise SecAggRefused("the round requires signed keys and no signing key was given")
        self.setup = setup
        self.index = me
        self.neighbours = frozenset(neighbours)
        self._vector = vec.astype(np.float32, copy=False)
        self._signing_key = signing_key
        self._peer_keys = peer_keys
        self._stage = STAGE_SETUP
        self.quantised: np.ndarray | None = None
        self._peers: dict[int, KeyAdvertisement] = {}
        self._senders: set[int] = set()
        self._b_shares: dict[int, bytes] = {}
        self._s_shares: dict[int, bytes] = {}

    def _enter(self, stage: int, name: str) -> None:
        if self._stage != stage:
            raise SecAggRefused(f"client {self.index}: {name} out of order (stage {self._stage}, asked {stage})")
        self._stage = stage + 1  # set before the work: a failed stage cannot be retried with other inputs

    def advertise(self) -> KeyAdvertisement:
        self._enter(STAGE_SETUP, "advertise")
        self._enc_sk, enc_pk = sc.new_keypair()
        self._mask_sk, mask_pk = sc.new_keypair()
        sig = b""
        if self._signing_key is not None:
            sig = sc.sign(self._signing_key, sc.advertisement_bytes(self.setup.round_id, self.index, enc_pk, mask_pk))
        self._own = KeyAdvertisement(
            client_index=self.index, encryption_public_key=enc_pk, mask_public_key=mask_pk, signature=sig
        )
        return self._own

    def share_keys(self, bundle: KeyBundle) -> ShareKeys:
        self._enter(STAGE_KEYS, "share_keys")
        rid, t = self.setup.round_id, self.setup.threshold
        peers: dict[int, KeyAdvertisement] = {}
        keys = {self._own.encryption_public_key, self._own.mask_public_key}
        for adv in bundle.neighbours:
            v = adv.client_index
            if v not in self.neighbours or v in peers:
                raise SecAggRefused(f"client {self.index}: key bundle lists {v}, not a (single) neighbour")
            if len(adv.encryption_public_key) != sc.KEY_BYTES or len(adv.mask_public_key) != sc.KEY_BYTES:
                raise SecAggRefused(f"client {self.index}: neighbour {v}'s keys are not 32 bytes")
            if {
                adv.encryption_public_key,
                adv.mask_public_key,
            } & keys or adv.encryption_public_key == adv.mask_public_key:
                raise SecAggRefused(f"client {self.index}: neighbour {v} reuses a public key")
            keys |= {adv.encryption_public_key, adv.mask_public_key}
            if self._peer_keys is not None:
                msg = sc.advertisement_bytes(rid, v, adv.encryption_public_key, adv.mask_public_key)
                if v not in self._peer_keys or not sc.verify(self._peer_keys[v], msg, adv.signature):
                    raise SecAggRefused(f"client {self.index}: neighbour {v}'s keys are not signed by its identity")
            peers[v] = adv
        if len(peers) + 1 < t:
            raise SecAggRefused(f"client {self.index}: {len(peers)} neighbours left, its secrets need {t} holders")
        self._peers = peers
        self._b = secrets.token_bytes(sc.SECRET_BYTES)
        holders = [*sorted(peers), self.index]
        b_sh = sc.shamir_split(self._b, t, holders)
        s_sh = sc.shamir_split(sc.private_bytes(self._mask_sk), t, holders)
        self._b_shares[self.index] = b_sh[self.index]
        self._s_shares[self.index] = s_sh[self.index]
        out = []
        for v, adv in sorted(peers.items()):
            key = sc.agree(self._enc_sk, adv.encryption_public_key, purpose="share", round_id=rid, a=self.index, b=v)
            plain = SharePlaintext(sender=self.index, receiver=v, self_mask_share=b_sh[v], key_share=s_sh[v])
            ct = sc.encrypt(key, plain.SerializeToString(), round_id=rid, sender=self.index, receiver=v)
            out.append(EncryptedShare(sender=self.index, receiver=v, ciphertext=ct))
        return ShareKeys(client_index=self.index, shares=out)

    def masked_input(self, bundle: ShareBundle) -> MaskedInput:
        self._enter(STAGE_SHARES, "masked_input")
        rid, me = self.setup.round_id, self.index
        for es in bundle.shares:
            u = es.sender
            if u not in self._peers or u in self._senders or es.receiver != me:
                raise SecAggRefused(f"client {me}: share from {u} to {es.receiver} is not expected")
            key = sc.agree(self._enc_sk, self._peers[u].encryption_public_key, purpose="share", round_id=rid, a=me, b=u)
            try:
                plain = SharePlaintext.FromString(sc.decrypt(key, es.ciphertext, round_id=rid, sender=u, receiver=me))
                if plain.sender != u or plain.receiver != me:
                    raise sc.CryptoError(f"share from {u} names {plain.sender} -> {plain.receiver}")
                sc.share_from_bytes(plain.self_mask_share)
                sc.share_from_bytes(plain.key_share)
            except (sc.CryptoError, DecodeError) as exc:
                raise SecAggRefused(f"client {me}: share from {u}: {exc}") from exc
            self._senders.add(u)
            self._b_shares[u] = plain.self_mask_share
            self._s_shares[u] = plain.key_share
        if len(self._senders) + 1 < self.setup.threshold:
            raise SecAggRefused(f"client {me}: shares from {len(self._senders)} neighbours, fewer than the threshold")
        length = self.setup.vector_length
        self.quantised = sc.quantise(self._vector, self.setup.clip_range, self.setup.quant_bits)
        plus, minus = [], []
        for u in sorted(self._senders):
            seed = sc.agree(self._mask_sk, self._peers[u].mask_public_key, purpose="mask", round_id=rid, a=me, b=u)
            (plus if me < u else minus).append(seed)
        masked = self.quantised + sc.expand(self._b, length, pairwise=False)
        if plus:
            masked += sc.expand_sum(plus, length, pairwise=True)
        if minus:
            masked -= sc.expand_sum(minus, length, pairwise=True)
        self._vector = None  # the input is not needed any more
        return MaskedInput(client_index=me, masked=masked.astype("<u4").tobytes())

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        self._enter(STAGE_MASKED, "unmask")
        me = self.index
        alive, dead = list(request.self_mask_owners), list(request.key_owners)
        if len(set(alive)) != len(alive) or len(set(dead)) != len(dead):
            raise SecAggRefused(f"client {me}: unmask request repeats an owner")
        both = set(alive) & set(dead)
        if both:
            raise SecAggRefused(f"client {me}: refuses to reveal both secrets of {sorted(both)}")
        if me in dead:
            raise SecAggRefused(f"client {me}: its own masked input was used; it will not reveal its mask key")
        strangers = (set(alive) | set(dead)) - self.neighbours - {me}
        if strangers:
            raise SecAggRefused(f"client {me}: unmask request about non-neighbours {sorted(strangers)}")
        unknown = (set(alive) | set(dead)) - self._senders - {me}
        if unknown:
            raise SecAggRefused(f"client {me}: holds no shares of {sorted(unknown)}")
        if len(set(alive) | {me}) < self.setup.threshold:
            # Bell et al.: with fewer live neighbours than the threshold the server could be isolating one input.
            raise SecAggRefused(f"client {me}: only {len(set(alive) | {me})} live holders, fewer than the threshold")
        return UnmaskResponse(
            client_index=me,
            self_mask_shares=[RevealedShare(owner=u, share=self._b_shares[u]) for u in alive],
            key_shares=[RevealedShare(owner=u, share=self._s_shares[u]) for u in dead],
        )

    def handle(self, message: SecAggMessage) -> SecAggMessage:
        """Transport-facing dispatcher: the server's message for the next stage in, the client's reply out."""
        kind = message.WhichOneof("body")
        if kind == "setup":
            if message.setup != self.setup:
                raise SecAggRefused(f"client {self.index}: a second, different setup for this round")
            return SecAggMessage(key_advertisement=self.advertise())
        if kind == "key_bundle":
            return SecAggMessage(share_keys=self.share_keys(message.key_bundle))
        if kind == "share_bundle":
            return SecAggMessage(masked_input=self.masked_input(message.share_bundle))
        if kind == "unmask_request":
            return SecAggMessage(unmask_response=self.unmask(message.unmask_request))
        raise SecAggRefused(f"client {self.index}: a client does not accept a {kind} message")
