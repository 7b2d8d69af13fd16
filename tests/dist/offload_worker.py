"""Under torchrun with 2 processes (alone, or as a job of batch_worker.py): a teacher FSDP-sharded with its shards
offloaded to CPU (FSDP2's CPU offload policy, as --offload_teacher_model uses on GPUs) gives the same logits as
one sharded without, and its units' shards live in CPU memory. Usage: offload_worker.py TEACHER_DIR"""

import sys

import torch
import torch.distributed as dist

from gkd import parallel
from gkd.config import TrainConfig
from gkd.models import load_model


def run(args):
    teacher = args[0]
    par = parallel.setup(TrainConfig(model=teacher, teacher_model=teacher, dataset=["unused"]))
    models = {offload: parallel.load_sharded(lambda: load_model(teacher), lambda m: m,
                                             lambda m, o=offload: parallel.shard_teacher(m, par, offload=o), par)
              for offload in (False, True)}
    layers = models[True].model.layers
    assert all(parallel.local(p).device.type == "cpu" for p in layers.parameters())
    assert all(parallel.local(p).numel() < p.numel() for p in layers.parameters() if p.numel() > 1)  # sharded
    ids = torch.randint(5, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {o: m(input_ids=ids).logits for o, m in models.items()}
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=0)
    print(f"OK rank {dist.get_rank()}", flush=True)
    parallel.teardown()


if __name__ == "__main__":
    run(sys.argv[1:])
