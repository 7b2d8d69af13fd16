"""A local Hugging Face hub cache in the hub's own layout, for offline tests of hub IDs.

    HF_HOME/hub/models--org--name/blobs/<sha256>
    HF_HOME/hub/models--org--name/snapshots/<commit>/<file> -> ../../blobs/<sha256>
    HF_HOME/hub/models--org--name/refs/main                  (holds <commit>)
    HF_HOME/hub/datasets--org--name/...                      (the same for datasets)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_snapshot(hf_home: Path, repo_id: str, files: dict[str, Path | bytes], commit: str, *,
                 repo_type: str = "model", ref: str | None = "main") -> Path:
    """Put ``files`` (name in the repo -> local file or bytes) into the cache as snapshot ``commit``;
    ``ref`` (a branch name) points at it. Returns the snapshot folder."""
    repo = Path(hf_home) / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for name, src in files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def add_model_folder(hf_home: Path, repo_id: str, folder: Path, commit: str, **kw) -> Path:
    return add_snapshot(hf_home, repo_id, {p.relative_to(folder).as_posix(): p for p in Path(folder).rglob("*")
                                           if p.is_file()}, commit, **kw)


def commit_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def parquet_bytes(rows: list[dict], tmp: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(tmp) / f"{commit_hash(repr(rows))}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = path.read_bytes()
    path.unlink()
    return data
