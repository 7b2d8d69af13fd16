"""Vocab-parallel losses with TP=2 (two processes, torchrun, gloo on 127.0.0.1) equal TP=1: a job of the
session's 2-process launch (tests/dist/tp_losses_worker.py)."""

import pytest

from helpers import declare

declare("tp-losses", 2, lambda c, out: [], call="tp_losses_worker:run")


@pytest.mark.slow
@pytest.mark.dist
def test_vocab_parallel_equals_single_process(runs):
    assert "TP-OK" in runs.stdout("tp-losses"), runs.output("tp-losses")[-6000:]
