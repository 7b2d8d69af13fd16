"""gkd.train.malloc: the heap's free pages go back to the system between a step's phases."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from gkd.train import malloc, step

# holes in the heap: 256 blocks of 512 KiB (below the 1 MiB mmap threshold) with every other one freed, as a
# forward's activations leave them between live ones; the resident set before and after release_free_heap
HOLES = """
import json, os, torch
from gkd.train.malloc import limit_heap_retention, release_free_heap

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

applied = limit_heap_retention()
blocks = [torch.ones(128 * 1024) for _ in range(256)]
del blocks[::2]
before = rss()
release_free_heap()
print(json.dumps({"applied": applied, "before": before, "after": rss()}))
"""


def test_release_gives_the_freed_holes_back():
    out = subprocess.run([sys.executable, "-c", HOLES], check=True, capture_output=True, text=True).stdout
    r = json.loads(out.splitlines()[-1])
    assert r["applied"]
    assert r["before"] - r["after"] > 40, r  # 128 freed blocks of 0.5 MiB = 64 MiB


def test_release_is_a_no_op_where_the_policy_does_not_apply(monkeypatch):
    monkeypatch.setattr(malloc, "_libc", None)  # off glibc, off the CPU, or MALLOC_MMAP_THRESHOLD_ set by the user
    malloc.release_free_heap()


def test_each_micro_batch_releases_before_its_loss_and_before_its_backward(tiny, tmp_path, monkeypatch):
    from gkd.config import TrainConfig
    from gkd.train.stats import Window
    from gkd.train.trainer import Trainer

    events = []
    monkeypatch.setattr(step, "release_free_heap", lambda: events.append("release"))
    monkeypatch.setattr(malloc, "release_free_heap", lambda: events.append("halfway"))
    real_fused, real_backward = step._fused, torch.Tensor.backward
    monkeypatch.setattr(step, "_fused", lambda *a, **k: (events.append("loss"), real_fused(*a, **k))[1])
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (events.append("backward"),
                                                                          real_backward(self, *a, **k))[1])
    cfg = TrainConfig(model=tiny["student"], teacher_model=tiny["teacher"], dataset=[tiny["data"]],
                      output_dir=str(tmp_path / "o"), lmbda=0.0, max_completion_length=4, micro_batch_size=2,
                      global_batch_size=4, max_steps=1, progress_bar=False)
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        trainer.train_step(0, Window())
    finally:
        trainer.close()
    assert events == ["release", "loss", "release", "backward", "halfway"] * 2


def test_halfway_release_comes_when_the_layers_above_the_middle_one_have_their_gradients(tiny4, monkeypatch):
    """The backward gives the heap back once, when it reaches the middle layer's output: the layers above have their
    weight gradients then, the others not yet; a forward without gradients (generation, evaluation) asks for
    nothing."""
    from gkd.models import load_model
    from gkd.models.adapter import adapter_for

    model = load_model(tiny4["student"])
    layers = adapter_for(model).decoder(model).layers
    assert len(layers) == 4
    seen = []
    monkeypatch.setattr(malloc, "_libc", object())  # the policy applies (its release is recorded instead)
    monkeypatch.setattr(malloc, "release_free_heap",
                        lambda: seen.append([layer.mlp.down_proj.weight.grad is not None for layer in layers]))
    malloc.release_halfway_back(layers)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        model(input_ids=ids)
    assert seen == []
    model(input_ids=ids).logits.sum().backward()
    half = len(layers) // 2
    assert seen == [[False] * (half + 1) + [True] * (len(layers) - half - 1)]


def test_halfway_release_is_not_set_where_the_policy_does_not_apply(tiny, monkeypatch):
    from gkd.models import load_model
    from gkd.models.adapter import adapter_for

    model = load_model(tiny["student"])
    layers = adapter_for(model).decoder(model).layers
    monkeypatch.setattr(malloc, "_libc", None)
    malloc.release_halfway_back(layers)
    assert all(not layer._forward_hooks for layer in layers)
