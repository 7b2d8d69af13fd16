"""Rollouts: the Rollout protocol (base); the decode loop and HF generate (hf, decode), generation through
pipeline stages (pipelined), vLLM in-process or on a server (vllm_engine, vllm_worker)."""
