"""`gkd train`: distil a teacher into a student, in this process or in several under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from gkd.config import TrainConfig, build_config, parser_for

ERROR_DIR = "GKD_ERROR_DIR"  # where workers under `gkd train --nproc_per_node` leave their one-line errors


def run(argv: list[str]) -> int:
    p = parser_for(TrainConfig, "gkd train", "Distil a teacher into a student with GKD.")
    ns = vars(p.parse_args(argv))
    cfg = build_config(TrainConfig, {k: v for k, v in ns.items() if k != "config"}, ns.get("config"))
    if (cfg.nproc_per_node > 1 or cfg.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        check_launch(cfg.validate(), cfg.nproc_per_node * cfg.nnodes)  # flag mistakes in one line, before any process
        return launch_torchrun(cfg.nproc_per_node, ["train", *argv], cfg)
    cmd_train(cfg)
    return 0


def cmd_train(cfg: TrainConfig) -> dict:
    from gkd.parallel import teardown
    from gkd.train.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, log=lambda msg: print(msg, file=sys.stderr))
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
                    cfg.context_parallel_size, cfg.pipeline_model_parallel_size)
        check_folder(cfg.model, cfg.expert_model_parallel_size, lora_experts=cfg.train_type == "lora"
                     and cfg.lora_experts and cfg.target_modules == "all-linear")
        from gkd.config import teacher_specs

        for spec in teacher_specs(cfg):
            if not spec.remote:
                check_folder(spec.source, cfg.expert_model_parallel_size, student=False)


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
