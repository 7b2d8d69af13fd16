"""Vocab-parallel losses with TP=2 (two processes, torchrun, gloo on 127.0.0.1) equal TP=1."""

from pathlib import Path

import pytest


@pytest.mark.dist
def test_vocab_parallel_equals_single_process(torchrun):
    proc = torchrun(Path(__file__).parent / "dist" / "tp_losses_worker.py", 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "TP-OK" in proc.stdout
