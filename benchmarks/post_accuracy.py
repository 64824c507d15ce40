"""POST's accuracy figures for one student: what a data holder's private prompt is worth on the teacher.

    python benchmarks/post_accuracy.py --student NAME_OR_DIR [--teacher smollm2-135m] [--dataset rotten-tomatoes]
        [--public vader-amazon] [--dp-steps 200] [--transfer-steps 200] [--alpha 0.5[,1.0...]]
        [--source DIR] [--teacher-dp] [--study-checkpoints] [--out runs/post-accuracy]

On the dataset's 500 test examples: the teacher zero-shot (the dataset's template, the baseline of every
figure in the README), the student zero-shot, the student with a prompt DP-tuned on it (epsilon = 8, the
README's single-holder settings: 20 tokens from the instruction text, Adam lr 3e-3, batch 32), that prompt
put on the teacher as it is, and the prompt POST-transferred to the teacher (one run per --alpha) with
public inputs of --public; optionally DP tuning directly on the teacher with the same settings
(--teacher-dp), and the test accuracy of every transfer checkpoint (--study-checkpoints: shows what the
choice on public validation data gains or loses; never used to choose). --source reuses a DP prompt saved
by an earlier run instead of tuning a new one. Prints one JSON object; the artifacts land in --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit

from fedprompt import artifact
from fedprompt.dp.engine import DPConfig, private_tune
from fedprompt.models import zoo
from fedprompt.runtime import Runtime
from fedprompt.server.post.transfer import TransferConfig, transfer
from fedprompt.training import Session
from fedprompt.tuning_settings import TuneConfig


def dp_prompt(session: Session, cfg: TuneConfig, epsilon: float, out: Path) -> tuple[Path, float]:
    started = time.monotonic()
    result, spend = private_tune(session, cfg, DPConfig(target_epsilon=epsilon))
    seconds = time.monotonic() - started
    _, init = session.initial_prompt(cfg)
    meta = artifact.ArtifactMeta.create(
        session.prompt_task,
        session.loaded.model_id,
        session.loaded.weights_sha256,
        origin_id=result.origin_id,
        init=init,
        privacy=spend,
        training={"steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size},
    )
    artifact.save(out, result.weight, meta)
    return out, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--public", default="vader-amazon")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--dp-steps", type=int, default=200)
    ap.add_argument("--transfer-steps", type=int, default=200)
    ap.add_argument("--transfer-lr", type=float, default=1e-3)
    ap.add_argument("--alpha", default="0.5", help="comma-separated: one transfer per value")
    ap.add_argument("--source", default=None, help="a DP prompt already tuned on the student")
    ap.add_argument("--teacher-dp", action="store_true", help="also DP-tune directly on the teacher")
    ap.add_argument(
        "--study-checkpoints",
        action="store_true",
        help="also report the test accuracy of every evaluated transfer checkpoint (a diagnostic: the choice "
        "itself is made on public validation data only)",
    )
    ap.add_argument("--out", default="runs/post-accuracy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    runtime = Runtime.create(args.device, args.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tune_cfg = TuneConfig(steps=args.dp_steps, lr=3e-3, batch_size=32, eval_every=0)
    teacher = Session(args.teacher, args.dataset, runtime=runtime)
    student = Session(args.student, args.dataset, runtime=runtime)
    test = teacher.dataset.split("test")
    acc: dict[str, float] = {
        "teacher_zero_shot": teacher.evaluate(teacher.prompted(None), test, desc="teacher zero-shot"),
        "student_zero_shot": student.evaluate(student.prompted(None), test, desc="student zero-shot"),
    }
    seconds: dict[str, float] = {}
    if args.source:
        source = Path(args.source)
    else:
        source, seconds["student_dp_tuning"] = dp_prompt(student, tune_cfg, args.epsilon, out / "student-dp")
    weight, meta = artifact.load(source)
    acc["student_dp"] = student.evaluate(student.prompted(weight), test, desc="student + DP prompt")
    if weight.shape[1] == teacher.loaded.hidden_size:
        acc["untransferred_on_teacher"] = teacher.evaluate(teacher.prompted(weight), test, desc="untransferred")
    transfers = {}
    for alpha in (float(a) for a in args.alpha.split(",")):
        cfg = TransferConfig(alpha=alpha, steps=args.transfer_steps, lr=args.transfer_lr)
        started = time.monotonic()
        result = transfer(
            str(source), teacher.loaded, args.public, cfg, student=student.loaded, runtime=runtime,
            keep_checkpoints=args.study_checkpoints,
        )  # fmt: skip
        seconds[f"transfer_alpha_{alpha:g}"] = time.monotonic() - started
        artifact.save(out / f"post-alpha-{alpha:g}", result.weight, result.meta)
        chosen = next(r for r in result.report["history"] if r["step"] == result.report["chosen_step"])
        transfers[f"{alpha:g}"] = {
            "test_accuracy": teacher.evaluate(teacher.prompted(result.weight), test, desc=f"POST alpha={alpha:g}"),
            "chosen_step": result.report["chosen_step"],
            "public_validation_accuracy": chosen["val_accuracy"],
            "history": result.report["history"],
        }
        if args.study_checkpoints:  # diagnostic only: the test set never chooses the checkpoint
            transfers[f"{alpha:g}"]["test_accuracy_by_step"] = {
                step: teacher.evaluate(teacher.prompted(w), test, desc=f"step {step}")
                for step, w in result.checkpoints.items()
            }
    if args.teacher_dp:
        tdp, seconds["teacher_dp_tuning"] = dp_prompt(teacher, tune_cfg, args.epsilon, out / "teacher-dp")
        acc["teacher_dp"] = teacher.evaluate(teacher.prompted(artifact.load(tdp)[0]), test, desc="teacher DP")
    manifest = zoo.read_manifest(Path(zoo.registered().get(args.student, args.student)))
    emit(
        {
            "name": "post_accuracy",
            "unit": "test accuracy",
            "accuracy": acc,
            "post": transfers,
            "seconds": seconds,
            "privacy": meta.privacy,
            "student": {
                "id": student.loaded.model_id,
                "layers_kept": manifest.get("layers_kept"),
                "distillation": {k: manifest.get("distillation", {}).get(k) for k in ("steps_done", "tokens", "seconds",
                                                                                      "lr", "corpus", "heldout")},
            },
            "settings": {**vars(args), "test_examples": len(test), "precision": runtime.precision},
        }
    )  # fmt: skip


if __name__ == "__main__":
    main()
