"""Under torchrun with 2 processes (alone, or as a job of batch_worker.py): each loss on vocab shards equals the
unsharded loss on every rank."""

import torch
import torch.distributed as dist

from gkd.losses import (
    LogitHead,
    Skew,
    fused_linear_gkd_loss,
    generalized_jsd,
    sft_cross_entropy,
    topk_generalized_jsd,
    topk_logprobs,
)


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    out.backward(torch.ones_like(out) if out.dim() else None)
    return out.detach(), [x.grad for x in xs]


def run(args=()):
    """In a process group that exists."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)  # the same data on every rank
    B, T, V, H = 2, 9, 64, 12
    zs, zt = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    h, w = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / H**0.5
    th, tw = torch.randn(B, T, H + 2, generator=g), torch.randn(V, H + 2, generator=g) / H**0.5
    vl = V // world
    sl = slice(rank * vl, (rank + 1) * vl)
    tp = dist.group.WORLD

    skews = (Skew("kl", 0.1), Skew("reverse_kl", 0.3))
    for beta in (0.0, 0.4, 1.0, *skews):
        for red in ("mean", "none"):
            full, (gs_full, gt_full) = grads(
                lambda a, b: generalized_jsd(a, b, beta=beta, temperature=0.8, mask=mask, reduction=red), zs, zt)
            part, (gs_part, gt_part) = grads(
                lambda a, b: generalized_jsd(a, b, beta=beta, temperature=0.8, mask=mask, reduction=red, tp_group=tp),
                zs[..., sl], zt[..., sl])
            close(part, full, f"full-vocab value beta={beta} {red}")
            close(gs_part, gs_full[..., sl], f"student grad shard beta={beta} {red}")
            close(gt_part, gt_full[..., sl], f"teacher grad shard beta={beta} {red}")

    # global top-k across shards
    ids, lp = topk_logprobs(zt, 10)
    ids_tp, lp_tp = topk_logprobs(zt[..., sl], 10, tp_group=tp)
    assert torch.equal(ids, ids_tp), "global top-k ids"
    close(lp_tp, lp, "global top-k log-probs")
    for beta in (0.0, 0.5, 1.0, *skews):
        full, (gs_full,) = grads(lambda a: topk_generalized_jsd(a, ids, lp, beta=beta, temperature=1.1, mask=mask), zs)
        part, (gs_part,) = grads(
            lambda a: topk_generalized_jsd(a, ids, lp, beta=beta, temperature=1.1, mask=mask, tp_group=tp), zs[..., sl])
        close(part, full, f"top-k value beta={beta}")
        close(gs_part, gs_full[..., sl], f"top-k student grad shard beta={beta}")

    full, (gs_full,) = grads(lambda a: sft_cross_entropy(a, labels, mask=mask), zs)
    part, (gs_part,) = grads(lambda a: sft_cross_entropy(a, labels, mask=mask, tp_group=tp), zs[..., sl])
    close(part, full, "sft value")
    close(gs_part, gs_full[..., sl], "sft grad shard")

    teachers = {
        "hidden": lambda shard: dict(teacher_hidden=th, teacher_lm_head_weight=tw[shard]),
        "hidden-top8": lambda shard: dict(teacher_hidden=th, teacher_lm_head_weight=tw[shard], teacher_topk=8),
        "topk": lambda shard: dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp),
    }
    for name, teacher in teachers.items():
        for beta in (0.0, 0.5, 1.0, *skews):
            for red in ("sum", "none"):
                kw = dict(labels=labels, sft_alpha=0.2, beta=beta, temperature=0.9, mask=mask, reduction=red,
                          chunk_size=5)
                full, (gh_full, gw_full) = grads(
                    lambda a, b: fused_linear_gkd_loss(a, b, **teacher(slice(None)), **kw).loss, h, w)
                part, (gh_part, gw_part) = grads(
                    lambda a, b: fused_linear_gkd_loss(a, b, **teacher(sl), tp_group=tp, **kw).loss, h, w[sl])
                what = f"fused {name} beta={beta} {red}"
                close(part, full, what + " value")
                close(gh_part, gh_full, what + " hidden grad")
                close(gw_part, gw_full[sl], what + " lm_head shard grad")
                stats_full = fused_linear_gkd_loss(h, w, **teacher(slice(None)), **kw)
                stats_part = fused_linear_gkd_loss(h, w[sl], **teacher(sl), tp_group=tp, **kw)
                assert int(stats_full.agree_count) == int(stats_part.agree_count), what + " agreement"
    # a logit head with a bias, a scale and a softcap (both sides), its bias split with the vocabulary
    b, tb = torch.randn(V, generator=g), torch.randn(V, generator=g)
    for form, tform in ((dict(scale=0.5, softcap=1.5), dict(softcap=2.0, scale=2.0, scale_hidden=True)),
                        (dict(scale=3.0, scale_hidden=True, softcap=2.5), dict(scale=0.25))):
        for beta in (0.0, 0.5, 1.0):
            for topk in (None, 8):
                kw = dict(labels=labels, sft_alpha=0.2, beta=beta, temperature=0.9, mask=mask, reduction="sum",
                          chunk_size=5, teacher_hidden=th, teacher_topk=topk)
                full, (gh_full, gw_full, gb_full) = grads(
                    lambda a, c, d: fused_linear_gkd_loss(a, LogitHead(c, d, **form),
                                                          teacher_lm_head_weight=LogitHead(tw, tb, **tform), **kw).loss,
                    h, w, b)
                part, (gh_part, gw_part, gb_part) = grads(
                    lambda a, c, d: fused_linear_gkd_loss(a, LogitHead(c, d, **form), tp_group=tp,
                                                          teacher_lm_head_weight=LogitHead(tw[sl], tb[sl], **tform),
                                                          **kw).loss,
                    h, w[sl], b[sl])
                what = f"fused head {form} beta={beta} topk={topk}"
                close(part, full, what + " value")
                close(gh_part, gh_full, what + " hidden grad")
                close(gw_part, gw_full[sl], what + " lm_head shard grad")
                close(gb_part, gb_full[sl], what + " bias shard grad")
    dist.barrier()
    if rank == 0:
        print("TP-OK")


if __name__ == "__main__":
    import gkd.parallel  # noqa: F401 - before the group (gkd.parallel.mesh says why)

    dist.init_process_group("gloo")
    run()
    dist.destroy_process_group()
