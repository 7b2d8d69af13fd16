"""Mesh sizes and tensor-parallel plans: what cannot be split is a one-line error before any work."""

import pytest
import torch

from gkd.config import TrainConfig
from gkd.errors import GKDError
from gkd.parallel.mesh import mesh_sizes, setup
from gkd.parallel.tensor_parallel import check_plan


def test_mesh_sizes():
    assert mesh_sizes(4, 2, 1) == (1, 2, 1, 2)
    assert mesh_sizes(8, 2, 2) == (2, 2, 1, 2)
    assert mesh_sizes(8, 2, 1, 2) == (1, 2, 2, 2)
    assert mesh_sizes(1, 1, 1) == (1, 1, 1, 1)
    with pytest.raises(GKDError, match="3 processes cannot be split into --tensor_model_parallel_size 2"):
        mesh_sizes(3, 2, 1)


def test_global_batch_must_split_over_data_parallel_ranks():
    cfg = TrainConfig(micro_batch_size=2, global_batch_size=8)
    assert cfg.grad_accumulation_steps(2) == 2
    with pytest.raises(GKDError, match="--global_batch_size 8 must be a multiple of --micro_batch_size 2 x "
                                       "data-parallel size 3 = 6"):
        cfg.grad_accumulation_steps(3)


def test_context_parallel_needs_several_processes():
    with pytest.raises(GKDError, match="cannot be split into --tensor_model_parallel_size 1 x --context_parallel_size 2"):
        setup(TrainConfig(context_parallel_size=2))


def test_expert_parallel_needs_several_processes():
    with pytest.raises(GKDError, match="--expert_model_parallel_size 2 needs 2 processes or more"):
        setup(TrainConfig(expert_model_parallel_size=2))


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2)
    return LlamaForCausalLM(LlamaConfig(**{**base, **kw}))


def test_tensor_parallel_plan_errors_name_the_model_and_the_size():
    check_plan(_llama(), 2)
    with pytest.raises(GKDError, match="LlamaForCausalLM has num_key_value_heads 2, which 4 does not divide"):
        check_plan(_llama(), 4)
    with pytest.raises(GKDError, match="LlamaForCausalLM has vocab_size 95, which 2 does not divide"):
        check_plan(_llama(vocab_size=95), 2)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(GKDError, match="no tensor-parallel plan for GPT2LMHeadModel \\(plans exist for the families "
                                       ".*llama-like text"):
        check_plan(gpt2, 2)
    from gkd.models import apply_lora

    torch.manual_seed(0)
    check_plan(apply_lora(_llama(), 4, 8, 0.0, "all-linear", 0), 2, lora=True)  # LoRA splits like its layers
