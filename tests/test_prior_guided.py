"""PriorGuidedReconstruction on real digits and ECG beats (seeded, small budgets)."""

from __future__ import annotations

import math

import pytest
import torch
from _iterative_models import SmallReLUCNN, SmallSigmoidCNN, dlg_init, gradients
from torch import nn

from fl_audit.attacks import (
    AttackTarget,
    PriorGuidedReconstruction,
    create_attack,
    get_attack,
)
from fl_audit.attacks._matching import Budget, MatchingProblem, SoftenedReLU
from fl_audit.data import Samples, load_samples
from fl_audit.errors import InvalidInputError
from fl_audit.metrics import match_inputs


def _target(
    samples: Samples, rows: slice, seed: int
) -> tuple[AttackTarget, torch.Tensor]:
    x = samples.inputs[rows]
    assert samples.labels is not None
    y = samples.labels[rows] % 10
    model = dlg_init(SmallSigmoidCNN(x.shape[1], x.shape[-1], dims=x.dim() - 2), seed)
    target = AttackTarget.from_gradients(
        model,
        gradients(model, x, y),
        samples.input_shape,
        batch_size=x.shape[0],
        input_range=(0.0, 1.0),
    )
    return target, x


def test_registered_under_prior_guided() -> None:
    assert get_attack("prior_guided") is PriorGuidedReconstruction
    assert isinstance(
        create_attack("prior_guided", max_iterations=5), PriorGuidedReconstruction
    )


def test_idlg_rule_finds_every_single_label(digits: Samples) -> None:
    # Arrange: ten digits, each alone in its gradient
    assert digits.labels is not None
    found, truth = [], []
    for i in range(10):
        target, _ = _target(digits, slice(i, i + 1), seed=i)
        # Act: one iteration is enough, the label is fixed before optimising
        attack = PriorGuidedReconstruction(
            max_iterations=1, inits=["uniform"], progress=False
        )
        result = attack.run(target)
        assert result.labels is not None
        found.append(int(result.labels[0]))
        truth.append(int(digits.labels[i]))
    # Assert
    assert found == truth


def test_batch_label_counts_match_the_batch(digits: Samples) -> None:
    # Arrange: batches of 4 real digits (repeated labels included)
    assert digits.labels is not None
    for start in (0, 4, 8):
        target, _ = _target(digits, slice(start, start + 4), seed=start)
        # Act
        attack = PriorGuidedReconstruction(
            max_iterations=1, inits=["uniform"], progress=False
        )
        result = attack.run(target)
        # Assert: the multiset of labels is the batch's
        assert result.labels is not None
        truth = digits.labels[start : start + 4]
        assert sorted(result.labels.tolist()) == sorted(truth.tolist())


def test_recovers_a_real_digit_above_30_db(digits: Samples) -> None:
    # Arrange
    target, x = _target(digits, slice(3, 4), seed=3)
    attack = PriorGuidedReconstruction(
        time_budget_s=120, max_iterations=1500, progress=False
    )
    # Act
    result = attack.run(target)
    # Assert
    report = match_inputs(result.inputs, x, data_range=1.0)
    assert report.scores[0].psnr >= 30.0
    assert result.residual is not None and result.residual < 1e-3


def test_restarts_stop_when_two_trials_agree(digits: Samples) -> None:
    # Arrange: a digit every trial recovers; no residual ends the restarts
    target, x = _target(digits, slice(3, 4), seed=3)

    def attack(**options: object) -> PriorGuidedReconstruction:
        return PriorGuidedReconstruction(
            time_budget_s=120,
            max_iterations=4000,
            accept_residual=0.0,
            progress=False,
            **options,
        )

    # Act
    agreeing = attack().run(target)
    every = attack(agree_db=None).run(target)
    # Assert: two trials instead of the plan's four, the same answer
    assert any("trials 1 and 2" in n and "agree" in n for n in agreeing.notes)
    assert "best of 2 trial(s)" in agreeing.notes[-1]
    assert "best of 4 trial(s)" in every.notes[-1]
    assert match_inputs(agreeing.inputs, x, data_range=1.0).scores[0].psnr >= 60.0


def test_the_polish_stops_once_the_answer_has_settled() -> None:
    # Arrange: a 28x28 garment whose polish converges slowly (measured: 66 dB
    # after 2,449 iterations without the rule, 61 dB after 1,005 with it)
    garments = load_samples("fashion_mnist", 4, seed=0)
    target, x = _target(garments, slice(1, 2), seed=1)
    # Act
    result = PriorGuidedReconstruction(
        time_budget_s=120, max_iterations=3000, inits=["uniform"], progress=False
    ).run(target)
    # Assert: settled long before the iteration budget, far above 30 dB
    assert "(settled)" in result.notes[-1]
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 55.0


def test_recovers_an_ecg_beat_with_the_smoothness_prior() -> None:
    # Arrange: one real ECG window (1, 64) behind a 1-D sigmoid CNN
    beats = load_samples("ecg", 1, size=64, seed=2)
    x = beats.inputs
    model = dlg_init(SmallSigmoidCNN(1, 64, dims=1), 5)
    target = AttackTarget.from_gradients(
        model, gradients(model, x, torch.tensor([4])), (1, 64), input_range=(0.0, 1.0)
    )
    # Act
    result = PriorGuidedReconstruction(
        time_budget_s=120, max_iterations=1500, progress=False
    ).run(target)
    # Assert
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 30.0


def test_centre_start_beats_noise_on_real_ecg_windows() -> None:
    # Arrange: three real ECG windows (1, 64), each behind its own 1-D CNN
    beats = load_samples("ecg", 3, size=64, seed=2)
    targets = []
    for k in range(3):
        x = beats.inputs[k : k + 1]
        model = dlg_init(SmallSigmoidCNN(1, 64, dims=1), 5 + k)
        observed = gradients(model, x, torch.tensor([4]))
        target = AttackTarget.from_gradients(
            model, observed, (1, 64), input_range=(0.0, 1.0)
        )
        targets.append((target, x))

    def psnr(target: AttackTarget, x: torch.Tensor, init: str) -> float:
        result = PriorGuidedReconstruction(
            time_budget_s=None, max_iterations=40, inits=[init], progress=False
        ).run(target)
        assert any(f"{init} start" in note for note in result.notes)
        return match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr

    # Act: a start at the box's centre and a noise start, 40 iterations each
    centre = [psnr(t, x, "centre") for t, x in targets]
    noise = [psnr(t, x, "uniform") for t, x in targets]
    # Assert: the smooth start is closer on every window, and above 30 dB
    assert all(c > n for c, n in zip(centre, noise, strict=True))
    assert min(centre) >= 30.0


def test_centre_start_of_a_batch_breaks_the_slot_symmetry(digits: Samples) -> None:
    # Arrange
    target, _ = _target(digits, slice(0, 2), seed=0)
    attack = PriorGuidedReconstruction(progress=False)
    problem = MatchingProblem(target, torch.float64)
    gen = torch.Generator().manual_seed(0)
    # Act
    budget, labels = Budget(None, 1), torch.tensor([0, 1])
    x0 = attack._initial(
        "centre", problem, target, 2, gen, None, budget, (0.0, 1.0), labels, []
    )
    # Assert: near the middle of the box, the two slots differ
    assert x0 is not None
    assert (x0 - 0.5).abs().max() < 0.1
    assert not torch.equal(x0[0], x0[1])


def test_residual_falls_as_psnr_rises(digits: Samples) -> None:
    # Arrange: the same target under growing iteration budgets, uniform start
    target, x = _target(digits, slice(5, 6), seed=5)
    residuals, psnrs = [], []
    for budget in (3, 30, 300):
        attack = PriorGuidedReconstruction(
            max_iterations=budget, time_budget_s=30, inits=["uniform"], progress=False
        )
        # Act
        result = attack.run(target)
        assert result.residual is not None
        residuals.append(result.residual)
        psnrs.append(match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr)
    # Assert: strictly better fit and strictly better reconstruction
    assert residuals[0] > residuals[1] > residuals[2]
    assert psnrs[0] < psnrs[1] < psnrs[2]


class _NaNOnce(nn.Module):
    """Wraps a model; its forward returns NaN on calls number 5 to 7."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if 5 <= self.calls <= 7 else out


def test_nan_objective_restarts_the_trial(digits: Samples) -> None:
    # Arrange
    base, x = _target(digits, slice(7, 8), seed=7)
    model = _NaNOnce(base.model)
    target = AttackTarget.from_gradients(
        model,
        {f"inner.{k}": v for k, v in base.gradients.items()},
        base.input_shape,
        input_range=(0.0, 1.0),
    )
    attack = PriorGuidedReconstruction(
        time_budget_s=120,  # the iteration budget ends it, however loaded the CPU
        max_iterations=800,
        inits=["uniform", "uniform"],
        progress=False,
    )
    # Act
    result = attack.run(target)
    # Assert: the failed trial is noted, the attack still delivers
    assert any("diverged" in note for note in result.notes)
    assert result.residual is not None and math.isfinite(result.residual)
    assert torch.isfinite(result.inputs).all()
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 30.0


def test_time_and_iteration_budgets_are_respected(digits: Samples) -> None:
    # Arrange
    target, _ = _target(digits, slice(0, 4), seed=0)
    steps: list[float] = []
    # Act
    timed = PriorGuidedReconstruction(
        time_budget_s=0.5, max_iterations=None, progress=False
    )
    result = timed.run(target)
    counted = PriorGuidedReconstruction(
        max_iterations=7,
        time_budget_s=None,
        optimizer="adam",
        inits=["uniform"],
        progress=False,
        callback=lambda x, v, t: steps.append(t),
    )
    counted.run(target)
    lbfgs = PriorGuidedReconstruction(
        max_iterations=33, time_budget_s=None, inits=["uniform"], progress=False
    ).run(target)
    # Assert (slack: one evaluation and the final residual); the callback
    # sees the trial's start, then each of the 7 Adam steps; L-BFGS's last
    # step of 10 runs only the 3 iterations left
    assert result.elapsed_s < 1.5
    assert len(steps) == 1 + 7
    assert "; 33 iteration(s)" in lbfgs.notes[-1]


def test_a_callback_that_returns_true_stops_the_attack(digits: Samples) -> None:
    # Arrange: a plan of four trials, each with several phases
    target, _ = _target(digits, slice(0, 1), seed=0)
    calls: list[float] = []

    def stop_at_third(_x: torch.Tensor, _value: float, elapsed: float) -> bool:
        calls.append(elapsed)
        return len(calls) >= 3

    attack = PriorGuidedReconstruction(
        max_iterations=2000, time_budget_s=None, progress=False, callback=stop_at_third
    )
    # Act
    result = attack.run(target)
    # Assert: no step after the one that asked to stop, and the notes say so
    assert len(calls) == 3
    assert any("cancelled" in note for note in result.notes)
    assert result.inputs.shape == (1, *target.input_shape)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"max_iterations": 0}, "max_iterations"),
        ({"time_budget_s": -1}, "time_budget_s"),
        ({"time_budget_s": None, "max_iterations": None}, "needs a budget"),
        ({"inits": ["mean"]}, "reference"),
        ({"inits": ["zeros"]}, "unknown"),
        ({"distance": "l1"}, "distance"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"tv_weight": -1.0}, "tv_weight"),
        ({"tv_weight": []}, "tv_weight"),
        ({"tv_weight": [3.0, -1.0]}, "tv_weight"),
        ({"patience": 0}, "patience"),
        ({"labels": "guess"}, "labels"),
        ({"relu_smoothing": (0.1, -1.0)}, "relu_smoothing"),
        ({"agree_db": 0}, "agree_db"),
        ({"agree_db": True}, "agree_db"),
        ({"settle_step": -1e-3}, "settle_step"),
        ({"settle_residual": float("nan")}, "settle_residual"),
    ],
)
def test_bad_options_are_refused(options: dict, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment):
        PriorGuidedReconstruction(**options)


def test_reference_of_the_wrong_shape_is_refused(digits: Samples) -> None:
    target, _ = _target(digits, slice(0, 1), seed=0)
    attack = PriorGuidedReconstruction(
        reference=torch.rand(4, 1, 5, 5), max_iterations=2
    )
    with pytest.raises(InvalidInputError, match="input shape"):
        attack.run(target)


def test_softened_relu_keeps_the_value_and_ramps_the_derivative() -> None:
    # Arrange
    z = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).requires_grad_(True)
    act = SoftenedReLU()
    act.width = 1.0
    # Act
    out = act(z)
    (slope,) = torch.autograd.grad(out.sum(), z)
    # Assert: exact ReLU values, derivative 0 / linear ramp / 1
    assert torch.equal(out.detach(), torch.relu(z.detach()))
    expected = (z.detach() + 0.5).clamp(0.0, 1.0)
    assert torch.allclose(slope, expected)


def test_matching_problem_swaps_relus_without_changing_the_gradient() -> None:
    # Arrange
    fashion = load_samples("fashion_mnist", 2, size=16, seed=0)
    x, y = fashion.inputs[:1].double(), fashion.labels[:1] % 10
    torch.manual_seed(0)
    model = SmallReLUCNN(1, 16).double()
    observed = gradients(model, x, y)
    target = AttackTarget.from_gradients(model, observed, fashion.input_shape)
    # Act
    problem = MatchingProblem(target, torch.float64)
    grads = problem.gradient(x, y, create_graph=False)
    # Assert: both ReLUs swapped, the exact gradient is reproduced
    assert len(problem.relus) == 2
    assert problem.residual(x, y) < 1e-12
    pairs = zip(grads, problem.names, strict=True)
    assert all(torch.allclose(g, observed[n]) for g, n in pairs)


def _relu_garment() -> tuple[AttackTarget, torch.Tensor]:
    """A 16x16 Fashion-MNIST garment's gradient on a default-init ReLU CNN."""
    fashion = load_samples("fashion_mnist", 2, size=16, seed=0)
    x, y = fashion.inputs[:1], fashion.labels[:1] % 10
    torch.manual_seed(0)
    model = SmallReLUCNN(1, 16)
    target = AttackTarget.from_gradients(
        model, gradients(model, x, y), fashion.input_shape, input_range=(0.0, 1.0)
    )
    return target, x


def test_relu_smoothing_recovers_a_default_init_relu_cnn() -> None:
    # Arrange: a real 16x16 Fashion-MNIST image, ReLU CNN, PyTorch's init
    target, x = _relu_garment()

    def attack(smoothing: tuple[float, ...]) -> float:
        result = PriorGuidedReconstruction(
            time_budget_s=120,
            max_iterations=400,
            inits=["uniform"],
            relu_smoothing=smoothing,
            progress=False,
        ).run(target)
        return match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr

    # Act
    smoothed, plain = attack((0.3, 0.1, 0.03)), attack(())
    # Assert: the ramp continuation reaches 30 dB where the exact ReLU stalls
    assert smoothed >= 30.0
    assert plain < 30.0


def test_trials_cycle_through_the_tv_weights_and_keep_the_best_match() -> None:
    # Arrange: a real 16x16 Fashion-MNIST image, ReLU CNN, PyTorch's init
    target, _ = _relu_garment()
    options = dict(
        time_budget_s=120,
        max_iterations=2000,
        accept_residual=0.0,
        patience=5,
        progress=False,
    )
    alone = PriorGuidedReconstruction(inits=["uniform"], tv_weight=30.0, **options)
    first = alone.run(target)
    # Act: the same first trial, then a second start with another weight
    cycled = PriorGuidedReconstruction(
        inits=["uniform", "uniform"], tv_weight=(30.0, 3.0), **options
    )
    both = cycled.run(target)
    # Assert: both trials ran, the better match was kept, its weight named
    note = both.notes[-1]
    assert "best of 2 trial(s)" in note
    assert both.residual <= first.residual
    weight = "30" if both.residual == first.residual else "3,"
    assert f"TV weight {weight}" in note


def test_a_determined_conv_chain_gives_a_close_start() -> None:
    # Arrange: a garment behind DLG's LeNet (three 5x5 convolutions with
    # sigmoid, then FC): every layer of the walk down from the FC layer has
    # at least as many equations as unknowns
    garment = load_samples("fashion_mnist", 1, seed=3)
    x = garment.inputs.double()
    model = dlg_init(_LeNet(), 0).double()
    assert garment.labels is not None
    target = AttackTarget.from_gradients(
        model,
        gradients(model, x, garment.labels),
        garment.input_shape,
        batch_size=1,
        input_range=(0.0, 1.0),
    )
    starts: list[torch.Tensor] = []

    def first(inputs: torch.Tensor, _value: float, _elapsed: float) -> bool:
        starts.append(inputs)
        return True  # stop at the start

    # Act
    result = PriorGuidedReconstruction(progress=False, callback=first).run(target)
    # Assert: the start is the loose conv_inversion solve, its label kept
    assert any(n.startswith("analytic start: conv_inversion") for n in result.notes)
    assert "labels: conv_inversion" in result.notes[-1]
    assert len(starts) == 1
    assert match_inputs(starts[0], x, data_range=1.0).scores[0].psnr >= 30.0


def test_an_inconsistent_conv_start_is_not_used(digits: Samples) -> None:
    # Arrange: an 8x8 digit behind a ReLU CNN whose stride-2 layer has 74
    # kept outputs + 432 kernel equations for 384 unknowns, but rank 348
    # (dense certificate): its minimum-norm answer is not an activation the
    # layer below can produce (relative residual 0.8), and no joint solve
    # passes a ReLU
    x = digits.inputs[2:3]
    assert digits.labels is not None
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, 10),
    )
    target = AttackTarget.from_gradients(
        model,
        gradients(model, x, digits.labels[2:3] % 10),
        digits.input_shape,
        batch_size=1,
        input_range=(0.0, 1.0),
    )
    # Act
    result = PriorGuidedReconstruction(progress=False, callback=lambda *_: True).run(
        target
    )
    # Assert
    assert any(
        n.startswith("no conv_inversion start: its walk down is inconsistent")
        for n in result.notes
    ), result.notes
    assert "uniform start" in result.notes[-1]


class _LeNet(nn.Module):
    """DLG's LeNet for 28x28 images."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(12 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def test_an_underdetermined_conv_chain_starts_from_noise() -> None:
    # Arrange: a garment behind the small ReLU CNN: its stride-2 layer sees
    # 8 * 28 * 28 inputs through at most 8 * 14 * 14 outputs + 576 kernel
    # equations, and a ReLU below it (no joint solve through it)
    garments = load_samples("fashion_mnist", 1, seed=0)
    x = garments.inputs
    assert garments.labels is not None
    torch.manual_seed(0)
    model = SmallReLUCNN(1, 28)
    target = AttackTarget.from_gradients(
        model,
        gradients(model, x, garments.labels),
        garments.input_shape,
        batch_size=1,
        input_range=(0.0, 1.0),
    )
    # Act
    result = PriorGuidedReconstruction(progress=False, callback=lambda *_: True).run(
        target
    )
    # Assert
    assert any(
        n.startswith("no conv_inversion start: a layer") for n in result.notes
    ), result.notes
    assert "uniform start" in result.notes[-1]
