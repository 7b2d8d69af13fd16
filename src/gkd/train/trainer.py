"""The GKD loop: draw the source, get completions, score with the teacher, fused loss, update. The
components come from gkd.train.build; the loop uses only what their protocols declare."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from gkd import parallel
from gkd.config import TrainConfig
from gkd.data.batch import collate
from gkd.data.order import StepData
from gkd.data.rows import Example
from gkd.errors import GKDError
from gkd.models import adapter_for, load_tokenizer
from gkd.models.adapter import check_packing
from gkd.train import build, checkpoint, outdir, sources
from gkd.train.budget import Budget
from gkd.train.sources import DATA, FRESH, REPLAY
from gkd.train.completions import Ahead, Completions
from gkd.train.malloc import limit_heap_retention
from gkd.train.metrics import MetricsLog, plot
from gkd.train.stats import StepStats, Window
from gkd.train.step import MicroBatch, forward_backward


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg.validate()
        self.par = par = parallel.setup(cfg)
        self.log = log = log if par.is_main else (lambda *_a, **_k: None)
        self.device = par.device
        if self.device.type == "cpu":
            limit_heap_retention()
        self.out, path, resumed = build.check_before_loading(cfg, par, log)
        torch.manual_seed(cfg.seed)

        self.tokenizer = load_tokenizer(cfg.model)
        self.images, self.teacher_images = build.image_processing(cfg, self.tokenizer, log)
        self.train_examples, self.val_examples = build.examples(cfg.section("data"), cfg.seed, self.tokenizer,
                                                                self.images, self.teacher_images, log)
        self.routed = build.routes(cfg, self.train_examples + self.val_examples, log)  # one line now for a bad route
        build.settle_product(par, resumed.get("cpu_product"), log)
        # one model at a time, sharded before the next loads: a rank's peak is one whole model, not two
        self.student = build.student(cfg.section("model"), cfg.seed, par)
        self.adapter = adapter_for(self.student)
        if cfg.packing:
            check_packing(self.student)
        self.pack = (cfg.packing_length or sys.maxsize) if cfg.packing else None  # most tokens per packed row
        self.loss_args = build.loss_args(cfg, self.student, par, log)
        self.teacher = build.cached_teacher(build.teacher(cfg.section("teacher"), self.tokenizer, self.student, par,
                                                          log), cfg, par, log)
        build.check_fits(cfg, self.student, self.teacher, self.train_examples, self.val_examples)
        torch.manual_seed(cfg.seed)  # rank 0 drew numbers while loading (LoRA init): every rank starts alike
        self.sampler, self.rollout = build.rollouts(cfg, self.student, self.tokenizer, self.teacher,
                                                    self.train_examples, par, self.out, log)
        self._eval_teacher_completions = {}  # per teacher: its greedy completions of the held-out prompts

        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.budget = Budget(cfg.section("optim"), len(self.train_examples), par, resumed.get("train_seconds", 0.0))
        self.optimizer, self.scheduler = build.optimizer(cfg.section("optim"), self.params, self.budget)
        self.data = StepData(self.train_examples, cfg.global_batch_size, cfg.seed)
        self.sources = sources.schedule(cfg.section("method"), cfg.global_batch_size)
        self.sources.load(resumed.get("sources", {}))
        ahead = Ahead(cfg.async_generation, cfg.section("method"), self.data, self.budget.step_bound - 1, par,
                      self.rollout) if cfg.async_generation else None
        self.completions = Completions(cfg.section("method"), self.rollout, self.sampler, self.teacher,
                                       self.student, self.train_examples, par, cfg.gather_for_generation, ahead)
        self.start_step, self.bad_steps = 0, 0
        self.memory = None  # per-rank MiB of parameters and optimizer state (largest rank), after step 1
        if path is not None:
            info = checkpoint.load(path, self.student, self.optimizer, self.scheduler, par)
            self.start_step, self.bad_steps = info["step"], info.get("bad_steps", 0)
            log(f"[gkd] resumed from {path} at step {self.start_step}")

    def _row_inputs(self, rows: list[Example]) -> tuple[list[dict] | None, list[dict] | None]:
        """Each row's other model inputs (its images, processed) for the student, and for the teacher where
        its processor differs (None: the student's)."""
        if self.images is None:
            return None, None
        mine = [self.images(r.images) for r in rows]
        return mine, None if self.teacher_images is None else [self.teacher_images(r.images) for r in rows]

    def train_step(self, step: int, window: Window) -> float:
        cfg, par = self.cfg, self.par
        source = self.sources.source(step, self.budget.progress(step))
        indices, replayed, version = self.sources.rows(step, source, self.data)
        everyone = [self.train_examples[i] for i in indices]
        lo, hi = par.dp_slice(len(everyone))
        rows = everyone[lo:hi]  # this data-parallel rank's share of the global batch
        inputs, teacher_inputs = self._row_inputs(rows)  # processed once, shared by generation and scoring
        if replayed is not None:  # earlier samples of the student (the adaptive schedule)
            completions = replayed[lo:hi]
        else:
            completions, version = self.completions(rows, step, lo, inputs, teacher_inputs, source == FRESH)
            self.sources.keep(source, step, indices, completions, version, par)
        sampled = source != DATA
        if cfg.speculative_kd_topk:  # every rank, every step: the tokens proposed and replaced, over the ranks
            proposed, replaced = par.pipeline_reduce(torch.tensor(self.rollout.take_counts())).tolist()
            window.proposed, window.replaced = window.proposed + proposed, window.replaced + replaced
        n_tokens = int(par.dp_reduce(torch.tensor(sum(len(c) for c in completions))))
        micro = []
        for m in (slice(m0, m0 + cfg.micro_batch_size) for m0 in range(0, len(rows), cfg.micro_batch_size)):
            batch = collate([r.prompt_ids for r in rows[m]], completions[m], self.tokenizer.pad_token_id,
                            None if inputs is None else inputs[m],
                            None if teacher_inputs is None else teacher_inputs[m], images=[r.images for r in rows[m]],
                            sampled=sampled, pack=self.pack)
            micro.append(MicroBatch(batch.to(self.device), [sampled] * len(rows[m]), first_row=lo + m.start, step=step,
                                    teachers=[r.teacher for r in rows[m]] if self.routed else None))
        # MoE: the router aux loss is a mean over the step's routed (attention-mask) tokens on every rank
        routed = float(par.dp_reduce(torch.tensor(sum(int(mb.batch.attention_mask.sum()) for mb in micro)))
                       ) if self.adapter.moe else 0.0
        # with sharded weights every rank must join each forward, so only a single process skips
        row = forward_backward(micro, self.student, self.adapter, self.teacher, self.loss_args, float(n_tokens),
                               skip_empty=par.world == 1, dims=par,
                               reduce_scatter_each=cfg.reduce_scatter_every_micro_batch, routed=routed)
        stats = StepStats.of(par.loss_reduce(row), self.adapter.num_experts(self.student),
                             self.teacher.names if self.routed else None)
        grad_norm = parallel.clip_grad_norm(self.params, cfg.max_grad_norm, par, self.student)
        if not (math.isfinite(stats.loss) and math.isfinite(float(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.log(f"[gkd] step {step + 1}: non-finite loss or gradient ({stats.loss}); update skipped "
                     f"({self.bad_steps}/{cfg.max_bad_steps} in a row)")
            if self.bad_steps >= cfg.max_bad_steps:
                raise GKDError(f"training stopped: {self.bad_steps} consecutive steps with a non-finite loss "
                               "(lower --learning_rate, or check the data and --torch_dtype)")
            return stats.loss
        self.bad_steps = 0
        learning_rate = self.scheduler.get_last_lr()[0]  # this update's (the scheduler then moves to the next)
        self.optimizer.step()
        self.budget.tick()  # the schedule's next value may depend on the time
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.rollout.weights_changed()
        window.add(stats, n_tokens, len(everyone), sampled, float(grad_norm), learning_rate, source == REPLAY)
        window.add_policy(step, version)
        if self.memory is None:  # optimizer state exists after the first update
            self.memory = build.memory(self.student, self.optimizer, self.teacher, par)
        return stats.loss

    def close(self) -> None:
        """Release what outlives training (an in-process vLLM engine, a server sampler's threads, the output
        folder's lock)."""
        outdir.release(self.out)
        self.rollout.close()
        self.teacher.close()

    def evaluate(self) -> dict:
        """Held-out metrics (gkd.evaluate) on --val_dataset / the split, prefixed with eval_ (with several
        teachers, eval_NAME_ for each: routed ones on their rows, a mixture's members on every row). Each data-
        parallel rank takes its share of the rows and the sums are reduced; a teacher's greedy completions are
        made once."""
        metrics, par = {}, self.par
        for name, teacher, rows in self.teacher.evaluation_groups(self.val_examples):
            mine, counted = _dp_share(rows, par)
            inputs, teacher_inputs = self._row_inputs(mine)
            result = teacher.evaluate(
                self.student, [e.prompt_ids for e in mine], eos_ids=self.sampler.eos_ids,
                pad_id=self.tokenizer.pad_token_id, beta=self.cfg.objective,
                temperature=self.cfg.divergence_temperature, max_new_tokens=self.cfg.max_completion_length,
                device=self.device, batch_size=self.cfg.global_batch_size, inputs=inputs, teacher_inputs=teacher_inputs,
                teacher_completions=self._eval_teacher_completions.get(name), counted=counted,
                reduce=par.pipeline_reduce if par.world > 1 else None, tp_group=par.tp_group)
            self._eval_teacher_completions[name] = result.teacher_completions
            prefix = f"eval_{name}_" if name else "eval_"
            metrics.update({prefix + k: v for k, v in result.metrics.items() if isinstance(v, float)})
        self.student.train()
        return metrics

    def save_checkpoint(self, step: int) -> Path:
        return checkpoint.save(self.out, step, self.student, self.optimizer, self.scheduler,
                               {"bad_steps": self.bad_steps, "train_seconds": self.budget.elapsed,
                                "sources": self.sources.state(), "cpu_product": build.product_name(self.par),
                                "settings": checkpoint.settings(self.cfg)},
                               self.cfg.save_total_limit, self.par)

    def train(self) -> dict:
        cfg, main = self.cfg, self.par.is_main
        if main:
            outdir.prepare_output_dir(str(self.out))
            outdir.claim(self.out, cfg.overwrite_output_dir)
        try:
            return self._run()
        finally:  # the run is over, however it ended: another may use the folder
            if main:
                outdir.release(self.out)

    def _run(self) -> dict:
        from tqdm import tqdm

        cfg, main = self.cfg, self.par.is_main
        self.par.barrier()
        sinks = cfg.report_to or []
        metrics = MetricsLog(self.out, tensorboard="tensorboard" in sinks, resume_step=self.start_step,
                             enabled=main, wandb_config=cfg.to_dict() if "wandb" in sinks else None)
        bar = tqdm(total=self.budget.steps, initial=self.start_step, desc="gkd train",
                   disable=not (cfg.progress_bar and main), dynamic_ncols=True)
        window, last, done = Window(), {}, self.start_step
        self.budget.start()
        while not self.budget.over(done):
            self.train_step(done, window)
            done += 1
            end = self.budget.over(done)
            if window.steps and (done % cfg.logging_steps == 0 or end):
                last = {k: v for k, v in {**window.metrics(), **(self.memory or {})}.items() if v is not None}
                metrics.log(done, {**last, **self.budget.metrics()})
                bar.set_postfix(loss=f"{last['loss']:.4f}", agree=f"{last['top1_agreement']:.3f}")
                window = Window()
            if self.val_examples and cfg.eval_steps and (done % cfg.eval_steps == 0 or end):
                held_out = self.evaluate()
                self.sources.observe(held_out)
                metrics.log(done, {**held_out, **self.sources.metrics()})
            if cfg.save_steps and done % cfg.save_steps == 0 and not end:
                self.save_checkpoint(done)
            bar.update(1)
        bar.close()
        metrics.close()
        self.save_checkpoint(done)
        checkpoint.export(self.student, self.tokenizer, self.out / "final", cfg, self.par)
        if main:
            try:
                plot(metrics.path, self.out / "loss_curve.png")
            except ImportError:
                self.log("[gkd] matplotlib is not installed: no loss_curve.png (gkd plot draws it later)")
        return last


def _dp_share(rows: list[Example], par) -> tuple[list[Example], list[bool]]:
    """This data-parallel rank's share of ``rows``, padded with the last row to the same count on every rank
    (they share each forward), and which of them count."""
    per = -(-len(rows) // par.dp_size)
    mine = rows[par.dp_rank * per:(par.dp_rank + 1) * per]
    return mine + [rows[-1]] * (per - len(mine)), [True] * len(mine) + [False] * (per - len(mine))
