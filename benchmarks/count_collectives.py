"""Run `gkd` counting the torch.distributed collectives each training step calls, per rank and kind.

    .venv/bin/python benchmarks/count_collectives.py COUNTS train --model ...          # 1 process
    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node=2 \\
        benchmarks/count_collectives.py COUNTS train --model ...                       # under torchrun

Everything after COUNTS is `gkd`'s own command line, run unchanged (runpy of `python -m gkd`). Each rank
writes COUNTS.rank<R>.json after every training step: {"rank": R, "steps": [{kind: calls}, ...]}, one dict
per `Trainer.train_step` (its generation, teacher, forward/backward, gradient sync, clipping and update;
not the loop's logging or checkpoints, nor setup). A count is one call of a collective function by its
caller: the c10d functions on `torch.distributed` (FSDP2 calls `dist.all_gather_single` once per unit
gathered, `dist.reduce_scatter_single` once per unit reduced, and `dist.all_reduce` across replicas) and
the functional collectives DTensor uses (`full_tensor()` of a sharded norm is one `funcol.all_reduce`).
Calls made inside another counted call (`broadcast_object_list`'s own broadcasts) do not count again.
A call on a process group of one rank (a mesh dimension of size 1) counts apart, as "<kind> (1 rank)":
it is a call, and it moves nothing.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import os
import runpy
import sys
import threading
from pathlib import Path

KINDS = (  # a function name's part -> its kind; the first that matches
    ("all_gather", "all-gather"), ("reduce_scatter", "reduce-scatter"), ("all_reduce", "all-reduce"),
    ("broadcast", "broadcast"), ("all_to_all", "all-to-all"), ("barrier", "barrier"), ("send", "send/recv"),
    ("recv", "send/recv"), ("gather", "gather"), ("scatter", "scatter"), ("reduce", "reduce"),
    ("permute_tensor", "permute"),
)
C10D = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_single", "all_gather_into_tensor",
        "all_gather_coalesced", "all_gather_object", "reduce_scatter", "reduce_scatter_single",
        "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "all_to_all", "all_to_all_single", "barrier",
        "send", "recv", "isend", "irecv", "batch_isend_irecv", "gather", "gather_object", "scatter",
        "scatter_object_list", "reduce")
FUNCOL = ("all_reduce", "all_reduce_coalesced", "all_reduce_inplace", "all_gather_tensor", "all_gather_single",
          "all_gather_tensor_autograd", "all_gather_single_autograd", "all_gather_tensor_inplace",
          "all_gather_into_tensor_coalesced", "all_gather_single_coalesced", "reduce_scatter_tensor",
          "reduce_scatter_single", "reduce_scatter_tensor_autograd", "reduce_scatter_single_autograd",
          "reduce_scatter_tensor_inplace", "reduce_scatter_tensor_coalesced", "reduce_scatter_single_coalesced",
          "all_to_all_single", "all_to_all_single_autograd", "broadcast", "permute_tensor")

COUNTS: collections.Counter = collections.Counter()
_inside = threading.local()


def kind_of(name: str) -> str:
    return next(kind for part, kind in KINDS if part in name)


def _group_size(signature: inspect.Signature, args, kwargs) -> int | None:
    """The size of the process group a call names (None: the default group, or a (mesh, dim) pair)."""
    import torch.distributed as dist

    try:
        group = signature.bind(*args, **kwargs).arguments.get("group")
    except TypeError:
        return None
    return group.size() if isinstance(group, dist.ProcessGroup) else None


def _counted(fn, kind: str):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        depth = getattr(_inside, "depth", 0)
        if depth == 0:
            COUNTS[kind + (" (1 rank)" if _group_size(signature, args, kwargs) == 1 else "")] += 1
        _inside.depth = depth + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _inside.depth = depth

    return wrapper


def install() -> None:
    """Wrap the collective functions where their callers look them up (module attributes)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    for module, names in ((dist, C10D), (funcol, FUNCOL)):
        for name in names:
            if callable(getattr(module, name, None)):
                setattr(module, name, _counted(getattr(module, name), kind_of(name)))


def count_steps(prefix: str) -> None:
    """After each training step, this rank's calls during it appended to PREFIX.rank<R>.json."""
    from gkd.train.trainer import Trainer

    path = Path(f"{prefix}.rank{os.environ.get('RANK', '0')}.json")
    steps: list[dict] = []
    train_step = Trainer.train_step

    @functools.wraps(train_step)
    def counted_step(self, *args, **kwargs):
        before = COUNTS.copy()
        try:
            return train_step(self, *args, **kwargs)
        finally:
            steps.append(dict(sorted((COUNTS - before).items())))
            path.write_text(json.dumps({"rank": int(os.environ.get("RANK", "0")), "steps": steps}) + "\n")

    Trainer.train_step = counted_step


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    prefix = sys.argv[1]
    install()
    count_steps(prefix)
    sys.argv = ["gkd", *sys.argv[2:]]
    runpy.run_module("gkd", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
