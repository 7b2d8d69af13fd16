"""Linear layers on oneDNN's float32 product, forward and backward, where this machine runs it faster than
torch's (gkd.machine.onednn_faster). On one AMD EPYC VM (Zen 5, 2 cores) MKL multiplies float32 at about 210
GFLOP/s on its AVX2 path and oneDNN at 420-470 on its AVX-512 one: a SmolLM2 student's forward and backward
over 4 rows of 103 tokens took 0.45-0.52 s against 0.81-0.91 s (ad hoc). Elsewhere (and for other dtypes,
devices and DTensors) the layers keep F.linear.

The products agree to float rounding, not bit for bit: a run's processes settle on one product together
(oneDNN only where every one of them timed it faster, gkd.train.build) and every layout takes it, so a run
repeats itself on its machine and its layouts agree with one process as closely as with torch's products."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from gkd.machine import onednn_faster, onednn_linear


class _Product(torch.autograd.Function):
    """``x @ w.T + b`` with its three gradients, every product by oneDNN."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return onednn_linear(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(g, w.T).reshape(*grad.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[1]:
            gw = onednn_linear(g.T.contiguous(), x.reshape(-1, x.shape[-1]).T)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    # FSDP's layers hold their gathered (plain) weights while they run; tensor parallel's are DTensors
    if (x.dtype == torch.float32 and x.device.type == "cpu" and not isinstance(x, DTensor)
            and not isinstance(self.weight, DTensor)):
        return _Product.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)  # (moved to an accelerator since, say)


def takes_products(layer: torch.nn.Module) -> bool:
    """Whether ``layer``'s forward is this module's."""
    forward = vars(layer).get("forward")
    return isinstance(forward, functools.partial) and forward.func is _forward


def faster_linears(model: torch.nn.Module) -> int:
    """Every plain float32 CPU ``nn.Linear`` of ``model`` (whose forward nothing else replaced) computes through
    oneDNN from now on, if this machine runs oneDNN's products faster (``onednn_faster``: a run's processes
    settle it together); returns how many layers do. A layer whose weight is a DTensor when it runs (tensor
    parallel) keeps F.linear."""
    if not onednn_faster():
        return 0
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in vars(m)
              and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    for m in layers:
        m.forward = functools.partial(_forward, m)
    return len(layers)
