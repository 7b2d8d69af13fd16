"""Run one `gkd train` in this process and print its peak memory as JSON: the accelerator's allocated
peak (torch.cuda.max_memory_allocated) where there is one, and the process's peak resident set.

    .venv/bin/python benchmarks/peak_memory.py train --model S --teacher_model T ... --offload_teacher_model true
"""

from __future__ import annotations

import json
import resource
import sys


def main() -> None:
    import torch

    from gkd.cli import main as gkd

    rc = gkd(sys.argv[1:])
    peak = {"rc": rc, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    if torch.cuda.is_available():
        peak["peak_cuda_mib"] = torch.cuda.max_memory_allocated() // 2**20
    print(json.dumps(peak))
    sys.exit(rc)


if __name__ == "__main__":
    main()
