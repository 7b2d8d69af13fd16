"""The rollouts of a run, from its rollout section and layout: the trainer never asks which one it got."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from gkd.errors import GKDError
from gkd.rollout.base import Rollout, SamplingConfig


def local_rollout(sampling: SamplingConfig, eos_ids: list[int], pad_id: int, par) -> Rollout:
    """Sampling from a model in this process: the decode loop / HF generate, or through the pipeline
    stages when the model is split into them (``par``: gkd.parallel.Parallel)."""
    if par.pp > 1:
        from gkd.rollout.pipelined import PipelineSampler

        return PipelineSampler(sampling, eos_ids, pad_id, par.device)
    from gkd.rollout.hf import HFSampler

    return HFSampler(sampling, eos_ids, pad_id, par.device, synced=par.world > 1)


def student_rollout(section, model_spec: str, sampling: SamplingConfig, local: Rollout, student, tokenizer,
                    has_images: bool, par, out: Path, log) -> Rollout:
    """The student's on-policy sampler: ``local`` unless the rollout section asks for vLLM (``--use_vllm``)."""
    if not section.use_vllm:
        return local
    from gkd.models import resolve
    from gkd.models.adapter import check_vllm
    from gkd.rollout.vllm_engine import VLLMColocateSampler, VLLMServerSampler, write_vllm_folder

    if has_images:
        raise GKDError("--use_vllm with image rows is not supported yet (vLLM expands image placeholders "
                       "itself); leave --use_vllm off: HF generate samples with the images")
    check_vllm(student)
    eos_ids = local.eos_ids
    if section.vllm_mode == "server":
        url = section.vllm_server_base_url or f"http://{section.vllm_server_host}:{section.vllm_server_port}"
        return VLLMServerSampler(url, sampling, eos_ids, timeout=section.vllm_server_timeout,
                                 sync_dir=Path(section.vllm_sync_dir or out / "vllm-sync"), log=log,
                                 weight_sync=section.vllm_weight_sync, group_port=section.vllm_group_port, par=par)
    folder, gguf = resolve(model_spec)  # a hub ID: its cached snapshot
    path = str(folder)
    if gguf:  # GGUF or an alias: vLLM reads a HF folder
        tmp = tempfile.mkdtemp(prefix="gkd-vllm-student-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        path = str(write_vllm_folder(student, tokenizer, Path(tmp)))
    return VLLMColocateSampler(
        path, sampling, eos_ids, dtype=section.torch_dtype,
        max_model_len=section.vllm_max_model_len or section.max_length + section.max_completion_length,
        gpu_memory_utilization=section.vllm_gpu_memory_utilization,
        tensor_parallel_size=section.vllm_tensor_parallel_size, kv_cache_memory_mb=section.vllm_kv_cache_memory_mb,
        sleep_level=section.sleep_level, seed=section.seed, torchrun=par.world > 1)
