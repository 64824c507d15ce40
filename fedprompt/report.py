"""The demo's report: a markdown summary and PNG plots of accuracy and privacy spend per round."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def plot_accuracy(history: list[dict], baselines: dict[str, float], path: Path) -> None:
    rounds = [r["round"] for r in history if r.get("accuracy") is not None]
    accs = [100 * r["accuracy"] for r in history if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(rounds, accs, marker="o", linewidth=2, label="federated, DP (global prompt)")
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))]
    for i, (name, acc) in enumerate(baselines.items()):
        ax.axhline(100 * acc, linestyle=styles[i % len(styles)], color=f"C{i + 1}", label=f"{name}: {100 * acc:.1f} %")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_epsilon(history: list[dict], target: float, path: Path) -> None:
    holders = sorted({h for r in history for h in r.get("holders", {})})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for h in holders:
        pts = [
            (r["round"], r["holders"][h]["epsilon"]) for r in history if "epsilon" in r.get("holders", {}).get(h, {})
        ]
        if pts:
            ax.plot([0] + [p[0] for p in pts], [0.0] + [p[1] for p in pts], marker="o", label=h)
    ax.axhline(target, linestyle="--", color="grey", label=f"target epsilon = {target:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (per example, each holder)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(folder: Path, *, history: list[dict], results: dict, settings: dict, splits: list[dict]) -> Path:
    """``report.md``, ``accuracy.png``, ``epsilon.png`` and ``results.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    baselines = {"zero-shot": results["zero_shot"], "centralised, non-private": results["centralised"]}
    baselines.update({f"{h} alone, DP": acc for h, acc in results["local_only"].items()})
    plot_accuracy(history, baselines, folder / "accuracy.png")
    plot_epsilon(history, settings["target_epsilon"], folder / "epsilon.png")
    (folder / "results.json").write_text(
        json.dumps({"results": results, "settings": settings, "splits": splits, "history": history}, indent=2) + "\n"
    )
    lines = [
        "# fedprompt demo: a private federation on loopback",
        "",
        f"{settings['holders']} data holders with label-skewed splits of `{settings['dataset']}` "
        f"(Dirichlet alpha = {settings['alpha']}), model `{settings['model']}`, {settings['rounds']} rounds of "
        f"{settings['local_steps']} local DP-SGD steps (expected batch {settings['batch_size']}, "
        f"{settings['optimizer']} lr {settings['lr']}), each holder at epsilon = {settings['target_epsilon']:g} "
        f"(delta = {settings.get('delta', 1e-5):g}) over the "
        "whole run. "
        + (
            "Updates are merged by secure aggregation (SecAgg+ through the aggregation server): the coordinator "
            "saw only their mean. "
            if settings.get("secure_aggregation")
            else "Updates went to the coordinator in the clear (no secure aggregation). "
        )
        + "Accuracy is on the dataset's test split (the union of the holders' test splits).",
        "",
        "| holder | train | test | train labels |",
        "|---|---:|---:|---|",
        *[
            f"| holder-{s['holder']} | {s['train']} | {s['test']} | "
            + ", ".join(f"{k} {v}" for k, v in s["train_labels"].items())
            + " |"
            for s in splits
        ],
        "",
        "| method | test accuracy | gain over zero-shot |",
        "|---|---:|---:|",
        f"| zero-shot (template `{settings['template']!r}`) | {_pct(results['zero_shot'])} | |",
        f"| initial prompt (untuned) | {_pct(results['initial'])} | "
        f"{_gain(results['initial'], results['zero_shot'])} |",
        *[
            f"| {h} alone, DP epsilon = {settings['target_epsilon']:g} | {_pct(a)} | {_gain(a, results['zero_shot'])} |"
            for h, a in results["local_only"].items()
        ],
        f"| **federated, DP epsilon = {settings['target_epsilon']:g} each** | **{_pct(results['federated'])}** | "
        f"**{_gain(results['federated'], results['zero_shot'])}** |",
        f"| centralised, non-private (pooled data) | {_pct(results['centralised'])} | "
        f"{_gain(results['centralised'], results['zero_shot'])} |",
        "",
        "Per round (global test accuracy; each holder's epsilon, all its rounds composed):",
        "",
        "| round | accuracy | " + " | ".join(f"{h} epsilon" for h in results["local_only"]) + " |",
        "|---:|---:|" + "---:|" * len(results["local_only"]),
        *[
            f"| {r['round']} | {_pct(r.get('accuracy'))} | "
            + " | ".join(
                f"{r.get('holders', {}).get(h, {}).get('epsilon', float('nan')):.2f}" if r["round"] else "0"
                for h in results["local_only"]
            )
            + " |"
            for r in history
        ],
        "",
        "![accuracy per round](accuracy.png)",
        "",
        "![epsilon per round](epsilon.png)",
        "",
        f"Wall time: federation {settings['federation_seconds']:.0f} s, baselines {settings['baseline_seconds']:.0f} s "
        f"({settings['machine']}).",
        "",
        "The local-only and centralised runs are comparisons made for this report: a real holder that also "
        "trained alone would spend its privacy budget twice.",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _gain(x: float | None, base: float | None) -> str:
    return "" if x is None or base is None else f"{100 * (x - base):+.1f} points"
