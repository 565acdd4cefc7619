"""DLGBaseline: the plain reference method, on real digits."""

from __future__ import annotations

import math

import pytest
import torch
from _iterative_models import SmallSigmoidCNN, TupleOut, dlg_init, gradients

from fl_audit.attacks import (
    AttackTarget,
    DLGBaseline,
    PriorGuidedReconstruction,
    get_attack,
)
from fl_audit.data import Samples
from fl_audit.errors import InvalidInputError, UnsupportedModelError
from fl_audit.metrics import match_inputs


def _target(digits: Samples, i: int) -> tuple[AttackTarget, torch.Tensor, int]:
    assert digits.labels is not None
    x, y = digits.inputs[i : i + 1], digits.labels[i : i + 1]
    model = dlg_init(SmallSigmoidCNN(1, 8), i)
    return (
        AttackTarget.from_gradients(model, gradients(model, x, y), (1, 8, 8)),
        x,
        int(y),
    )


def test_registered_under_dlg() -> None:
    assert get_attack("dlg") is DLGBaseline


def test_dlg_with_line_search_recovers_a_digit(digits: Samples) -> None:
    # Arrange
    target, x, y = _target(digits, 1)
    # Act
    result = DLGBaseline(
        line_search=True,
        max_iterations=2000,
        time_budget_s=None,
        patience=60,
        progress=False,
    ).run(target)
    # Assert: the image and the soft label's argmax
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 30.0
    assert result.labels is not None and int(result.labels[0]) == y
    assert result.residual is not None and result.residual < 1e-3


def test_budgets_are_respected(digits: Samples) -> None:
    # Arrange
    target, _, _ = _target(digits, 2)
    steps: list[float] = []
    # Act
    timed = DLGBaseline(time_budget_s=0.3, max_iterations=None, progress=False).run(
        target
    )
    DLGBaseline(
        max_iterations=40,
        time_budget_s=None,
        progress=False,
        callback=lambda x, v, t: steps.append(t),
    ).run(target)
    # Assert: 40 iterations are at most 2 steps of 20
    assert timed.elapsed_s < 1.0
    assert 1 <= len(steps) <= 2


@pytest.mark.parametrize("budget", [7, 30, 45])
def test_the_iteration_budget_is_met_exactly(digits: Samples, budget: int) -> None:
    # Arrange: budgets that are not multiples of DLG's 20-iteration steps
    target, _, _ = _target(digits, 2)
    # Act
    result = DLGBaseline(max_iterations=budget, time_budget_s=None, progress=False).run(
        target
    )
    # Assert: the last step runs only what is left (it used to run 20)
    assert any(f"after {budget} iteration(s)" in note for note in result.notes)


def test_a_callback_that_returns_true_stops_the_attack(digits: Samples) -> None:
    # Arrange
    target, _, _ = _target(digits, 2)
    calls: list[float] = []

    def stop_now(_x: torch.Tensor, _value: float, elapsed: float) -> bool:
        calls.append(elapsed)
        return True

    # Act
    result = DLGBaseline(
        max_iterations=400, time_budget_s=None, progress=False, callback=stop_now
    ).run(target)
    # Assert: one step of 20 iterations, then the stop, said in the notes
    assert len(calls) == 1
    assert any("stopped: cancelled" in note for note in result.notes)


def test_a_diverging_run_is_reported_not_raised(digits: Samples) -> None:
    # Arrange: a huge step without line search overflows quickly
    target, _, _ = _target(digits, 3)
    # Act
    result = DLGBaseline(lr=1e30, time_budget_s=2, progress=False).run(target)
    # Assert
    assert result.residual is not None
    assert torch.isfinite(result.inputs).all()
    assert any("stopped" in n for n in result.notes)
    assert math.isfinite(result.residual) or result.residual == math.inf


@pytest.mark.parametrize(
    "options", [{"lr": 0}, {"max_iterations": -3}, {"patience": 0}, {"tolerance": -1}]
)
def test_bad_options_are_refused(options: dict) -> None:
    with pytest.raises(InvalidInputError):
        DLGBaseline(**options)


@pytest.mark.parametrize("attack_of", [DLGBaseline, PriorGuidedReconstruction])
def test_a_model_without_one_logits_tensor_is_declined(
    digits: Samples, attack_of: type
) -> None:
    # Arrange
    model = TupleOut(64, 16)
    x, y = digits.inputs[:1], digits.labels[:1]
    target = AttackTarget.from_gradients(model, gradients(model, x, y), (1, 8, 8))
    attack = attack_of(progress=False, max_iterations=5)
    # Act
    verdict = attack.applicability(target)
    # Assert: declined with the fix, and run raises the typed error
    assert not verdict and "returns a tuple" in verdict.reason
    with pytest.raises(UnsupportedModelError, match="tuple"):
        attack.run(target)
