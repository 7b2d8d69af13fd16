"""benchmarks/gpu_check.sh --dry-run: the GPU check's plumbing on CPU, on tiny models, ending in its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.needs_module("vllm")
def test_gpu_check_dry_run_writes_a_summary_of_every_check(tmp_path):
    # e2e needs TRL's own venv (benchmarks/e2e_vs_trl.py makes it on first use): its dry run is left to a person;
    # parallel's is too (a minute of two torchrun runs whose training the distributed tests check)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path),
                           "--only", "server offload"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = summary["checks"]
    assert summary["dry_run"] is True and set(checks) == {"e2e", "pair", "server", "offload", "parallel"}
    assert all(checks[name]["status"] == "skipped" for name in ("e2e", "pair", "parallel"))
    for name in ("server", "offload"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["server"]["result"]["steps"] == 3
    off = {r["offload_teacher_model"]: r for r in checks["offload"]["result"]}
    assert set(off) == {"false", "true"} and all(r["rc"] == 0 and r["peak_rss_mib"] > 0 for r in off.values())


def test_gpu_check_refuses_an_unknown_argument():
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument --fast" in proc.stderr
