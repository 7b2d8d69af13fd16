"""vLLM worker extension for a rollout server whose weights follow the student.

Start the server with it (the server's environment must be able to import gkd):

    VLLM_SERVER_DEV_MODE=1 vllm serve STUDENT --worker-extension-cls gkd.vllm_worker.WeightSync \
        --no-enable-chunked-prefill --max-num-batched-tokens 8192 ...

The trainer writes the student's weights to a shared path and calls the dev endpoint
``POST /collective_rpc {"method": "gkd_load_weights", "args": [path, version]}``; every worker loads
them in place and remembers the version, which ``gkd_weight_version`` reports, so a restarted server
(version "0") is noticed and re-synced instead of sampling from stale weights. This module imports
only torch and safetensors: it runs inside vLLM's workers.
"""

from __future__ import annotations


class WeightSync:
    def gkd_load_weights(self, path: str, version: str) -> str:
        from safetensors.torch import load_file

        weights = load_file(path, device="cpu")
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        self.gkd_version = str(version)
        return self.gkd_version

    def gkd_weight_version(self) -> str:
        return getattr(self, "gkd_version", "0")
