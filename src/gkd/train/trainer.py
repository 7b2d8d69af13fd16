"""The GKD loop: draw the source, get completions, score with the teacher, fused loss, update."""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gkd import parallel
from gkd.config import TrainConfig
from gkd.data.batch import collate
from gkd.data.order import StepData, lmbda_draw, sample_seed
from gkd.data.rows import (
    Example,
    check_context,
    load_examples,
    longest_sequence,
    model_context,
    split_examples,
    warn_unused_num_proc,
)
from gkd.errors import GKDError
from gkd.models import (
    adapter_for,
    apply_lora,
    check_compatible,
    eos_ids,
    freeze_vision,
    load_image_processing,
    load_model,
    load_tokenizer,
    resolve,
)
from gkd.models.adapter import check_vllm
from gkd.parallel.expert import expert_parameters
from gkd.rollout.base import SamplingConfig
from gkd.rollout.hf import HFSampler
from gkd.teacher.local import LocalTeacher
from gkd.teacher.remote import RemoteTeacher
from gkd.train import checkpoint, outdir
from gkd.train.outdir import check_output_dir, prepare_output_dir
from gkd.train.malloc import limit_heap_retention
from gkd.train.metrics import MetricsLog, plot
from gkd.train.step import STATS, LossArgs, MicroBatch, forward_backward


@dataclass
class Window:
    """Sums over the optimizer steps since the last log line."""

    loss: float = 0.0
    div: float = 0.0
    sft: float = 0.0
    sft_tokens: int = 0
    agree: int = 0
    tokens: int = 0
    seqs: int = 0
    student_seqs: int = 0
    grad_norm: float = 0.0
    router_aux: float = 0.0
    expert_tokens: object = None  # [MoE layers, E] tokens routed to each expert (MoE students)
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg.validate()
        self.par = par = parallel.setup(cfg)
        self.log = log if par.is_main else (lambda *_a, **_k: None)
        log = self.log
        self.device = par.device
        if self.device.type == "cpu":
            limit_heap_retention()
        cfg.grad_accumulation_steps(par.dp_size)  # a one-line error unless the global batch splits
        parallel.check_options(cfg, par.world, par.tp)
        if par.dp_mesh is None and not (cfg.reduce_scatter_every_micro_batch and cfg.gather_for_generation):
            self.log("[gkd] --reduce_scatter_every_micro_batch / --gather_for_generation apply to FSDP only: "
                     "this run does not shard the student")
        self.out = check_output_dir(cfg.output_dir)
        path = checkpoint.resolve(cfg.resume_from_checkpoint, self.out) if cfg.resume_from_checkpoint else None
        outdir.check_owner(self.out, path, cfg.overwrite_output_dir)  # one run per folder, before any work
        torch.manual_seed(cfg.seed)

        self.tokenizer = load_tokenizer(cfg.model)
        self.images, self.teacher_images = self._image_processing()
        data_kw = dict(max_length=cfg.max_length, truncation_strategy=cfg.truncation_strategy,
                       max_completion_length=cfg.max_completion_length, warn=log, num_proc=cfg.dataset_num_proc,
                       images=self.images, teacher_images=self.teacher_images)
        warn_unused_num_proc(cfg.dataset + (cfg.val_dataset or []), cfg.dataset_num_proc, log)
        examples = load_examples(cfg.dataset, self.tokenizer, **data_kw)
        if cfg.val_dataset:
            self.train_examples, self.val_examples = examples, load_examples(cfg.val_dataset, self.tokenizer, **data_kw)
        else:
            self.train_examples, self.val_examples = split_examples(examples, cfg.split_dataset_ratio, cfg.seed)
        # one model at a time, sharded before the next loads: a rank's peak is one whole model, not two
        self.student = student = self._load_student()
        self.adapter = adapter_for(student)
        aux_coef = cfg.router_aux_loss_coef
        if aux_coef and not self.adapter.moe:
            log(f"[gkd] --model {cfg.model} has no experts: --router_aux_loss_coef does nothing")
        self.loss_args = LossArgs(beta=cfg.beta, temperature=cfg.divergence_temperature, sft_alpha=cfg.sft_alpha,
                                  chunk_size=cfg.loss_chunk_size or None, tp_group=par.tp_group,
                                  router_aux_loss_coef=self.adapter.router_aux_loss_coef(student) if aux_coef is None
                                  else aux_coef)
        self.teacher = self._remote_teacher() if cfg.teacher_model_server else self._local_teacher(student)
        self._check_fits()
        torch.manual_seed(cfg.seed)  # rank 0 drew numbers while loading (LoRA init): every rank starts alike
        sampling = SamplingConfig(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                  top_p=cfg.top_p, top_k=cfg.top_k, batch_size=cfg.global_batch_size)
        # whether off-policy steps can need teacher completions at all (else no rank asks the others)
        self._teacher_completes = cfg.seq_kd or any(e.completion_ids is None for e in self.train_examples)
        sampler = HFSampler
        if par.pp > 1:  # generation runs through the stages
            from gkd.rollout.pipelined import PipelineSampler as sampler
            from gkd.rollout.pipelined import check_generation_config

            if cfg.lmbda > 0:
                check_generation_config(student, f"--model {cfg.model}")
            if self._teacher_completes and isinstance(self.teacher, LocalTeacher):
                check_generation_config(self.teacher.model, f"--teacher_model {cfg.teacher_model}")
        self.sampler = sampler(sampling, eos_ids(self.tokenizer, student), self.tokenizer.pad_token_id, self.device,
                               synced=par.world > 1)
        self.rollout = self._student_sampler(sampling) if cfg.use_vllm else self.sampler
        self._eval_teacher_completions = None  # greedy teacher completions of the held-out prompts, made once

        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * len(self.train_examples)
                                                              / cfg.global_batch_size))
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, self.total_steps))
        self.data = StepData(self.train_examples, cfg.global_batch_size, cfg.seed)
        self.start_step = 0
        self.bad_steps = 0
        self.memory = None  # per-rank MiB of parameters and optimizer state (largest rank), after step 1
        if path is not None:
            info = checkpoint.load(path, self.student, self.optimizer, self.scheduler, par)
            self.start_step, self.bad_steps = info["step"], info.get("bad_steps", 0)
            log(f"[gkd] resumed from {path} at step {self.start_step}")

    def _image_processing(self):
        """(the student's image processing or None for a text-only student, the local teacher's where it
        makes other inputs than the student's, else None)."""
        cfg = self.cfg
        mine = load_image_processing(cfg.model, self.tokenizer)
        if mine is None and not (cfg.freeze_vit and cfg.freeze_aligner):
            self.log(f"[gkd] --model {cfg.model} has no vision tower: --freeze_vit / --freeze_aligner do nothing")
        if mine is None or cfg.teacher_model_server:  # a server processes the images itself
            return mine, None
        theirs = load_image_processing(cfg.teacher_model, self.tokenizer)
        if theirs is None:
            raise GKDError(f"--teacher_model {cfg.teacher_model} is text-only but the student {cfg.model} reads "
                           "images: the teacher must see the same images")
        return mine, None if theirs.same_as(mine) else theirs

    def _row_inputs(self, rows: list[Example]) -> tuple[list[dict] | None, list[dict] | None]:
        """Each row's other model inputs (its images, processed) for the student, and for the teacher where
        its processor differs (None: the student's)."""
        if self.images is None:
            return None, None
        mine = [self.images(r.images) for r in rows]
        return mine, None if self.teacher_images is None else [self.teacher_images(r.images) for r in rows]

    def _load_student(self):
        cfg, par = self.cfg, self.par

        def prepare(model):  # on rank 0's copy and on every rank's skeleton: all ranks see the same error
            parallel.check_model(model, par, lora=cfg.train_type == "lora",
                                 lora_experts=cfg.lora_experts and cfg.target_modules == "all-linear")
            if cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.config.use_cache = False
            frozen = freeze_vision(model, cfg.freeze_vit, cfg.freeze_aligner)
            if cfg.train_type == "lora":
                model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.seed,
                                   exclude=frozen, experts=cfg.lora_experts)
            return model

        student = parallel.load_sharded(lambda: load_model(cfg.model, cfg.torch_dtype), prepare,
                                        lambda m: parallel.shard_student(m, par), par)
        return student.train()

    def _local_teacher(self, student) -> LocalTeacher:
        cfg, par = self.cfg, self.par
        offload = parallel.teacher_offload(par, cfg.offload_teacher_model, self.device)
        if cfg.offload_teacher_model and not offload:
            self.log("[gkd] --offload_teacher_model: training runs on the CPU, where the teacher already is; "
                     "nothing to offload")
        teacher = parallel.load_sharded(lambda: load_model(cfg.teacher_model, cfg.torch_dtype), lambda m: m,
                                        lambda m: parallel.shard_teacher(m, par, offload=offload == "fsdp"), par)
        check_compatible(self.tokenizer, load_tokenizer(cfg.teacher_model), student, teacher)
        return LocalTeacher(teacher, self.device, topk=cfg.gkd_logits_topk, offload=offload == "move")

    def _check_fits(self) -> None:
        """Sequences within both contexts and K within the vocabulary: one line now, not a failure mid-run."""
        cfg = self.cfg
        contexts = {"student": model_context(self.student)}
        if isinstance(self.teacher, LocalTeacher):
            contexts["teacher"] = model_context(self.teacher.model)
            vocab = self.teacher.model.config.get_text_config().vocab_size
            if cfg.gkd_logits_topk > vocab:
                raise GKDError(f"--gkd_logits_topk {cfg.gkd_logits_topk} exceeds the teacher's vocabulary of {vocab} "
                               "tokens; use at most that (0 = the full vocabulary)")
        check_context(self.train_examples + self.val_examples, cfg.max_completion_length,
                      cfg.lmbda > 0 or cfg.seq_kd or bool(self.val_examples and cfg.eval_steps), contexts)

    def _remote_teacher(self) -> RemoteTeacher:
        cfg = self.cfg
        if cfg.lmbda < 1 and any(e.completion_ids is None for e in self.train_examples):
            raise GKDError("--dataset has prompt-only rows; on off-policy steps the teacher must write their "
                           "completions, which needs a local --teacher_model (or use --lmbda 1)")
        remote = RemoteTeacher(
            cfg.teacher_model_server, cfg.gkd_logits_topk, api_key=cfg.teacher_api_key, timeout=cfg.teacher_timeout,
            retries=cfg.teacher_retries, max_in_flight=cfg.teacher_max_in_flight,
            seqs_per_request=cfg.teacher_seqs_per_request, wait=cfg.teacher_wait, wire_dtype=cfg.teacher_wire_dtype)
        self.log(f"[gkd] teacher server {remote.url}: waiting for /health, checking tokenizer and K")
        teacher = remote.connect(self.tokenizer)
        if any(e.images for e in self.train_examples + self.val_examples):
            teacher.check_images()
        teacher.check_fits(longest_sequence(self.train_examples, cfg.max_completion_length, cfg.lmbda > 0)[0])
        return teacher

    def _student_sampler(self, sampling: SamplingConfig):
        """vLLM for the student's on-policy completions (HF generate stays for the teacher)."""
        from gkd.rollout.vllm_engine import VLLMColocateSampler, VLLMServerSampler

        cfg = self.cfg
        if self.adapter.moe and self.device.type == "cpu":
            # its in-memory reload (reload_weights) of a MoE model changes the outputs even when handed the
            # folder's own tensors, so the samples would not come from the student being trained
            raise GKDError(f"--use_vllm with a mixture-of-experts student ({cfg.model}) is not supported on CPU: "
                           "vLLM's CPU engine does not reload MoE weights faithfully; leave --use_vllm off "
                           "(HF generate samples)")
        if any(e.images for e in self.train_examples):
            raise GKDError("--use_vllm with image rows is not supported yet (vLLM expands image placeholders "
                           "itself); leave --use_vllm off: HF generate samples with the images")
        check_vllm(self.student)
        if cfg.vllm_mode == "server":
            url = cfg.vllm_server_base_url or f"http://{cfg.vllm_server_host}:{cfg.vllm_server_port}"
            return VLLMServerSampler(url, sampling, self.sampler.eos_ids, timeout=cfg.vllm_server_timeout,
                                     sync_dir=Path(cfg.vllm_sync_dir or self.out / "vllm-sync"), log=self.log,
                                     weight_sync=cfg.vllm_weight_sync, group_port=cfg.vllm_group_port,
                                     par=self.par)
        folder, gguf = resolve(cfg.model)  # a hub ID: its cached snapshot
        path = str(folder)
        if gguf:  # GGUF or an alias: vLLM reads a HF folder
            from gkd.rollout.vllm_engine import write_vllm_folder

            tmp = tempfile.mkdtemp(prefix="gkd-vllm-student-")
            atexit.register(shutil.rmtree, tmp, ignore_errors=True)
            path = str(write_vllm_folder(self.student, self.tokenizer, Path(tmp)))
        return VLLMColocateSampler(
            path, sampling, self.sampler.eos_ids, dtype=cfg.torch_dtype,
            max_model_len=cfg.vllm_max_model_len or cfg.max_length + cfg.max_completion_length,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, tensor_parallel_size=cfg.vllm_tensor_parallel_size,
            kv_cache_memory_mb=cfg.vllm_kv_cache_memory_mb, sleep_level=cfg.sleep_level, seed=cfg.seed,
            torchrun=self.par.world > 1)

    # ---------------------------------------------------------------------------------------------

    def _completions(self, rows: list[Example], step: int, first: int, inputs, teacher_inputs
                     ) -> tuple[list[list[int]], list[bool]]:
        """Completion ids for each row and whether the student sampled it (the lmbda draw, the same on every
        rank). ``first`` is the index of rows[0] in the global batch: it seeds each row's sample. ``inputs``
        / ``teacher_inputs``: each row's other model inputs (images) for the student / the teacher."""
        prompts = [r.prompt_ids for r in rows]
        ids = list(range(first, first + len(rows)))
        if lmbda_draw(self.cfg.seed, step) < self.cfg.lmbda:
            self.rollout.seed = sample_seed(self.cfg.seed, step, 0)
            with parallel.gathered_for_generation(self.student, self.cfg.gather_for_generation and not self.cfg.use_vllm):
                drawn = self.rollout.generate(self.student, prompts, ids, inputs)
            return self.par.share_in_tp(drawn), [True] * len(rows)
        completions = [None if self.cfg.seq_kd else r.completion_ids for r in rows]
        if not self._teacher_completes:
            return completions, [False] * len(rows)
        missing = [i for i, c in enumerate(completions) if c is None]
        # sequence-level KD, and prompt-only rows on off-policy steps: the teacher completes. A sharded
        # teacher needs every rank in each forward, so all ranks generate as many prompts (repeats fill in).
        count = int(self.par.dp_reduce(torch.tensor(len(missing)), op=torch.distributed.ReduceOp.MAX))
        if count:
            self.sampler.seed = sample_seed(self.cfg.seed, step, 1)
            fill = missing + [missing[0] if missing else 0] * (count - len(missing))
            theirs = teacher_inputs or inputs
            drawn = self.teacher.generate([prompts[i] for i in fill], self.sampler, [ids[i] for i in fill],
                                          None if theirs is None else [theirs[i] for i in fill])
            for i, c in zip(missing, self.par.share_in_tp(drawn)):
                completions[i] = c
        return completions, [False] * len(rows)

    def _collate(self, rows: list[Example], completions, inputs, teacher_inputs, part: slice):
        return collate([r.prompt_ids for r in rows[part]], completions[part], self.tokenizer.pad_token_id,
                       None if inputs is None else inputs[part],
                       None if teacher_inputs is None else teacher_inputs[part],
                       images=[r.images for r in rows[part]]).to(self.device)

    def train_step(self, step: int, window: Window) -> float:
        cfg = self.cfg
        everyone = self.data.rows(step)
        lo, hi = self.par.dp_slice(len(everyone))
        rows = everyone[lo:hi]  # this data-parallel rank's share of the global batch
        inputs, teacher_inputs = self._row_inputs(rows)  # processed once, shared by generation and scoring
        completions, from_student = self._completions(rows, step, lo, inputs, teacher_inputs)
        n_tokens = int(self.par.dp_reduce(torch.tensor(sum(len(c) for c in completions))))
        micro = [MicroBatch(self._collate(rows, completions, inputs, teacher_inputs, m), from_student[m])
                 for m in (slice(m0, m0 + cfg.micro_batch_size) for m0 in range(0, len(rows), cfg.micro_batch_size))]
        # MoE: the router aux loss is a mean over the step's routed (attention-mask) tokens on every rank
        routed = float(self.par.dp_reduce(torch.tensor(sum(int(mb.batch.attention_mask.sum()) for mb in micro)))
                       ) if self.adapter.moe else 0.0
        # with sharded weights every rank must join each forward, so only a single process skips
        stats = forward_backward(micro, self.student, self.adapter, self.teacher, self.loss_args, float(n_tokens),
                                 skip_empty=self.par.world == 1, dims=self.par,
                                 reduce_scatter_each=cfg.reduce_scatter_every_micro_batch, routed=routed)
        stats = self.par.loss_reduce(stats)
        loss_total = float(stats[0])

        grad_norm = parallel.clip_grad_norm(self.params, cfg.max_grad_norm, self.par)
        if not (math.isfinite(loss_total) and math.isfinite(float(grad_norm))):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.log(f"[gkd] step {step + 1}: non-finite loss or gradient ({loss_total}); update skipped "
                     f"({self.bad_steps}/{cfg.max_bad_steps} in a row)")
            if self.bad_steps >= cfg.max_bad_steps:
                raise GKDError(f"training stopped: {self.bad_steps} consecutive steps with a non-finite loss "
                               "(lower --learning_rate, or check the data and --torch_dtype)")
            return loss_total
        self.bad_steps = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.use_vllm:
            self.rollout.weights_changed()

        window.loss += loss_total
        window.div += float(stats[1])
        window.sft += float(stats[2])
        window.agree += int(stats[3])
        window.sft_tokens += int(stats[4])
        window.tokens += n_tokens
        window.seqs += len(everyone)
        window.student_seqs += len(everyone) if from_student[0] else 0
        window.grad_norm += float(grad_norm)
        window.router_aux += float(stats[5])
        if len(stats) > len(STATS):
            load = stats[len(STATS):].view(-1, self.adapter.experts(self.student)[0].gate_up_proj.shape[0])
            window.expert_tokens = load if window.expert_tokens is None else window.expert_tokens + load
        window.steps += 1
        if self.memory is None:  # optimizer state exists after the first update
            state = [t for st in self.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
            self.memory = {"param_mib_per_rank": self.par.most(parallel.local_mib(self.student.parameters())),
                           "optimizer_mib_per_rank": self.par.most(parallel.local_mib(state))}
            if self.adapter.moe:  # under expert parallelism about 1/EP of the unsharded run's
                experts = set(expert_parameters(self.student))
                self.memory["expert_param_mib_per_rank"] = self.par.most(parallel.local_mib(experts))
                self.memory["expert_optimizer_mib_per_rank"] = self.par.most(parallel.local_mib(
                    t for p in experts for t in self.optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor)))
            if isinstance(self.teacher, LocalTeacher):
                params = list(self.teacher.model.parameters())
                self.memory["teacher_mib_per_rank"] = self.par.most(parallel.local_mib(params))
                # what stays on the training device between uses (less under --offload_teacher_model)
                self.memory["teacher_device_mib_per_rank"] = self.par.most(parallel.local_mib(
                    p for p in params if parallel.local(p).device.type == self.device.type))
        return loss_total

    def close(self) -> None:
        """Release what outlives training (an in-process vLLM engine, a server sampler's threads)."""
        self.rollout.close()

    def _window_metrics(self, w: Window) -> dict:
        elapsed = time.perf_counter() - w.t0
        return {
            "loss": w.loss / w.steps,
            "divergence": w.div / max(w.tokens, 1),
            "sft_loss": w.sft / max(w.sft_tokens, 1) if w.sft_tokens else None,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "grad_norm": w.grad_norm / w.steps,
            "tokens_per_s": w.tokens / max(elapsed, 1e-9),
            "step_time": elapsed / w.steps,
            "on_policy_share": w.student_seqs / max(w.seqs, 1),
            "completion_length": w.tokens / max(w.seqs, 1),
            "top1_agreement": w.agree / max(w.tokens, 1),
            **self._moe_metrics(w),
            **(self.memory or {}),
        }

    def _moe_metrics(self, w: Window) -> dict:
        """MoE students: the router aux loss (before its coefficient; the step's loss includes coef x it)
        and the expert load, tokens of the busiest expert over the mean (1 = balanced; E/k = all tokens
        on the same k experts), in the worst layer."""
        if w.expert_tokens is None:
            return {}
        t = w.expert_tokens
        return {"router_aux_loss": w.router_aux / w.steps,
                "expert_load": float((t.max(1).values / t.mean(1).clamp(min=1e-9)).max())}

    def evaluate(self) -> dict:
        """Held-out metrics (gkd.evaluate) on --val_dataset / the split, prefixed with eval_; with several
        data-parallel ranks each takes its share of the rows and the sums are reduced."""
        from gkd.train.evaluate import evaluate

        rows = self.val_examples
        per = -(-len(rows) // self.par.dp_size)  # every rank the same count: they share each forward
        mine = rows[self.par.dp_rank * per:(self.par.dp_rank + 1) * per]
        counted = [True] * len(mine) + [False] * (per - len(mine))
        mine = mine + [rows[-1]] * (per - len(mine))
        inputs, teacher_inputs = self._row_inputs(mine)
        result = evaluate(
            self.student, self.teacher.model, [e.prompt_ids for e in mine], eos_ids=self.sampler.eos_ids,
            pad_id=self.tokenizer.pad_token_id, beta=self.cfg.beta, temperature=self.cfg.divergence_temperature,
            max_new_tokens=self.cfg.max_completion_length, device=self.device, batch_size=self.cfg.global_batch_size,
            teacher_completions=self._eval_teacher_completions, inputs=inputs, teacher_inputs=teacher_inputs,
            counted=counted, reduce=self.par.dp_reduce if self.par.world > 1 else None)
        self._eval_teacher_completions = result.teacher_completions
        self.student.train()
        return {f"eval_{k}": v for k, v in result.metrics.items() if isinstance(v, float)}

    def save_checkpoint(self, step: int) -> Path:
        return checkpoint.save(self.out, step, self.student, self.optimizer, self.scheduler,
                               {"bad_steps": self.bad_steps}, self.cfg.save_total_limit, self.par)

    def train(self) -> dict:
        cfg = self.cfg
        from tqdm import tqdm

        main = self.par.is_main
        if main:
            prepare_output_dir(str(self.out))
            outdir.claim(self.out, self.cfg.overwrite_output_dir)
        self.par.barrier()
        metrics = MetricsLog(self.out, tensorboard="tensorboard" in (cfg.report_to or []), resume_step=self.start_step,
                             enabled=main, wandb_config=cfg.to_dict() if "wandb" in (cfg.report_to or []) else None)
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="gkd train",
                   disable=not (cfg.progress_bar and main), dynamic_ncols=True)
        window, last = Window(), {}
        for step in range(self.start_step, self.total_steps):
            self.train_step(step, window)
            done = step + 1
            if window.steps and (done % cfg.logging_steps == 0 or done == self.total_steps):
                last = {k: v for k, v in self._window_metrics(window).items() if v is not None}
                metrics.log(done, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", agree=f"{last['top1_agreement']:.3f}")
                window = Window()
            if self.val_examples and cfg.eval_steps and (done % cfg.eval_steps == 0 or done == self.total_steps):
                metrics.log(done, self.evaluate())
            if cfg.save_steps and done % cfg.save_steps == 0 and done < self.total_steps:
                self.save_checkpoint(done)
            bar.update(1)
        bar.close()
        metrics.close()
        self.save_checkpoint(self.total_steps)
        checkpoint.export(self.student, self.tokenizer, self.out / "final", cfg, self.par)
        if main:
            try:
                plot(metrics.path, self.out / "loss_curve.png")
            except ImportError:
                self.log("[gkd] matplotlib is not installed: no loss_curve.png (gkd plot draws it later)")
        return last
