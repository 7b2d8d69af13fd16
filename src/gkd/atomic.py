"""Files written whole or not at all: a temp file beside the target, fsynced, renamed over it. A reader
sees the old file or the new one, never half of one; several writers of the same file leave the last
rename's (fine where they write the same bytes). And the digest that tells a whole file from a damaged one."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically; on failure no temp file is left and an OSError goes up."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path | str, sync: bool = False) -> str:
    """The file's sha256 (hex); ``sync``: fsync it too, while it is open."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if sync:
            os.fsync(fh.fileno())
    return digest
