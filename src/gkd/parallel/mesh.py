"""The device mesh from the flags: pipeline stages, data parallel (replicate x shard), context parallel,
tensor parallel, expert parallel; one process per device.

Launch with ``torchrun --nproc-per-node N -m gkd train ...`` (or ``gkd train --nproc_per_node N``).
Sizes: world = pp x dp_replicate x dp_shard x cp x tp; dp_shard takes whatever the other sizes leave, so
FSDP is the default way to use more processes. Context-parallel peers (cp) hold the same rows and split
their tokens; FSDP shards over dp_shard x cp. Expert parallelism (EP) splits the data-parallel shard ranks
further (dp_shard = edp x ep, torchtitan's layout): a second mesh over (pp, dp_replicate, edp, ep, tp) holds the
experts (gkd.parallel.expert) while every other weight keeps this mesh; a pipeline stage's experts are split over
the EP ranks of that stage.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
# torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, bound at import: imported
# after a group exists (transformers imports it lazily, loading a config), they keep that group alive past
# destroy_process_group, and at the interpreter's exit its gloo threads, still running, can abort a finished
# process (SIGABRT). Imported now, before any group, the defaults hold None.
import torch.distributed.nn  # noqa: F401

from gkd.errors import GKDError
from gkd.parallel.groups import forget, made

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EXPERT_DIMS = ("pp", "dp_replicate", "edp", "ep", "tp")  # the experts' mesh: dp_shard x cp = edp x ep (EP inner)
_made_group = False


@dataclass
class Parallel:
    """Where this process sits. A single process has no mesh and every collective is a no-op."""

    world: int = 1
    rank: int = 0
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1  # pipeline stages (gkd.parallel.pipeline)
    pipeline: object = None  # gkd.parallel.pipeline.PipelinePlan when pp > 1
    device: torch.device = torch.device("cpu")
    mesh: object = None  # DeviceMesh over DIMS when world > 1
    ep: int = 1
    expert_mesh: object = None  # DeviceMesh over EXPERT_DIMS when ep > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        if self.mesh is None:
            return 0
        return self.mesh.get_local_rank("dp_replicate") * self.dp_shard + self.mesh.get_local_rank("dp_shard")

    @property
    def tp_group(self):
        return self.mesh.get_group("tp") if self.tp > 1 else None

    @property
    def cp_group(self):
        return self.mesh.get_group("cp") if self.cp > 1 else None

    @property
    def cp_rank(self) -> int:
        return self.mesh.get_local_rank("cp") if self.cp > 1 else 0

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp") if self.pp > 1 else 0

    @property
    def pp_group(self):
        return self.mesh.get_group("pp") if self.pp > 1 else None

    @property
    def tp_mesh(self):
        return self.mesh["tp"] if self.tp > 1 else None

    @property
    def dp_mesh(self):
        """The (replicate, shard) mesh FSDP shards and reduces over, the shard dimension taking in the
        context-parallel peers (their gradients are partial sums over their tokens); None when there is
        neither data nor context parallelism."""
        if self.cp > 1:
            return self.mesh["dp_replicate", self._shard_cp()]
        return self.mesh["dp_replicate", "dp_shard"] if self.dp_size > 1 else None

    @property
    def shard_mesh(self):
        """The mesh the teacher's layers are sharded over (replicas keep whole copies); None if size 1."""
        if self.cp > 1:
            return self.mesh[self._shard_cp()]
        return self.mesh["dp_shard"] if self.dp_shard > 1 else None

    def _shard_cp(self) -> str:
        # flattened in setup (every rank takes part in making its groups); torch warns that slicing it from
        # the root will change, which the pinned torch does not do
        warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")
        return "dp_shard_cp"

    @property
    def ep_mesh(self):
        """(ep) or, with tensor parallelism, (ep, tp): experts split over ep, whole on each TP rank."""
        if self.ep == 1:
            return None
        return self.expert_mesh["ep", "tp"] if self.tp > 1 else self.expert_mesh["ep"]

    @property
    def edp_mesh(self):
        """The data-parallel ranks that hold the same experts, (replicate, edp): FSDP (HSDP with replicas)
        shards and reduces the experts over them; None when EP takes every data-parallel rank."""
        return self.expert_mesh["dp_replicate", "edp"] if self.ep > 1 and self.dp_size * self.cp > self.ep else None

    def dp_slice(self, n: int) -> tuple[int, int]:
        """This rank's rows [lo, hi) of a global batch of n rows."""
        per = n // self.dp_size
        return self.dp_rank * per, (self.dp_rank + 1) * per

    def dp_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """``t`` reduced over the data-parallel ranks (tensor-parallel peers hold the same value already)."""
        for dim in ("dp_replicate", "dp_shard"):
            if self.mesh is not None and self.mesh.size(self.mesh.mesh_dim_names.index(dim)) > 1:
                dist.all_reduce(t, op=op, group=self.mesh.get_group(dim))
        return t

    def dp_gather(self, obj) -> list:
        """Every data-parallel rank's ``obj``, in data-parallel rank order (the order of ``dp_slice``)."""
        out = [obj]
        for dim in ("dp_shard", "dp_replicate"):  # the inner dimension first: dp_rank = replicate x shard + shard
            if self.mesh is not None and self.mesh.size(self.mesh.mesh_dim_names.index(dim)) > 1:
                box = [None] * self.mesh.size(self.mesh.mesh_dim_names.index(dim))
                dist.all_gather_object(box, out, group=self.mesh.get_group(dim))
                out = [x for part in box for x in part]
        return out

    def pipeline_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums over the data-parallel ranks and a pipeline's stages, of values one stage alone holds (the last
        stage's evaluation sums, the sampler's corrected-token counts)."""
        self.dp_reduce(t)
        if self.pp > 1:
            dist.all_reduce(t, group=self.pp_group)
        return t

    def loss_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums of per-token quantities over every rank holding other tokens: data and context parallel."""
        self.dp_reduce(t)
        if self.cp > 1:
            dist.all_reduce(t, group=self.cp_group)
        return t

    def share_in_tp(self, obj):
        """The first rank's ``obj`` on every rank of this tensor- and context-parallel group. Peers sample the
        same rows with the same seeds; this makes sure they feed the same tokens to their shared forwards
        even if two samplers ever disagree (GPU nondeterminism)."""
        for size, group in ((self.cp, self.cp_group), (self.tp, self.tp_group)):
            if size > 1:
                box = [obj]
                dist.broadcast_object_list(box, group=group, group_src=0)
                obj = box[0]
        return obj

    def most(self, value: float) -> float:
        """The largest ``value`` over all ranks."""
        if self.world == 1:
            return value
        t = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def expert_size(ep: int, world: int, dp_replicate: int, dp_shard: int, tp: int, cp: int = 1, pp: int = 1) -> int:
    """The expert-parallel size, or a one-line error: EP splits the data-parallel shard ranks (with context
    parallelism, dp_shard x cp: context-parallel peers hold other tokens of the same rows, which the experts take
    like any other tokens)."""
    if ep < 1:
        raise GKDError(f"--expert_model_parallel_size must be >= 1, got {ep}")
    if ep == 1:
        return 1
    if world == 1:
        raise GKDError(f"--expert_model_parallel_size {ep} needs {ep} processes or more (launch with torchrun or "
                       "--nproc_per_node)")
    if tp > 1 and ep != dp_shard * cp * dp_replicate:
        raise GKDError(f"--expert_model_parallel_size {ep} with --tensor_model_parallel_size {tp} needs EP to take "
                       f"every data- and context-parallel rank ({dp_shard * cp * dp_replicate}): experts "
                       "FSDP-sharded beside TP are not supported yet")
    if (dp_shard * cp) % ep:
        what = "data-parallel shard size" if cp == 1 else "data-parallel shard x context-parallel size"
        raise GKDError(f"--expert_model_parallel_size {ep} must divide the {what} {dp_shard * cp} ({world} "
                       "processes): expert-parallel ranks are data- (or context-) parallel ranks")
    return ep


def check_options(cfg, world: int, tp: int) -> None:
    """Options that several processes do not support (yet), as one-line errors."""
    if world == 1:
        return
    if cfg.pipeline_model_parallel_size > 1:
        from gkd.parallel.pipeline import check_options as pipeline_options

        pipeline_options(cfg, world, tp)
    if cfg.use_vllm and cfg.vllm_mode == "colocate" and tp % cfg.vllm_tensor_parallel_size:
        raise GKDError(f"--vllm_tensor_parallel_size {cfg.vllm_tensor_parallel_size} must divide "
                       f"--tensor_model_parallel_size {tp}: the ranks of one vLLM engine must hold the same prompts")


def mesh_sizes(world: int, tp: int, dp_replicate: int, cp: int = 1, pp: int = 1) -> tuple[int, int, int, int]:
    """(dp_replicate, dp_shard, cp, tp) for ``world`` processes (``pp`` of them pipeline stages), or a one-line
    error saying why not."""
    if tp < 1 or dp_replicate < 1 or cp < 1 or pp < 1:
        raise GKDError("--tensor_model_parallel_size, --context_parallel_size, --pipeline_model_parallel_size and "
                       "--data_parallel_replicate_size must be >= 1")
    if world % (tp * cp * dp_replicate * pp):
        hint = " (launch several with torchrun or --nproc_per_node)" if world == 1 else ""
        stages = f"--pipeline_model_parallel_size {pp} x " if pp > 1 else ""
        raise GKDError(f"{world} process{'es' if world > 1 else ''}{hint} cannot be split into {stages}"
                       f"--tensor_model_parallel_size {tp} x --context_parallel_size {cp} x "
                       f"--data_parallel_replicate_size {dp_replicate} x a data-parallel shard size (the product "
                       "must divide the number of processes)")
    return dp_replicate, world // (tp * cp * dp_replicate * pp), cp, tp


def setup(cfg) -> Parallel:
    """The process group and mesh of a torchrun launch (nothing for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pp = cfg.pipeline_model_parallel_size
    rep, shard, cp, tp = mesh_sizes(world, cfg.tensor_model_parallel_size, cfg.data_parallel_replicate_size,
                                    cfg.context_parallel_size, pp)
    ep = expert_size(cfg.expert_model_parallel_size, world, rep, shard, tp, cp, pp)
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world == 1:
        return Parallel(device=torch.device("cuda") if cuda else device)
    if cuda:
        torch.cuda.set_device(device)
    global _made_group
    if not dist.is_initialized():
        _made_group = True
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo",
                                timeout=timedelta(seconds=cfg.distributed_timeout))
    timeout = timedelta(seconds=cfg.distributed_timeout)
    mesh = _mesh(device.type, (pp, rep, shard, cp, tp), timeout, DIMS)
    if cp > 1:  # FSDP's shard dimension takes in the context-parallel peers
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp", backend_override=_options(cuda, timeout))
    # (dp_shard, cp) regrouped as (edp, ep): the same ranks in the same order, EP inner
    experts = _mesh(device.type, (pp, rep, shard * cp // ep, ep, tp), timeout, EXPERT_DIMS) if ep > 1 else None
    plan = None
    if pp > 1:
        from gkd.parallel.pipeline import PipelinePlan

        plan = PipelinePlan(cfg.virtual_pipeline_model_parallel_size, cfg.pipeline_layers, cfg.pipeline_schedule)
    return Parallel(world=world, rank=dist.get_rank(), dp_replicate=rep, dp_shard=shard, cp=cp, tp=tp, pp=pp,
                    device=device, mesh=mesh, ep=ep, expert_mesh=experts, pipeline=plan)


def _mesh(device_type: str, shape: tuple[int, ...], timeout: timedelta, names: tuple[str, ...]):
    """The DeviceMesh over ``names``, from groups made here so that each has ``timeout`` (a mesh that makes
    its own groups gives them torch's default, 30 minutes, whatever the default group has)."""
    from torch.distributed.device_mesh import DeviceMesh

    def make():
        ranks = torch.arange(dist.get_world_size()).view(shape)
        mine = []
        for dim in range(len(shape)):
            for members in ranks.movedim(dim, -1).reshape(-1, shape[dim]).tolist():
                group = dist.new_group(members, timeout=timeout)  # every rank takes part in making every group
                if dist.get_rank() in members:
                    mine.append(group)
        return DeviceMesh.from_group(mine, device_type, mesh=ranks, mesh_dim_names=names)

    return made(("mesh", device_type, shape, names, timeout), make)


def _options(cuda: bool, timeout: timedelta):
    """Backend options carrying our timeout, for groups a DeviceMesh makes itself."""
    from torch._C._distributed_c10d import Backend

    return Backend.Options("nccl" if cuda else "gloo", timeout)


def teardown() -> None:
    """Leave the process group cleanly (a gloo group left to the interpreter's exit can abort); only one
    that setup made: a single process may hold vLLM's, which vLLM leaves itself. Under a launcher's group the
    meshes stay, for the next training in this process to take (gkd.parallel.groups)."""
    if _made_group and dist.is_initialized():
        dist.destroy_process_group()
        forget()
