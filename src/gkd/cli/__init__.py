"""`gkd train | cache | eval | serve | prune | plot | models | demo`, one module per command (each has ``run(argv)``).
User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import time
from pathlib import Path

from gkd.machine import bound_onednn_caches

# before torch loads MKL: MKL picks kernels by the data's memory alignment and, under load, runs on fewer
# threads than asked (MKL_DYNAMIC); either changes a matmul's reduction order, so a resumed run would
# differ in the last digits from the uninterrupted one. A user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
bound_onednn_caches()  # (also read once, at the first oneDNN operation: gkd.machine)

from gkd.cli.train import ERROR_DIR  # noqa: E402 - after the environment above
from gkd.errors import GKDError  # noqa: E402

COMMANDS = ("train", "cache", "eval", "serve", "prune", "plot", "models", "demo")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="gkd", description="Generalized Knowledge Distillation of language models.")
    top.add_argument("command", choices=COMMANDS, help="what to do")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        print("\nRun `gkd COMMAND --help` for the options of each command.")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise GKDError(f"unknown command {command!r}; choose {', '.join(COMMANDS)}")
        code = importlib.import_module(f"gkd.cli.{command}").run(rest)
        if isinstance(code, int) and code:  # a launcher's exit code (gkd train --nproc_per_node)
            return code
    except GKDError as e:
        if os.environ.get(ERROR_DIR) and "RANK" in os.environ:  # under gkd's own launcher: it reports
            Path(os.environ[ERROR_DIR], f"rank-{os.environ['RANK']}.txt").write_text(str(e))
            return 2
        if int(os.environ.get("RANK", "0")):
            # under plain torchrun the same mistake stops every rank: rank 0 reports it and the launcher
            # then stops this one while it waits; it speaks only if rank 0 did not fail
            time.sleep(2)
        print(f"gkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gkd: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # the machine, not the program: a full disk, a read-only or forbidden folder, a taken port
        print(f"gkd: error: {e.strerror} ({e.filename or 'no file named'})", file=sys.stderr)
        return 2
    return 0


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                       errno.EADDRINUSE, errno.EADDRNOTAVAIL}


if __name__ == "__main__":
    sys.exit(main())
