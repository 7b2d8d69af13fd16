"""Hugging Face hub IDs for models (``org/name[@revision]``) and datasets (``org/name[@revision][:split]``).

They are resolved through huggingface_hub's own cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``): a cached
snapshot is used without touching the network, so a run works offline once its models and data are
cached (``HF_HUB_OFFLINE=1`` forbids downloads outright). A missing ID is one line naming the ID and the
cache folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from gkd.errors import GKDError

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ID = re.compile(rf"^(?P<repo>(?:{_NAME}/)?{_NAME})(?:@(?P<rev>[A-Za-z0-9._/-]+?))?(?::(?P<split>[A-Za-z0-9._-]+))?$")


def looks_like_id(spec: str) -> bool:
    """``org/name`` with an optional ``@revision`` and ``:split`` (a bare ``name`` is too easily a mistyped
    local path, so the organisation is required)."""
    m = _ID.match(spec)
    return bool(m) and "/" in m["repo"] and ".." not in spec


def parse(spec: str) -> tuple[str, str | None, str | None]:
    """(repo id, revision or None, split or None)."""
    m = _ID.match(spec)
    if not m or "/" not in m["repo"]:
        raise GKDError(f"{spec!r} is not a hub ID (org/name[@revision][:split])")
    return m["repo"], m["rev"], m["split"]


def _hf_home() -> Path:
    env = os.environ
    return Path(env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")).expanduser()


def cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (its constants are read at import)."""
    given = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(given).expanduser() if given else _hf_home() / "hub"


def datasets_cache_dir() -> Path:
    """Where ``datasets`` keeps the Arrow files it prepares (HF_DATASETS_CACHE, else HF_HOME/datasets)."""
    given = os.environ.get("HF_DATASETS_CACHE")
    return Path(given).expanduser() if given else _hf_home() / "datasets"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def snapshot(spec: str, repo_type: str = "model") -> Path:
    """The local snapshot folder of a hub ID: from the cache if it is there (no network), else downloaded
    into the cache unless offline."""
    from huggingface_hub import snapshot_download

    repo, rev, _ = parse(spec)
    cache = cache_dir()
    kw = dict(repo_id=repo, revision=rev, repo_type=repo_type, cache_dir=str(cache))
    try:
        return Path(snapshot_download(**kw, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (huggingface_hub raises several types): try the hub
        pass
    what = "dataset" if repo_type == "dataset" else "model"
    missing = (f"{what} {spec}: no such local path, and {repo}{f' at revision {rev}' if rev else ''} is not in the "
               f"Hugging Face cache {cache}")
    if offline():
        raise GKDError(f"{missing}; HF_HUB_OFFLINE=1 forbids downloading it: fetch it once with network (hf download "
                       f"{repo}{' --repo-type dataset' if repo_type == 'dataset' else ''}) or set HF_HOME to a cache "
                       "that holds it")
    try:
        return Path(snapshot_download(**kw))
    except Exception as e:  # noqa: BLE001 - no network, unknown repo, gated repo, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise GKDError(f"{missing}, and downloading it failed ({type(e).__name__}: {reason}); check the ID, or "
                       "fetch it where there is network and set HF_HOME to that cache") from None


def model_folder(spec: str) -> Path:
    folder = snapshot(spec, "model")
    if not (folder / "config.json").is_file():
        raise GKDError(f"model {spec}: the cached snapshot {folder} has no config.json (not a transformers model, "
                       "or only partly downloaded)")
    return folder


def load_dataset_rows(spec: str, num_proc: int = 0):
    """The rows of one split (default ``train``) of a hub dataset, prepared by ``datasets`` from the cached
    snapshot's data files (``num_proc`` processes)."""
    try:
        import datasets
    except ImportError:
        raise GKDError(f"dataset {spec}: hub datasets need `pip install datasets`") from None
    _, _, split = parse(spec)
    folder = snapshot(spec, "dataset")
    try:
        ds = datasets.load_dataset(str(folder), num_proc=num_proc or None, cache_dir=str(datasets_cache_dir()))
    except Exception as e:  # noqa: BLE001 - no data files, several configs, unreadable files ...
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise GKDError(f"dataset {spec}: cannot read the cached snapshot {folder} ({type(e).__name__}: {reason})") from None
    split = split or "train"
    if split not in ds:
        raise GKDError(f"dataset {spec}: no split {split!r} (it has {', '.join(ds)}); name one as {parse(spec)[0]}:SPLIT")
    return ds[split]
