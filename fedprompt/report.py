"""The demo's report: a markdown summary and PNG plots of accuracy and privacy spend per round."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt

from fedprompt.stats import accuracy_interval, gain_interval


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def summarise(right: dict[str, list[bool]]) -> dict[str, dict]:
    """Each method's accuracy with its 95 % interval, and its gain over zero-shot with a paired 95 % interval."""
    base = right["zero-shot"]
    return {
        name: {
            "accuracy": accuracy_interval(r).as_dict(),
            "gain_over_zero_shot": gain_interval(r, base).as_dict(),
            "examples": len(r),
        }
        for name, r in right.items()
    }


def plot_methods(summary: dict[str, dict], path: Path) -> None:
    names = list(summary)
    acc = [100 * summary[n]["accuracy"]["value"] for n in names]
    err = [
        [100 * (summary[n]["accuracy"]["value"] - summary[n]["accuracy"]["low"]) for n in names],
        [100 * (summary[n]["accuracy"]["high"] - summary[n]["accuracy"]["value"]) for n in names],
    ]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    colours = ["C0" if n == "federated" else "C7" for n in names]
    ax.barh(names, acc, xerr=err, color=colours, capsize=3)
    ax.axvline(acc[names.index("zero-shot")], linestyle="--", color="grey", label="zero-shot")
    ax.set_xlim(max(0.0, min(acc) - 15), min(100.0, max(acc) + 8))
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%), 95 % interval")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_epsilon(spend: dict[str, list[float]], target: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for h, eps in spend.items():
        ax.plot(range(len(eps) + 1), [0.0, *eps], marker="o", label=h)
    ax.axhline(target, linestyle="--", color="grey", label=f"target epsilon = {target:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (per example, each holder)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


METHOD_NOTES = {
    "zero-shot": "the frozen model with the template `{template}`",
    "untuned prompt": "the federation's initial soft prompt, before any round",
    "federated": "**DP epsilon = {eps:g} per holder, {rounds} rounds**",
    "centralised DP": "the pooled data under DP epsilon = {eps:g}, the federation's compute "
    "({steps} steps of batch {central_batch})",
    "centralised, non-private": "the pooled data without DP, the federation's compute",
}


def write(
    folder: Path,
    *,
    history: list[dict],
    right: dict[str, list[bool]],
    spend: dict[str, list[float]],
    settings: dict,
    splits: list[dict],
) -> Path:
    """``report.md``, ``accuracy.png``, ``epsilon.png`` and ``results.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise(right)
    plot_methods(summary, folder / "accuracy.png")
    plot_epsilon(spend, settings["target_epsilon"], folder / "epsilon.png")
    (folder / "results.json").write_text(
        json.dumps(
            {"results": summary, "spend": spend, "settings": settings, "splits": splits, "history": history}, indent=2
        )
        + "\n"
    )
    steps = settings["rounds"] * settings["local_steps"]
    fill = {
        "template": settings["template"].replace("\n", "\\n"),
        "eps": settings["target_epsilon"],
        "rounds": settings["rounds"],
        "steps": steps,
        "central_batch": settings["batch_size"] * settings["holders"],
    }
    rows = []
    for name, r in summary.items():
        note = METHOD_NOTES.get(name, "the same DP budget and steps on its own data only").format(**fill)
        a, g = r["accuracy"], r["gain_over_zero_shot"]
        gain = "" if name == "zero-shot" else f"{100 * g['value']:+.1f} [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}]"
        bold = "**" if name == "federated" else ""
        rows.append(
            f"| {bold}{name}{bold} | {note} | {bold}{_pct(a['value'])}{bold} [{_pct(a['low'])}, {_pct(a['high'])}] "
            f"| {gain} |"
        )
    seconds = settings["seconds"]
    lines = [
        "# fedprompt demo: a private federation on loopback",
        "",
        f"{settings['holders']} data holders with label-skewed splits of `{settings['dataset']}` "
        f"(Dirichlet alpha = {settings['alpha']}, seed {settings['seed']}), model `{settings['model']}`, a "
        f"{settings['prompt_length']}-token soft prompt (initialised as the embeddings of {settings['init_text']!r}), "
        f"{settings['rounds']} rounds of {settings['local_steps']} "
        f"local DP-SGD steps (expected batch {settings['batch_size']}, {settings['optimizer']} lr {settings['lr']}), "
        f"each holder at epsilon = {settings['target_epsilon']:g} (delta = {settings['delta']:g}) over the whole run. "
        + (
            "Updates are merged by secure aggregation (SecAgg+ with the aggregation server): the coordinator "
            "saw only their mean. "
            if settings["secure_aggregation"]
            else "Updates went to the coordinator in the clear (no secure aggregation). "
        )
        + f"Accuracy is on the dataset's test split ({len(right['zero-shot'])} examples, public); intervals are 95 %: "
        "Wilson's for an accuracy, paired over the same test examples for a gain.",
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
        "| method | what | test accuracy [95 %] | gain over zero-shot, points [95 %] |",
        "|---|---|---:|---:|",
        *rows,
        "",
        "![accuracy of each method](accuracy.png)",
        "",
        "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f" ({settings['machine']}).",
        "",
        "Each holder's epsilon after each round, all its rounds composed (from its own ledger):",
        "",
        "| round | " + " | ".join(f"{h} epsilon" for h in spend) + " |",
        "|---:|" + "---:|" * len(spend),
        *[
            f"| {rnd} | " + " | ".join(f"{eps[rnd - 1]:.2f}" for eps in spend.values()) + " |"
            for rnd in range(1, settings["rounds"] + 1)
        ],
        "",
        "![epsilon per round](epsilon.png)",
        "",
        "The holders-alone and centralised runs are comparisons made for this report: a real holder that also "
        "trained alone would spend its privacy budget twice.",
    ]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
