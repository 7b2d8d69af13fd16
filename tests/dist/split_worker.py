"""Under torchrun (alone, or as a job of batch_worker.py): context-parallel attention over the ranks' pieces of
three sequences gives the whole sequences' hidden states, and the pieces cover every position once.
Usage: split_worker.py MODEL_FOLDER...; prints "ERR RANK ERROR" on each rank for each model."""

import sys

import torch
import torch.distributed as dist

from gkd.data.batch import collate
from gkd.models import adapter_for, load_model
from gkd.parallel.context import ContextSplit, use_context_parallel_attention


def run(args):
    """In a process group that exists."""
    for folder in args:
        _check(folder)


def _check(folder):
    rank, size = dist.get_rank(), dist.get_world_size()
    model = load_model(folder)
    torch.manual_seed(0)
    prompts = [torch.randint(5, 90, (n,)).tolist() for n in (7, 3, 12)]
    completions = [torch.randint(5, 90, (n,)).tolist() for n in (5, 9, 1)]
    batch = collate(prompts, completions, 0)
    adapter = adapter_for(model)
    whole = adapter.final_hidden(model, batch.model_inputs())
    use_context_parallel_attention(model)
    split = ContextSplit(batch, dist.group.WORLD, rank, size)
    assert split.length % (2 * size) == 0 and split.length >= batch.input_ids.shape[1]
    with split.active():
        mine = adapter.final_hidden(model, split.model_inputs())
        mine.sum().backward()
    ref = split.local(whole.detach())
    valid = split.local(batch.attention_mask, 0).bool()
    err = float((mine - ref).abs()[valid].max())
    print("ERR", rank, err, folder, flush=True)
    # the positions of all ranks cover the padded length exactly once, and each rank holds head + mirrored tail
    owned = split.owned.flatten().sort().values
    assert torch.equal(owned, torch.arange(split.length)), owned
    assert err < 1e-5, err


if __name__ == "__main__":
    dist.init_process_group("gloo")
    run(sys.argv[1:])
    dist.destroy_process_group()
