"""A client's side of SecAgg+ against a malicious server (the protocol: ``fedprompt.protocols.secagg.protocol``)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError

from fedprompt.protocols.secagg import crypto as sc
from fedprompt.protocols.secagg.protocol import DEFAULT_COLLUDERS, SecAggRefused
from fedprompt.protocols.secagg_pb2 import (
    ConsistencyCheck,
    ConsistencySignature,
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

# the client's answers, in the order the server's stages ask for them
_ADVERTISE, _SHARE_KEYS, _MASK, _SIGN, _UNMASK = range(5)


@dataclass(frozen=True)
class ClientIdentity:
    """Who the client is and whom it trusts, known before any round from its own files: its node name and
    identity key, and the identity keys of the nodes it accepts as peers (its copy of ``nodes/*/node.pub``)."""

    name: str
    signing_key: ec.EllipticCurvePrivateKey
    roster: dict[str, ec.EllipticCurvePublicKey]
    min_cohort: int = 3  # the fewest clients a round may have
    colluders: int = DEFAULT_COLLUDERS  # clients that may collude with the server, which the threshold must resist


class SecAggClient:
    """One client's side. Holds its secrets for one round only and refuses any request that would reveal both
    secrets of a peer, that concerns a non-neighbour, that does not follow from the survivors its neighbourhood
    signed, or that comes out of order."""

    def __init__(self, setup: SecAggSetup, vector: np.ndarray, identity: ClientIdentity) -> None:
        me, neighbours = setup.client_index, set(setup.neighbours)
        self._peer_keys = check_setup(setup, identity)
        vec = np.asarray(vector)
        if vec.ndim != 1 or vec.shape[0] != setup.vector_length:
            raise SecAggRefused(f"vector of shape {vec.shape}, expected ({setup.vector_length},)")
        if not np.all(np.isfinite(vec)):
            raise SecAggRefused("vector holds NaN or infinite values")
        self.setup = setup
        self.index = me
        self.neighbours = frozenset(neighbours)
        self._vector = vec.astype(np.float32, copy=False)
        self._signing_key = identity.signing_key
        self._stage = _ADVERTISE
        self.quantised: np.ndarray | None = None
        self._peers: dict[int, KeyAdvertisement] = {}
        self._senders: set[int] = set()
        self._b_shares: dict[int, bytes] = {}
        self._s_shares: dict[int, bytes] = {}
        self._survivors: frozenset[int] | None = None

    def _enter(self, stage: int, name: str) -> None:
        if self._stage != stage:
            raise SecAggRefused(f"client {self.index}: {name} out of order (stage {self._stage}, asked {stage})")
        self._stage = stage + 1  # set before the work: a failed stage cannot be retried with other inputs

    def advertise(self) -> KeyAdvertisement:
        self._enter(_ADVERTISE, "advertise")
        rid = self.setup.round_id
        self._enc_sk, enc_pk = sc.new_keypair()
        self._mask_sk, mask_pk = sc.new_keypair()
        self._b = secrets.token_bytes(sc.SECRET_BYTES)
        commitment = sc.commit_seed(rid, self.index, self._b)
        signed = sc.advertisement_bytes(rid, self.index, enc_pk, mask_pk, commitment)
        self._own = KeyAdvertisement(
            client_index=self.index,
            encryption_public_key=enc_pk,
            mask_public_key=mask_pk,
            signature=sc.sign(self._signing_key, signed),
            self_mask_commitment=commitment,
        )
        return self._own

    def share_keys(self, bundle: KeyBundle) -> ShareKeys:
        self._enter(_SHARE_KEYS, "share_keys")
        rid, t = self.setup.round_id, self.setup.threshold
        peers: dict[int, KeyAdvertisement] = {}
        keys = {self._own.encryption_public_key, self._own.mask_public_key}
        for adv in bundle.neighbours:
            v = adv.client_index
            if v not in self.neighbours or v in peers:
                raise SecAggRefused(f"client {self.index}: key bundle lists {v}, not a (single) neighbour")
            if len(adv.encryption_public_key) != sc.KEY_BYTES or len(adv.mask_public_key) != sc.KEY_BYTES:
                raise SecAggRefused(f"client {self.index}: neighbour {v}'s keys are not 32 bytes")
            if {adv.encryption_public_key, adv.mask_public_key} & keys or (
                adv.encryption_public_key == adv.mask_public_key
            ):
                raise SecAggRefused(f"client {self.index}: neighbour {v} reuses a public key")
            keys |= {adv.encryption_public_key, adv.mask_public_key}
            msg = sc.advertisement_bytes(
                rid, v, adv.encryption_public_key, adv.mask_public_key, adv.self_mask_commitment
            )
            if not sc.verify(self._peer_keys[v], msg, adv.signature):
                raise SecAggRefused(f"client {self.index}: neighbour {v}'s keys are not signed by its identity")
            peers[v] = adv
        if len(peers) + 1 < t:
            raise SecAggRefused(f"client {self.index}: {len(peers)} neighbours left, its secrets need {t} holders")
        self._peers = peers
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
        self._enter(_MASK, "masked_input")
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

    def sign_survivors(self, check: ConsistencyCheck) -> ConsistencySignature:
        """Sign the one set of survivors this client accepts for the round; a second set is never signed."""
        self._enter(_SIGN, "sign_survivors")
        me, t = self.index, self.setup.threshold
        survivors = list(check.survivors)
        if len(set(survivors)) != len(survivors) or any(not 1 <= u <= self.setup.num_clients for u in survivors):
            raise SecAggRefused(f"client {me}: the survivors repeat a client or name one outside the round")
        members = frozenset(survivors)
        if me not in members:
            raise SecAggRefused(f"client {me}: its masked input was sent but it is not among the survivors")
        if len(members) < self.setup.threshold or len(members) < 2:
            raise SecAggRefused(f"client {me}: {len(members)} survivors, fewer than the threshold")
        if len((self.neighbours | {me}) & members) < t:
            # Bell et al.: with fewer live neighbours than the threshold the server could be isolating one input
            raise SecAggRefused(f"client {me}: only {len((self.neighbours | {me}) & members)} live holders of t = {t}")
        self._survivors = members
        signature = sc.sign(self._signing_key, sc.consistency_bytes(self.setup.round_id, sorted(members)))
        return ConsistencySignature(client_index=me, signature=signature)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        self._enter(_UNMASK, "unmask")
        me, t, survivors = self.index, self.setup.threshold, self._survivors
        assert survivors is not None
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
        # the request must follow from the one set of survivors this client signed: b shares for exactly the
        # neighbours in it, s shares only for neighbours outside it
        if set(alive) != ((self.neighbours | {me}) & survivors & (self._senders | {me})) or set(dead) & survivors:
            raise SecAggRefused(f"client {me}: the unmask request does not follow from the survivors it signed")
        signed = self._valid_signatures(request)
        if len(signed) < t:
            raise SecAggRefused(
                f"client {me}: {len(signed)} valid signatures of its neighbourhood over the survivors, fewer than {t}"
            )
        response = UnmaskResponse(
            client_index=me,
            self_mask_shares=[RevealedShare(owner=u, share=self._b_shares[u]) for u in alive],
            key_shares=[RevealedShare(owner=u, share=self._s_shares[u]) for u in dead],
        )
        self._forget()
        return response

    def _valid_signatures(self, request: UnmaskRequest) -> set[int]:
        """The signers of (N(me) ∪ {me}) ∩ survivors whose signature over the survivors verifies."""
        assert self._survivors is not None
        message = sc.consistency_bytes(self.setup.round_id, sorted(self._survivors))
        eligible = (self.neighbours | {self.index}) & self._survivors
        valid = set()
        for s in request.signatures:
            if s.signer in valid or s.signer not in eligible:
                continue
            if sc.verify(self._peer_keys[s.signer], message, s.signature):
                valid.add(s.signer)
        return valid

    def _forget(self) -> None:
        """Drop every secret of the round: nothing more is ever revealed (the stage counter is past the end)."""
        self._b = b""
        self._enc_sk = self._mask_sk = None
        self._b_shares.clear()
        self._s_shares.clear()

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
        if kind == "consistency_check":
            return SecAggMessage(consistency_signature=self.sign_survivors(message.consistency_check))
        if kind == "unmask_request":
            return SecAggMessage(unmask_response=self.unmask(message.unmask_request))
        raise SecAggRefused(f"client {self.index}: a client does not accept a {kind} message")


def check_setup(setup: SecAggSetup, identity: ClientIdentity) -> dict[int, object]:
    """Refuse a setup this client would not run (before it trains anything for the round); returns the identity
    key of the client and of each neighbour, by index, from the client's own roster."""
    n, me = setup.num_clients, setup.client_index
    neighbours = set(setup.neighbours)
    if not setup.round_id:
        raise SecAggRefused("setup without a round id")
    if not 1 <= me <= n or me in neighbours or len(neighbours) != len(setup.neighbours):
        raise SecAggRefused(f"setup: bad client index {me} or neighbour list")
    if any(not 1 <= v <= n for v in neighbours):
        raise SecAggRefused("setup: a neighbour index outside 1..num_clients")
    if n < identity.min_cohort:
        raise SecAggRefused(f"setup: a round of {n} clients; this client needs at least {identity.min_cohort}")
    k, t = len(neighbours), setup.threshold
    if not (2 * t > k + 1 + identity.colluders and t <= k + 1):
        raise SecAggRefused(
            f"setup: threshold {t} of {k + 1} holders does not resist {identity.colluders} colluding client(s) "
            f"(needs 2t > {k + 1 + identity.colluders})"
        )
    if setup.modulus_bits != sc.MODULUS_BITS:
        raise SecAggRefused(f"setup: modulus_bits {setup.modulus_bits}; this client supports {sc.MODULUS_BITS}")
    if not 2 <= setup.quant_bits <= sc.quant_bits_for(n):
        raise SecAggRefused(f"setup: quant_bits {setup.quant_bits} lets the sum of {n} inputs overflow")
    if not (setup.clip_range > 0 and math.isfinite(setup.clip_range)):
        raise SecAggRefused("setup: clip_range must be positive and finite")
    return _peer_keys(setup, identity, me, neighbours)


def _peer_keys(setup: SecAggSetup, identity: ClientIdentity, me: int, neighbours: set[int]) -> dict[int, object]:
    """The identity key of this client and of each neighbour, by index, from the client's own roster."""
    names = dict(setup.node_names)
    if names.get(me) != identity.name:
        raise SecAggRefused(f"setup: index {me} is named {names.get(me)!r}, this client is {identity.name!r}")
    keys = {me: identity.signing_key.public_key()}
    seen = {identity.name}
    for v in sorted(neighbours):
        name = names.get(v)
        if name is None or name in seen:
            raise SecAggRefused(f"setup: neighbour {v} has no node name, or one already used ({name!r})")
        if name not in identity.roster:
            raise SecAggRefused(f"setup: neighbour {v} is {name!r}, not a node this client knows")
        seen.add(name)
        keys[v] = identity.roster[name]
    return keys
