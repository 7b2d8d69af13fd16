"""`gkd eval`: held-out metrics of a student against a teacher."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from gkd.config import EvalConfig, build_config, parser_for
from gkd.errors import GKDError


def run(argv: list[str]) -> None:
    p = parser_for(EvalConfig, "gkd eval", "Held-out metrics of a student against a teacher.")
    ns = vars(p.parse_args(argv))
    cmd_eval(build_config(EvalConfig, {k: v for k, v in ns.items() if k != "config"}, ns.get("config")))


def _prompt_examples(paths, tokenizer, max_length, images=None, teacher_images=None):
    """The rows' prompts (their images expanded as the student's processor does)."""
    from gkd.data.rows import load_examples

    return [dataclasses.replace(e, completion_ids=None) for e in load_examples(
        paths, tokenizer, max_length=max_length, truncation_strategy="left", max_completion_length=1, warn=_warn,
        images=images, teacher_images=teacher_images)]


def check_output_file(path: str) -> None:
    """Fail before the work if the metrics file cannot be written (a folder by that name, a missing or
    read-only folder)."""
    target = Path(path).absolute()
    if target.is_dir():
        raise GKDError(f"--output {path}: is a folder; name a file, such as {Path(path) / 'eval.json'}")
    folder = target.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise GKDError(f"--output {path}: the folder {folder} does not exist or is not writable")


def write_atomic(path: str, text: str) -> None:
    """The results whole or not at all (gkd.atomic); a failed write (a full disk) is one line and leaves no
    temp file (and an earlier file at ``path`` as it was)."""
    from gkd import atomic
    from gkd.train import outdir

    target = Path(path).absolute()
    with outdir.writing(f"writing the results {path}", target.parent, then=""):
        atomic.write_atomic(target, text)


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_eval(cfg: EvalConfig) -> dict:
    import torch

    from gkd.config import check_types
    from gkd.data.rows import check_context, model_context
    from gkd.evaluate import evaluate, format_table
    from gkd.models import check_compatible, eos_ids, load_image_processing, load_model, load_tokenizer

    for name in ("model", "teacher_model"):
        if not getattr(cfg, name):
            raise GKDError(f"--{name} is required")
    if not cfg.dataset:
        raise GKDError("--dataset is required")
    check_types(cfg)
    if not 0 <= cfg.beta <= 1 or cfg.temperature <= 0:
        raise GKDError("--beta must be in [0, 1] and --temperature > 0")
    for name in ("batch_size", "max_completion_length", "max_length"):
        if getattr(cfg, name) < 1:
            raise GKDError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_samples < 0:
        raise GKDError(f"--num_samples must be >= 0, got {cfg.num_samples}")
    if cfg.output:
        check_output_file(cfg.output)
    tok = load_tokenizer(cfg.model)
    images = load_image_processing(cfg.model, tok)
    theirs = load_image_processing(cfg.teacher_model, tok) if images is not None else None
    if images is not None and theirs is None:
        raise GKDError(f"--teacher_model {cfg.teacher_model} is text-only but the student reads images")
    teacher_images = None if theirs is None or theirs.same_as(images) else theirs
    examples = _prompt_examples(cfg.dataset, tok, cfg.max_length, images, teacher_images)
    student, teacher = load_model(cfg.model, cfg.torch_dtype), load_model(cfg.teacher_model, cfg.torch_dtype)
    check_compatible(tok, load_tokenizer(cfg.teacher_model), student, teacher)
    check_context(examples, cfg.max_completion_length, True,
                  {"student": model_context(student), "teacher": model_context(teacher)})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = [e.prompt_ids for e in examples]
    inputs = None if images is None else [images(e.images) for e in examples]
    teacher_inputs = None if images is None else [(teacher_images or images)(e.images) for e in examples]
    result = evaluate(student.to(device), teacher.to(device), prompts, eos_ids=eos_ids(tok, student),
                      pad_id=tok.pad_token_id, beta=cfg.beta, temperature=cfg.temperature,
                      max_new_tokens=cfg.max_completion_length, device=device, batch_size=cfg.batch_size,
                      inputs=inputs, teacher_inputs=teacher_inputs, samples=cfg.num_samples)
    print(format_table({"student": result.metrics}))
    if cfg.output:
        text = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        rows = [{"prompt": text(p), "teacher": text(t), "student": text(g), "samples": [text(c) for c in drawn], **m}
                for p, t, g, drawn, m in zip(prompts, result.teacher_completions, result.student_completions,
                                             result.samples, result.rows)]
        write_atomic(cfg.output, json.dumps({**result.metrics, "rows": rows}, indent=2))
    return result.metrics
