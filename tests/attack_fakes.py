"""Misbehaving attacks for the runtime tests (module level: child processes
unpickle them by name)."""

from __future__ import annotations

import time

import numpy as np
import torch

from fl_audit.attacks import Attack, AttackResult, AttackTarget


class Sleepy(Attack):
    """Sleeps, then returns nothing: an attack that hangs."""

    name = "sleepy"

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds = seconds

    def run(self, target: AttackTarget) -> AttackResult:
        time.sleep(self.seconds)
        return _empty(self.name, target)


class Raises(Attack):
    name = "raises"

    def run(self, target: AttackTarget) -> AttackResult:
        raise RuntimeError("the attack blew up")


class Hog(Attack):
    """Allocates far more memory than any cap allows."""

    name = "hog"

    def run(self, target: AttackTarget) -> AttackResult:
        blocks = [np.ones(2**27) for _ in range(64)]  # 64 GiB
        return _empty(self.name, target, len(blocks))


class NaNs(Attack):
    name = "nans"

    def run(self, target: AttackTarget) -> AttackResult:
        x = torch.full((1, *target.input_shape), float("nan"))
        return AttackResult(self.name, x, torch.tensor([False]))


def _empty(name: str, target: AttackTarget, _: int = 0) -> AttackResult:
    return AttackResult(
        name, torch.zeros((0, *target.input_shape)), torch.zeros(0, dtype=torch.bool)
    )
