"""`gkd cache`: score the training dataset's completions with the teacher once, into --teacher_cache, ahead of
training (the same flags as gkd train; rows, K, temperature and teacher make the same keys training uses)."""

from __future__ import annotations

import json
import sys

from gkd.config import TrainConfig, build_config, parser_for
from gkd.errors import GKDError


def run(argv: list[str]) -> int:
    p = parser_for(TrainConfig, "gkd cache", "Fill --teacher_cache with the teacher's top-K log-probs of the "
                                             "training dataset's completions (then gkd train reuses them).")
    ns = vars(p.parse_args(argv))
    cfg = build_config(TrainConfig, {k: v for k, v in ns.items() if k != "config"}, ns.get("config"))
    print(json.dumps(cmd_cache(cfg)))
    return 0


def cmd_cache(cfg: TrainConfig, log=lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Score every training row that has a completion (the off-policy rows); a summary of what it did."""
    from tqdm import tqdm

    from gkd import parallel
    from gkd.data.batch import collate
    from gkd.data.rows import check_context
    from gkd.models import load_model, load_tokenizer
    from gkd.teacher.cache import check_folder
    from gkd.train import build

    cfg.validate()
    if not cfg.teacher_cache:
        raise GKDError("gkd cache needs --teacher_cache DIR: the folder to fill")
    if "," in cfg.teacher_model + cfg.teacher_model_server:
        raise GKDError("gkd cache fills one teacher's entries: run it once per teacher (one folder holds them all)")
    if cfg.nproc_per_node > 1 or cfg.nnodes > 1:
        raise GKDError("gkd cache runs in one process (--nproc_per_node 1); several gkd cache processes may fill "
                       "one folder at once")
    check_folder(cfg.teacher_cache)
    par = parallel.setup(cfg)
    teacher = None
    try:
        tokenizer = load_tokenizer(cfg.model)
        images, teacher_images = build.image_processing(cfg, tokenizer, log)
        rows, _ = build.examples(cfg.section("data"), cfg.seed, tokenizer, images, teacher_images, log)
        # the student only for the check that both share one vocabulary (a server checks its tokenizer itself)
        student = None if cfg.teacher_model_server else load_model(cfg.model, cfg.torch_dtype)
        teacher = build.cached_teacher(build.teacher(cfg.section("teacher"), tokenizer, student, par, log), cfg, par, log)
        del student
        done = [r for r in rows if r.completion_ids is not None]
        check_context(done, cfg.max_completion_length, False, {"teacher": teacher.context})
        teacher.check_rows(done, cfg.max_completion_length, False)
        theirs = teacher_images or images
        pack = (cfg.packing_length or sys.maxsize) if cfg.packing else None  # as gkd train packs them
        bar = tqdm(total=len(done), desc="gkd cache", unit="row", disable=not cfg.progress_bar, file=sys.stderr)
        for m0 in range(0, len(done), cfg.micro_batch_size):
            part = done[m0:m0 + cfg.micro_batch_size]
            batch = collate([r.prompt_ids for r in part], [r.completion_ids for r in part], tokenizer.pad_token_id,
                            None if images is None else [images(r.images) for r in part],
                            None if teacher_images is None else [theirs(r.images) for r in part],
                            images=[r.images for r in part], pack=pack)
            teacher.score(batch.to(par.device))
            bar.update(len(part))
        bar.close()
        c = teacher.cache
        return {"folder": str(c.folder), "rows": len(done), "rows_scored": c.misses, "rows_already_cached": c.hits,
                "damaged_entries_rescored": c.damaged, "bytes_written": c.written_bytes,
                "prompt_only_rows_skipped": len(rows) - len(done)}
    finally:
        if teacher is not None:
            teacher.close()
        parallel.teardown()
