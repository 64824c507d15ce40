"""The aggregation server's side of SecAgg+ against a malicious server (the protocol:
``fedprompt.protocols.secagg.protocol``).

The server is the party the protocol does not trust; what it checks here is the clients: signatures, shapes,
shares against commitments, the range of the sum. Every failure of a client's material either drops that client
(while the round can still finish) or aborts the round with :class:`SecAggAbort`; nothing ends as a wrong mean.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from fedprompt.protocols.secagg import crypto as sc
from fedprompt.protocols.secagg import unmask
from fedprompt.protocols.secagg.protocol import (
    DEFAULT_COLLUDERS,
    MAX_CIPHERTEXT,
    STAGE_CONSISTENCY,
    STAGE_DONE,
    STAGE_KEYS,
    STAGE_MASKED,
    STAGE_SETUP,
    STAGE_SHARES,
    STAGE_UNMASK,
    SecAggAbort,
    neighbour_graph,
    plan,
)
from fedprompt.protocols.secagg_pb2 import (
    ConsistencyCheck,
    ConsistencySignature,
    EncryptedShare,
    KeyAdvertisement,
    KeyBundle,
    MaskedInput,
    SecAggMessage,
    SecAggSetup,
    ShareBundle,
    ShareKeys,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)

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
        identities: dict[int, tuple[str, ec.EllipticCurvePublicKey]],
        neighbourhood: int | None = None,
        threshold: int | None = None,
        colluders: int = DEFAULT_COLLUDERS,
    ) -> None:
        """``identities``: for each client index, its node name and identity key (the registered node keys)."""
        if not round_id:
            raise ValueError("round_id must be non-empty: keys and ciphertexts are bound to it")
        self.round_id = str(round_id)
        self.plan = plan(
            num_clients,
            vector_length,
            clip_range,
            neighbourhood=neighbourhood,
            threshold=threshold,
            colluders=colluders,
        )
        if not 2 <= min_clients <= num_clients:
            raise ValueError(f"min_clients must be in 2..{num_clients} (one survivor's sum is its input)")
        if set(identities) != set(range(1, num_clients + 1)):
            raise ValueError("every client index needs a node name and identity key")
        if len({name for name, _ in identities.values()}) != num_clients:
            raise ValueError("two clients share a node name")
        self.min_clients = int(min_clients)
        self.names = {i: name for i, (name, _) in identities.items()}
        self.verify_keys = {i: key for i, (_, key) in identities.items()}
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
        self._signatures: dict[int, bytes] = {}
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
                require_signatures=True,
                node_names={j: self.names[j] for j in self.neighbours[i] | {i}},
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
            elif len(adv.self_mask_commitment) != 32:
                self._reject(idx, "keys: no commitment to the self-mask seed")
            elif not self._signed(idx, adv):
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
        if not adv.signature:
            return False
        msg = sc.advertisement_bytes(
            self.round_id, idx, adv.encryption_public_key, adv.mask_public_key, adv.self_mask_commitment
        )
        return sc.verify(self.verify_keys[idx], msg, adv.signature)

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
                elif not sc.NONCE_BYTES + 16 < len(share.ciphertext) <= MAX_CIPHERTEXT:
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

    def receive_masked(self, replies: dict[int, MaskedInput]) -> dict[int, ConsistencyCheck]:
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
        self._check_recoverable(u3, u3, "masked inputs")
        total = np.zeros(length, dtype=np.uint32)
        for vec in good.values():
            total += vec  # uint32 wraps: the sum is mod 2^32 as the masks require
        self._masked_sum = total
        self._u3 = u3
        self._asked = set(u3)
        self._stage = STAGE_CONSISTENCY
        check = ConsistencyCheck(survivors=sorted(u3))
        return {v: check for v in sorted(u3)}

    def _check_recoverable(self, u3: set[int], helpers: set[int], stage: str) -> None:
        """Abort unless every survivor's b_u and every dropped client's s_u still have ``threshold`` holders
        among ``helpers`` (the clients that will be asked to reveal)."""
        t = self.plan.threshold
        short = [u for u in u3 if len((self.neighbours[u] | {u}) & helpers) < t]
        short += [u for u in self._u2 - u3 if len(self.neighbours[u] & helpers) < t]
        if short:
            raise SecAggAbort(
                f"secure aggregation round {self.round_id!r}: after {stage}, clients {sorted(short)} have fewer than "
                f"{t} live holders of their shares; their masks cannot be removed"
            )

    def receive_signatures(self, replies: dict[int, ConsistencySignature]) -> dict[int, UnmaskRequest]:
        """Keep the survivors whose signature over (round, survivors) verifies; each gets its unmask request with
        the signatures of its own neighbourhood, which it checks before it reveals anything."""
        self._enter(STAGE_CONSISTENCY)
        message = sc.consistency_bytes(self.round_id, sorted(self._u3))
        signed: dict[int, bytes] = {}
        for v, msg in self._accept(replies, ConsistencySignature).items():
            if sc.verify(self.verify_keys[v], message, msg.signature):
                signed[v] = msg.signature
            else:
                self._reject(v, "consistency: the signature over the survivors does not verify")
        helpers = set(signed)
        self._check_recoverable(self._u3, helpers, "the consistency round")
        t = self.plan.threshold
        unconvinced = [v for v in helpers if len((self.neighbours[v] | {v}) & helpers) < t]
        if unconvinced:  # they would refuse: fewer than t of their neighbourhood signed
            raise SecAggAbort(
                f"secure aggregation round {self.round_id!r}: clients {sorted(unconvinced)} would see fewer than {t} "
                "signatures of their neighbourhood over the survivors"
            )
        dropped = self._u2 - self._u3
        self._signatures = signed
        self._requests = {
            v: UnmaskRequest(
                self_mask_owners=sorted((self.neighbours[v] | {v}) & self._u3),
                key_owners=sorted(self.neighbours[v] & dropped),
                signatures=[
                    SurvivorSignature(signer=u, signature=signed[u])
                    for u in sorted((self.neighbours[v] | {v}) & helpers)
                ],
            )
            for v in sorted(helpers)
        }
        self._asked = helpers
        self._stage = STAGE_UNMASK
        return dict(self._requests)

    def _signers_of(self, v: int, helpers: set[int]) -> list[int]:
        return sorted((self.neighbours[v] | {v}) & helpers)

    def receive_unmask(self, replies: dict[int, UnmaskResponse]) -> tuple[np.ndarray, list[int]]:
        self._enter(STAGE_UNMASK)
        b_shares: dict[int, dict[int, bytes]] = {}
        s_shares: dict[int, dict[int, bytes]] = {}
        for v, msg in self._accept(replies, UnmaskResponse).items():
            parsed = unmask.parse_response(self.round_id, v, msg, self._requests[v])
            if isinstance(parsed, str):
                self._reject(v, parsed)
                continue
            for owner, share in parsed[0].items():
                b_shares.setdefault(owner, {})[v] = share
            for owner, share in parsed[1].items():
                s_shares.setdefault(owner, {})[v] = share
        t, u3 = self.plan.threshold, self._u3
        dropped = sorted(self._u2 - u3)
        missing = [u for u in u3 if len(b_shares.get(u, {})) < t]
        missing += [u for u in dropped if len(s_shares.get(u, {})) < t]
        if missing:
            raise SecAggAbort(
                f"secure aggregation round {self.round_id!r}: fewer than {t} shares arrived for the secrets "
                f"of clients {sorted(missing)}"
            )
        total = unmask.unmasked_sum(
            self.round_id, self.plan, self._masked_sum, u3, dropped, b_shares, s_shares, self._adverts, self.neighbours
        )
        survivors = sorted(u3)
        unmask.check_range(self.round_id, self.plan, total, len(survivors))
        self.quantised_sum = total
        result = sc.dequantise_sum(total, self.plan.clip_range, self.plan.quant_bits, len(survivors))
        self.result = (result, survivors)
        self._masked_sum = None
        self._asked = set()
        self._stage = STAGE_DONE
        return self.result

    def step(self, stage: int, replies: dict[int, SecAggMessage]) -> dict[int, SecAggMessage]:
        """Transport-facing dispatcher: stage 0 = setup (no replies), 1..4 = the replies to stage 0..3."""
        if stage == STAGE_SETUP:
            if replies:
                raise SecAggAbort("stage 0 (setup) takes no replies")
            return {i: SecAggMessage(setup=m) for i, m in self.setup().items()}
        table = {
            STAGE_KEYS: ("key_advertisement", self.receive_keys, "key_bundle"),
            STAGE_SHARES: ("share_keys", self.receive_shares, "share_bundle"),
            STAGE_MASKED: ("masked_input", self.receive_masked, "consistency_check"),
            STAGE_CONSISTENCY: ("consistency_signature", self.receive_signatures, "unmask_request"),
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
        try:
            out = method(bodies)
        except SecAggAbort:
            raise
        except (sc.CryptoError, ValueError) as exc:  # material a client made to fail (a low-order key, ...)
            raise SecAggAbort(f"secure aggregation round {self.round_id!r}, stage {stage}: {exc}") from exc
        if out_field is None:
            return {}
        return {i: SecAggMessage(**{out_field: m}) for i, m in out.items()}
