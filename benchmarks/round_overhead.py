"""Coordination overhead of a federation round on loopback, plain and secure; what the front and the holder's
policy cost; bytes on the wire per holder per round; and the share of a demo round spent training.

For 2, 4 and 8 holders (tiny model, real `fedprompt server` + `fedprompt client` processes, TLS and node
authentication), a round's wall time on the coordinator (send the prompt, wait for every reply) minus the
slowest holder's training compute is Flower's and fedprompt's overhead: once with plain rounds, once with
secure aggregation (the holders fetch their setup, train, run SecAgg+ with the aggregation server themselves;
the round's wall time includes the protocol and the coordinator's collection of the mean). Holders report
their compute time only without DP (under DP it would leak), so the runs are `--no-dp` and the holders opt in
with `--allow-no-dp`. Secure rounds start at 3 holders: a holder refuses a smaller secure cohort (with two,
the mean and its own update give it the other's), so 2 holders are measured plain only.

The front (``server/coordinator/front.py``) is measured against holders that connect to the SuperLink's own
loopback port, bypassing it (possible only on the coordinator's machine). The holder's policy checks (the rules, and the
composition of the run's releases for its ε cap, over a ledger that already holds 50 releases) are timed
in-process and set against a round's wall time. Flower counts the bytes of every message of the run.

The demo round: three holders on the demo's model and settings (`fedprompt demo`'s defaults, secure
aggregation), where the share of a round's wall time that the slowest holder spends in its training steps is
what a round is for.

    python benchmarks/round_overhead.py [--holders 2 4 8] [--rounds 4] [--skip-demo-round]
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import emit

from fedprompt import flower_procs as fp
from fedprompt.client.policy import HolderPolicy
from fedprompt.local_federation import HolderSpec, LocalFederation
from fedprompt.models import zoo

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LENGTH = 20
TINY = (
    "--model", "tiny-llama",
    "--task", "rotten-tomatoes",
    "--local-steps", "2",
    "--batch-size", "8",
    "--prompt-length", str(PROMPT_LENGTH),
)  # fmt: skip
MIN_SECURE_COHORT = HolderPolicy.min_secure_cohort  # the smallest a holder accepts
NO_DP = ("--no-dp", "--set", "wait_for_nodes_s=300")  # holders report their compute only without DP


def write_data(folder: Path, n: int, rows: int = 120) -> list[Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_sentiment_rows

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"holder-{i + 1}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(rows, seed=i)))
        paths.append(p)
    return paths


def federate(folder: Path, data: list[Path], settings: tuple, *, secure: bool, via_front: bool = True) -> tuple:
    """One federation of real processes; returns its history and Flower's traffic counters."""
    n = len(data)
    holders = [HolderSpec(f"holder-{i + 1}", p, 1000.0) for i, p in enumerate(data)]
    superlink_port = fp.free_port()
    holder_flags = ["--allow-no-dp"]
    with LocalFederation(folder / "fed", holders) as fed:
        fed.start_server(
            *settings,
            "--min-available-nodes", str(n),
            "--min-train-nodes", str(n),
            "--superlink-port", str(superlink_port),
            *(["--secure-aggregation"] if secure else []),
        )  # fmt: skip
        direct = None if via_front else f"127.0.0.1:{superlink_port}"
        # while the holders start (the coordinator exits once the run is over); the first round is not counted
        front_latency = front_seconds_per_request(fed, superlink_port) if via_front else None
        for h in holders:
            fed.start_holder(h, *holder_flags, superlink=direct)
        history = fed.wait(3600)
        traffic = fed.run_traffic()
        traffic["front-seconds-per-request"] = front_latency
    if via_front:
        traffic["front-requests"] = front_requests(fed.out / "coordinator" / "logs" / "front.log")
    return history, traffic


def post_seconds(url: str, ca: Path, repeats: int) -> float:
    """Mean time of a Fleet API request (unauthenticated, so the SuperLink answers it with an error at once)."""
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=10) as client:
        client.post(url, content=b"")  # the TLS handshake, once, as a SuperNode's session does
        started = time.perf_counter()
        for _ in range(repeats):
            client.post(url, content=b"")
        return (time.perf_counter() - started) / repeats


def front_seconds_per_request(fed: LocalFederation, superlink_port: int, repeats: int = 300) -> float:
    """What one request pays for the hop through the front: through it, minus straight to the SuperLink."""
    ca = fed.certs / "ca.crt"
    path = "/v1/fleet/get-run"
    for port in (fed.port, superlink_port):
        fp.wait_for_port("127.0.0.1", port, fed.server, fed.logs / "server.log")
    through = post_seconds(f"https://127.0.0.1:{fed.port}{path}", ca, repeats)
    direct = post_seconds(f"https://127.0.0.1:{superlink_port}{path}", ca, repeats)
    return through - direct


def front_requests(log: Path) -> int:
    """The requests the front forwarded in the whole run (it logs the count when it stops)."""
    found = re.findall(r"fleet listener: forwarded (\d+) requests", log.read_text())
    if not found:
        raise RuntimeError(f"{log} has no count of forwarded requests")
    return int(found[-1])


def run(n: int, rounds: int, folder: Path, *, secure: bool = False, via_front: bool = True) -> dict:
    history, traffic = federate(
        folder, write_data(folder / "data", n), (*TINY, *NO_DP, "--num-rounds", str(rounds)), secure=secure,
        via_front=via_front,
    )  # fmt: skip
    per_round = []
    for rec in history[1:]:
        compute = max(m["train_seconds"] for m in rec["holders"].values())
        per_round.append({"round": rec["round"], "wall_s": rec["train_seconds"], "max_train_s": compute})
    steady = per_round[1:] or per_round  # round 1 also loads the model into each holder's daemon
    prompt_bytes = PROMPT_LENGTH * zoo.load("tiny-llama").hidden_size * 4
    per_holder_round = traffic["total-bytes"] / (n * rounds)
    front = {}
    if via_front:
        # every request of every holder crosses the front; a round waits for the slowest holder's, so charging
        # the round with all of them (not one holder's share) overstates what the front costs
        requests = traffic["front-requests"] / rounds
        front = {
            "front_seconds_per_request": traffic["front-seconds-per-request"],
            "front_requests_per_round": requests,
            "front_seconds_per_round_bound": requests * traffic["front-seconds-per-request"],
        }
    return {
        **front,
        "holders": n,
        "secure": secure,
        "path": "through the fleet front" if via_front else "straight to the SuperLink (front bypassed)",
        "rounds": per_round,
        "wall_s_median": statistics.median(r["wall_s"] for r in steady),
        "overhead_s_median": statistics.median(r["wall_s"] - r["max_train_s"] for r in steady),
        "first_round_overhead_s": per_round[0]["wall_s"] - per_round[0]["max_train_s"],
        "bytes_per_holder_per_round": per_holder_round,
        "prompt_bytes": prompt_bytes,
        "wire_to_prompt_ratio": per_holder_round / prompt_bytes,
    }


def demo_round(folder: Path, rounds: int = 3) -> dict:
    """Rounds of the demo's federation (its model, split and settings, secure), without DP so that the holders
    report their compute: the share of each round's wall time that the slowest holder trains."""
    from fedprompt.data import datasets as ds_mod
    from fedprompt.data import partition
    from fedprompt.demo import DEMO_DEFAULTS

    d = DEMO_DEFAULTS
    full = ds_mod.load(d["dataset"])
    data = partition.write_holder_files(full, folder / "data", d["holders"], alpha=d["alpha"], seed=0)
    settings = (
        "--model", d["model"],
        "--task", d["dataset"],
        "--num-rounds", str(rounds),
        "--local-steps", str(d["local_steps"]),
        "--batch-size", str(d["batch_size"]),
        "--lr", str(d["lr"]),
        "--prompt-length", str(d["prompt_length"]),
        "--set", f"init_text={json.dumps(d['init_text'])}",
        *NO_DP,
    )  # fmt: skip
    history, traffic = federate(folder, data, settings, secure=True)
    shares = [
        {
            "round": rec["round"],
            "wall_s": rec["train_seconds"],
            "max_train_s": max(m["train_seconds"] for m in rec["holders"].values()),
        }
        for rec in history[1:]
    ]
    steady = shares[1:] or shares
    wall = statistics.median(r["wall_s"] for r in steady)
    front_s = traffic["front-requests"] / rounds * traffic["front-seconds-per-request"]
    return {
        "front_seconds_per_round_bound": front_s,
        "front_share_of_round": front_s / wall,
        "settings": {k: d[k] for k in ("model", "dataset", "holders", "local_steps", "batch_size", "prompt_length")},
        "rounds": shares,
        "training_share_median": statistics.median(r["max_train_s"] / r["wall_s"] for r in steady),
    }


def policy_check_seconds(folder: Path, repeats: int = 200) -> float:
    """One training request's policy checks on a ledger of 50 releases: the rules and the run's ε cap."""
    from fedprompt.dp.ledger import PrivacyLedger
    from fedprompt.dp.spend import Budget

    ledger = PrivacyLedger.create(folder / "policy-state", Budget(1000.0, 1e-5))
    release = {"mechanism": "dp-sgd", "delta": 1e-5, "epsilon": 1.0, "accountant": "rdp"}
    release.update(noise_multiplier=1.0, sample_rate=0.01, steps=4)
    for r in range(50):
        ledger.commit(ledger.reserve(task="t", run_id=f"run-{r % 5}", round=r, **release), steps=4, epsilon=1.0)
    policy = HolderPolicy(max_run_epsilon=100.0).resolved(1000)
    started = time.perf_counter()
    for _ in range(repeats):
        policy.check_run(dp=True, target_epsilon=8.0, delta=1e-5, secure_aggregation=False)
        ledger.run_epsilon("run-1", 1e-5, adding=release)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--holders", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--skip-demo-round", action="store_true", help="the tiny-model rounds only")
    a = ap.parse_args()
    plain, secure = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in a.holders:
            plain[n] = run(n, a.rounds, tmp / f"plain-{n}")
            print(json.dumps(plain[n]), file=sys.stderr, flush=True)
            if n >= MIN_SECURE_COHORT:
                secure[n] = run(n, a.rounds, tmp / f"secure-{n}", secure=True)
                print(json.dumps(secure[n]), file=sys.stderr, flush=True)
        n0 = a.holders[0]
        direct = run(n0, a.rounds, tmp / f"direct-{n0}", via_front=False)
        print(json.dumps(direct), file=sys.stderr, flush=True)
        checks = policy_check_seconds(tmp)
        demo = None if a.skip_demo_round else demo_round(tmp / "demo")
    front = plain[n0]
    front_s = max(0.0, front["front_seconds_per_round_bound"])
    added = {n: secure[n]["overhead_s_median"] - plain[n]["overhead_s_median"] for n in secure}
    emit(
        {
            "benchmark": "round_overhead",
            "results": [*plain.values(), *secure.values(), direct],
            "secure_round_added_s": added,
            # the rounds' wall times through and around the front differ by the SuperNodes' 3 s polling phase
            # more than by the front: its cost is its per-request latency times the requests it forwarded
            "round_wall_s_through_front_minus_direct": front["wall_s_median"] - direct["wall_s_median"],
            "front_seconds_per_round": front_s,
            "front_share_of_round": front_s / front["wall_s_median"],
            "policy_check_seconds_per_request": checks,
            "policy_check_share_of_round": checks / front["wall_s_median"],
            "demo_round": demo,
            "targets": {
                "secure round adds at most 3 s to a plain one": all(v <= 3.0 for v in added.values()),
                "a demo round spends at least 70 % training": demo is None or demo["training_share_median"] >= 0.7,
                # of a demo round (the tiny model's rounds are mostly the SuperNodes' idle polling, each poll a
                # request through the front: there the bound says more about Flower's polling than the front)
                "front + policy checks under 5 % of a round's wall time": demo is None
                or demo["front_share_of_round"] + checks / statistics.median(r["wall_s"] for r in demo["rounds"][1:])
                < 0.05,
            },
        }
    )


if __name__ == "__main__":
    main()
