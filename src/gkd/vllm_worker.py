"""vLLM worker extension for a rollout server whose weights follow the student.

Start the server with it (the server's environment must be able to import gkd):

    VLLM_SERVER_DEV_MODE=1 vllm serve STUDENT --worker-extension-cls gkd.vllm_worker.WeightSync \
        --no-enable-chunked-prefill --max-num-batched-tokens 8192 ...

The trainer calls vLLM's dev endpoint ``POST /collective_rpc`` with one of these methods:

- ``gkd_load_weights(path, version)``: read the student's weights from a shared path.
- ``gkd_join_group(port, world_size)`` once, then ``gkd_receive_weights(specs, version)`` per sync: the
  workers and the trainer form a process group (gloo on CPU, NCCL on GPUs; the store listens on the
  server at ``port``, the trainer is the last rank) and the trainer broadcasts each tensor.

Every worker remembers the version, which ``gkd_weight_version`` reports, so a restarted server
(version "0") is noticed and re-synced instead of sampling from stale weights. This module imports
only torch and safetensors: it runs inside vLLM's workers.
"""

from __future__ import annotations

from datetime import timedelta

import torch


def weight_group(host: str, port: int, rank: int, world_size: int, timeout: float, cuda: bool):
    """A process group of its own (not torch.distributed's default one) over a TCP store that rank 0 hosts;
    the constructor returns once every rank has joined."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout))
    if cuda:
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout))


class WeightSync:
    def gkd_load_weights(self, path: str, version: str) -> str:
        from safetensors.torch import load_file

        weights = load_file(path, device="cpu")
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        self.gkd_version = str(version)
        return self.gkd_version

    def gkd_join_group(self, port: int, world_size: int, timeout: float = 300.0) -> str:
        self.gkd_cuda = torch.cuda.is_available()
        self.gkd_group = weight_group("127.0.0.1", int(port), self.rank, int(world_size), timeout, self.gkd_cuda)
        return "joined"

    def gkd_receive_weights(self, specs: list, version: str) -> str:
        group = getattr(self, "gkd_group", None)
        if group is None:
            raise RuntimeError("gkd_receive_weights before gkd_join_group")
        root = group.size() - 1  # the trainer
        device = torch.device("cuda", torch.cuda.current_device()) if self.gkd_cuda else torch.device("cpu")
        received = []
        for name, dtype, shape in specs:  # every tensor first: the sender must never wait on a partial load
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            group.broadcast(t, root).wait()
            received.append((name, t))
        self.model_runner.reload_weights(weights_iterator=iter(received))
        self.gkd_version = str(version)
        return self.gkd_version

    def gkd_weight_version(self) -> str:
        return getattr(self, "gkd_version", "0")
