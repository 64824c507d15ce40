"""Coordination overhead of a federation round on loopback, what the front and the holder's policy cost, and
bytes on the wire per holder per round.

For 2, 4 and 8 holders (tiny model, real `fedprompt server` + `fedprompt client` processes, TLS and node
authentication), a round's wall time on the coordinator (send the prompt, wait for every reply) minus the
slowest holder's training compute is Flower's and fedprompt's overhead. Holders report their compute time only
without DP (under DP it would leak), so the runs are `--no-dp` and the holders opt in with `--allow-no-dp`.

The front (``server/front.py``) is measured in the same run against holders that connect to the SuperLink's own
loopback port, bypassing it (possible only on the coordinator's machine: the SuperLink listens on 127.0.0.1).
The holder's policy checks (the rules, and the composition of the run's releases for its ε cap, over a ledger
that already holds 50 releases) are timed in-process and set against a round's wall time. Flower counts the
bytes of every message of the run (fleet API payloads, before TLS and HTTP framing); divided by holders and
rounds, they stand beside the size of the prompt itself.

    python benchmarks/round_overhead.py [--holders 2 4 8] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import emit

from fedprompt import flower_procs as fp
from fedprompt import zoo
from fedprompt.local_federation import HolderSpec, LocalFederation

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LENGTH = 20
SETTINGS = (
    "--model", "tiny-llama",
    "--task", "rotten-tomatoes",
    "--local-steps", "2",
    "--batch-size", "8",
    "--prompt-length", str(PROMPT_LENGTH),
    "--no-dp",  # holders report their compute time only without DP (under DP it would leak)
    "--set", "wait_for_nodes_s=300",
)  # fmt: skip


def write_data(folder: Path, n: int) -> list[Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_sentiment_rows

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"holder-{i + 1}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in make_sentiment_rows(120, seed=i)))
        paths.append(p)
    return paths


def run(n: int, rounds: int, folder: Path, *, via_front: bool = True) -> dict:
    holders = [HolderSpec(f"holder-{i + 1}", p, 1000.0) for i, p in enumerate(write_data(folder / "data", n))]
    superlink_port = fp.free_port()
    with LocalFederation(folder / "fed", holders) as fed:
        fed.start_server(
            *SETTINGS,
            "--num-rounds", str(rounds),
            "--min-available-nodes", str(n),
            "--min-train-nodes", str(n),
            "--superlink-port", str(superlink_port),
        )  # fmt: skip
        direct = None if via_front else f"127.0.0.1:{superlink_port}"
        for h in holders:
            fed.start_holder(h, "--allow-no-dp", superlink=direct)
        history = fed.wait(1800)
        traffic = fed.run_traffic()
    per_round = []
    for rec in history[1:]:
        compute = max(m["train_seconds"] for m in rec["holders"].values())
        per_round.append({"round": rec["round"], "wall_s": rec["train_seconds"], "max_train_s": compute})
    steady = per_round[1:] or per_round  # round 1 also loads the model into each holder's daemon
    prompt_bytes = PROMPT_LENGTH * zoo.load("tiny-llama").hidden_size * 4
    per_holder_round = traffic["total-bytes"] / (n * rounds)
    return {
        "holders": n,
        "path": "through the fleet front" if via_front else "straight to the SuperLink (front bypassed)",
        "rounds": per_round,
        "wall_s_median": statistics.median(r["wall_s"] for r in steady),
        "overhead_s_median": statistics.median(r["wall_s"] - r["max_train_s"] for r in steady),
        "first_round_overhead_s": per_round[0]["wall_s"] - per_round[0]["max_train_s"],
        "bytes_per_holder_per_round": per_holder_round,
        "prompt_bytes": prompt_bytes,
        "wire_to_prompt_ratio": per_holder_round / prompt_bytes,
    }


def policy_check_seconds(folder: Path, repeats: int = 200) -> float:
    """One training request's policy checks on a ledger of 50 releases: the rules and the run's ε cap."""
    from fedprompt.client.policy import HolderPolicy
    from fedprompt.dp.ledger import Budget, PrivacyLedger

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
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in a.holders:
            results.append(run(n, a.rounds, tmp / f"front-{n}"))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        n0 = a.holders[0]
        direct = run(n0, a.rounds, tmp / f"direct-{n0}", via_front=False)
        print(json.dumps(direct), file=sys.stderr, flush=True)
        checks = policy_check_seconds(tmp)
    front = next(r for r in results if r["holders"] == n0)
    emit(
        {
            "benchmark": "round_overhead",
            "results": [*results, direct],
            "front_seconds_per_round": front["wall_s_median"] - direct["wall_s_median"],
            "front_share_of_round": (front["wall_s_median"] - direct["wall_s_median"]) / front["wall_s_median"],
            "policy_check_seconds_per_request": checks,
            "policy_check_share_of_round": checks / front["wall_s_median"],
            "target": "front + policy checks under 5 % of a round's wall time",
        }
    )


if __name__ == "__main__":
    main()
