"""The process groups and meshes made in this process, by what they span: a process that runs several
trainings under one default group (a launcher's) makes each only once. A group holds threads and sockets until
destroyed, and destroying one under a live mesh would strand DTensor's caches, which match meshes by their
ranks, not by their groups."""

from __future__ import annotations

import atexit

import torch.distributed as dist

_made: dict = {}


def made(key: tuple, make):
    """``make()``'s result, once per default group: every rank calls this with the same keys in the same
    order (each group is made by all ranks together)."""
    world = dist.GroupMember.WORLD
    if _made.get("world") is not world:
        _made.clear()
        _made["world"] = world
    if key not in _made:
        _made[key] = make()
    return _made[key]


def forget() -> None:
    """The default group is gone: so is everything made in it."""
    _made.clear()


# A group destroyed by its owner (a launcher, a script) while this cache still holds it would live on, with its
# gloo threads, into the interpreter's exit, where they can abort the process: let go of it while Python lives.
atexit.register(forget)
