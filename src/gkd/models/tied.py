"""A tied input embedding's backward without a second [vocabulary, width] buffer.

PyTorch's embedding backward writes the looked-up rows' gradient into a zero-filled [V, H] tensor, which autograd
then adds to the lm_head's gradient of the same weight. On a model whose head is tied to its embedding (SmolLM2,
Qwen2.5-0.5B, ...) that second [V, H] buffer lives at the very end of every backward, where it is the step's peak
resident set: 108-113 MiB above the rest of the backward for SmolLM2's 49,152 x 576 (benchmarks/RESULTS.md).

Here the lookup's output is cut from that graph, and its backward adds the rows' gradient into the weight's ``.grad``
in place. The head's gradient is already there: the weight's gradient accumulator then has the head as its only
input, and autograd runs an accumulator as soon as its inputs are in, before the layers' backward reaches the
embedding. Repeated ids are summed first, in order of appearance, and each row is then added once: for a float32
weight and one micro-batch the dense path's sums exactly (up to the sign of a zero); over several, (.grad + head) +
rows where the dense path adds .grad + (head + rows). For a bfloat16 weight ``index_add_`` sums in float32 and rounds
once, closer to the float32 sum than the dense path (4,096 ids of 5 values: 0.11 off against 2.45). CPU only: the
saving is of a CPU process's memory, and on a GPU ``index_add_``'s atomic additions would not sum repeated ids in one
order from run to run.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class _RowsIntoGrad(torch.autograd.Function):
    """The looked-up rows, copied; backward adds their gradient into ``weight.grad`` and returns none."""

    @staticmethod
    def forward(ctx, rows, ids, module):
        # the weight is reached through its module, not passed: as an argument autograd would make the weight's
        # gradient accumulator wait for this node, and the head's gradient would not be in .grad yet
        ctx.save_for_backward(ids)
        ctx.module = module
        return rows.clone()  # (not a view: a multimodal forward writes image features into its rows in place)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight, padding_idx = ctx.module.weight, ctx.module.padding_idx
        ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        if padding_idx is not None:  # the padding row gets no gradient, as in nn.Embedding
            keep = ids != padding_idx
            ids, grad = ids[keep], grad[keep]
        rows, where = torch.unique(ids, return_inverse=True)
        summed = torch.zeros(rows.shape[0], grad.shape[1], dtype=grad.dtype, device=grad.device)
        summed.index_add_(0, where, grad)
        if weight.grad is None:  # no head gradient in this backward: the rows alone
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, rows, summed)
        return None, None, None


def _into_grad(module: nn.Embedding, args, kwargs, out):
    if not (torch.is_grad_enabled() and out.requires_grad):
        return None  # no_grad forwards (sampling, evaluation) keep the module's output
    rows = out.detach().requires_grad_()  # a leaf: the lookup's own backward (and its dense buffer) is dropped
    return _RowsIntoGrad.apply(rows, args[0] if args else kwargs["input"], module)


def add_lookup_grads_in_place(model: nn.Module) -> bool:
    """Make ``model``'s tied input embedding add its gradient into the weight's ``.grad`` in place. Only where that
    is the same sum: a plain ``nn.Embedding`` (a subclass may transform its output) whose trained weight is the
    lm_head's on this rank, an ordinary CPU tensor (not sharded), without max_norm, scale_grad_by_freq or sparse
    gradients. Returns whether it was applied."""
    from gkd.models.adapter import output_embeddings, unwrap

    try:
        emb, head = unwrap(model).get_input_embeddings(), output_embeddings(model)
    except (AttributeError, NotImplementedError):  # a pipeline stage of a multimodal model without the embedding
        return False
    if (type(emb) is not nn.Embedding or getattr(head, "weight", None) is not emb.weight or not emb.weight.requires_grad
            or isinstance(emb.weight, DTensor) or emb.weight.device.type != "cpu" or emb.max_norm is not None
            or emb.scale_grad_by_freq or emb.sparse):
        return False
    emb.register_forward_hook(_into_grad, with_kwargs=True)
    return True
