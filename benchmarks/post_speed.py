"""POST's compute saving: a data holder's DP training step on the student against the same step on the teacher.

    python benchmarks/post_speed.py [--teacher smollm2-135m] [--keep-layers first3,last3 | --student NAME_OR_DIR]
        [--batch-size 32] [--steps 4] [--rounds 2] [--transfer-steps 200]

Both steps are the one `fedprompt tune --dp` takes (Opacus's DPOptimizer over fedprompt's SoftPrompt grad
sampler, Adam, clip 1), on the same real batches of the dataset's training texts (the two models share the
tokenizer, so the token ids are identical), the same 20-token prompt, sequence lengths and precision,
interleaved over --rounds. A step's time depends on the architecture, not on the weights: without --student
the student is cut from the teacher (--keep-layers) and not distilled. Then the provider's side: one
transfer of a student prompt to the teacher (--transfer-steps steps, public inputs of --public), timed
whole. Prints one JSON object; the headline is teacher step / student step (target >= 4).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import emit, fixed_batches
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedprompt import artifact
from fedprompt.dp import grad_sample as _registered  # noqa: F401
from fedprompt.models import zoo
from fedprompt.models.student import build_student, decoder_layers, parse_keep_layers
from fedprompt.models.zoo import LoadedModel
from fedprompt.runtime import Runtime
from fedprompt.server.post.transfer import TransferConfig, transfer
from fedprompt.training import Session
from fedprompt.tuning_settings import TuneConfig


def cut_student(teacher: LoadedModel, spec: str, runtime: Runtime) -> LoadedModel:
    keep = parse_keep_layers(spec, len(decoder_layers(teacher.model)[1]))
    model = build_student(teacher.model, keep).to(runtime.device)
    return LoadedModel(f"{teacher.model_id}-cut-{len(keep)}l", model, teacher.tokenizer, zoo.state_dict_sha256(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--student", default=None, help="a distilled student (default: cut one with --keep-layers)")
    ap.add_argument("--keep-layers", default="first3,last3")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--public", default="vader-amazon")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--prompt-length", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--transfer-steps", type=int, default=200, help="0: no transfer timing")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    runtime = Runtime.create(args.device, args.precision)
    teacher = Session(args.teacher, args.dataset, runtime=runtime)
    student_model = (
        zoo.load(args.student, device=runtime.device)
        if args.student
        else cut_student(teacher.loaded, args.keep_layers, runtime)
    )
    student = Session(student_model, teacher.dataset, runtime=runtime)
    batches = fixed_batches(teacher, args.batch_size, args.steps)
    tune_cfg = TuneConfig(prompt_length=args.prompt_length)

    def dp_step_seconds(session: Session) -> float:
        initial, _ = session.initial_prompt(tune_cfg)
        prompted = session.prompted(initial)
        prompted.train()
        gsm = GradSampleModule(prompted)
        opt = DPOptimizer(
            torch.optim.Adam(prompted.prompt.parameters(), lr=3e-3),
            noise_multiplier=0.5,
            max_grad_norm=1.0,
            expected_batch_size=args.batch_size,
        )

        def step(batch):
            opt.zero_grad()
            with runtime.autocast():
                loss = prompted.classification_loss(batch, session.verbalizer)
            loss.backward()
            opt.step()

        step(batches[0])  # warm-up
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            step(b)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        gsm.remove_hooks()
        return (time.perf_counter() - t0) / len(batches)

    times: dict[str, list[float]] = {"teacher": [], "student": []}
    for _ in range(args.rounds):
        times["teacher"].append(dp_step_seconds(teacher))
        times["student"].append(dp_step_seconds(student))
    med = {k: statistics.median(v) for k, v in times.items()}

    # the provider's side: one transfer of a (here untuned) student prompt to the teacher
    transfer_report = None
    if args.transfer_steps > 0:
        with tempfile.TemporaryDirectory() as tmp:
            initial, init = student.initial_prompt(tune_cfg)
            meta = artifact.ArtifactMeta.create(
                teacher.prompt_task, student.loaded.model_id, student.loaded.weights_sha256, origin_id="", init=init
            )
            artifact.save(Path(tmp) / "source", initial, meta)
            cfg = TransferConfig(steps=args.transfer_steps)
            t0 = time.perf_counter()
            result = transfer(str(Path(tmp) / "source"), teacher.loaded, args.public, cfg, student=student.loaded,
                              runtime=runtime)  # fmt: skip
            transfer_report = {
                "seconds": time.perf_counter() - t0,
                "steps": args.transfer_steps,
                "public_inputs": cfg.public_examples,
                "validation_examples": result.report["public"]["validation"],
                "evaluations": len(result.report["history"]),
            }

    layers = len(decoder_layers(student.loaded.model)[1])
    emit(
        {
            "name": "post_speed",
            "value": med["teacher"] / med["student"],
            "unit": "ratio of seconds per DP training step, teacher / student (target >= 4)",
            "seconds_per_step": med,
            "runs": times,
            "student_layers": layers,
            "teacher_layers": len(decoder_layers(teacher.loaded.model)[1]),
            "transfer": transfer_report,
            "settings": {**vars(args), "runtime": runtime.describe()},
        }
    )


if __name__ == "__main__":
    main()
