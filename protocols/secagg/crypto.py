"""The cryptographic and arithmetic pieces of secure aggregation (``fedprompt.protocols.secagg.protocol``).

Kept apart from the state machines so that each piece can be tested (and reviewed) on its own, and so that the
benchmark can time the same primitives the protocol uses. Every secret comes from the operating system's CSPRNG
(``secrets`` / ``os.urandom``); nothing here touches ``random`` or a seeded numpy generator, because a mask that
can be predicted from a 32-bit seed hides nothing.
"""

from __future__ import annotations

import math
import os
import secrets
import struct

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedprompt.errors import FedPromptError

# Shamir field: the Mersenne prime 2^521 - 1. It exceeds 2^256, so a whole 32-byte seed or X25519 private key is
# one field element and is shared in one piece (no chunking, no padding, no loss of entropy).
PRIME = (1 << 521) - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66: every share has this fixed big-endian width
SECRET_BYTES = 32
KEY_BYTES = 32
NONCE_BYTES = 12
MODULUS_BITS = 32

# Domain separation: a key derived for one purpose can never be mistaken for one derived for another.
_INFO_SHARE = b"fedprompt/secagg/v1/share-encryption"
_INFO_PAIRWISE = b"fedprompt/secagg/v1/pairwise-mask"
_NONCE_SELF = b"\x00" * 8 + b"selfmask"
_NONCE_PAIR = b"\x00" * 8 + b"pairmask"
_SIGNATURE_LABEL = b"fedprompt/secagg/v2/key-advertisement"
_CONSISTENCY_LABEL = b"fedprompt/secagg/v2/survivors"
_COMMITMENT_LABEL = b"fedprompt/secagg/v2/self-mask-commitment"


class CryptoError(FedPromptError, ValueError):
    """Material that fails an integrity check: a ciphertext, signature, share or key that does not verify."""


# --------------------------------------------------------------------------------------------- key agreement


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 pair and the raw 32-byte public key that goes on the wire."""
    sk = X25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes_raw()


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes_raw()


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise CryptoError(f"an X25519 private key has {KEY_BYTES} bytes, not {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def public_from_bytes(raw: bytes) -> X25519PublicKey:
    if len(raw) != KEY_BYTES:
        raise CryptoError(f"an X25519 public key has {KEY_BYTES} bytes, not {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def _pair_info(label: bytes, round_id: str, a: int, b: int) -> bytes:
    """HKDF info binding a key to its purpose, the round and the (unordered) pair, so keys never repeat."""
    lo, hi = min(a, b), max(a, b)
    rid = round_id.encode()
    return label + struct.pack(">I", len(rid)) + rid + struct.pack(">II", lo, hi)


def agree(sk: X25519PrivateKey, peer_public: bytes, *, purpose: str, round_id: str, a: int, b: int) -> bytes:
    """A 32-byte key shared by clients `a` and `b`: X25519 then HKDF-SHA256 with a purpose- and round-bound info.

    `purpose` is "share" (AES-GCM key for the encrypted shares) or "mask" (the seed of a pairwise mask): the two
    come from different X25519 pairs already, and the distinct labels keep them apart even if a key were reused.
    """
    label = {"share": _INFO_SHARE, "mask": _INFO_PAIRWISE}[purpose]
    try:
        shared = sk.exchange(public_from_bytes(peer_public))
    except ValueError:
        raise CryptoError("X25519 agreement failed (a low-order public key)") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_pair_info(label, round_id, a, b)).derive(
        shared
    )


# ------------------------------------------------------------------------------------ authenticated encryption


def _aad(round_id: str, sender: int, receiver: int) -> bytes:
    rid = round_id.encode()
    return b"fedprompt/secagg/v1/share" + struct.pack(">I", len(rid)) + rid + struct.pack(">II", sender, receiver)


def encrypt(key: bytes, plaintext: bytes, *, round_id: str, sender: int, receiver: int) -> bytes:
    """AES-256-GCM with a random nonce in front; the round and direction are authenticated, so a relay cannot
    replay a share into another round or swap sender and receiver."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(round_id, sender, receiver))


def decrypt(key: bytes, blob: bytes, *, round_id: str, sender: int, receiver: int) -> bytes:
    if len(blob) < NONCE_BYTES + 16:
        raise CryptoError("ciphertext shorter than a nonce and a tag")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(round_id, sender, receiver))
    except InvalidTag:
        raise CryptoError(
            f"share from {sender} to {receiver} fails authentication (tampered or misaddressed)"
        ) from None


# ------------------------------------------------------------------------------------------------- signatures


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def advertisement_bytes(
    round_id: str, client_index: int, encryption_key: bytes, mask_key: bytes, commitment: bytes
) -> bytes:
    """The canonical byte string a node signs: length-prefixed, so no two distinct tuples encode alike."""
    return b"".join(
        [
            _SIGNATURE_LABEL,
            _field(round_id.encode()),
            struct.pack(">I", client_index),
            _field(encryption_key),
            _field(mask_key),
            _field(commitment),
        ]
    )


def consistency_bytes(round_id: str, survivors: list[int]) -> bytes:
    """What every survivor signs in the consistency round: the round and the sorted set of survivors."""
    members = sorted(set(survivors))
    return _CONSISTENCY_LABEL + _field(round_id.encode()) + struct.pack(f">I{len(members)}I", len(members), *members)


def commit_seed(round_id: str, client_index: int, seed: bytes) -> bytes:
    """A hiding, binding commitment to a 32-byte uniform seed (SHA-256 in a domain of its own): the server can check
    a reconstructed self-mask seed against it, and learns nothing of the seed from it."""
    h = hashes.Hash(hashes.SHA256())
    h.update(_COMMITMENT_LABEL + _field(round_id.encode()) + struct.pack(">I", client_index) + _field(seed))
    return h.finalize()


def sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA with the node's identity key (EC P-384 in this deployment, hence SHA-384)."""
    return key.sign(message, ec.ECDSA(hashes.SHA384()))


def verify(key: ec.EllipticCurvePublicKey, message: bytes, signature: bytes) -> bool:
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True


# ------------------------------------------------------------------------------------- Shamir secret sharing


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(raw: bytes) -> int:
    if len(raw) != SHARE_BYTES:
        raise CryptoError(f"a share has {SHARE_BYTES} bytes, not {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise CryptoError("a share is not an element of the field")
    return y


def shamir_split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, bytes]:
    """Shares of `secret` at the points `xs` (client indices, all nonzero): any `threshold` reconstruct it and
    fewer reveal nothing, because the other coefficients are uniform in the field."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} needs 1..{len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and nonzero")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = share_to_bytes(y)
    return out


def lagrange_at_zero(points: dict[int, int]) -> int:
    """The value at 0 of the polynomial through `points` ({x: y}); one modular inverse (extended Euclid) per
    point, with Python's big ints. With fewer points than the degree + 1 the answer is unrelated to the secret."""
    xs = list(points)
    total = 0
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        total = (total + points[xi] * num * pow(den, -1, PRIME)) % PRIME
    return total


def shamir_combine(shares: dict[int, bytes], threshold: int) -> bytes:
    """The 32-byte secret from at least `threshold` shares ({x: share}).

    Every share beyond the first `threshold` is checked against the polynomial those define: a share that does
    not lie on it raises :class:`InconsistentShares` naming the points that disagree, so a wrong share is caught
    wherever more than `threshold` of them arrived."""
    if len(shares) < threshold:
        raise CryptoError(f"{len(shares)} shares cannot reconstruct a secret that needs {threshold}")
    pts = {x: share_from_bytes(s) for x, s in shares.items()}
    xs = sorted(pts)
    base = {x: pts[x] for x in xs[:threshold]}
    off = [x for x in xs[threshold:] if _lagrange_at(base, x) != pts[x]]
    if off:
        raise InconsistentShares(off, f"shares at {off} do not lie on the polynomial of the others")
    value = lagrange_at_zero(base)
    if value >> (8 * SECRET_BYTES):
        raise CryptoError("the shares do not interpolate to a 32-byte secret (inconsistent or forged shares)")
    return value.to_bytes(SECRET_BYTES, "big")


class InconsistentShares(CryptoError):
    """Shares of one secret that do not lie on one polynomial."""

    def __init__(self, points: list[int], message: str) -> None:
        super().__init__(message)
        self.points = points


def odd_share_out(shares: dict[int, bytes], threshold: int) -> int | None:
    """The one point whose share disagrees with all the others, when that can be told: with at least
    ``threshold`` + 2 shares, removing a single wrong share leaves the rest on one polynomial, and removing any
    right one does not. None when no single removal makes them agree or more than one does."""
    if len(shares) < threshold + 2:
        return None
    pts = {x: share_from_bytes(s) for x, s in shares.items()}
    fits = []
    for out in pts:
        rest = {x: y for x, y in pts.items() if x != out}
        xs = sorted(rest)
        base = {x: rest[x] for x in xs[:threshold]}
        if all(_lagrange_at(base, x) == rest[x] for x in xs[threshold:]):
            fits.append(out)
    return fits[0] if len(fits) == 1 else None


def _lagrange_at(points: dict[int, int], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points``."""
    total = 0
    for xi, yi in points.items():
        num, den = 1, 1
        for xj in points:
            if xj != xi:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


# ------------------------------------------------------------------------------------------------------ masks


def expand(seed: bytes, length: int, *, pairwise: bool) -> np.ndarray:
    """`length` uint32 words of ChaCha20 keystream under the full 32-byte `seed` (little-endian words).

    The nonce differs between self masks and pairwise masks, a second separation on top of HKDF."""
    if len(seed) != SECRET_BYTES:
        raise CryptoError(f"a mask seed has {SECRET_BYTES} bytes, not {len(seed)}")
    enc = Cipher(algorithms.ChaCha20(seed, _NONCE_PAIR if pairwise else _NONCE_SELF), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * length)), dtype="<u4").astype(np.uint32, copy=False)


def expand_sum(seeds: list[bytes], length: int, *, pairwise: bool, block: int = 256) -> np.ndarray:
    """Sum mod 2^32 of the masks of many seeds, in blocks so memory stays bounded (n = 1000 or more)."""
    total = np.zeros(length, dtype=np.uint32)
    for start in range(0, len(seeds), block):
        chunk = seeds[start : start + block]
        stacked = np.empty((len(chunk), length), dtype=np.uint32)
        for row, seed in enumerate(chunk):
            stacked[row] = expand(seed, length, pairwise=pairwise)
        total += stacked.sum(axis=0, dtype=np.uint32)  # uint32 arithmetic wraps: exactly mod 2^32
    return total


# --------------------------------------------------------------------------------------------- quantisation


def quant_bits_for(num_clients: int, modulus_bits: int = MODULUS_BITS) -> int:
    """Levels per value such that n values at the top level still sum below 2^modulus_bits:
    n·(2^q − 1) < (n + 1)·2^q ≤ 2^m when q = m − ceil(log2(n + 1))."""
    q = modulus_bits - math.ceil(math.log2(num_clients + 1))
    if q < 2:
        raise ValueError(f"{num_clients} clients leave no quantisation levels in {modulus_bits} bits")
    return q


def quantise(values: np.ndarray, clip_range: float, quant_bits: int) -> np.ndarray:
    """Clip to [-c, c], scale to [0, 2^q − 1] and round stochastically: floor(y) + [u < frac(y)] with u from the
    OS CSPRNG, so E[q] = y exactly (to 2^-32) and the rounding noise is independent of anything the server sees."""
    levels = (1 << quant_bits) - 1
    x = np.clip(np.asarray(values, dtype=np.float64), -clip_range, clip_range)
    y = (x + clip_range) * (levels / (2.0 * clip_range))
    low = np.floor(y)
    u = np.frombuffer(os.urandom(4 * y.size), dtype="<u4").astype(np.float64) * (1.0 / 4294967296.0)
    q = low + (u.reshape(y.shape) < (y - low))
    return np.minimum(q, levels).astype(np.uint32)


def dequantise_sum(total: np.ndarray, clip_range: float, quant_bits: int, count: int) -> np.ndarray:
    """The float64 sum of `count` dequantised vectors from the (non-overflowing) sum of their integers:
    Σ (q_i·s − c) = s·Σq_i − count·c."""
    levels = (1 << quant_bits) - 1
    return total.astype(np.float64) * (2.0 * clip_range / levels) - count * clip_range


def quantisation_step(clip_range: float, quant_bits: int) -> float:
    return 2.0 * clip_range / ((1 << quant_bits) - 1)
