"""Linear layers on oneDNN's float32 product, forward and backward, where this machine runs it faster than
torch's (gkd.machine.onednn_faster). On one AMD EPYC VM (Zen 5, 2 cores) MKL multiplies float32 at about 210
GFLOP/s on its AVX2 path and oneDNN at 420-470 on its AVX-512 one: a SmolLM2 student's forward and backward
over 4 rows of 103 tokens took 0.45-0.52 s against 0.81-0.91 s (ad hoc). Elsewhere (and for other dtypes,
devices and DTensors) the layers keep F.linear.

The products agree to float rounding, not bit for bit: a run's processes settle on one product together
(oneDNN only where every one of them timed it faster, gkd.train.build) and every layout takes it but tensor
parallel's DTensor layers (F.linear), so a run repeats itself on its machine."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from gkd.machine import onednn_faster, onednn_linear, onednn_takes, transposed_rows


class _Product(torch.autograd.Function):
    """``x @ w.T + b`` with its three gradients, every product by oneDNN."""

    @staticmethod
    def forward(ctx, x, w, b):
        # (x [rows, in]) what each gradient needs only: a frozen weight's layer keeps no input, as F.linear's
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)
        ctx.has_bias = b is not None
        return onednn_linear(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(grad, w.T)
        if ctx.needs_input_grad[1]:
            gw = onednn_linear(transposed_rows(grad), x.T)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    # FSDP's layers hold their gathered (plain) weights while they run; tensor parallel's are DTensors
    if onednn_takes(x, self.weight):
        # 2-D through the Function, the shape put back outside it: its output stays a tensor of its own (callers
        # may change it in place)
        y = _Product.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    return F.linear(x, self.weight, self.bias)  # (moved to an accelerator since, or no rows)


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
