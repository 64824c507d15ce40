"""The last stage of SecAgg+ on the server: the secrets the survivors revealed turned back into the sum of the
clients' inputs (``server.py`` collects the shares; every check here aborts the round rather than end in a wrong
mean)."""

from __future__ import annotations

import numpy as np

from fedprompt.protocols.secagg import crypto as sc
from fedprompt.protocols.secagg.protocol import SecAggAbort


def unmasked_sum(
    round_id: str,
    plan,
    masked_sum: np.ndarray,
    u3: set[int],
    dropped: list[int],
    b_shares: dict[int, dict[int, bytes]],
    s_shares: dict[int, dict[int, bytes]],
    adverts: dict,
    neighbours: dict[int, set[int]],
) -> np.ndarray:
    """The quantised sum of the inputs of the clients ``u3`` that sent one: their self masks removed (each seed
    reconstructed and checked against its commitment) and the pairwise masks of the ``dropped`` clients with
    their surviving neighbours removed (each mask key reconstructed and checked against its advertised key)."""
    self_seeds = []
    for u in sorted(u3):
        seed = reconstruct(round_id, plan, u, b_shares[u], "self-mask seed")
        if sc.commit_seed(round_id, u, seed) != adverts[u].self_mask_commitment:
            raise SecAggAbort(
                f"secure aggregation round {round_id!r}: the shares of client {u}'s self-mask seed do not "
                "reconstruct the seed it committed to (a client sent a wrong share)"
            )
        self_seeds.append(seed)
    plus, minus = [], []  # v added +PRG(s_uv) when v < u, −PRG when v > u
    for u in dropped:
        sk = sc.private_from_bytes(reconstruct(round_id, plan, u, s_shares[u], "mask key"))
        if sk.public_key().public_bytes_raw() != adverts[u].mask_public_key:
            raise SecAggAbort(
                f"secure aggregation round {round_id!r}: the shares of client {u}'s mask key do not "
                "match its advertised key (a client sent a wrong share)"
            )
        for v in sorted(neighbours[u] & u3):
            seed = sc.agree(sk, adverts[v].mask_public_key, purpose="mask", round_id=round_id, a=u, b=v)
            (plus if v < u else minus).append(seed)
    length = plan.vector_length
    total = masked_sum - sc.expand_sum(self_seeds, length, pairwise=False)
    if plus:
        total -= sc.expand_sum(plus, length, pairwise=True)
    if minus:
        total += sc.expand_sum(minus, length, pairwise=True)
    return total


def check_range(round_id: str, plan, total: np.ndarray, count: int) -> None:
    """``count`` quantised inputs sum to at most count · (2^q − 1) per value: a sum beyond that is a wrong
    masked input or a wrong mask (garbage unmasks to uniform words, almost all of them out of range)."""
    if int(total.max()) > count * ((1 << plan.quant_bits) - 1):
        raise SecAggAbort(
            f"secure aggregation round {round_id!r}: the unmasked sum leaves the range {count} "
            "quantised inputs can reach (a client sent a malformed masked input or share)"
        )


def reconstruct(round_id: str, plan, owner: int, shares: dict[int, bytes], what: str) -> bytes:
    """One secret from its shares; shares that disagree with one another (more than t arrived) abort the
    round, naming who revealed the odd share when that can be told (t + 2 shares or more)."""
    try:
        return sc.shamir_combine(shares, plan.threshold)
    except sc.InconsistentShares as exc:
        odd = sc.odd_share_out(shares, plan.threshold)
        who = f"client {odd} revealed a wrong share" if odd is not None else "a client sent a wrong share"
        raise SecAggAbort(
            f"secure aggregation round {round_id!r}: the shares of client {owner}'s {what} disagree ({who})"
        ) from exc
    except sc.CryptoError as exc:
        raise SecAggAbort(f"secure aggregation round {round_id!r}: client {owner}'s {what}: {exc}") from exc


def parse_response(round_id: str, v: int, msg, req) -> tuple[dict[int, bytes], dict[int, bytes]] | str:
    """({owner: self-mask share}, {owner: mask-key share}) of client ``v``'s response when it answers exactly the
    request, else why not (the client is dropped); a share that is not a share at all aborts the round (a
    malicious client, not a crashed one)."""
    out = []
    for got, want, name in (
        (msg.self_mask_shares, req.self_mask_owners, "self-mask"),
        (msg.key_shares, req.key_owners, "key"),
    ):
        shares = {}
        for rs in got:
            if rs.owner in shares:
                return f"unmask: two {name} shares for {rs.owner}"
            try:
                sc.share_from_bytes(rs.share)
            except sc.CryptoError as exc:
                raise SecAggAbort(
                    f"secure aggregation round {round_id!r}: client {v} revealed a {name} share for "
                    f"{rs.owner} that is not a share ({exc})"
                ) from exc
            shares[rs.owner] = rs.share
        if set(shares) != set(want):
            return f"unmask: {name} shares for {sorted(shares)}, asked {sorted(want)}"
        out.append(shares)
    return out[0], out[1]
