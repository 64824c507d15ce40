"""Secure aggregation against a malicious server: SecAgg+ (Bell et al., CCS 2020) with the signed keys and the
consistency round of Bonawitz et al. (CCS 2017). The protocol, its parameters and its errors.

The state machines are ``server.SecAggServer`` and ``client.SecAggClient``; the cryptography and
the arithmetic are in ``crypto``.

Why this shape: the coordinator relays ``fedprompt.v1`` SecAgg messages inside Flower rounds (or any other relay)
and must never hold a key that opens them, so both sides are plain objects that take the previous stage's
messages and return the next ones. The server learns only the sum of the inputs of the clients whose masked
input arrived; a single masked vector is uniform mod 2^32.

Stages (``SecAggServer.step`` numbers them):

0. setup: the server draws a random sparse neighbour graph (Harary-style ring of degree k ≈ 2·log2 n) and tells
   each client its index, its neighbours and their node names, and the parameters. The client checks them
   against its own policy, draws its self-mask seed b_u and answers with two X25519 public keys (one to encrypt
   shares, one to agree pairwise masks) and a commitment to b_u, all signed with its node identity key.
1. keys: each client gets its surviving neighbours' adverts and verifies every signature against the identity
   key it holds itself for the neighbour's node name (never a key the server supplies); then it answers with
   AES-GCM encrypted Shamir shares of b_u and of its mask private key s_u, one per neighbour.
2. shares: each client gets the shares addressed to it and answers with its quantised input plus PRG(b_u) plus,
   for each neighbour v that shared, ±PRG(agree(s_u, v)) (+ when u < v), all mod 2^32.
3. consistency: the server names the set S of clients whose masked input arrived; every survivor signs
   (round, S) with its identity key.
4. unmask: the server asks each signer, for each neighbour, EITHER the b share (the neighbour is in S) OR the s
   share (it shared keys but is not in S), never both, and hands it the signatures over S. The client reveals
   only if at least ``threshold`` valid signatures of its own neighbourhood cover that one S and the request
   follows from S exactly; then it forgets its secrets.
5. done: with ``threshold`` shares of each needed secret the server removes the self masks of the survivors and
   the pairwise masks towards the dropped, checks every reconstructed secret (b_u against its commitment, s_u
   against its advertised public key, shares beyond the threshold against the polynomial of the others) and the
   range of the sum, and dequantises the exact integer sum.

**Who is protected against whom.** Against a malicious server (and relay) that also controls up to
``colluders`` clients, no honest client's input is learnt, as long as 2·t > k + 1 + colluders for each client's
k neighbours (the default threshold is the least such t): to unmask an honest u's input the server needs t shares
of b_u and t of s_u from the k + 1 holders of u's shares; colluders give both, an honest holder gives one, so the
two sets need 2t − 2·colluders honest holders among k + 1 − colluders. The consistency round makes an honest
client refuse, rather than reveal, when the server shows it a set of survivors that is not the one its
neighbourhood signed. A client refuses a threshold that does not meet its own ``colluders``, a round smaller than
its cohort, a second setup, a request out of order, for both secrets of one peer, or about non-neighbours.

**Integrity against a malicious client** (what the server can check): a share that does not reconstruct the
dealer's committed b_u or advertised s_u, shares that disagree with one another where more than t arrived, and a
sum outside the range the survivors' quantised inputs can produce each abort the round with a clear error, never
a wrong mean. Not detected: a client that sends a well-formed masked input of values inside the quantisation range
but not its real update (the sum moves by at most its own clipped share); use DP on the server side or robust
aggregation for that.

Replies that fail validation drop their sender, as if it had gone offline (``SecAggServer.rejected`` says why);
a stage raises ``SecAggAbort`` when too few remain to finish.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from fedprompt.errors import FedPromptError
from fedprompt.protocols.secagg import crypto as sc

__all__ = [
    "DEFAULT_COLLUDERS",
    "SecAggAbort",
    "SecAggError",
    "SecAggPlan",
    "SecAggRefused",
    "least_threshold",
    "neighbour_graph",
    "plan",
]

STAGE_SETUP, STAGE_KEYS, STAGE_SHARES, STAGE_MASKED, STAGE_CONSISTENCY, STAGE_UNMASK, STAGE_DONE = range(7)
LAST_STAGE = STAGE_UNMASK
MAX_CIPHERTEXT = 1024  # a SharePlaintext is ~150 bytes; anything far larger is not a share
DEFAULT_COLLUDERS = 1  # clients a round tolerates colluding with the server, by default


class SecAggError(FedPromptError):
    """Base of the errors secure aggregation raises on purpose."""


class SecAggAbort(SecAggError):
    """The round cannot finish: too few clients or shares remain, a secret or the sum fails its check, or a stage
    is called out of order. The gRPC layer answers ABORTED; the round is closed."""

    status = "ABORTED"


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

    @property
    def quantisation_step(self) -> float:
        return sc.quantisation_step(self.clip_range, self.quant_bits)


def least_threshold(holders: int, colluders: int) -> int:
    """The least t with 2t > holders + colluders: what keeps a secret safe from a server with ``colluders``."""
    return (holders + colluders) // 2 + 1


def plan(
    num_clients: int,
    vector_length: int,
    clip_range: float,
    *,
    neighbourhood: int | None = None,
    threshold: int | None = None,
    colluders: int = DEFAULT_COLLUDERS,
) -> SecAggPlan:
    """The round's parameters, validated.

    neighbourhood: default 2·ceil(log2 n) (even, so each client has k/2 ring neighbours either side), the full
    graph once that reaches n − 1; Bell et al. show O(log n) neighbours keep the sum private and recoverable
    w.h.p. against a constant fraction of dropouts and corruptions. threshold: default the least t with
    2t > k + 1 + colluders (see the module docstring), capped at k + 1.
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
    if colluders < 0:
        raise ValueError("colluders must be >= 0")
    t = min(least_threshold(k + 1, colluders), k + 1) if threshold is None else int(threshold)
    if not 2 * t > k + 1 or t > k + 1:
        raise ValueError(f"threshold must be a strict majority of the {k + 1} holders: {(k + 1) // 2 + 1}..{k + 1}")
    return SecAggPlan(n, int(vector_length), float(clip_range), k, t, sc.MODULUS_BITS, sc.quant_bits_for(n))


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
