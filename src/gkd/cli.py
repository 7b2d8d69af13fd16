"""`gkd train | eval | serve | prune | plot | models | demo`. User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path

from gkd.config import EvalConfig, TrainConfig, build_config, parser_for
from gkd.errors import GKDError

ERROR_DIR = "GKD_ERROR_DIR"  # where workers under `gkd train --nproc_per_node` leave their one-line errors


def _prompt_examples(paths, tokenizer, max_length, images=None, teacher_images=None):
    """The rows' prompts (their images expanded as the student's processor does)."""
    from gkd.data.rows import load_examples

    return [dataclasses.replace(e, completion_ids=None) for e in load_examples(
        paths, tokenizer, max_length=max_length, truncation_strategy="left", max_completion_length=1, warn=_warn,
        images=images, teacher_images=teacher_images)]


def check_output_file(path: str) -> None:
    """Fail before the work if the metrics file cannot be written (a missing or read-only folder)."""
    folder = Path(path).absolute().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise GKDError(f"--output {path}: the folder {folder} does not exist or is not writable")


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
        Path(cfg.output).write_text(json.dumps({**result.metrics, "rows": rows}, indent=2))
    return result.metrics


def cmd_train(cfg: TrainConfig) -> dict:
    from gkd.parallel import teardown
    from gkd.train.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, log=_warn)
        last = trainer.train()
        if trainer.par.is_main:
            print(json.dumps({"final": str(trainer.out / "final"), **last}))
    finally:
        try:
            if trainer is not None:
                trainer.close()
        finally:
            teardown()
    return last


def check_launch(cfg: TrainConfig, world: int) -> None:
    from gkd.parallel.mesh import check_options, mesh_sizes

    rep, shard, _, _ = mesh_sizes(world, cfg.tensor_model_parallel_size, cfg.data_parallel_replicate_size,
                                  cfg.context_parallel_size, cfg.pipeline_model_parallel_size)
    cfg.grad_accumulation_steps(rep * shard)
    check_options(cfg, world, cfg.tensor_model_parallel_size)
    if cfg.expert_model_parallel_size > 1:  # from the configs: a dense student or an expert count EP does not split
        from gkd.parallel.expert import check_folder
        from gkd.parallel.mesh import expert_size

        expert_size(cfg.expert_model_parallel_size, world, rep, shard, cfg.tensor_model_parallel_size,
                    cfg.context_parallel_size)
        check_folder(cfg.model, cfg.expert_model_parallel_size, lora_experts=cfg.train_type == "lora"
                     and cfg.lora_experts and cfg.target_modules == "all-linear")
        if cfg.teacher_model:
            check_folder(cfg.teacher_model, cfg.expert_model_parallel_size, student=False)


def launch_torchrun(nproc: int, argv: list[str], cfg: TrainConfig) -> int:
    """`gkd train --nproc_per_node N [--nnodes M --rdzv_endpoint HOST:PORT]`: the same command in N
    processes on this machine (torchrun's launcher, in this process), which meet the other machines' at
    the rendezvous. A worker's own one-line error is the whole report; the exit code is the first failed
    worker's (2 for a user mistake)."""
    import logging
    import signal
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # workers report for themselves
    # as torchrun does: the processes share the cores instead of each taking them all
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if cfg.nnodes == 1:
        rdzv = dict(run_id=uuid.uuid4().hex, rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0")
    elif cfg.node_rank >= 0:  # fixed ranks: the endpoint is node 0's
        rdzv = dict(run_id=cfg.rdzv_id, rdzv_backend="static", rdzv_endpoint=cfg.rdzv_endpoint,
                    rdzv_configs={"rank": cfg.node_rank})
    else:
        rdzv = dict(run_id=cfg.rdzv_id, rdzv_backend="c10d", rdzv_endpoint=cfg.rdzv_endpoint)
    config = LaunchConfig(min_nodes=cfg.nnodes, max_nodes=cfg.nnodes, nproc_per_node=nproc, max_restarts=0, **rdzv)
    import tempfile

    # workers leave their one-line errors here and this launcher prints one of them: printed by every rank
    # they would come once per process (the same mistake stops them all)
    errors = Path(tempfile.mkdtemp(prefix="gkd-errors-"))
    os.environ[ERROR_DIR] = str(errors)
    try:
        elastic_launch(config, sys.executable)("-m", "gkd", *argv)
    except ChildFailedError as e:
        said = sorted(errors.glob("rank-*.txt"), key=lambda f: f.stat().st_mtime_ns)  # the first to fail
        if said:
            print(f"gkd: error: {said[0].read_text()}", file=sys.stderr)
            return 2
        rank, first = min(e.failures.items(), key=lambda kv: kv[1].timestamp)
        if first.exitcode < 0:  # killed: it could not say why itself
            print(f"gkd: error: process {rank} was killed by {signal.Signals(-first.exitcode).name}", file=sys.stderr)
            return 128 - first.exitcode
        return first.exitcode
    except (KeyboardInterrupt, SignalException):
        print("gkd: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(errors, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="gkd", description="Generalized Knowledge Distillation of language models.")
    top.add_argument("command", choices=["train", "eval", "serve", "prune", "plot", "models", "demo"],
                     help="what to do")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        print("\nRun `gkd COMMAND --help` for the options of each command.")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            p = parser_for(TrainConfig, "gkd train", "Distil a teacher into a student with GKD.")
            ns = vars(p.parse_args(rest))
            cfg = build_config(TrainConfig, {k: v for k, v in ns.items() if k != "config"}, ns.get("config"))
            if (cfg.nproc_per_node > 1 or cfg.nnodes > 1) and "LOCAL_RANK" not in os.environ:
                # flag mistakes in one line, before any process
                check_launch(cfg.validate(), cfg.nproc_per_node * cfg.nnodes)
                return launch_torchrun(cfg.nproc_per_node, argv, cfg)
            cmd_train(cfg)
        elif command == "eval":
            p = parser_for(EvalConfig, "gkd eval", "Held-out metrics of a student against a teacher.")
            ns = vars(p.parse_args(rest))
            cmd_eval(build_config(EvalConfig, {k: v for k, v in ns.items() if k != "config"}, ns.get("config")))
        elif command == "serve":
            from gkd.config import ServeConfig
            from gkd.teacher.serve import TeacherServer

            p = parser_for(ServeConfig, "gkd serve", "Serve a teacher's top-k log-probs (vLLM's API, plus a compact form).")
            ns = vars(p.parse_args(rest))
            cfg = build_config(ServeConfig, {k: v for k, v in ns.items() if k != "config"}, ns.get("config"))
            cfg.api_key = cfg.api_key or os.environ.get("GKD_API_KEY", "")
            TeacherServer(cfg).serve_forever()
        elif command == "prune":
            from gkd.config import _OneLineErrors
            from gkd.models import prune_command

            p = _OneLineErrors(prog="gkd prune", description="Depth-prune a teacher into a student folder.")
            p.add_argument("--teacher_model", "--teacher-model", "--model", required=True,
                           help="a Hugging Face folder, a .gguf file, or smollm2")
            p.add_argument("--output_dir", "--output-dir", required=True, help="where the student folder goes")
            p.add_argument("--keep_layers", "--keep-layers", type=lambda s: [int(x) for x in s.split(",")],
                           help="comma-separated layer indices to keep (default: every --every-th)")
            p.add_argument("--every", type=int, default=2, help="keep layers 0, every, 2*every, ...")
            p.add_argument("--torch_dtype", "--torch-dtype", default="float32", choices=("float32", "bfloat16"),
                           help="dtype of the saved weights")
            a = p.parse_args(rest)
            if a.every < 1:
                raise GKDError("--every must be >= 1")
            print(json.dumps(prune_command(a.teacher_model, a.output_dir, a.keep_layers, a.every, a.torch_dtype)))
        elif command == "plot":
            from gkd.config import _OneLineErrors
            from gkd.train.metrics import plot

            p = _OneLineErrors(prog="gkd plot", description="Draw the logged curves of a training run.")
            p.add_argument("output_dir", help="a training --output_dir (holds metrics.jsonl)")
            a = p.parse_args(rest)
            src = Path(a.output_dir) / "metrics.jsonl"
            if not src.is_file():
                raise GKDError(f"{src}: no such file (is {a.output_dir} a training output folder?)")
            print(plot(src, Path(a.output_dir) / "loss_curve.png"))
        elif command == "models":
            from gkd.config import _OneLineErrors
            from gkd.models import support

            p = _OneLineErrors(prog="gkd models", description="The supported model families and what works for each.")
            p.add_argument("--json", action="store_true", help="one JSON object per family instead of a table")
            a = p.parse_args(rest)
            print("\n".join(json.dumps(r) for r in support.rows()) if a.json else support.markdown())
        elif command == "demo":
            from gkd.demo import main as demo_main

            demo_main(rest)
        else:
            raise GKDError(f"unknown command {command!r}; choose train, eval, serve, prune, plot, models or demo")
    except GKDError as e:
        if os.environ.get(ERROR_DIR) and "RANK" in os.environ:  # under gkd's own launcher: it reports
            Path(os.environ[ERROR_DIR], f"rank-{os.environ['RANK']}.txt").write_text(str(e))
            return 2
        if int(os.environ.get("RANK", "0")):
            # under plain torchrun the same mistake stops every rank: rank 0 reports it and the launcher
            # then stops this one while it waits; it speaks only if rank 0 did not fail
            time.sleep(2)
        print(f"gkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gkd: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # the machine, not the program: a full disk, a read-only or forbidden folder, a taken port
        print(f"gkd: error: {e.strerror} ({e.filename or 'no file named'})", file=sys.stderr)
        return 2
    return 0


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                       errno.EADDRINUSE, errno.EADDRNOTAVAIL}


if __name__ == "__main__":
    sys.exit(main())
