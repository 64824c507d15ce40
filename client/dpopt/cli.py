"""``fedprompt dpopt``: write a private text prompt with DP-OPT and compare it with its baselines."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import replace
from pathlib import Path

from fedprompt import taskfile
from fedprompt.cli.common import add_runtime
from fedprompt.dp.cli import add_state_arguments, open_ledger
from fedprompt.errors import ConfigError, FedPromptError

MECHANISM = "dp-opt"


def add_dpopt_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dpopt",
        help="write a private text prompt (DP-OPT) with a local model; it works on any model",
        description="DP-OPT (Hong et al., ICLR 2024): an ensemble of in-context learners writes an instruction "
        "token by token through the limited-domain mechanism; one candidate is chosen on a disjoint holdout with "
        "the exponential mechanism. Prints the candidates and the test accuracy of the zero-shot instruction, "
        "the non-private ensemble and the DP prompt.",
    )
    p.add_argument("--model", default="smollm2-135m", help="the local model that writes the prompt")
    taskfile.add_task_arguments(p, default="rotten-tomatoes")
    p.add_argument("--out", required=True, help="folder for the text prompt artifact")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--eval-model", action="append", default=[], help="also evaluate on this model (repeatable)")
    p.add_argument(
        "--eval-split", default="test", choices=["validation", "test"], help="the split the prompts are scored on"
    )
    p.add_argument("--eval-examples", type=int, default=0, help="evaluate on the first N examples (0: all)")
    p.add_argument("--instruction", default=None, help="the initial instruction (default: the dataset's)")
    p.add_argument("--no-nonprivate", action="store_true", help="skip the non-private ensemble baseline")
    p.add_argument("--report", default=None, help="also write the figures as JSON here (not inside --out)")
    g = p.add_argument_group("DP-OPT settings (a preset, then any of these overrides it)")
    g.add_argument(
        "--preset",
        default="auto",
        choices=["auto", "cpu", "quick", "paper"],
        help="auto: paper on a GPU, cpu otherwise",
    )
    g.add_argument(
        "--target-epsilon",
        type=float,
        default=8.0,
        help="epsilon the whole run may spend, token generation and candidate selection (default 8)",
    )
    g.add_argument("--delta", type=float, default=None, help="default: 1/(2n), n generation examples")
    g.add_argument("--teachers", type=int, default=None, help="J, teachers per token")
    g.add_argument("--shots", type=int, default=None, help="m, expected demonstrations per teacher")
    g.add_argument("--candidates", type=int, default=None, help="K")
    g.add_argument("--max-new-tokens", type=int, default=None, help="most tokens one candidate instruction may have")
    g.add_argument("--temperature", type=float, default=None, help="teachers' sampling temperature (0: greedy)")
    g.add_argument("--token-epsilon", type=float, default=None, help="eps0 of one token release")
    g.add_argument("--token-delta", type=float, default=None, help="delta0 of one token release")
    g.add_argument(
        "--k-bar", type=int, default=None, help="k-bar, the most voted tokens the limited-domain release looks at"
    )
    g.add_argument(
        "--holdout-fraction",
        type=float,
        default=None,
        help="share of the training examples kept apart to select a candidate, in (0, 1)",
    )
    g.add_argument(
        "--teacher-batch-size", type=int, default=None, help="teachers run in one forward pass (memory vs speed)"
    )
    g.add_argument(
        "--seed", type=int, default=None, help="TESTS ONLY: seeds sampling and DP noise (never in production)"
    )
    add_state_arguments(g)
    add_runtime(p)
    p.add_argument("--max-length", type=int, default=256, help="evaluation: longest input in tokens")
    p.set_defaults(func=cmd_dpopt)


_OVERRIDES = (
    "teachers",
    "shots",
    "candidates",
    "max_new_tokens",
    "temperature",
    "token_epsilon",
    "token_delta",
    "k_bar",
    "holdout_fraction",
    "teacher_batch_size",
    "seed",
)


def config_from_args(args: argparse.Namespace, device_type: str):
    from fedprompt.protocols.dpopt_settings import PRESETS

    preset = args.preset if args.preset != "auto" else ("paper" if device_type == "cuda" else "cpu")
    changes = {name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None}
    return preset, replace(PRESETS[preset], target_epsilon=args.target_epsilon, delta=args.delta, **changes)


def cmd_dpopt(args: argparse.Namespace) -> int:
    from fedprompt.cache import check_out_folder

    out = Path(args.out)
    check_out_folder(out, args.force)
    from fedprompt.runtime import Runtime

    runtime = Runtime.create(args.device, args.precision)
    preset, cfg = config_from_args(args, runtime.device.type)  # validated before anything loads
    if args.eval_examples < 0:
        raise ConfigError(f"--eval-examples must be >= 0, got {args.eval_examples}")
    print(f"runtime: {runtime.describe()}; preset {preset}", file=sys.stderr)

    from fedprompt.client.dpopt import generation as dpopt
    from fedprompt.models import zoo
    from fedprompt.task import Verbalizer
    from fedprompt.tuning_settings import DEFAULT_INIT_TEXT

    dataset = taskfile.dataset_for(args.task, args.data)
    instruction = (
        args.instruction or dataset.init_text or DEFAULT_INIT_TEXT.format(labels=", ".join(dataset.label_names))
    )
    writer = zoo.load(args.model, device=runtime.device, attention="sdpa")
    verbalizer = Verbalizer.of(writer.tokenizer, dataset)
    words = [w[0] for w in dataset.label_words]
    train = dataset.split("train")
    gen, holdout = dpopt.prepare(writer, runtime, verbalizer, dataset.template, words, instruction, train, cfg)
    print(
        f"{len(gen.examples)} generation examples, {len(holdout)} holdout; J = {cfg.teachers}, m = {cfg.shots}, "
        f"sample rate {gen.sample_rate:.4f}, eps0 = {cfg.token_epsilon:g}, delta = {gen.delta:.3g}: at most "
        f"{gen.query_limit} token releases fit in epsilon = {cfg.target_epsilon:g}"
    )

    def show(k: int, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"candidate {k + 1}: {text}")

    ledger = open_ledger(args, gen.delta)
    # charged at the projection (valid under adaptive stopping, see dpopt.finish); a run that fails releases nothing
    # (candidates are shown to the holder itself only), so its reservation is cancelled
    reservation = {"mechanism": MECHANISM, "delta": gen.delta, "epsilon": dpopt.projected_epsilon(gen)}
    with ledger.release(task=dataset.name, run_id=uuid.uuid4().hex, **reservation) as release:
        result = dpopt.finish(gen, holdout, dataset.template, on_candidate=show)
        eps = result.epsilon if result.candidates else result.epsilon_generation
        release.settle(steps=result.queries, epsilon=eps)
    total = ledger.spent()
    print(
        f"\nDP-OPT: {len(result.candidates)} candidates, {result.tokens} tokens released in {result.queries} queries "
        f"({result.failures} failed), {result.seconds:.0f} s; epsilon generation {result.epsilon_generation:.3f} "
        f"(the projection; {result.epsilon_generation_realised:.3f} for the queries made), "
        f"selection {result.epsilon_selection:.3f}: the prompt costs epsilon = {result.epsilon:.3f} at delta = "
        f"{result.delta:.3g} ({dpopt.ACCOUNTANT})"
    )
    print(f"ledger {ledger.path}: total spend epsilon = {total.epsilon:.3f} (delta = {total.delta:g}; {total.method})")
    if result.chosen is None:
        raise FedPromptError(
            "DP-OPT released no candidate (every candidate failed or the budget ran out); nothing saved"
        )
    print(f"chosen prompt: {result.chosen}")

    nonprivate = None
    if not args.no_nonprivate:
        print("\nnon-private ensemble (plain majority vote, no noise; for comparison, never saved):")
        np_cfg = replace(cfg, private=False)
        np_gen = dpopt.DPOPTGenerator(
            writer, runtime, verbalizer, dataset.template, words, instruction, gen.examples, np_cfg
        )
        nonprivate = dpopt.finish(np_gen, holdout, dataset.template)

    from fedprompt import text_prompt

    meta = _text_prompt_meta(dataset, writer, instruction, result, cfg, preset)
    text_prompt.save(out, result.chosen, meta)
    prompts = {"zero_shot_template": None, "zero_shot_instruction": instruction, "dp_opt": result.chosen}
    if nonprivate is not None and nonprivate.chosen is not None:
        prompts["nonprivate_ensemble"] = nonprivate.chosen
    split = dataset.split(args.eval_split)
    examples = split[: args.eval_examples] if args.eval_examples else split
    accuracy = {}
    for name in [args.model, *args.eval_model]:
        model = writer if name == args.model else zoo.load(name, device=runtime.device, attention="sdpa")
        accuracy[model.model_id] = evaluate_prompts(model, runtime, dataset, prompts, examples, args.max_length)
    print(f"\n{args.eval_split} accuracy on {dataset.name} ({len(examples)} examples):")
    for model_id, accs in accuracy.items():
        print(f"  {model_id}:")
        for k, v in accs.items():
            print(f"    {k:24} {100 * v:6.2f} %")
    print(f"text prompt artifact: {out}")
    if args.report:
        report = {
            "dataset": dataset.name,
            "writer_model": writer.model_id,
            "preset": preset,
            "eval_split": args.eval_split,
            "eval_examples": len(examples),
            "accuracy": accuracy,
            **_run_record(result, nonprivate),
            "privacy": meta.privacy,
        }
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _text_prompt_meta(dataset, writer, instruction: str, result, cfg, preset: str):
    from fedprompt import text_prompt
    from fedprompt.client.dpopt import generation as dpopt

    return text_prompt.TextPromptMeta.create(
        dataset,
        writer.model_id,
        writer.weights_sha256,
        initial_instruction=instruction,
        privacy={
            "epsilon": result.epsilon,
            "delta": result.delta,
            "accountant": dpopt.ACCOUNTANT,
            "mechanism": MECHANISM,
            "epsilon_generation": result.epsilon_generation,
            "epsilon_selection": result.epsilon_selection,
            "queries": result.queries,
            "sample_rate": result.sample_rate,
            "token_epsilon": cfg.token_epsilon,
            "token_delta": cfg.token_delta,
        },
        settings={**result.settings, "preset": preset, "candidates_released": result.candidates},
    )


def _run_record(result, nonprivate) -> dict:
    """What the report says of the private run (and of the non-private ensemble, when it ran)."""
    return {
        "settings": result.settings,
        "dp_prompt": result.chosen,
        "candidates": result.candidates,
        "generation": {
            "queries": result.queries,
            "failures": result.failures,
            "tokens": result.tokens,
            "seconds": result.seconds,
        },
        "nonprivate": None
        if nonprivate is None
        else {"queries": nonprivate.queries, "tokens": nonprivate.tokens, "seconds": nonprivate.seconds},
    }


def evaluate_prompts(model, runtime, dataset, prompts: dict, examples, max_length: int) -> dict[str, float]:
    """Accuracy of each instruction above the dataset's template (None: the template alone)."""
    from fedprompt.client.dpopt.text import correct_count, instruction_template
    from fedprompt.task import Verbalizer

    verbalizer = Verbalizer.of(model.tokenizer, dataset)
    out = {}
    for name, instruction in prompts.items():
        template = dataset.template if instruction is None else instruction_template(instruction, dataset.template)
        correct = correct_count(
            model, runtime, verbalizer, template, examples, max_length=max_length, desc=f"eval {name}"
        )
        out[name] = correct / len(examples)
    return out
