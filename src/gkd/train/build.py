"""The components of a training run, each built from its config section: data, student, teacher, rollouts,
optimizer. The trainer calls these once and then only loops."""

from __future__ import annotations

import torch
import torch.distributed as dist

from gkd import parallel
from gkd.config import mixture_weights, route_map, teacher_specs
from gkd.data.rows import check_context, load_examples, model_context, split_examples, warn_unused_num_proc
from gkd.errors import GKDError
from gkd.machine import PRODUCT_VARIABLE, has_onednn, onednn_faster, pinned_product, settle_onednn
from gkd.models import (adapter_for, apply_lora, check_compatible, eos_ids, freeze_parameters, freeze_vision,
                        load_image_processing, load_model, load_tokenizer)
from gkd.models.onednn import faster_linears
from gkd.models.tied import add_lookup_grads_in_place
from gkd.parallel.expert import expert_parameters
from gkd.rollout.base import SamplingConfig
from gkd.rollout.factory import local_rollout, student_rollout
from gkd.train import checkpoint, outdir
from gkd.train.malloc import release_halfway_back
from gkd.train.step import LossArgs


def image_processing(cfg, tokenizer, log):
    """(the student's image processing or None for a text-only student, the local teacher's where it makes
    other inputs than the student's, else None)."""
    mine = load_image_processing(cfg.model, tokenizer)
    if mine is not None and len(teacher_specs(cfg)) > 1:
        raise GKDError(f"--model {cfg.model} reads images: several teachers are for text-only students (yet)")
    if mine is None and not (cfg.freeze_vit and cfg.freeze_aligner):
        log(f"[gkd] --model {cfg.model} has no vision tower: --freeze_vit / --freeze_aligner do nothing")
    if mine is None or cfg.teacher_model_server:  # a server processes the images itself
        return mine, None
    theirs = load_image_processing(cfg.teacher_model, tokenizer)
    if theirs is None:
        raise GKDError(f"--teacher_model {cfg.teacher_model} is text-only but the student {cfg.model} reads "
                       "images: the teacher must see the same images")
    return mine, None if theirs.same_as(mine) else theirs


def examples(data, seed: int, tokenizer, images, teacher_images, log):
    """(training rows, held-out rows) from the data section: --val_dataset, or a seeded split."""
    kw = dict(max_length=data.max_length, truncation_strategy=data.truncation_strategy,
              max_completion_length=data.max_completion_length, warn=log, num_proc=data.dataset_num_proc,
              images=images, teacher_images=teacher_images, warn_cut_completions=True)
    warn_unused_num_proc(data.dataset + (data.val_dataset or []), data.dataset_num_proc, log)
    rows = load_examples(data.dataset, tokenizer, **kw)
    if data.val_dataset:
        return rows, load_examples(data.val_dataset, tokenizer, **kw)
    return split_examples(rows, data.split_dataset_ratio, seed)


def student(m, seed: int, par):
    """The student from the model section, prepared (checkpointing, frozen vision, LoRA) and sharded."""
    def prepare(model):  # on rank 0's copy and on every rank's skeleton: all ranks see the same error
        parallel.check_model(model, par, lora=m.train_type == "lora",
                             lora_experts=m.lora_experts and m.target_modules == "all-linear")
        if m.gradient_checkpointing:
            from gkd.models.dropout import checkpoint_contexts

            # recomputation draws the LoRA dropout masks its forward drew (gkd.models.dropout)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                               "context_fn": checkpoint_contexts})
            model.config.use_cache = False
        frozen = freeze_vision(model, m.freeze_vit, m.freeze_aligner)
        if freeze_parameters(model, m.freeze_parameters) is not None and par.world > 1 and any(
                p.requires_grad for part in adapter_for(model).vision_modules(model) for p in part.parameters()):
            # a rank whose rows have images backpropagates through frozen text layers into the vision tower, one
            # without would skip them, and their sharded weights would be gathered for backward on some ranks
            # only: every rank backpropagates through them
            model.enable_input_require_grads()
        if m.train_type == "lora":
            model = apply_lora(model, m.lora_rank, m.lora_alpha, m.lora_dropout, m.target_modules, seed,
                               exclude=frozen, experts=m.lora_experts)
        return model

    model = parallel.load_sharded(lambda: load_model(m.model, m.torch_dtype), prepare,
                                  lambda model: parallel.shard_student(model, par), par)
    add_lookup_grads_in_place(model)  # a tied embedding: no second [V, H] buffer at the end of every backward
    faster_linears(model)
    if par.pp == 1:  # (on the CPU; not in a pipeline's schedule, which interleaves micro-batches)
        release_halfway_back(adapter_for(model).decoder(model).layers)
    return model.train()


def settle_product(par, recorded: str | None, log) -> None:
    """The float32 product of the run's CPU layers and loss (gkd.models.onednn), before any model is built: the one
    ``GKD_CPU_PRODUCT`` pins, else the one a resumed run's checkpoint records (bit-exact resume needs the same
    arithmetic; timed afresh, a busier machine could choose the other), else oneDNN's where it timed faster; and
    oneDNN's only where every process takes it."""
    if par.device.type != "cpu":
        settle_onednn(False)
        return
    pinned = pinned_product()
    asked = pinned or recorded
    use = onednn_faster() if asked is None else asked == "onednn" and has_onednn()
    if asked == "onednn" and not use:
        log(f"[gkd] {f'{PRODUCT_VARIABLE}=onednn' if pinned else 'the checkpoint'} asks for oneDNN's product, which "
            f"this torch lacks: torch's (a resumed run matches to rounding, not bit for bit)")
    if pinned and recorded and pinned != recorded:
        log(f"[gkd] the checkpoint's run multiplied with {recorded}'s product, {PRODUCT_VARIABLE}={pinned} asks for "
            f"the other: the resumed run matches to rounding, not bit for bit")
    if par.world > 1:  # one product for all processes, so that layouts compute as one process does
        agreed = torch.tensor([int(use)])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        use = bool(agreed)
    settle_onednn(use)


def product_name(par) -> str | None:
    """The product ``settle_product`` settled, as a checkpoint records it (None off the CPU)."""
    return ("onednn" if onednn_faster() else "torch") if par.device.type == "cpu" else None


def teacher(t, tokenizer, student_model, par, log):
    """The run's teacher from the teacher section: one teacher as it is, several routed per row or mixed
    (gkd.teacher.multi, docs/teachers.md), each built by ``one_teacher``."""
    from gkd.teacher import multi

    specs = teacher_specs(t)
    if len(specs) == 1:
        return one_teacher(t, specs[0], tokenizer, student_model, par, log)
    teachers = {s.name: one_teacher(t, s, tokenizer, student_model, par, log) for s in specs}
    if not t.teacher_mixture:
        return multi.RoutedTeacher(teachers)
    multi.check_mixable(teachers, {name: v for name, x in teachers.items() if (v := _vocab(x)) is not None})
    return multi.MixtureTeacher(teachers, mixture_weights(t.teacher_mixture, len(specs)))


def _vocab(teacher) -> int | None:
    """A teacher's vocabulary size (None: a top-k server's, whose tokenizer connect found to be the student's)."""
    if hasattr(teacher, "adapter"):  # a local model
        return teacher.model.config.get_text_config().vocab_size
    head = getattr(teacher, "head", None)
    return None if head is None else head.weight.shape[0]


def one_teacher(t, spec, tokenizer, student_model, par, log):
    """A local teacher (loaded, sharded like the student, checked against it) or a teacher server, from
    the teacher section and its entry ``spec`` (gkd.teacher.multi.TeacherSpec)."""
    if spec.remote:
        from gkd.teacher.remote import RemoteTeacher

        cross = t.teacher_tokenizer == "other"  # its own tokenizer: K is applied after the alignment
        remote = RemoteTeacher(
            spec.source, 0 if cross else spec.topk, api_key=t.teacher_api_key, timeout=t.teacher_timeout,
            retries=t.teacher_retries, max_in_flight=t.teacher_max_in_flight,
            seqs_per_request=t.teacher_seqs_per_request, wait=t.teacher_wait, wire_dtype=t.teacher_wire_dtype,
            wire=t.teacher_wire)
        log(f"[gkd] teacher server {remote.url}: waiting for /health, checking tokenizer and K")
        if cross:  # the tokenizer the server declares, checked against the server's own tokenising
            from gkd.teacher.cross_tokenizer import CrossTokenizerTeacher

            return CrossTokenizerTeacher(remote.connect(), tokenizer, remote.tokenizer, spec.topk, log,
                                         t.cross_tokenizer_fallback)
        remote.connect(tokenizer)
        if remote.head is not None:  # the hidden wire: the loss takes the teacher's head beside the student's
            vocab = adapter_for(student_model).lm_head(student_model).shape[0]  # (a DTensor's is the whole)
            if remote.head.weight.shape[0] != vocab:
                raise GKDError(f"teacher server {remote.url}: its logit head has {remote.head.weight.shape[0]} rows, "
                               f"the student's vocabulary {vocab}; GKD needs one vocabulary")
            if par.tp > 1:  # the loss takes each head split over the vocabulary, as the student's is
                from gkd.parallel.tensors import vocabulary_shard

                remote.head = vocabulary_shard(remote.head, par.mesh.get_local_rank("tp"), par.tp)
        return remote
    from gkd.teacher.local import LocalTeacher

    offload = parallel.teacher_offload(par, t.offload_teacher_model, par.device)
    if t.offload_teacher_model and not offload:
        log("[gkd] --offload_teacher_model: training runs on the CPU, where the teacher already is; nothing to offload")
    model = parallel.load_sharded(lambda: load_model(spec.source, t.torch_dtype), lambda m: m,
                                  lambda m: parallel.shard_teacher(m, par, offload=offload == "fsdp"), par)
    faster_linears(model)
    if t.teacher_tokenizer == "other":  # aligned by text (gkd.teacher.cross_tokenizer), K applied there
        from gkd.teacher.cross_tokenizer import CrossTokenizerTeacher

        inner = LocalTeacher(model, par.device, offload=offload == "move", name=spec.flag)
        return CrossTokenizerTeacher(inner, tokenizer, load_tokenizer(spec.source), spec.topk, log,
                                     t.cross_tokenizer_fallback, tp_group=par.tp_group)
    check_compatible(tokenizer, load_tokenizer(spec.source), student_model, model)
    return LocalTeacher(model, par.device, topk=spec.topk, offload=offload == "move", name=spec.flag)


def routes(cfg, examples, log) -> bool:
    """Give every row its teacher when the run routes rows (several teachers, no mixture); one line for a
    row or route naming no teacher. True when the steps route rows to several teachers. With one teacher
    a 'teacher' column is not used (as any other column: a warning)."""
    from gkd.teacher import multi

    names = [s.name for s in teacher_specs(cfg)]
    named = next((e for e in examples if e.teacher is not None), None)
    if len(names) > 1 and cfg.teacher_mixture:
        if named is not None or cfg.teacher_route:
            raise GKDError(f"{named.source if named else '--teacher_route'}: rows are routed to teachers, but "
                           "--teacher_mixture scores every row against the mixture; give one or the other")
        return False
    if len(names) == 1 and named is not None and not cfg.teacher_route:
        log(f"[gkd] dataset column 'teacher' (first at {named.source}) is not used: one teacher scores every row")
        return False
    if len(names) > 1 or cfg.teacher_route:
        multi.assign_routes(examples, names, route_map(cfg.teacher_route),
                            list(cfg.dataset) + list(cfg.val_dataset or []))
    return len(names) > 1


def loss_args(cfg, student_model, par, log) -> LossArgs:
    """What every micro-batch's loss takes, from the method's options and the student."""
    adapter, aux = adapter_for(student_model), cfg.router_aux_loss_coef
    if aux and not adapter.moe:
        log(f"[gkd] --model {cfg.model} has no experts: --router_aux_loss_coef does nothing")
    return LossArgs(beta=cfg.objective, temperature=cfg.divergence_temperature, sft_alpha=cfg.sft_alpha,
                    chunk_size=cfg.loss_chunk_size or None, tp_group=par.tp_group,
                    router_aux_loss_coef=adapter.router_aux_loss_coef(student_model) if aux is None else aux,
                    dropout_seed=cfg.seed if cfg.train_type == "lora" and cfg.lora_dropout else None)


def cached_teacher(teacher, cfg, par, log):
    """The teacher behind ``--teacher_cache`` (gkd.teacher.cache), or ``teacher`` itself without the flag;
    several teachers are each cached (one folder holds every teacher's entries apart)."""
    if not cfg.teacher_cache:
        return teacher
    from gkd.teacher import cache

    def one(member, spec):
        identity = (cache.remote_identity(member) if spec.remote
                    else cache.local_identity(spec.source, cfg.torch_dtype))
        store = cache.TeacherCache(cfg.teacher_cache, identity, spec.topk, cfg.divergence_temperature, log)
        # a local teacher split over the processes scores only with all of them
        return cache.CachedTeacher(member, store, sharded=par.world > 1 and not spec.remote,
                                   tp_group=par.tp_group, log=log)

    specs = teacher_specs(cfg)
    if len(specs) == 1:
        return one(teacher, specs[0])
    teacher.teachers = {s.name: one(teacher.teachers[s.name], s) for s in specs}
    return teacher


def check_before_loading(cfg, par, log) -> tuple:
    """What is checked before any model loads: the batch split, the layout's options, the output folder and
    the checkpoint to resume (a damaged marker or other pinned flags). Returns (output folder, checkpoint
    path or None, its gkd_checkpoint.json or {})."""
    cfg.grad_accumulation_steps(par.dp_size)  # a one-line error unless the global batch splits
    parallel.check_options(cfg, par.world, par.tp)
    if par.dp_mesh is None and not (cfg.reduce_scatter_every_micro_batch and cfg.gather_for_generation):
        log("[gkd] --reduce_scatter_every_micro_batch / --gather_for_generation apply to FSDP only: "
            "this run does not shard the student")
    out = outdir.check_output_dir(cfg.output_dir)
    if cfg.teacher_cache:
        from gkd.teacher.cache import check_folder

        check_folder(cfg.teacher_cache)
    path = checkpoint.resolve(cfg.resume_from_checkpoint, out) if cfg.resume_from_checkpoint else None
    resumed = checkpoint.read_info(path) if path is not None else {}
    if path is not None:
        checkpoint.check_settings(path, resumed, cfg)
    outdir.check_owner(out, path, cfg.overwrite_output_dir)  # one run per folder
    return out, path, resumed


def check_fits(cfg, student_model, teacher, train_rows, val_rows) -> None:
    """Sequences within both contexts: one line now, not a failure mid-run."""
    sampled = cfg.samples_student or cfg.seq_kd or bool(val_rows and cfg.eval_steps)
    contexts = {"student": model_context(student_model)}
    if teacher.context is not None:
        contexts["teacher"] = teacher.context
    check_context(train_rows + val_rows, cfg.max_completion_length, sampled, contexts)
    teacher.check_rows(train_rows, cfg.max_completion_length, cfg.samples_student)  # it scores training rows only


def rollouts(cfg, student_model, tokenizer, teacher, train_rows, par, out, log):
    """(the sampler of models in this process, the student's on-policy sampler: the same one unless vLLM)."""
    sampling = SamplingConfig(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                              top_p=cfg.top_p, top_k=cfg.top_k, batch_size=cfg.global_batch_size)
    local = local_rollout(sampling, eos_ids(tokenizer, student_model), tokenizer.pad_token_id, par)
    if cfg.samples_student:
        local.check_model(student_model, f"--model {cfg.model}")
    if cfg.seq_kd or any(e.completion_ids is None for e in train_rows):
        if cfg.lmbda < 1 or cfg.seq_kd:
            teacher.check_generation(local, "--dataset has prompt-only rows (or --seq_kd is on): off-policy steps "
                                            "need them completed (or use --lmbda 1)")
    on_policy = student_rollout(cfg.section("rollout"), cfg.model, sampling, local, student_model, tokenizer,
                                any(e.images for e in train_rows), par, out, log)
    if cfg.speculative_kd_topk:
        on_policy = corrected_rollout(cfg.speculative_kd_topk, local, teacher, student_model, cfg.model, train_rows, par)
    return local, on_policy


def corrected_rollout(topk: int, local, teacher, student_model, model_spec: str, train_rows, par):
    """The student's sampler with teacher-corrected tokens (--speculative_kd_topk), checked now."""
    from gkd.rollout.corrected import TeacherCorrectedRollout

    if any(e.images for e in train_rows):
        raise GKDError("--speculative_kd_topk with image rows is not supported: the teacher reads text tokens "
                       "beside the student; leave it at 0 for image data")
    rollout = TeacherCorrectedRollout(local, teacher, topk)
    rollout.check_model(student_model, f"--model {model_spec}")
    return rollout


def optimizer(o, params, budget):
    """(AdamW, its LR schedule along ``budget``) from the optim section."""
    # (as a group: a pipeline stage whose weights are all frozen holds none, which a bare list may not be)
    opt = torch.optim.AdamW([{"params": params}], lr=o.learning_rate, weight_decay=o.weight_decay, fused=True)
    return opt, budget.schedule(opt)


def memory(student_model, opt, teacher, par) -> dict:
    """Per-rank MiB of parameters and optimizer state (the largest rank's), after the first update."""
    def tensors(params):
        return [t for p in params for t in opt.state.get(p, {}).values() if isinstance(t, torch.Tensor)]

    params = list(student_model.parameters())
    out = {"param_mib_per_rank": par.most(parallel.local_mib(params)),
           "optimizer_mib_per_rank": par.most(parallel.local_mib(tensors(params)))}
    if adapter_for(student_model).moe:  # under expert parallelism about 1/EP of the unsharded run's
        experts = set(expert_parameters(student_model))
        out["expert_param_mib_per_rank"] = par.most(parallel.local_mib(experts))
        out["expert_optimizer_mib_per_rank"] = par.most(parallel.local_mib(tensors(experts)))
    return {**out, **teacher.memory_mib(par.most, par.device)}
