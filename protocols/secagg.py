"""Secure aggregation after SecAgg+ (Bell et al., CCS 2020): the protocol, its parameters and its errors.

The state machines are ``secagg_server.SecAggServer`` and ``secagg_client.SecAggClient``; the cryptography and
the arithmetic are ``secagg_crypto``.

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

from fedprompt.errors import FedPromptError
from fedprompt.protocols import secagg_crypto as sc
from fedprompt.server.records import Conflict

__all__ = [
    "SecAggAbort",
    "SecAggError",
    "SecAggPlan",
    "SecAggRefused",
    "neighbour_graph",
    "plan",
]

STAGE_SETUP, STAGE_KEYS, STAGE_SHARES, STAGE_MASKED, STAGE_UNMASK, STAGE_DONE = range(6)
MAX_CIPHERTEXT = 1024  # a SharePlaintext is ~150 bytes; anything far larger is not a share


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
