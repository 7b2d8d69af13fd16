"""Pipeline parallelism: a model's decoder layers split into stages over the ``pp`` mesh dimension.

Each rank keeps only its stages' layers (the embedding on the first stage, the final norm and lm_head on
the last) inside the model object itself: the layer list becomes a ``ModuleDict`` keyed by the layer's
index, so every weight keeps its name (``model.layers.7.mlp...``) and a checkpoint saved at one pipeline
size loads at another. A :class:`Stage` is a thin module over one stage's share (the same parameters)
whose forward runs those layers, recomputing positions, the causal mask and the rotary embedding as the
family's body would. A vision-language model's first stage also holds the vision tower and aligner and
merges the image features into its embeddings; the family's own positions (Qwen2-VL's M-RoPE) are made by
every stage from the batch (``context``).

The student trains through ``torch.distributed.pipelining`` (1F1B, GPipe, interleaved 1F1B with virtual
stages); its loss is the fused GKD loss on the last stage, summed and divided by the step's global token
count, so the schedule must not rescale gradients (``scale_grads=False``): the accumulated gradient is
exactly the single-process one. A mixture-of-experts student's stages pass each row's routing sums on
beside the hidden states (gkd.models.routing), and the last stage adds the router loss of their totals.
The teacher runs its own no-grad pipeline first (one stage per rank); its last-stage hidden states meet
the student's on the last stage only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gkd.errors import GKDError
from gkd.models.adapter import adapter_for, unwrap
from gkd.models.routing import recording, row_sums

SCHEDULES = ("1f1b", "gpipe")


@dataclass
class PipelinePlan:
    """The flags: stages per rank (virtual), a hand split of the student's layers, the schedule."""

    virtual: int = 1
    layers: str = ""
    schedule: str = "1f1b"


def check_options(cfg, world: int, tp: int) -> None:
    """Options pipeline parallelism does not support (yet), schedules the step's micro-batches cannot fill,
    and models it cannot split (read from their config before any process loads them), as one-line errors."""
    p, v = cfg.pipeline_model_parallel_size, cfg.virtual_pipeline_model_parallel_size
    if cfg.use_vllm and cfg.vllm_mode != "server":
        raise GKDError(f"--use_vllm --vllm_mode {cfg.vllm_mode} with --pipeline_model_parallel_size {p}: an engine "
                       "beside each rank would hold the whole model the stages split; use --vllm_mode server, or "
                       "leave --use_vllm off (the pipelined sampler generates through the stages)")
    if v < 1:
        raise GKDError("--virtual_pipeline_model_parallel_size must be >= 1")
    if v > 1 and cfg.pipeline_schedule != "1f1b":
        raise GKDError(f"--virtual_pipeline_model_parallel_size {v} runs the interleaved 1F1B schedule; "
                       f"--pipeline_schedule {cfg.pipeline_schedule} has no virtual stages")
    micro = cfg.global_batch_size // (cfg.micro_batch_size * max(1, world // (tp * p * cfg.context_parallel_size)))
    if v == 1 and cfg.pipeline_schedule == "1f1b" and micro < p:
        raise GKDError(f"the 1F1B schedule needs at least --pipeline_model_parallel_size {p} micro-batches per step "
                       f"on a data-parallel rank, got {micro}: raise --global_batch_size, lower --micro_batch_size, "
                       "or use --pipeline_schedule gpipe")
    if v > 1 and micro >= p and micro % p:
        raise GKDError(f"interleaved 1F1B (--virtual_pipeline_model_parallel_size {v}) needs the micro-batches per "
                       f"step on a data-parallel rank ({micro}) to be a multiple of --pipeline_model_parallel_size {p}")
    for flag, spec, stages, hand in (("--model", cfg.model, p * v, cfg.pipeline_layers),
                                     ("--teacher_model", cfg.teacher_model, p, "")):
        config = _config(spec)
        if config is not None:
            check_config(config, stages, hand, f"{flag} {spec}")



def _config(spec: str):
    """A model folder's config, or None where it cannot be read here (the load says why later)."""
    if not spec:
        return None
    from gkd.models.load import read_config, resolve

    try:
        folder, gguf = resolve(spec)
        return None if gguf else read_config(folder)
    except Exception:  # noqa: BLE001 - reported, in one line, where the model is loaded
        return None


def check_config(config, stages: int, hand: str, where: str) -> None:
    """A one-line error unless a model of ``config`` splits into ``stages`` pipeline stages."""
    from gkd.models.adapter import adapter_for_config, families, text_config

    name = (getattr(config, "architectures", None) or [config.model_type])[0]
    adapter = adapter_for_config(config)
    gap = adapter.pipeline_refusal(config)
    if gap:
        able = ", ".join(t for a in families() if a.pipelines for t in a.model_types)
        who = where if name == config.model_type else f"{name}, {where}"  # (a config may name no architecture)
        raise GKDError(f"--pipeline_model_parallel_size: no pipeline plan for {config.model_type} ({who}): "
                       f"{gap}; pipelines exist for {able} (see gkd models)")
    split_layers(text_config(config).num_hidden_layers, stages, hand, where, adapter.stage_first_layers(config))


def split_layers(n_layers: int, stages: int, hand: str = "", where: str = "the model",
                 first: int = 0) -> list[list[int]]:
    """The layer indices of each stage: balanced (earlier stages take one more where it does not divide),
    or ``hand``, comma-separated layer counts per stage; the first stage holds at least ``first`` layers (those
    that take what only it makes, gkd.models.adapter.Adapter.stage_first_layers)."""
    if hand:
        try:
            counts = [int(c) for c in hand.split(",")]
        except ValueError:
            raise GKDError(f"--pipeline_layers {hand}: give comma-separated layer counts, one per stage") from None
        if len(counts) != stages or min(counts) < 1 or sum(counts) != n_layers:
            raise GKDError(f"--pipeline_layers {hand}: needs {stages} counts of at least 1 layer that add up to the "
                           f"{n_layers} decoder layers of {where}")
    else:
        if stages > n_layers:
            raise GKDError(f"{stages} pipeline stages (--pipeline_model_parallel_size x "
                           f"--virtual_pipeline_model_parallel_size) but {where} has {n_layers} decoder layers; "
                           "each stage needs at least one")
        base, extra = divmod(n_layers, stages)
        counts = [base + (s < extra) for s in range(stages)]
        if counts[0] < first:  # the first stage takes those, the others share the rest evenly
            if stages > n_layers - first + 1:
                raise GKDError(f"{stages} pipeline stages but {where} has {n_layers} decoder layers, of which the "
                               f"first stage must hold {first} (they take vision features only it makes); each "
                               "other stage needs at least one")
            base, extra = divmod(n_layers - first, stages - 1)
            counts = [first] + [base + (s < extra) for s in range(stages - 1)]
    if counts[0] < first:
        raise GKDError(f"--pipeline_layers {hand}: the first stage of {where} must hold its first {first} decoder "
                       "layers (they take vision features only the first stage makes)")
    starts = [sum(counts[:s]) for s in range(stages)]
    return [list(range(a, a + c)) for a, c in zip(starts, counts)]


def check_model(model, stages: int, hand: str = "", where: str = "the model") -> None:
    """check_config for a loaded model (a GGUF file's too)."""
    check_config(unwrap(model).config, stages, hand, where)


class Stage(nn.Module):
    """One stage of a model: (embedding), its decoder layers, (final norm and lm_head). The modules are the
    model's own; forward takes token ids on the first stage, hidden states elsewhere, and returns hidden
    states (normed on the last stage)."""

    def __init__(self, model, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        adapter = adapter_for(model)
        body = adapter.decoder(model)
        self.adapter, self.config, self.layer_ids = adapter, body.config, layer_ids
        self.embed_tokens = body.embed_tokens if first else None
        # the first stage runs the vision modules (registered here, so that FSDP and the schedule see them);
        # the model itself is kept unregistered for the family's image-feature call
        self.vision = nn.ModuleList(adapter.vision_modules(model)) if first else None
        self.__dict__["model"] = model
        self.layers = nn.ModuleList([body.layers[str(i)] for i in layer_ids])
        self.norm = body.norm if last else None
        self.lm_head = unwrap(model).get_output_embeddings() if last else None
        self.rotary_emb = body.rotary_emb
        # what each of the step's micro-batches takes besides its hidden states (``context``), in schedule order
        self.contexts: list[dict] = []
        self.indexes: list[torch.Tensor] = []  # each micro-batch's token -> sequence index (routing sums)
        self.dropouts: list = []  # each micro-batch's LoRA dropout identities (a context manager's maker), or none
        self.calls = 0
        # a MoE student's training forwards also carry each row's routing sums (gkd.models.routing) to the last
        # stage, which forms the router loss from them: their width (0: none), and this stage's expert loads
        self.routers, self.routing, self.load = adapter.routers_of(self.layers), 0, None
        self.sequences = 0  # the routing sums' rows: the most sequences a micro-batch of the step holds

    def forward(self, x: torch.Tensor, routing=None, attention_mask=None, position_ids=None, cache=None,
                images=None):
        """A training micro-batch (x, and a MoE student's routing sums so far): schedules run a stage's
        micro-batches in order, so the k-th call is the k-th micro-batch and takes its ``context`` (the
        right-padded attention mask, the family's positions, the images). Generation passes the mask,
        positions, this stage's KV cache and, at the prompt, the images. (Called as the module, so FSDP
        gathers what the stage holds.)"""
        if attention_mask is None and self.contexts:
            k = self.calls
            self.calls += 1
            with self.dropouts[k]() if self.dropouts else contextlib.nullcontext():
                if self.routing:
                    return self.routed(x, routing, self.contexts[k], self.indexes[k])
                return self.run(x, **self.contexts[k])
        return self.run(x, attention_mask, position_ids, cache, images)

    def routed(self, x: torch.Tensor, routing, given: dict, index: torch.Tensor):
        """(hidden states, the sequences' routing sums with this stage's layers added: one row per sequence of
        ``index``, the micro-batch's token -> sequence map, up to the schedule's fixed count); the loads are
        kept."""
        with recording(self.routers) as seen:
            h = self.run(x, **given)
        if routing is None:
            routing = torch.zeros(self.sequences, self.routing, dtype=torch.float32, device=h.device)
        if not seen:
            return h, routing
        sums, load = row_sums(seen, index, count=self.sequences)
        self.load = load if self.load is None else self.load + load
        return h, routing + sums

    def run(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids=None, cache=None,
            images: dict | None = None, split=None):
        """``split`` (gkd.parallel.context.ContextSplit): the first stage takes the whole sequences (padded to the
        split's length: images merge into whole sequences) and keeps this rank's tokens; later stages take
        those tokens' hidden states; the positions are whole and cut the same way; attention gathers the
        peers' keys."""
        if split is not None:
            with split.active():
                return self._run(x, attention_mask, position_ids, cache, images, split)
        return self._run(x, attention_mask, position_ids, cache, images)

    def _run(self, x: torch.Tensor, attention_mask, position_ids, cache, images, split=None):
        adapter, config = self.adapter, self.config
        given = {}  # what the first stage's layers take from the images besides (DeepStack)
        if self.embed_tokens is not None:  # token ids: the embedding, with the images' features merged in
            h, given = adapter.stage_images(self.model, x, adapter.stage_embed(config, self.embed_tokens, x),
                                            images or {})
            if split is not None:
                h = h.index_select(1, split.mine)
                given = local_layer_inputs(given, split.mine)
        else:
            h = x
        if split is not None:
            position_ids = position_ids.index_select(position_ids.dim() - 1, split.mine)
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device)[None]
        text, rotary_positions = adapter.stage_positions(position_ids)
        masks = adapter.stage_masks(config, h, attention_mask, text, cache, self.layer_ids)
        rotary = adapter.stage_rotary(config, self.rotary_emb, h, rotary_positions, self.layer_ids)
        for i, layer in zip(self.layer_ids, self.layers):
            h = layer(h, attention_mask=masks[i], position_ids=text, past_key_values=cache,
                      use_cache=cache is not None, position_embeddings=rotary[i])
            if given:
                h = adapter.after_layer(i, h, given)
        return self.norm(h) if self.norm is not None else h

    def head(self):
        """The last stage's logit head: its lm_head with the family's scale / softcap (gkd.losses.LogitHead),
        read after the forward that gathered it under FSDP."""
        return self.adapter.head_of(self.lm_head, self.config)


@dataclass
class Staged:
    """A model's stages on this rank (a pipeline of ``num`` stages over ``group``)."""

    stages: list[Stage]
    indices: list[int]  # their stage indices (rank r holds r, r + P, ...)
    num: int
    group: object
    rank: int  # this rank's place in the pipeline
    # a tied lm_head and embedding live on the first and the last stage as two equal copies; their gradients
    # are summed over ``tied_group`` (those two stages) so that both take the single weight's update
    ties: bool = False  # the model ties them (every rank knows: read before the split)
    tied: nn.Module | None = None  # this rank's copy (the embedding or the lm_head), or None
    tied_group: object = None
    tied_name: tuple[str, str] | None = None  # (the last stage's copy, the embedding's name) on the last stage

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def first(self) -> Stage | None:
        return self.stages[0] if self.indices[0] == 0 else None

    @property
    def last(self) -> Stage | None:
        return self.stages[-1] if self.indices[-1] == self.num - 1 else None

    def peer(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.group, pp_rank)

    def dtype(self) -> torch.dtype:
        return next(p for p in self.stages[0].layers.parameters() if p.is_floating_point()).dtype

    def hidden_size(self) -> int:
        return self.stages[0].config.hidden_size


def staged(model) -> Staged | None:
    """The stages of a pipelined model (None when it is not split)."""
    return unwrap(model).__dict__.get("_gkd_staged")


def split(model, par, virtual: int = 1, hand: str = "") -> Staged:
    """Keep only this rank's stages of ``model`` (in place, before its weights are materialised)."""
    adapter = adapter_for(model)
    body = adapter.decoder(model)
    num = par.pp * virtual
    check_model(model, num, hand)
    plan = split_layers(len(body.layers), num, hand, first=adapter.stage_first_layers(unwrap(model).config))
    indices = [par.pp_rank + v * par.pp for v in range(virtual)]
    head, embed = unwrap(model).get_output_embeddings(), body.embed_tokens
    tied = head.weight is embed.weight
    names = tuple(f"{_name_of(model, m)}.weight" for m in (head, embed))
    if tied and 0 not in indices and num - 1 in indices:  # the last stage's own copy (the state dict fills it)
        head.weight = nn.Parameter(torch.empty_like(head.weight), requires_grad=head.weight.requires_grad)
    layers = body.layers
    body.layers = nn.ModuleDict({str(i): layers[i] for s in indices for i in plan[s]})
    stages = [Stage(model, plan[s], s == 0, s == num - 1) for s in indices]
    if 0 not in indices:
        body.embed_tokens = None
        adapter.drop_vision(model)  # the first stage alone runs the images
    if num - 1 not in indices:
        body.norm = None
        unwrap(model).set_output_embeddings(None)
    out = Staged(stages, indices, num, par.pp_group, par.pp_rank, ties=tied)
    if tied and (0 in indices or num - 1 in indices):
        out.tied = body.embed_tokens if 0 in indices else head
    if out.tied is head:
        out.tied_name = names
    unwrap(model).__dict__["_gkd_staged"] = out
    return out


def shard(model, par, plan: PipelinePlan, student: bool) -> None:
    """Split into stages, then tensor parallel inside each layer, expert parallel (a stage's experts over its EP
    ranks), then FSDP over the data-parallel ranks:
    each decoder layer a unit; a student stage is the root of its unit (embedding, norm and lm_head stay
    gathered from its forward to the loss, as gkd.parallel.fsdp explains); a teacher's embedding and lm_head
    stay whole."""
    st = split(model, par, plan.virtual if student else 1, plan.layers if student else "")
    if student and st.ties:
        _tie_groups(st, par)
    if student and adapter_for(model).moe:  # A_e and P_e of each expert, and the layers (gkd.models.routing)
        for stage in st.stages:
            stage.routing = 2 * adapter_for(model).num_experts(model) + 1
    if par.cp > 1:
        from gkd.parallel.context import use_context_parallel_attention

        use_context_parallel_attention(model)
    if par.tp > 1:
        from gkd.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, par.tp_mesh)
    from gkd.parallel.expert import split_experts

    ignored = split_experts(model, par, student=student)  # this rank's stages' experts, over the stage's EP ranks
    if student and par.dp_mesh is not None:  # (context-parallel peers' gradients are partial sums too)
        from gkd.parallel.fsdp import shard_units

        for stage in st.stages:
            shard_units(list(stage.layers), stage, par.dp_mesh, ignored)
    if not student and par.dp_shard > 1:
        from gkd.parallel.fsdp import shard_teacher

        shard_teacher(model, par.mesh["dp_shard"], ignored)


def _tie_groups(st: Staged, par) -> None:
    """For a tied model, a group of the first and the last stage of each pipeline (every rank creates every
    group, as torch.distributed asks); this rank keeps the one its copy belongs to."""
    from gkd.parallel.groups import made

    names = par.mesh.mesh_dim_names
    pipelines = par.mesh.mesh.movedim(names.index("pp"), -1).reshape(-1, par.pp)
    for ranks in pipelines.tolist():
        group = made(("tied", ranks[0], ranks[-1]), lambda: dist.new_group([ranks[0], ranks[-1]]))
        if dist.get_rank() in (ranks[0], ranks[-1]):
            st.tied_group = group


def exported_stages(model, par):
    """The whole student's checkpoint tensors (gkd.models.export) on rank 0, an empty iterator elsewhere: each
    stage exports its own (all its ranks gather its shards). Every rank must call it."""
    from gkd.models.export import export_weights

    return iter(on_rank0({k: v.detach().cpu() for k, v in export_weights(model)}, par).items())


def on_rank0(mine: dict, par) -> dict:
    """Every stage's ``mine`` (a dict of its tensors, whole over its FSDP/CP/TP ranks) merged on rank 0: the
    stages of rank 0's pipeline send theirs; {} on every other rank."""
    if par.dp_rank or par.cp_rank or par.mesh.get_local_rank("tp"):
        return {}
    parts = [None] * par.pp if par.is_main else None
    dist.gather_object(mine, parts, dst=0, group=par.pp_group)
    return {k: v for part in parts for k, v in part.items()} if par.is_main else {}


def sum_tied_gradients(model) -> None:
    """After the step's backward: the embedding's and the lm_head's gradients summed on both stages, as one
    weight would have received them (each shard with its twin: both copies are split the same way)."""
    from gkd.parallel.tensors import local

    st = staged(model)
    if st is None or st.tied is None or st.tied.weight.grad is None:
        return
    dist.all_reduce(local(st.tied.weight.grad), group=st.tied_group)


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def tied_copy_names(model) -> dict[str, str]:
    """{the last stage's copy of a tied weight: the name the weight has in a model that keeps it once} on the
    rank holding that copy: a checkpoint saved without a pipeline has its optimizer state under the latter."""
    st = staged(model)
    return dict([st.tied_name]) if st is not None and st.tied_name else {}


def tied_copy(model) -> torch.Tensor | None:
    """The last stage's copy of a tied weight (a gradient norm counts the weight once: on the first stage)."""
    st = staged(model)
    return st.tied.weight if st is not None and st.tied is not None and st.first is None else None


# --------------------------------------------------------------------------------------------------
# One training step
# --------------------------------------------------------------------------------------------------


def local_layer_inputs(given: dict, mine: torch.Tensor) -> dict:
    """The first stage's ``layer_inputs`` at a context split's positions ``mine`` (DeepStack's: this rank's image
    tokens)."""
    from gkd.parallel.context import local_deepstack

    return {**given, **local_deepstack(given, mine)} if given else given


def pad_to(t: torch.Tensor, length: int, value) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def context(model, batch, teacher: bool = False, split=None) -> dict:
    """What every stage of ``model`` takes for ``batch`` besides the hidden states: its attention mask, the
    family's positions (Qwen2-VL's M-RoPE ones, from the ids and the image grids) and its images (which the
    first stage alone reads). Every rank holds the batch, so each makes them itself: no transfer beyond the
    schedule's hidden states, and the positions cost a few integer operations. Packed rows (--packing) take no
    2D mask but each sequence's positions, as the family's forward makes them (``Adapter.prepare``): attention
    keeps to each sequence by them (``packed_rows``). Under a context ``split``: the whole sequences' positions,
    padded to the split's length (every stage keeps its rank's), no 2D mask (attention masks by position), and
    the split itself, which the stage turns on."""
    adapter = adapter_for(model)
    inputs = batch.teacher_inputs if teacher and batch.teacher_inputs is not None else batch.inputs
    ids, mask, packed = batch.input_ids, batch.attention_mask, batch.position_ids
    if split is not None:
        ids, mask = pad_to(ids, split.length, 0), pad_to(mask, split.length, 0)
        packed = None if packed is None else pad_to(packed, split.length, 0)
    if packed is not None:
        positions = adapter.prepare(model, {"input_ids": ids, "position_ids": packed, **inputs})["position_ids"]
    else:
        positions, _ = adapter.stage_position_ids(model, ids, mask, inputs)
    if split is not None:
        if positions is None:
            positions = torch.arange(split.length, device=ids.device)[None].expand(ids.shape[0], -1)
        return {"attention_mask": None, "position_ids": positions, "images": inputs, "split": split}
    return {"attention_mask": None if packed is not None else mask, "position_ids": positions, "images": inputs}


def packed_rows(model, batches):
    """While inside (a schedule's forwards and backwards, recomputation included): a model on SDPA attends per
    sequence of packed ``batches`` (gkd.models.packed); nothing changes for padded ones."""
    from gkd.models.adapter import text_config
    from gkd.models.packed import packed_attention

    packed = batches and batches[0].position_ids is not None
    return packed_attention(text_config(unwrap(model).config), {"position_ids": None} if packed else {})


def teacher_hidden(teacher_model, batches, splits=None) -> list[torch.Tensor] | None:
    """The teacher's final hidden states of each batch through its own no-grad pipeline: each stage
    receives a micro-batch's hidden states from the one before, runs its layers and passes them on; the
    last stage returns them (None elsewhere). ``splits``: each batch's context split (this rank's tokens)."""
    st = staged(teacher_model)
    stage = st.stages[0]
    out, pending = [], []
    with torch.no_grad():
        for b, split in zip(batches, splits or [None] * len(batches)):
            if st.first is not None:  # (whole sequences under a split: see Stage.run)
                x = b.input_ids if split is None else pad_to(b.input_ids, split.length, 0)
            else:
                rows, length = b.input_ids.shape[0], b.input_ids.shape[1] if split is None else len(split.mine)
                x = torch.empty(rows, length, st.hidden_size(), dtype=st.dtype(), device=b.input_ids.device)
                dist.recv(x, src=st.peer(st.rank - 1), group=st.group)
            with packed_rows(teacher_model, [b]):
                h = stage.run(x, **context(teacher_model, b, teacher=True, split=split))
            if st.last is None:
                pending.append(dist.isend(h.contiguous(), dst=st.peer(st.rank + 1), group=st.group))
            else:
                out.append(h)
    for w in pending:
        w.wait()
    return out if st.last is not None else None


def final_hidden(model, batch, teacher: bool = False) -> torch.Tensor | None:
    """``batch``'s final hidden states through ``model``'s stages in order, without gradients (evaluation): on
    the rank that holds the last stage, None elsewhere. Every pipeline rank calls it; virtual stages too. Each
    stage is called as the module, so that FSDP gathers what it holds."""
    st = staged(model)
    mine = dict(zip(st.indices, st.stages))
    given = context(model, batch, teacher=teacher)
    h = None
    with torch.no_grad():
        for s in range(st.num):
            if s not in mine:
                continue
            if s > 0:
                h = torch.empty(*batch.input_ids.shape, st.hidden_size(), dtype=st.dtype(),
                                device=batch.input_ids.device)
                dist.recv(h, src=st.peer((s - 1) % st.size), group=st.group)
            h = mine[s](batch.input_ids if s == 0 else h, **given)
            if s < st.num - 1:
                dist.send(h.contiguous(), dst=st.peer((s + 1) % st.size), group=st.group)
    return h if st.last is not None else None


def schedule_for(st: Staged, n_micro: int, length: int, width: int, device, loss_fn, plan: PipelinePlan,
                 sequences: int = 0, ids_length: int | None = None):
    """A pipelining schedule over this rank's stages for ``n_micro`` micro-batches of ``width`` rows and
    ``length`` positions (the first stage's ids: ``ids_length``, when they are longer), a MoE student's routing
    sums for ``sequences`` sequences (shapes given up front: no shape-inference forward)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    hidden = torch.empty(width, length, st.hidden_size(), dtype=st.dtype(), device="meta", requires_grad=True)
    ids = torch.empty(width, ids_length or length, dtype=torch.long, device="meta")
    carried = st.stages[0].routing
    if carried:  # a MoE student's routing sums ride along with the hidden states
        hidden = (hidden, torch.empty(sequences, carried, dtype=torch.float32, device="meta", requires_grad=True))
    stages = [PipelineStage(s, i, st.num, device, input_args=ids if i == 0 else hidden, output_args=hidden,
                            group=st.group) for s, i in zip(st.stages, st.indices)]
    if len(stages) > 1:
        return ScheduleInterleaved1F1B(stages, n_micro, loss_fn=loss_fn, scale_grads=False)
    kind = Schedule1F1B if plan.schedule == "1f1b" else ScheduleGPipe
    return kind(stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)


def padded(batches: list) -> list:
    """The step's micro-batches padded to one length and one width, as the schedule needs them: padded rows
    of equal count (a micro-batch size), or packed rows (as many as their sequences filled) topped up with
    empty ones; packed padding counts its own positions from 0, as collate's does (attended by nothing)."""
    length = max(b.input_ids.shape[1] for b in batches)
    width = max(b.input_ids.shape[0] for b in batches)
    packed = batches[0].position_ids is not None
    if not packed and any(b.input_ids.shape[0] != width for b in batches):
        raise GKDError("pipeline parallelism needs micro-batches of equal size")

    def fit(t: torch.Tensor, value) -> torch.Tensor:
        t = pad_to(t, length, value)
        return torch.cat([t, t.new_full((width - t.shape[0], length), value)])

    out = []
    for b in batches:
        mask = fit(b.attention_mask, 0)
        positions = None
        if packed:  # sequences fill each row from its start: the rest is padding
            count = torch.arange(length)[None].expand(width, -1)
            positions = torch.where(count < mask.sum(1, keepdim=True), fit(b.position_ids, 0),
                                    count - mask.sum(1, keepdim=True))
        out.append(type(b)(fit(b.input_ids, 0), mask, fit(b.loss_mask, False), fit(b.labels, -100), b.inputs,
                           b.teacher_inputs, b.images, b.sampled, positions))
    return out


def holds_last_stage(model) -> bool:
    return staged(model).last is not None


def forward_backward(micro_batches, batches, scored, student, n_stats: int, plan: PipelinePlan,
                     loss_fn, splits=None, dropouts=None) -> torch.Tensor:
    """gkd.train.step.forward_backward for a pipelined student: the schedule's micro-batches are the step's,
    ``batches`` them padded (``padded``) and ``scored`` the teacher's output of each (on the last stage);
    ``loss_fn(hidden, head, micro_batch, batch, teacher_output, routing)`` runs on the last stage (``head``:
    the student's LogitHead; ``routing``: a MoE student's routing sums of the rows, else None; ``split``: the
    micro-batch's context split, else None) and returns (loss, a row of ``n_stats`` sums); returns the step's
    sums on every stage of the pipeline, followed by a MoE student's tokens per expert of each MoE layer, as
    gkd.train.step.forward_backward does. ``splits``: each micro-batch's context split (the stages then run
    this rank's tokens of it, the hidden states between them hold those). ``dropouts``: each micro-batch's
    maker of the context that sets its tokens' identities for LoRA dropout (gkd.models.dropout) around every
    stage's forward of it (checkpointing's recomputation keeps them), or None."""
    st = staged(student)
    n_micro = len(micro_batches)
    splits = splits or [None] * n_micro
    width = batches[0].input_ids.shape[0]
    length = batches[0].input_ids.shape[1] if splits[0] is None else len(splits[0].mine)
    stats = torch.zeros(n_stats, dtype=torch.float64)
    last = st.last

    def pipeline_loss(output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        k = int(rows[0]) // width
        hidden, routing = output if isinstance(output, tuple) else (output, None)
        loss, row = loss_fn(hidden, last.head(), micro_batches[k], batches[k], scored[k], routing, splits[k])
        stats.add_(row)
        return loss

    contexts = [context(student, b, split=split) for b, split in zip(batches, splits)]
    indexes = [b.sequence_index() if split is None else split.local(b.sequence_index(), -1)
               for b, split in zip(batches, splits)]
    sequences = max(len(b.sequences()) for b in batches)
    for s in st.stages:
        s.contexts, s.indexes, s.sequences, s.calls, s.load = contexts, indexes, sequences, 0, None
        s.dropouts = dropouts or []
    device = micro_batches[0].batch.input_ids.device
    whole = None if splits[0] is None else splits[0].length  # (the first stage takes whole sequences)
    schedule = schedule_for(st, n_micro, length, width, device, pipeline_loss, plan, sequences, whole)
    ids = torch.cat([b.input_ids if whole is None else pad_to(b.input_ids, whole, 0) for b in batches])
    target = torch.arange(ids.shape[0], device=device)
    try:
        with packed_rows(student, batches):
            if st.first is not None:
                schedule.step(ids, target=target)
            else:
                schedule.step(target=target)
    finally:
        for s in st.stages:
            s.contexts, s.indexes, s.calls, s.dropouts = [], [], 0, []
    sum_tied_gradients(student)
    dist.all_reduce(stats, group=st.group)  # zeros except on the last stage
    if st.stages[0].routing:
        return torch.cat([stats, _expert_loads(st).flatten()])
    return stats


def _expert_loads(st: Staged) -> torch.Tensor:
    """The step's tokens per expert of every MoE layer of the model [layers, E], in layer order: each stage's
    own, gathered over the pipeline."""
    held = [None] * st.size
    dist.all_gather_object(held, [(i, s.load) for i, s in zip(st.indices, st.stages)], group=st.group)
    loads = [load for _, load in sorted((p for pairs in held for p in pairs), key=lambda p: p[0]) if load is not None]
    return torch.cat(loads)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, group, once=None) -> float:
    """The gradient norm over every stage (and shard), with the gradients scaled down to ``max_norm``;
    ``once``: a tied weight's last-stage copy, left out of the norm (the first stage counts it)."""
    from gkd.parallel.tensors import scale, squared_norm

    grads = [p.grad for p in params if p.grad is not None]
    norm = squared_norm([p.grad for p in params if p.grad is not None and p is not once])
    dist.all_reduce(norm, group=group)
    total = float(norm.sqrt())
    if max_norm and total > max_norm:
        scale(grads, max_norm / (total + 1e-6))
    return total
