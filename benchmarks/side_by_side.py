"""Two trainers of one benchmark stepping in turn in one process, so that both see the same load."""

from __future__ import annotations

import time


def step_in_turn(sides: dict, steps: int, before=None) -> tuple[dict, dict, dict]:
    """``steps`` training steps of each trainer in ``sides`` (name -> gkd Trainer), the first of each pair
    alternating; ``before(name)`` runs ahead of each step. Returns per side: seconds, losses and the step
    windows (gkd.train.stats.Window: tokens, sequences) of every step."""
    from gkd.train.stats import Window

    names = list(sides)
    seconds, loss, windows = ({name: [] for name in names} for _ in range(3))
    for step in range(steps):
        for name in (names if step % 2 == 0 else names[::-1]):
            if before is not None:
                before(name)
            window, t = Window(), time.perf_counter()
            loss[name].append(sides[name].train_step(step, window))
            seconds[name].append(time.perf_counter() - t)
            windows[name].append(window)
    return seconds, loss, windows
