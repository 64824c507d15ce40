"""Cost of secure aggregation per client and on the server: plain sums, fedprompt's SecAgg+, Flower's SecAgg+.

    python benchmarks/secure_aggregation.py [--clients 10 100 1000] [--dropout 0.05] [--dropout-stage masked]
                                            [--flower-sample 200] [--no-flower]

Every variant aggregates n float32 vectors of 20 × 576 = 11,520 values (a soft prompt of smollm2-135m), with the
same neighbourhood k and threshold t (fedprompt's defaults: k = 2·ceil(log2 n), t the least with 2t > k + 2, so
that the server and one colluding client cannot unmask anyone), and the
same fraction of clients dropping out at the chosen stage (`advertise`: after advertising keys; `shares`: after
sharing keys, so their pairwise masks must be removed; `masked`: after sending the masked input, so their
shares come from the others). All clients are simulated in one process, one after another, with no transport:
- `plain`: each client sends its float32 vector; the server adds n vectors;
- `fedprompt`: `fedprompt.protocols.secagg.protocol` end to end, the malicious-server variant (its client and server
  objects and protobuf messages; every client signs its keys and the survivors with a P-384 node key and checks
  its neighbours' signatures against its roster; the consistency round; the server's share and range checks);
  bytes per client are the serialized `SecAggMessage`s it sends;
- `flower`: the per-stage computations of flwr 1.41's SecAgg+ (`secaggplus_mod` on the client,
  `SecAggPlusWorkflow` on the server) with Flower's own primitives (EC P-384 keys as PEM, HKDF + Fernet, Shamir
  over GF(2^128) in 16-byte chunks from pycryptodome, `pseudo_rand_gen`, `quantize`, `ndarray_to_bytes`), minus
  Flower's messaging; bytes per client are the payloads it puts in its ConfigRecords (8 bytes per int), not the
  Flower message framing.
Client time is per client, all stages summed (median over the clients that finished; `client_sample` says
over how many). Server time is the server's work in all stages. For n above `--flower-sample`, Flower's clients
are timed on a sample only: the other clients skip share creation for their mask key (it is only ever
reconstructed for clients that drop) and send shares of the right size in its place; the server's work is
always simulated in full and the aggregate is checked against the true sum. (With `--dropout-stage advertise`
the simulation treats Flower's dropouts as never sampled; the real workflow keeps the setup-time sample and would
fail the round for want of their shares.)
Prints one JSON object; headlines: bytes per client fedprompt / plain at n = 100 (target <= 1.5) and server time
flower / fedprompt (target >= 10).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import emit
from cryptography.hazmat.primitives.asymmetric import ec

from fedprompt.protocols.secagg import crypto as sc
from fedprompt.protocols.secagg.client import ClientIdentity, SecAggClient
from fedprompt.protocols.secagg.protocol import LAST_STAGE, plan
from fedprompt.protocols.secagg.server import SecAggServer

SHAPE = (20, 576)
CLIP = 1.0
STAGES = {"advertise": 1, "shares": 2, "masked": 3}  # a dropout answers stages 0 .. value − 1


def make_vectors(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.normal(0.0, 0.3, SHAPE).astype(np.float32) for i in range(1, n + 1)}


def choose_dropouts(n: int, fraction: float) -> set[int]:
    return set(random.Random(n).sample(range(1, n + 1), round(fraction * n)))


def summary(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------------- plain


def bench_plain(vectors: dict[int, np.ndarray]) -> dict:
    flat = [v.reshape(-1) for v in vectors.values()]
    t0 = time.perf_counter()
    total = np.zeros(flat[0].size, dtype=np.float64)
    for v in flat:
        total += v
    server = time.perf_counter() - t0
    return {"bytes_per_client": int(flat[0].nbytes), "client_ms": 0.0, "server_s": server}


# ------------------------------------------------------------------------------------------------ fedprompt


def bench_ours(vectors: dict[int, np.ndarray], dropouts: set[int], stop: int) -> dict:
    n = len(vectors)
    length = vectors[1].size
    server_s = 0.0
    keys = {i: ec.generate_private_key(ec.SECP384R1()) for i in vectors}  # the holders' node keys
    names = {i: f"holder-{i}" for i in vectors}
    roster = {names[i]: k.public_key() for i, k in keys.items()}
    server = SecAggServer(
        "bench", n, length, CLIP, min_clients=2, identities={i: (names[i], k.public_key()) for i, k in keys.items()}
    )
    t = time.perf_counter()
    requests = server.step(0, {})
    server_s += time.perf_counter() - t
    client_s = dict.fromkeys(requests, 0.0)
    clients = {}
    for i, m in requests.items():
        t = time.perf_counter()
        clients[i] = SecAggClient(m.setup, vectors[i].reshape(-1), ClientIdentity(names[i], keys[i], roster))
        client_s[i] += time.perf_counter() - t
    sent = dict.fromkeys(clients, 0)
    for stage in range(LAST_STAGE):
        replies = {}
        for i, msg in requests.items():
            if i in dropouts and stage >= stop:
                continue
            t = time.perf_counter()
            reply = clients[i].handle(msg)
            client_s[i] += time.perf_counter() - t
            replies[i] = reply
            sent[i] += reply.ByteSize()
        t = time.perf_counter()
        requests = server.step(stage + 1, replies)
        server_s += time.perf_counter() - t
    total, survivors = server.result
    finished = [i for i in clients if i not in dropouts]
    exact = sum(clients[i].quantised.astype(np.int64) for i in survivors)
    truth = sum(vectors[i].reshape(-1).astype(np.float64).clip(-CLIP, CLIP) for i in survivors)
    return {
        "bytes_per_client": summary([sent[i] for i in finished]),
        "client_ms": 1e3 * summary([client_s[i] for i in finished]),
        "client_sample": len(finished),
        "server_s": server_s,
        "survivors": len(survivors),
        "exact_integer_sum": bool(np.array_equal(server.quantised_sum.astype(np.int64), exact)),
        "max_abs_error": float(np.max(np.abs(total - truth))),
        "quantisation_step": server.plan.quantisation_step,
    }


# --------------------------------------------------------------------------------------------------- Flower


def bench_flower(vectors: dict[int, np.ndarray], dropouts: set[int], stop: int, k: int, t: int, sample: int) -> dict:
    """Flower 1.41's SecAgg+ stage by stage (secaggplus_mod._setup/_share_keys/_collect_masked_vectors/_unmask
    and SecAggPlusWorkflow.setup/share_keys/collect_masked_vectors/unmask_stage), without its transport."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    n = len(vectors)
    nids = list(range(1, n + 1))
    mod_range = 1 << 32
    target_range = 1 << sc.quant_bits_for(n)  # the same levels as fedprompt (Flower's default is 2^22)
    num_shares = k + 1
    timed = set(random.Random(1).sample(nids, min(sample, n))) if n > sample else set(nids)
    client_s = dict.fromkeys(nids, 0.0)
    sent = dict.fromkeys(nids, 0)
    server_s = 0.0
    alive = lambda stage: [i for i in nids if not (i in dropouts and stage >= stop)]  # noqa: E731

    # server, setup: the ring of neighbours (random.shuffle as in the workflow)
    t0 = time.perf_counter()
    order = list(nids)
    random.shuffle(order)
    half = num_shares >> 1
    if num_shares >= n:
        nbrs = {nid: set(nids) for nid in nids}
    else:
        nbrs = {nid: {order[(idx + off) % n] for off in range(-half, half + 1)} for idx, nid in enumerate(order)}
    server_s += time.perf_counter() - t0

    # client, stage 0 (_setup)
    st: dict[int, dict] = {}
    u0 = alive(0)
    for nid in u0:
        t0 = time.perf_counter()
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        s = {"sk1": private_key_to_bytes(sk1), "pk1": public_key_to_bytes(pk1)}
        s |= {"sk2": private_key_to_bytes(sk2), "pk2": public_key_to_bytes(pk2)}
        client_s[nid] += time.perf_counter() - t0
        sent[nid] += len(s["pk1"]) + len(s["pk2"])
        st[nid] = s
    active = set(u0)

    # client, stage 1 (_share_keys); the server forwards ciphertexts (share_keys_stage)
    u1 = alive(1)
    fwd_srcs: dict[int, list[int]] = {nid: [] for nid in nids}
    fwd_cts: dict[int, list[bytes]] = {nid: [] for nid in nids}
    sk_share_len = None
    for nid in u1:
        s = st[nid]
        t0 = time.perf_counter()
        keys = {v: (st[v]["pk1"], st[v]["pk2"]) for v in sorted(nbrs[nid] & active)}
        s["keys"] = keys
        s["rd_seed"] = os.urandom(32)
        b_shares = create_shares(s["rd_seed"], t, len(keys))
        if nid in timed or nid in dropouts:
            sk1_shares = create_shares(s["sk1"], t, len(keys))
            sk_share_len = len(sk1_shares[0])
        else:  # untimed client that never drops: its mask key is never reconstructed, so a same-size stand-in
            sk1_shares = [bytes(sk_share_len or 4 + 16 * math.ceil((len(s["sk1"]) + 1) / 16))] * len(keys)
        s["b"], s["sk"], s["ss2"] = {}, {}, {}
        dsts, cts = [], []
        for idx, (v, (_, pk2)) in enumerate(keys.items()):
            if v == nid:
                s["b"][nid], s["sk"][nid] = b_shares[idx], sk1_shares[idx]
                continue
            key = generate_shared_key(bytes_to_private_key(s["sk2"]), bytes_to_public_key(pk2))
            s["ss2"][v] = key
            cts.append(encrypt(key, share_keys_plaintext_concat(nid, v, b_shares[idx], sk1_shares[idx])))
            dsts.append(v)
        client_s[nid] += time.perf_counter() - t0
        sent[nid] += sum(len(c) for c in cts) + 8 * len(dsts)
        t0 = time.perf_counter()
        for v, ct in zip(dsts, cts, strict=True):
            fwd_srcs[v].append(nid)
            fwd_cts[v].append(ct)
        server_s += time.perf_counter() - t0
    active = set(u1)

    # client, stage 2 (_collect_masked_vectors); the server sums (collect_masked_vectors_stage)
    u2 = alive(2)
    masked_bytes: dict[int, list[bytes]] = {}
    for nid in u2:
        s = st[nid]
        t0 = time.perf_counter()
        available = []
        for src, ct in zip(fwd_srcs[nid], fwd_cts[nid], strict=True):
            actual, dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(s["ss2"][src], ct))
            assert actual == src and dst == nid
            available.append(src)
            s["b"][src], s["sk"][src] = b_share, sk_share
        params = parameters_multiply([vectors[nid]], 1.0)  # num_examples / max_weight = 1
        q = factor_combine(target_range, quantize(params, CLIP, target_range))
        s["quantised"] = q[1]
        dims = [a.shape for a in q]
        q = parameters_addition(q, pseudo_rand_gen(s["rd_seed"], mod_range, dims))
        for v in available:
            shared = generate_shared_key(bytes_to_private_key(s["sk1"]), bytes_to_public_key(s["keys"][v][0]))
            mask = pseudo_rand_gen(shared, mod_range, dims)
            q = parameters_addition(q, mask) if nid > v else parameters_subtraction(q, mask)
        q = parameters_mod(q, mod_range)
        out = [ndarray_to_bytes(a) for a in q]
        client_s[nid] += time.perf_counter() - t0
        sent[nid] += sum(len(b) for b in out)
        masked_bytes[nid] = out
    t0 = time.perf_counter()
    masked = None
    for nid in u2:
        vec = [bytes_to_ndarray(b) for b in masked_bytes[nid]]
        masked = vec if masked is None else parameters_addition(masked, vec)
    masked = parameters_mod(masked, mod_range)
    server_s += time.perf_counter() - t0
    sampled = set(u1)  # clients that shared keys: their secrets are out there
    active = set(u2)
    dead = sampled - active

    # client, stage 3 (_unmask); the server reconstructs and removes the masks (unmask_stage)
    collected: dict[int, list[bytes]] = {nid: [] for nid in sampled}
    for nid in alive(3):
        s = st[nid]
        t0 = time.perf_counter()
        act, dd = list(nbrs[nid] & active), list(nbrs[nid] & dead)
        shares = [s["b"][v] for v in act] + [s["sk"][v] for v in dd]
        client_s[nid] += time.perf_counter() - t0
        sent[nid] += 8 * len(act + dd) + sum(len(x) for x in shares)
        t0 = time.perf_counter()
        for owner, share in zip(act + dd, shares, strict=True):
            collected[owner].append(share)
        server_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    for nid, share_list in collected.items():
        if len(share_list) < t:
            raise RuntimeError(f"Flower: not enough shares for {nid}")
        secret = combine_shares(share_list)
        if nid in active:
            masked = parameters_subtraction(masked, pseudo_rand_gen(secret, mod_range, get_parameters_shape(masked)))
        else:
            # Flower walks every neighbour of the dead client; only those whose masked input arrived carry a
            # mask towards it (the others were not summed), so this walks those, which is also less work.
            for v in nbrs[nid] & active:
                shared = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(st[v]["pk1"]))
                mask = pseudo_rand_gen(shared, mod_range, get_parameters_shape(masked))
                masked = parameters_addition(masked, mask) if nid > v else parameters_subtraction(masked, mask)
    recon = parameters_mod(masked, mod_range)
    q_total, recon = factor_extract(recon)
    agg = dequantize(recon, CLIP, target_range)
    for vec in agg:
        vec += -(len(active) - 1) * CLIP
        vec *= target_range / q_total
    server_s += time.perf_counter() - t0
    finished = [i for i in nids if i not in dropouts and i in timed]
    exact = sum(st[i]["quantised"].astype(np.int64) for i in active)
    return {
        "bytes_per_client": summary([sent[i] for i in nids if i not in dropouts]),
        "client_ms": 1e3 * summary([client_s[i] for i in finished]),
        "client_sample": len(finished),
        "server_s": server_s,
        "survivors": len(active),
        "exact_integer_sum": bool(np.array_equal(recon[0].astype(np.int64), exact)),
        "note": "bytes are ConfigRecord payloads (PEM keys, Fernet tokens, np.save'd int64 arrays, int ids as 8 B)",
    }


# -------------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--dropout", type=float, default=0.05, help="fraction of clients that drop out")
    ap.add_argument("--dropout-stage", choices=sorted(STAGES), default="masked")
    ap.add_argument("--flower-sample", type=int, default=200, help="time Flower's clients on this many, at most")
    ap.add_argument("--no-flower", action="store_true")
    args = ap.parse_args()
    stop = STAGES[args.dropout_stage]

    runs = []
    for n in args.clients:
        vectors = make_vectors(n)
        dropouts = choose_dropouts(n, args.dropout)
        p = plan(n, SHAPE[0] * SHAPE[1], CLIP)
        row = {"n": n, "dropouts": len(dropouts), "neighbourhood": p.neighbourhood, "threshold": p.threshold}
        row["plain"] = bench_plain(vectors)
        row["fedprompt"] = bench_ours(vectors, dropouts, stop)
        if not args.no_flower:
            row["flower"] = bench_flower(vectors, dropouts, stop, p.neighbourhood, p.threshold, args.flower_sample)
            row["server_time_flower_over_fedprompt"] = row["flower"]["server_s"] / row["fedprompt"]["server_s"]
            row["client_time_flower_over_fedprompt"] = row["flower"]["client_ms"] / row["fedprompt"]["client_ms"]
        row["bytes_fedprompt_over_plain"] = row["fedprompt"]["bytes_per_client"] / row["plain"]["bytes_per_client"]
        runs.append(row)
        print(f"n={n} done", file=sys.stderr, flush=True)

    by_n = {r["n"]: r for r in runs}
    headline = {}
    if 100 in by_n:
        headline["bytes_per_client_fedprompt_over_plain_n100"] = by_n[100]["bytes_fedprompt_over_plain"]
        headline["bytes_target"] = "<= 1.5"
    if not args.no_flower:
        headline["server_time_flower_over_fedprompt"] = {r["n"]: r["server_time_flower_over_fedprompt"] for r in runs}
        headline["server_time_target"] = ">= 10"
    emit(
        {
            "benchmark": "secure_aggregation",
            "vector": {"shape": list(SHAPE), "values": SHAPE[0] * SHAPE[1], "dtype": "float32"},
            "dropout": {"fraction": args.dropout, "stage": args.dropout_stage},
            "client_time": "median over the clients that finished every stage; client_sample = how many",
            "flower_client_sample": (
                f"when n > {args.flower_sample}, {args.flower_sample} random clients are timed; the others skip "
                "creating Shamir shares of their mask key (reconstructed only for dropouts) and send same-size "
                "stand-ins; the server's work is always complete"
            ),
            "simulation": "all clients and the server in one process, one after another, no transport",
            "headline": headline,
            "runs": runs,
        }
    )


if __name__ == "__main__":
    main()
