"""Training configuration: the flag names users know from ms-swift and TRL, grouped into sections.

Flags, a YAML file (``--config``) and Python callers all end in :class:`TrainConfig` (flat: ``--beta``,
``beta: 0.5``, ``TrainConfig(beta=0.5)``); :meth:`TrainConfig.validate` turns out-of-range values into
one-line :class:`GKDError` messages. Each component takes its section, ``cfg.section("teacher")``: a
frozen view holding that section's options alone (SECTIONS lists which option is where).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gkd.errors import GKDError


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # models
    model: str = _f("", "student: a Hugging Face model folder, a hub ID (org/name[@revision]), a .gguf file or smollm2")
    teacher_model: str = _f("", "teacher: a Hugging Face model folder, a hub ID (org/name[@revision]), a .gguf file "
                                "or smollm2; several: comma-separated (or a YAML list), each optionally name=model "
                                "(docs/teachers.md)", listed=True)
    torch_dtype: str = _f("float32", "dtype of both models' weights", choices=("float32", "bfloat16"))
    train_type: str = _f("full", "train all student weights, or LoRA adapters", choices=("full", "lora"))
    lora_rank: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / rank)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    target_modules: str = _f("all-linear", "LoRA target modules: comma-separated names, or all-linear")
    lora_experts: bool = _f(True, "LoRA on a MoE student with all-linear: adapt the experts' and router's weights too "
                                  "(PEFT's target_parameters); false keeps them frozen")
    merge_lora: bool = _f(False, "merge the LoRA adapter into the exported student")
    freeze_vit: bool = _f(True, "vision-language students: keep the vision tower as loaded (no LoRA on it either)")
    freeze_aligner: bool = _f(True, "vision-language students: keep the projector from vision into text as loaded")
    freeze_parameters: list[str] = _f(None, "full training: keep the student's parameters under these names (whole "
                                             "name components) as loaded, e.g. model.embed_tokens (a tied lm_head is "
                                             "that same weight) or model.layers.0", nargs="+")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    offload_teacher_model: bool = _f(False, "keep the teacher's weights on CPU except while it scores")
    teacher_model_server: str = _f("", "URL of a teacher server (vllm serve or gkd serve) instead of --teacher_model; "
                                       "several: comma-separated (or a YAML list), each optionally name=URL", listed=True)
    teacher_route: str = _f("", "several teachers: dataset=teacher,... routes each dataset's rows (*: every other "
                                "dataset); a row's 'teacher' column wins")
    teacher_mixture: str = _f("", "several teachers: weights w1,w2,... (normalised): every position is scored against "
                                  "the mixture sum_i w_i softmax(z_i / T) instead of routing rows")
    teacher_api_key: str = _f("", "bearer token for --teacher_model_server (or set GKD_TEACHER_API_KEY)")
    teacher_timeout: float = _f(120.0, "seconds before a teacher-server request counts as failed")
    teacher_retries: int = _f(5, "retries of a failed teacher-server request (exponential backoff from 0.5 s)")
    teacher_max_in_flight: int = _f(4, "teacher-server requests in flight at once")
    teacher_seqs_per_request: int = _f(8, "sequences scored per teacher-server request")
    teacher_wait: float = _f(300.0, "seconds to wait for the teacher server's /health at start")
    teacher_wire: str = _f("topk", "what a teacher server sends: its top-K log-probs, or (gkd serve) its final hidden "
                                   "states, to which the teacher's logit head is applied here: the full vocabulary",
                           choices=("topk", "hidden"))
    teacher_wire_dtype: str = _f("float32", "dtype of gkd serve's compact answers (log-probs: float32 or float16; "
                                            "hidden states: bfloat16 too)", choices=("float32", "float16", "bfloat16"))
    teacher_tokenizer: str = _f("same", "same: the teacher shares the student's tokenizer; other: it has its own, "
                                        "aligned by text offsets (docs/cross_tokenizer.md)", choices=("same", "other"))
    cross_tokenizer_fallback: str = _f("none", "--teacher_tokenizer other, where no teacher token lines up with a "
                                               "student token: none (no signal) or span_logprob (1/2 the squared gap "
                                               "of the span's log-probability under each model)",
                                       choices=("none", "span_logprob"))
    teacher_cache: str = _f("", "folder of the teacher's scores of dataset completions (its top-K log-probs with "
                                "--gkd_logits_topk K, else its final hidden states: the exact full vocabulary): "
                                "scored once, reused across epochs and runs (gkd cache fills it ahead)")
    # data
    dataset: list[str] = _f(None, "training data: JSONL/JSON/Parquet files, saved datasets folders or hub dataset IDs "
                                  "(org/name[@revision][:split])", nargs="+")
    val_dataset: list[str] = _f(None, "held-out data for evaluation (same formats)", nargs="+")
    dataset_num_proc: int = _f(0, "processes that prepare a hub dataset (datasets' num_proc; 0 = one)")
    split_dataset_ratio: float = _f(0.0, "fraction of --dataset held out for evaluation when no --val_dataset")
    max_length: int = _f(1024, "maximum prompt length in tokens")
    truncation_strategy: str = _f("left", "prompts longer than --max_length: cut from the left, or drop the row",
                                  choices=("left", "delete"))
    packing: bool = _f(False, "pack each micro-batch's sequences into one row (attention kept inside each sequence) "
                              "instead of padding every sequence to the longest")
    packing_length: int = _f(0, "with --packing: at most this many tokens per packed row, more rows when they do not "
                                "fit (0 = no limit: one row per micro-batch)")
    # the method
    beta: float = _f(0.5, "generalized JSD interpolation: 0 = KL(teacher||student), 1 = KL(student||teacher)")
    divergence: str = _f("gjsd", "the loss's divergence: the generalized JSD (--beta), or DistiLLM's skew KL "
                                 "KL(teacher || a teacher + (1-a) student) / skew reverse KL KL(student || a student + "
                                 "(1-a) teacher) with a = --skew_alpha", choices=("gjsd", "skew_kl", "skew_reverse_kl"))
    skew_alpha: float = _f(0.1, "--divergence skew_kl / skew_reverse_kl: the weight a of the skewed side in the mixture")
    lmbda: float = _f(0.5, "probability that a generation cycle is on-policy (student samples the completions); "
                           "with --lmbda_schedule adaptive, the starting share of steps on student data")
    lmbda_schedule: str = _f("fixed", "fixed: every step samples with probability --lmbda (GKD); adaptive: DistiLLM's "
                                      "adaptive off-policy schedule -- the share rises when the held-out divergence "
                                      "(--eval_steps) grows, and student data steps replay earlier samples from a "
                                      "buffer more as training goes on (docs/training.md)", choices=("fixed", "adaptive"))
    adaptive_lmbda_step: float = _f(0.1, "--lmbda_schedule adaptive: how much the share rises at a time")
    adaptive_lmbda_eps: float = _f(0.1, "--lmbda_schedule adaptive: the rise in held-out divergence that raises it")
    replay_capacity: int = _f(1000, "--lmbda_schedule adaptive: student-sampled rows the replay buffer keeps")
    temperature: float = _f(0.9, "temperature of sampling and, unless --loss_temperature, of the divergence")
    loss_temperature: float = _f(None, "temperature of the divergence (default: --temperature; TRL's GKDTrainer "
                                       "computes it at 1 whatever its --temperature)")
    sft_alpha: float = _f(0.0, "weight of the cross-entropy on dataset (not student-sampled) completions")
    router_aux_loss_coef: float = _f(None, "MoE students: weight of the router load-balancing loss (default: the "
                                           "model config's router_aux_loss_coef; 0 turns it off)")
    seq_kd: bool = _f(False, "off-policy completions are sampled from the teacher instead of the dataset")
    gkd_logits_topk: int = _f(0, "score with the teacher's top-K log-probs only (0 = full vocabulary); several "
                                 "teachers: one K for all or K1,K2,... (a YAML list) in teacher order", listed=True)
    max_completion_length: int = _f(512, "maximum completion tokens: new tokens per sampled completion, and dataset "
                                         "completions are cut to it (with a warning counting the rows cut)")
    top_p: float = _f(1.0, "nucleus sampling for on-policy completions")
    top_k: int = _f(0, "top-k sampling for on-policy completions (0 = off)")
    speculative_kd_topk: int = _f(0, "teacher-corrected on-policy samples (speculative KD): a token the student draws "
                                     "outside the teacher's K likeliest is replaced by the teacher's draw (0 = off)")
    # on-policy generation with vLLM
    use_vllm: bool = _f(False, "sample on-policy completions with vLLM instead of HF generate")
    vllm_mode: str = _f("colocate", "vLLM engine in this process, or an external vLLM server",
                        choices=("colocate", "server"))
    vllm_gpu_memory_utilization: float = _f(0.3, "colocate on a GPU: fraction of GPU memory vLLM may take")
    vllm_max_model_len: int = _f(0, "colocate: vLLM's max sequence length (0 = --max_length + --max_completion_length)")
    vllm_tensor_parallel_size: int = _f(1, "colocate: vLLM tensor-parallel size")
    vllm_kv_cache_memory_mb: int = _f(0, "colocate: vLLM KV-cache size in MiB (0 = 512 on CPU, from utilization on GPU)")
    sleep_level: int = _f(0, "colocate on a GPU: 1 = vLLM sleeps while training (weights to CPU, KV cache freed); 0 = never")
    vllm_server_base_url: str = _f("", "server mode: the vLLM server's URL (default http://HOST:PORT)")
    vllm_server_host: str = _f("127.0.0.1", "server mode: host of the vLLM server")
    vllm_server_port: int = _f(8000, "server mode: port of the vLLM server")
    vllm_server_timeout: float = _f(240.0, "server mode: seconds to wait for the server and for each request")
    vllm_weight_sync: str = _f("path", "server mode: weights go through a shared folder, or a process group with the "
                               "server's workers (gloo on CPU, NCCL on GPUs)", choices=("path", "group"))
    vllm_sync_dir: str = _f("", "server mode, path sync: folder the server can read (default OUTPUT_DIR/vllm-sync)")
    vllm_group_port: int = _f(51216, "server mode, group sync: port the server listens on for the weight-sync group")
    async_generation: int = _f(0, "server mode: the next on-policy step's completions are sampled while this step "
                                  "trains, from weights at most N optimizer steps old (0 = exact on-policy)")
    # parallelism (launch with torchrun, or --nproc_per_node here); data-parallel shard size = the rest
    nproc_per_node: int = _f(1, "processes on this machine: gkd train runs itself under torchrun with N processes")
    nnodes: int = _f(1, "machines in the job (each runs the same gkd train command; needs --rdzv_endpoint)")
    node_rank: int = _f(-1, "this machine's rank in [0, --nnodes) (-1: assigned by the rendezvous)")
    rdzv_endpoint: str = _f("", "HOST:PORT every machine reaches for the rendezvous (a node of the job)")
    rdzv_id: str = _f("gkd", "the job's name at the rendezvous: the same on every machine of one job")
    tensor_model_parallel_size: int = _f(1, "tensor parallel: attention heads, MLP and vocabulary split over N processes")
    data_parallel_replicate_size: int = _f(1, "data-parallel groups holding whole copies (the other data-parallel "
                                              "processes shard the weights, FSDP)")
    pipeline_model_parallel_size: int = _f(1, "pipeline parallel: the decoder layers split into N stages (embedding "
                                              "on the first, final norm + lm_head + loss on the last)")
    virtual_pipeline_model_parallel_size: int = _f(1, "pipeline stages per process (> 1: interleaved 1F1B)")
    pipeline_layers: str = _f("", "a hand split of the student's decoder layers: comma-separated counts per stage "
                                  "(default: balanced)")
    pipeline_schedule: str = _f("1f1b", "the pipeline schedule", choices=("1f1b", "gpipe"))
    context_parallel_size: int = _f(1, "context parallel: every sequence's tokens split over N processes (exact "
                                       "attention; load-balanced head and tail chunks)")
    expert_model_parallel_size: int = _f(1, "expert parallel (MoE models): each layer's experts split over N of the "
                                            "data-parallel processes, tokens sent to them with all-to-all")
    reduce_scatter_every_micro_batch: bool = _f(True, "FSDP: reduce-scatter the gradients after every micro-batch "
                                                 "(false: keep them whole until the step's last one: fewer "
                                                 "collectives, a whole gradient's memory on every rank)")
    gather_for_generation: bool = _f(True, "FSDP: gather the student once for a whole HF generation instead of "
                                           "each layer for every decoded token (false: less memory)")
    distributed_timeout: float = _f(600.0, "seconds a collective may wait for the other processes before failing")
    # optimisation
    micro_batch_size: int = _f(1, "sequences per forward/backward")
    global_batch_size: int = _f(8, "sequences per optimizer step (= micro x data-parallel x accumulation)")
    learning_rate: float = _f(1e-5, "AdamW peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_scheduler_type: str = _f("cosine", "learning-rate schedule after warm-up", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = _f(0.0, "fraction of the steps (or of --max_train_seconds) spent warming up linearly")
    max_grad_norm: float = _f(1.0, "clip the gradient norm (0 = no clipping)")
    num_train_epochs: float = _f(1.0, "passes over the training data (ignored when --max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps (0 = from --num_train_epochs)")
    max_train_seconds: float = _f(0.0, "seconds of training (after the models load; 0 = no limit): the run ends at "
                                        "the first step past them or at --max_steps, whichever comes first, and the "
                                        "LR schedule runs over the budget's time (without --max_steps the epochs "
                                        "do not bound it)")
    max_bad_steps: int = _f(3, "stop after this many consecutive steps with a NaN/inf loss (each is skipped)")
    seed: int = _f(42, "seed of data order, lmbda draws, sampling and LoRA init")
    loss_chunk_size: int = _f(0, "positions per lm_head chunk in the fused loss (0 = automatic; a last chunk of "
                                 "under a quarter of it joins the one before)")
    # output
    output_dir: str = _f("output", "where checkpoints, metrics and the final student go")
    overwrite_output_dir: bool = _f(False, "start afresh in an --output_dir that holds another run (its checkpoints, "
                                           "metrics and final model are deleted first)")
    save_steps: int = _f(0, "checkpoint every N optimizer steps (0 = only at the end)")
    save_total_limit: int = _f(2, "keep this many newest checkpoints")
    resume_from_checkpoint: str = _f("", "a checkpoint folder, or 'latest' in --output_dir")
    logging_steps: int = _f(1, "log metrics every N optimizer steps")
    eval_steps: int = _f(0, "evaluate on the held-out set every N steps (0 = never during training)")
    report_to: list[str] = _f(None, "metric sinks besides JSONL: tensorboard, wandb (WANDB_MODE=offline works "
                                    "without an account)", nargs="*")
    progress_bar: bool = _f(True, "show a progress bar on the terminal")

    def validate(self) -> "TrainConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise GKDError(msg)

        check_types(self)

        need(bool(self.model), "--model is required (a Hugging Face folder or a .gguf file)")
        specs = teacher_specs(self)
        need(len(specs) > 1 or bool(self.teacher_model) != bool(self.teacher_model_server),
             "give exactly one of --teacher_model (a Hugging Face folder or a .gguf file) and --teacher_model_server (a URL)")
        several = len(specs) > 1
        need(not self.teacher_mixture or several, "--teacher_mixture needs several teachers (--teacher_model / "
                                                   "--teacher_model_server, comma-separated)")
        if several:
            need(not self.seq_kd, "--seq_kd with several teachers: no one teacher writes the completions")
        if self.teacher_mixture:
            mixture_weights(self.teacher_mixture, len(specs))
        route_map(self.teacher_route)
        for spec in specs:
            if spec.remote:
                need(spec.source.startswith(("http://", "https://")),
                     f"--teacher_model_server must be an http(s):// URL, got {spec.source!r}")
                need(spec.topk >= 1 or self.teacher_wire == "hidden",
                     "--teacher_model_server needs --gkd_logits_topk K >= 1 (a server sends its top-K log-probs; "
                     "--teacher_wire hidden takes gkd serve's hidden states for the full vocabulary)")
        if self.teacher_model_server:
            need(not self.seq_kd, "--seq_kd needs a local --teacher_model (a teacher server only scores)")
            need(not self.eval_steps, "--eval_steps needs a local --teacher_model (gkd eval can run afterwards)")
            need(self.teacher_timeout > 0 and self.teacher_wait >= 0 and self.teacher_retries >= 0,
                 "--teacher_timeout must be > 0, --teacher_wait and --teacher_retries >= 0")
            need(self.teacher_max_in_flight >= 1 and self.teacher_seqs_per_request >= 1,
                 "--teacher_max_in_flight and --teacher_seqs_per_request must be >= 1")
        if self.teacher_cache:
            need(not self.seq_kd, "--teacher_cache with --seq_kd: its completions are sampled anew each step, "
                                  "there is nothing to reuse")
        need(self.cross_tokenizer_fallback == "none" or self.teacher_tokenizer == "other",
             f"--cross_tokenizer_fallback {self.cross_tokenizer_fallback} is for --teacher_tokenizer other")
        need(self.cross_tokenizer_fallback == "none" or len(specs) == 1,
             "--cross_tokenizer_fallback with several teachers is not supported yet")
        if self.teacher_tokenizer == "other":
            need(not self.teacher_model_server or self.teacher_wire == "hidden",
                 "--teacher_tokenizer other with --teacher_model_server needs --teacher_wire hidden (the teacher's "
                 "hidden states and head: its distribution over the paired vocabulary, not a top-K of its own)")
            need(not (self.teacher_cache or self.seq_kd or self.eval_steps),
                 "--teacher_tokenizer other is not supported yet with --teacher_cache, --seq_kd or --eval_steps")
            need(self.cross_tokenizer_fallback == "none" or self.context_parallel_size == 1,
                 "--cross_tokenizer_fallback with --context_parallel_size > 1 is not supported yet (a span's "
                 "log-probability would sum over the ranks' tokens)")
            need(self.cross_tokenizer_fallback == "none" or self.tensor_model_parallel_size == 1,
                 "--cross_tokenizer_fallback with --tensor_model_parallel_size > 1 is not supported yet (the student's "
                 "span log-probabilities would need the vocabulary shards' gradient)")
        need(bool(self.dataset), "--dataset is required (JSONL/JSON/Parquet files or a saved datasets folder)")
        need(0.0 <= self.beta <= 1.0, f"--beta must be in [0, 1], got {self.beta}")
        need(0.0 < self.skew_alpha < 1.0, f"--skew_alpha must be in (0, 1), got {self.skew_alpha}")
        need(self.divergence == "gjsd" or self.beta == 0.5, f"--beta {self.beta} is the generalized JSD's; "
             f"--divergence {self.divergence} takes --skew_alpha (leave --beta unset)")
        need(self.divergence != "gjsd" or self.skew_alpha == 0.1, f"--skew_alpha {self.skew_alpha} is for "
             "--divergence skew_kl / skew_reverse_kl; the generalized JSD takes --beta")
        need(0.0 <= self.lmbda <= 1.0, f"--lmbda must be in [0, 1], got {self.lmbda}")
        need(self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        need(self.loss_temperature is None or self.loss_temperature > 0,
             f"--loss_temperature must be > 0, got {self.loss_temperature}")
        need(self.sft_alpha >= 0, f"--sft_alpha must be >= 0, got {self.sft_alpha}")
        need(self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
             f"--router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        need(0.0 < self.top_p <= 1.0, f"--top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k >= 0, f"--top_k must be >= 0, got {self.top_k}")
        need(self.max_completion_length >= 1, f"--max_completion_length must be >= 1, got {self.max_completion_length}")
        need(self.max_length >= 1, f"--max_length must be >= 1, got {self.max_length}")
        need(self.teacher_wire == "topk" or bool(self.teacher_model_server),
             f"--teacher_wire {self.teacher_wire} needs --teacher_model_server (a local teacher is not on a wire)")
        need(self.teacher_wire_dtype != "bfloat16" or self.teacher_wire == "hidden",
             "--teacher_wire_dtype bfloat16 is for --teacher_wire hidden (top-K log-probs travel as float32 or float16)")
        need(self.packing_length >= 0, f"--packing_length must be >= 0, got {self.packing_length}")
        need(self.packing or not self.packing_length, f"--packing_length {self.packing_length} needs --packing true "
                                                      "(without it rows are padded, not packed)")
        need(self.micro_batch_size >= 1, f"--micro_batch_size must be >= 1, got {self.micro_batch_size}")
        need(self.global_batch_size >= 1, f"--global_batch_size must be >= 1, got {self.global_batch_size}")
        need(self.learning_rate >= 0, f"--learning_rate must be >= 0, got {self.learning_rate}")
        need(self.weight_decay >= 0, f"--weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.seed < 2**32, f"--seed must be in [0, 2^32), got {self.seed}")
        need(0.0 <= self.warmup_ratio < 1.0, f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.max_grad_norm >= 0, f"--max_grad_norm must be >= 0, got {self.max_grad_norm}")
        need(self.max_steps >= 0, f"--max_steps must be >= 0, got {self.max_steps}")
        need(self.max_steps > 0 or self.num_train_epochs > 0, "--num_train_epochs must be > 0 when --max_steps is 0")
        need(self.max_train_seconds >= 0, f"--max_train_seconds must be >= 0, got {self.max_train_seconds}")
        need(not (self.max_train_seconds and not self.max_steps and self.num_train_epochs != 1.0),
             f"--num_train_epochs {self.num_train_epochs} does not bound a run with --max_train_seconds: the time "
             "does (bound the steps with --max_steps)")
        need(self.dataset_num_proc >= 0, f"--dataset_num_proc must be >= 0, got {self.dataset_num_proc}")
        need(0.0 <= self.split_dataset_ratio < 1.0, f"--split_dataset_ratio must be in [0, 1), got {self.split_dataset_ratio}")
        need(self.lora_rank >= 1, f"--lora_rank must be >= 1, got {self.lora_rank}")
        need(not (self.freeze_parameters and self.train_type == "lora"),
             "--freeze_parameters is for --train_type full (LoRA trains its adapters alone)")
        need(all(p.strip() for p in self.freeze_parameters or ()), "--freeze_parameters: an empty prefix would freeze "
             "every parameter")
        need(0.0 <= self.lora_dropout < 1.0, f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.logging_steps >= 1, f"--logging_steps must be >= 1, got {self.logging_steps}")
        need(self.eval_steps >= 0, f"--eval_steps must be >= 0, got {self.eval_steps}")
        need(not self.eval_steps or bool(self.val_dataset) or self.split_dataset_ratio > 0,
             f"--eval_steps {self.eval_steps} needs held-out data: --val_dataset, or --split_dataset_ratio > 0 "
             "(without either there is nothing to evaluate)")
        need(self.save_steps >= 0 and self.save_total_limit >= 1, "--save_steps must be >= 0 and --save_total_limit >= 1")
        need(self.max_bad_steps >= 1, f"--max_bad_steps must be >= 1, got {self.max_bad_steps}")
        need(self.speculative_kd_topk >= 0, f"--speculative_kd_topk must be >= 0, got {self.speculative_kd_topk}")
        if self.speculative_kd_topk:
            need(self.samples_student, f"--speculative_kd_topk {self.speculative_kd_topk} corrects on-policy samples, and "
                                 "--lmbda 0 draws none: raise --lmbda or leave it at 0")
            need(not self.teacher_model_server, "--speculative_kd_topk needs a local --teacher_model: the teacher "
                                                "reads each sampled token, a teacher server scores whole sequences")
            need(not self.use_vllm, "--speculative_kd_topk samples with the decode loop beside the teacher, not with "
                                    "vLLM: leave --use_vllm off")
        need(self.loss_chunk_size >= 0, f"--loss_chunk_size must be >= 0, got {self.loss_chunk_size}")
        need(self.sleep_level in (0, 1), f"--sleep_level must be 0 or 1, got {self.sleep_level} (level 2 drops the "
                                         "weights, which every step would then have to resend)")
        need(0 < self.vllm_gpu_memory_utilization <= 1,
             f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        need(self.vllm_tensor_parallel_size >= 1 and self.vllm_max_model_len >= 0 and self.vllm_kv_cache_memory_mb >= 0,
             "--vllm_tensor_parallel_size must be >= 1, --vllm_max_model_len and --vllm_kv_cache_memory_mb >= 0")
        need(self.vllm_server_timeout > 0, f"--vllm_server_timeout must be > 0, got {self.vllm_server_timeout}")
        need(self.async_generation >= 0, f"--async_generation must be >= 0, got {self.async_generation}")
        if self.lmbda_schedule == "adaptive":
            need(self.eval_steps > 0, "--lmbda_schedule adaptive follows the held-out divergence: it needs --eval_steps "
                 "(and --val_dataset or --split_dataset_ratio)")
            need(self.replay_capacity >= self.global_batch_size, f"--replay_capacity {self.replay_capacity} must hold "
                 f"at least one batch (--global_batch_size {self.global_batch_size})")
            need(0 < self.adaptive_lmbda_step <= 1 and self.adaptive_lmbda_eps >= 0, "--adaptive_lmbda_step must be in "
                 f"(0, 1] and --adaptive_lmbda_eps >= 0, got {self.adaptive_lmbda_step} and {self.adaptive_lmbda_eps}")
            need(not self.async_generation, "--async_generation requests the next fixed-lmbda step ahead; with "
                 "--lmbda_schedule adaptive the next sampled step is not known in advance")
        else:
            defaults = {"adaptive_lmbda_step": 0.1, "adaptive_lmbda_eps": 0.1, "replay_capacity": 1000}
            changed = [k for k, v in defaults.items() if getattr(self, k) != v]
            need(not changed, f"--{changed[0] if changed else ''} is for --lmbda_schedule adaptive (this run's is fixed)")
        need(not self.async_generation or (self.use_vllm and self.vllm_mode == "server"),
             f"--async_generation {self.async_generation} needs --use_vllm true --vllm_mode server: only a separate "
             "vLLM server generates while this process trains (HF generate and vLLM colocate run in it)")
        need(self.nproc_per_node >= 1, f"--nproc_per_node must be >= 1, got {self.nproc_per_node}")
        need(self.nnodes >= 1, f"--nnodes must be >= 1, got {self.nnodes}")
        need(self.nnodes == 1 or ":" in self.rdzv_endpoint,
             f"--nnodes {self.nnodes} needs --rdzv_endpoint HOST:PORT (a machine of the job every other one reaches)")
        need(-1 <= self.node_rank < self.nnodes, f"--node_rank must be in [0, --nnodes {self.nnodes}) or -1, "
                                                 f"got {self.node_rank}")
        need(self.distributed_timeout > 0, f"--distributed_timeout must be > 0, got {self.distributed_timeout}")
        for sink in self.report_to or []:
            need(sink in ("tensorboard", "wandb"), f"--report_to: unknown sink {sink!r} (known: tensorboard, wandb)")
        return self

    @property
    def divergence_temperature(self) -> float:
        return self.temperature if self.loss_temperature is None else self.loss_temperature

    @property
    def samples_student(self) -> bool:
        """Whether any step may train on the student's samples."""
        return self.lmbda > 0 or self.lmbda_schedule == "adaptive"

    @property
    def objective(self):
        """What the loss takes as its ``beta``: the float, or a gkd.losses.Skew."""
        from gkd.losses import Skew

        return self.beta if self.divergence == "gjsd" else Skew(self.divergence.removeprefix("skew_"), self.skew_alpha)

    def grad_accumulation_steps(self, data_parallel: int = 1) -> int:
        per_step = self.micro_batch_size * data_parallel
        if self.global_batch_size % per_step:
            raise GKDError(
                f"--global_batch_size {self.global_batch_size} must be a multiple of --micro_batch_size "
                f"{self.micro_batch_size} x data-parallel size {data_parallel} = {per_step}"
            )
        return self.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str):
        """The options of one section (model, teacher, data, method, rollout, parallel, optim, checkpoint,
        logging, eval) as a frozen dataclass."""
        cls = _SECTION_TYPES[name]
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})


SECTIONS = {
    "model": ("model", "torch_dtype", "train_type", "lora_rank", "lora_alpha", "lora_dropout", "target_modules",
              "lora_experts", "merge_lora", "freeze_vit", "freeze_aligner", "freeze_parameters",
              "gradient_checkpointing"),
    "teacher": ("teacher_model", "teacher_model_server", "teacher_route", "teacher_mixture", "gkd_logits_topk", "offload_teacher_model", "teacher_api_key",
                "teacher_timeout", "teacher_retries", "teacher_max_in_flight", "teacher_seqs_per_request",
                "teacher_wait", "teacher_wire", "teacher_wire_dtype", "torch_dtype", "teacher_cache",
                "teacher_tokenizer", "cross_tokenizer_fallback"),
    "data": ("dataset", "val_dataset", "dataset_num_proc", "split_dataset_ratio", "max_length", "truncation_strategy",
             "max_completion_length", "packing", "packing_length"),
    "method": ("beta", "divergence", "skew_alpha", "lmbda", "lmbda_schedule", "adaptive_lmbda_step",
               "adaptive_lmbda_eps", "replay_capacity", "temperature", "loss_temperature", "sft_alpha", "router_aux_loss_coef", "seq_kd",
               "max_completion_length", "top_p", "top_k", "speculative_kd_topk", "loss_chunk_size", "seed"),
    "rollout": ("use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "vllm_max_model_len", "vllm_tensor_parallel_size",
                "vllm_kv_cache_memory_mb", "sleep_level", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
                "vllm_server_timeout", "vllm_weight_sync", "vllm_sync_dir", "vllm_group_port", "async_generation",
                "max_length", "max_completion_length", "torch_dtype", "seed"),
    "parallel": ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "tensor_model_parallel_size",
                 "data_parallel_replicate_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                 "pipeline_layers", "pipeline_schedule", "context_parallel_size", "expert_model_parallel_size",
                 "reduce_scatter_every_micro_batch", "gather_for_generation", "distributed_timeout"),
    "optim": ("micro_batch_size", "global_batch_size", "learning_rate", "weight_decay", "lr_scheduler_type",
              "warmup_ratio", "max_grad_norm", "num_train_epochs", "max_steps", "max_train_seconds", "max_bad_steps",
              "seed"),
    "checkpoint": ("output_dir", "overwrite_output_dir", "save_steps", "save_total_limit", "resume_from_checkpoint"),
    "logging": ("logging_steps", "report_to", "progress_bar"),
    "eval": ("eval_steps", "val_dataset", "max_completion_length", "global_batch_size"),
}


def _method_divergence_temperature(self) -> float:
    return self.temperature if self.loss_temperature is None else self.loss_temperature


def _section_types() -> dict[str, type]:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    placed = {n for names in SECTIONS.values() for n in names}
    missing = sorted(set(fields) - placed)
    assert not missing, f"options in no config section: {missing}"  # a new flag must say where it belongs
    extra = {"method": {"divergence_temperature": property(_method_divergence_temperature)}}
    return {name: dataclasses.make_dataclass(f"{name.capitalize()}Section", [(n, fields[n].type) for n in names],
                                             frozen=True, namespace=extra.get(name, {}))
            for name, names in SECTIONS.items()}


_SECTION_TYPES = _section_types()


# --- the other commands' options -----------------------------------------------------------------


@dataclass
class EvalConfig:
    model: str = _f("", "student: a Hugging Face model folder, a hub ID (org/name[@revision]), a .gguf file or smollm2")
    teacher_model: str = _f("", "teacher: a Hugging Face model folder, a hub ID, a .gguf file or smollm2")
    dataset: list[str] = _f(None, "prompts (rows as for training, files or hub IDs org/name[@revision][:split]; "
                                  "completions are ignored)", nargs="+")
    beta: float = _f(0.5, "generalized JSD interpolation for the reported divergence")
    temperature: float = _f(0.9, "temperature of the reported divergence")
    max_completion_length: int = _f(128, "new tokens of the greedy completions")
    max_length: int = _f(1024, "maximum prompt length (longer prompts are cut from the left)")
    batch_size: int = _f(16, "prompts per forward")
    torch_dtype: str = _f("float32", "dtype of both models", choices=("float32", "bfloat16"))
    num_samples: int = _f(0, "also sample this many completions per prompt from the student (seeds 0..N-1, at "
                             "--temperature) and report the teacher's mean log-prob of them")
    output: str = _f("", "write the metrics as JSON here, with one row per prompt (its text, the teacher's and "
                         "student's greedy completions, the student's samples and the prompt's own metrics)")


@dataclass
class ServeConfig:
    model: str = _f("", "teacher: a Hugging Face model folder, a hub ID (org/name[@revision]), a .gguf file or smollm2")
    host: str = _f("127.0.0.1", "address to bind (loopback unless you say otherwise)")
    port: int = _f(8000, "port to listen on")
    api_key: str = _f("", "require 'Authorization: Bearer KEY' on every request (or set GKD_API_KEY)")
    served_model_name: str = _f("", "model id reported by /v1/models (default: the --model path)")
    torch_dtype: str = _f("float32", "dtype of the weights", choices=("float32", "bfloat16"))
    max_model_len: int = _f(0, "longest accepted sequence in tokens (0 = the model's max_position_embeddings)")
    max_logprobs: int = _f(0, "largest accepted prompt_logprobs K (0 = the vocabulary size)")
    max_prompts: int = _f(64, "most prompts in one request")
    max_request_bytes: int = _f(32 * 2**20, "largest accepted request body")
    max_batch_tokens: int = _f(8192, "padded tokens (rows x longest row) per batched forward")
    max_logprob_entries: int = _f(2**23, "most log-probs (K x tokens) one compact answer may hold")
    max_json_logprob_entries: int = _f(2**17, "most log-probs (K x tokens) one vLLM-style JSON answer may hold "
                                              "(~80 bytes each, and slow to build: 2^17 is ~10 MB, a few seconds)")
    batch_wait_ms: float = _f(5.0, "how long the first request of a batch waits for others to join")
    request_timeout: float = _f(60.0, "seconds a client has to send one whole request (headers and body)")
    drain_timeout: float = _f(30.0, "on SIGTERM: seconds in-flight requests may take to finish (idle "
                                    "connections are closed at once)")

    def validate(self) -> "ServeConfig":
        check_types(self)
        if not self.model:
            raise GKDError("--model is required (a Hugging Face folder, a hub ID or a .gguf file)")
        for name in ("max_prompts", "max_request_bytes", "max_batch_tokens", "max_logprob_entries",
                     "max_json_logprob_entries"):
            if getattr(self, name) < 1:
                raise GKDError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "max_logprobs"):  # 0: the model's own
            if getattr(self, name) < 0:
                raise GKDError(f"--{name} must be >= 1 (or 0: the model's own), got {getattr(self, name)}")
        for name in ("request_timeout", "drain_timeout"):
            if getattr(self, name) <= 0:
                raise GKDError(f"--{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise GKDError(f"--port must be in [0, 65535], got {self.port}")
        return self


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_or_list(text: str):
    """An integer flag that also takes one value per teacher (``8,16``, kept as text)."""
    return text if "," in text else int(text)


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits 2; we want our one-line error
        raise GKDError(f"{self.prog}: {message} (see --help)")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field; ``--a_b`` and ``--a-b`` both work; booleans take ``true``/``false``."""
    for f in dataclasses.fields(cls):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if "nargs" in f.metadata:
            kw["nargs"] = f.metadata["nargs"]
        typ = f.type if not isinstance(f.type, str) else f.type
        if typ in ("bool", bool):
            kw.update(type=_parse_bool, nargs="?", const=True, metavar="true|false")
        elif typ in ("int", int):
            kw["type"] = _int_or_list if f.metadata.get("listed") else int
        elif typ in ("float", float):
            kw["type"] = float
        parser.add_argument(*names, dest=f.name, **kw)


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise GKDError(f"--config {path}: no such file")
    loader, duplicate = _unique_key_loader()
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GKDError(f"--config {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        data = yaml.load(text, Loader=loader) or {}  # (a SafeLoader)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise GKDError(f"--config {path}: {first}" if isinstance(e, duplicate)
                       else f"--config {path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise GKDError(f"--config {path}: expected a mapping of flag names to values")
    out: dict[str, Any] = {}
    for k, v in data.items():
        name = str(k).replace("-", "_")
        if name in out:  # max-steps and max_steps: one option given twice
            raise GKDError(f"--config {path}: option {name!r} given twice (each option once)")
        out[name] = v
    return out


def _unique_key_loader():
    import yaml

    class DuplicateKey(yaml.YAMLError):
        pass

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a mapping holding one key twice (PyYAML keeps the last silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise DuplicateKey(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (each option once)")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader, DuplicateKey


def _typed(f: dataclasses.Field, value: Any, where: str, one: bool = False) -> Any:
    """A YAML value as its flag would give it: text is parsed by the flag's own converter, a YAML number
    or boolean must already be of the field's type, and choices are checked. ``null`` is refused."""
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if not one and f.metadata.get("listed") and (isinstance(value, list) or (isinstance(value, str) and "," in value)):
        # one value per teacher: a YAML list or comma-separated text, kept as that text
        items = value if isinstance(value, list) else value.split(",")
        return ",".join(str(_typed(f, v.strip() if isinstance(v, str) else v, where, one=True)) for v in items)
    if f.metadata.get("nargs"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise GKDError(f"{where}: {f.name} must be text or a list of text, got {value!r}")
        return items
    want = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text"}.get(typ, typ)
    if isinstance(value, str) and typ in ("bool", "int", "float"):
        try:
            value = {"bool": _parse_bool, "int": int, "float": float}[typ](value)
        except (ValueError, argparse.ArgumentTypeError):
            raise GKDError(f"{where}: {f.name} must be {want}, got {value!r}") from None
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}.get(typ, lambda v: True)
    if not ok(value):
        raise GKDError(f"{where}: {f.name} must be {want}, got {value!r}")
    if typ == "float":
        value = float(value)
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise GKDError(f"{where}: {f.name} must be one of {', '.join(map(str, f.metadata['choices']))}, got {value!r}")
    return value


def check_types(cfg) -> None:
    """Python callers skip the flag parser: hold their values to the same types and choices. Floats must
    also be finite (inf in a rate, temperature or epoch count only fails deep inside training)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and (f.metadata.get("nargs") or f.default is None):  # unset: the default stands
            continue
        value = _typed(f, value, f"--{f.name}")
        if isinstance(value, float) and not math.isfinite(value):
            raise GKDError(f"--{f.name} must be a finite number, got {value}")
        setattr(cfg, f.name, value)


def build_config(cls, values: dict[str, Any], yaml_path: str | None = None):
    """The dataclass from YAML values overridden by flag values, with unknown keys rejected and YAML
    values converted and checked exactly as the flags are."""
    from_yaml = _load_yaml(yaml_path) if yaml_path else {}
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(from_yaml) - set(known)) or sorted(set(values) - set(known))
    if unknown:
        where = f"in {yaml_path}" if unknown[0] in from_yaml else "among the flags"
        raise GKDError(f"unknown option {unknown[0]!r} {where}; see --help for the list")
    merged = {k: _typed(known[k], v, f"--config {yaml_path}") for k, v in from_yaml.items()}
    for name, value in values.items():
        merged[name] = [value] if known[name].metadata.get("nargs") and isinstance(value, str) else value
    return cls(**merged)


def parser_for(cls, prog: str, description: str) -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog=prog, description=description)
    parser.add_argument("--config", help="a YAML file with any of these options (flags override it)")
    add_dataclass_flags(parser, cls)
    return parser


# --- several teachers (gkd.teacher.multi, docs/teachers.md) -------------------------------------------

_NAMED = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")  # name=source (a URL's scheme has no '=' before it)


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of the run: what users route to (``name``), where it is, its top-K (0: full vocabulary)."""

    name: str
    source: str  # a model (path, hub ID, .gguf) or a server URL
    remote: bool
    topk: int

    @property
    def flag(self) -> str:
        return f"--teacher_model{'_server' if self.remote else ''} {self.source}"


def _entries(text: str) -> list[tuple[str, str]]:
    out = []
    for entry in (e.strip() for e in (text or "").split(",")):
        if not entry:
            continue
        named = _NAMED.match(entry)
        out.append((named[1], named[2].strip()) if named else (entry, entry))
    return out


def topk_values(value, n: int) -> list[int]:
    """--gkd_logits_topk as one K per teacher: one value for all, or ``K1,K2,...`` in teacher order."""
    items = [v.strip() for v in str(value).split(",")]
    try:
        ks = [int(v) for v in items]
    except ValueError:
        raise GKDError(f"--gkd_logits_topk must be an integer or one per teacher (K1,K2,...), got {value!r}") from None
    if any(k < 0 for k in ks):
        raise GKDError(f"--gkd_logits_topk must be >= 0, got {value}")
    if len(ks) == 1:
        return ks * n
    if len(ks) != n:
        raise GKDError(f"--gkd_logits_topk gives {len(ks)} values for {n} teacher(s): give one, or one per teacher")
    return ks


def teacher_specs(t) -> list[TeacherSpec]:
    """The run's teachers from the teacher section (a single teacher is one entry, named by its source)."""
    found = [(n, s, False) for n, s in _entries(t.teacher_model)] + [(n, s, True) for n, s in _entries(t.teacher_model_server)]
    ks = topk_values(t.gkd_logits_topk, max(len(found), 1))
    specs = [TeacherSpec(n, s, remote, k) for (n, s, remote), k in zip(found, ks)]
    names = [s.name for s in specs]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise GKDError(f"two teachers are named {dup!r}: name them apart (name=path or name=URL)")
    return specs


def mixture_weights(text: str, n: int) -> list[float]:
    """--teacher_mixture ``w1,w2,...``: one weight >= 0 per teacher, not all 0; normalised to sum 1."""
    try:
        ws = [float(w) for w in text.split(",")]
    except ValueError:
        raise GKDError(f"--teacher_mixture must be numbers w1,w2,... (one per teacher), got {text!r}") from None
    if len(ws) != n:
        raise GKDError(f"--teacher_mixture gives {len(ws)} weight(s) for {n} teacher(s): give one per teacher")
    if any(not (w >= 0 and w < float("inf")) for w in ws) or not sum(ws) > 0:
        raise GKDError(f"--teacher_mixture weights must be finite, >= 0 and not all 0, got {text!r}")
    return [w / sum(ws) for w in ws]


def route_map(text: str) -> dict[str, str]:
    """--teacher_route ``dataset=name,...`` (``*=name``: every other dataset)."""
    out = {}
    for entry in (e.strip() for e in (text or "").split(",")):
        if not entry:
            continue
        if "=" not in entry:
            raise GKDError(f"--teacher_route: {entry!r} is not dataset=teacher")
        path, name = (x.strip() for x in entry.rsplit("=", 1))
        out[path] = name
    return out
