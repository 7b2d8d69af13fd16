"""TRL's GKDTrainer on one configuration; run by e2e_vs_trl.py inside TRL's own venv (not ours).

Writes {"step_times": [...], "losses": [...], "generated_tokens": [...], "trained_tokens": [...]} as
JSON: the wall time of every optimizer step, taken between consecutive `on_step_end` callbacks (the
first from `on_step_begin`), so data loading, generation, both forwards, the loss, backward and the
optimizer update are all counted; per step, the completion tokens the student sampled (up to and
including EOS, as TRL's completion mask counts them) and the tokens the loss counted (labels != -100).

With --plan FILE (a JSON list of {"lmbda", "beta", "seed", "learning_rate", "save"} and optionally
"on_policy_steps"; quality.py) it trains each entry in turn in this one process, from a fresh copy of the
student, and saves each final student to its "save" folder; the other flags give what the entries share.
"on_policy_steps" (0-based optimizer steps) replaces TRL's own per-step lmbda coin flip with that schedule,
so that a comparison with gkd runs the same steps on-policy (gkd's draw for the same seed).

With --budget_s S the run trains for S seconds instead of --steps (from the first step's start; it ends at the
first step past S) under the same time-based schedule as `gkd train --max_train_seconds`: each step's rate is
the schedule at the share of the budget used when it starts (gkd.train.budget.factor, imported from this repo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # gkd.train.budget: the shared schedule


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("model", "teacher", "dataset"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--out", help="write the run's timings here (JSON)")
    ap.add_argument("--lmbda", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient_checkpointing", action="store_true", help="TRL's own default is on")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--learning_rate", type=float, default=1e-5)
    ap.add_argument("--lr_scheduler_type", default="constant")
    ap.add_argument("--warmup_ratio", type=float, default=0.0)
    ap.add_argument("--budget_s", type=float, default=0.0, help="train for this many seconds instead of --steps")
    ap.add_argument("--plan", help="a JSON list of runs to train in turn (see above)")
    ap.add_argument("--freeze_embedding", action="store_true",
                    help="keep the student's input embedding (and an output layer tied to it) as loaded")
    args = ap.parse_args()
    if args.plan:
        for entry in json.load(open(args.plan)):
            run_args = argparse.Namespace(**{**vars(args), **entry})
            print(f"[trl] {entry}", flush=True)
            train(run_args)
        return
    train(args)


def train(args) -> None:
    """One GKDTrainer run; writes args.out (timings) when given, and the final student to args.save."""
    import tempfile

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    student = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    if args.freeze_embedding:  # what a TRL user writes for gkd's --freeze_parameters model.embed_tokens
        student.get_input_embeddings().requires_grad_(False)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype)
    data = load_dataset("json", data_files=args.dataset, split="train")

    marks: list[float] = []
    losses: list[float] = []
    generated: list[int] = []  # per optimizer step (one micro-batch per step here)
    trained: list[int] = []

    schedule = getattr(args, "on_policy_steps", None)

    def elapsed() -> float:
        return time.perf_counter() - marks[0] if marks else 0.0

    class Counting(GKDTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if not args.budget_s:
                return super().create_scheduler(num_training_steps, optimizer)
            from gkd.train.budget import factor

            # HF moves the scheduler after each optimizer step: the next step's rate at the time used so far
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda _step: factor(args.lr_scheduler_type, args.warmup_ratio,
                                                                  min(1.0, elapsed() / args.budget_s)))
            return self.lr_scheduler

        def training_step(self, model, inputs, num_items_in_batch=None):
            generated.append(0)
            if schedule is not None:  # TRL samples when random.random() <= lmbda: 1.0 always, 0.0 never
                self.lmbda = 1.0 if self.state.global_step in schedule else 0.0
            return super().training_step(model, inputs, num_items_in_batch)

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            generated[-1] += int(mask[:, inputs["prompts"].shape[1]:].sum())
            return ids, mask, labels

        def compute_loss(self, model, inputs, *a, **kw):
            trained.append(int((inputs["labels"] != -100).sum()))
            return super().compute_loss(model, inputs, *a, **kw)

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            marks.append(time.perf_counter())
            if args.budget_s and elapsed() >= args.budget_s:
                control.should_training_stop = True

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = GKDConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=10**6 if args.budget_s else args.steps, learning_rate=args.learning_rate, lr_scheduler_type=args.lr_scheduler_type,
            warmup_steps=args.warmup_ratio, lmbda=args.lmbda,  # transformers 5: a float < 1 is a ratio
            beta=args.beta, temperature=args.temperature, max_new_tokens=args.max_new_tokens, max_length=512,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
            bf16=args.dtype == "bfloat16", fp16=False,
            dataloader_num_workers=0, seed=args.seed, disable_tqdm=True,
            gradient_checkpointing=args.gradient_checkpointing)
        trainer = Counting(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                             processing_class=tokenizer, callbacks=[Clock()])
        trainer.train()
    if getattr(args, "save", None):
        trainer.model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        with open(f"{args.save}/trl_run.json.tmp", "w") as f:  # the steps that sampled, as measured
            json.dump({"on_policy_steps": [i for i, g in enumerate(generated) if g], "steps": len(generated),
                       "trained_tokens": sum(trained), "train_seconds": elapsed()}, f)
        os.replace(f"{args.save}/trl_run.json.tmp", f"{args.save}/trl_run.json")  # whole when quality.py sees it
    times = [b - a for a, b in zip(marks, marks[1:])]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"step_times": times, "losses": losses, "generated_tokens": generated, "trained_tokens": trained}, f)


if __name__ == "__main__":
    main()
