"""ConvInversion on real data: Conv2d (1 and 3 channels), Conv1d on ECG, batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_audit.attacks import (
    AttackTarget,
    ConvInversion,
    ConvInversionResult,
    create_attack,
)
from fl_audit.attacks._chain import conv_operator
from fl_audit.data import Samples, load_samples
from fl_audit.errors import InvalidInputError, UnsupportedModelError
from fl_audit.metrics import match_inputs


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return {
        name: g for (name, _), g in zip(model.named_parameters(), grads, strict=True)
    }


def _conv_classifier(
    x: torch.Tensor, h: int, k: int, s: int, p: int, seed: int = 0
) -> nn.Module:
    """conv -> ReLU -> flatten -> Linear(., 10), in the dtype of ``x``."""
    torch.manual_seed(seed)
    conv_cls = nn.Conv2d if x.dim() == 4 else nn.Conv1d
    conv = conv_cls(x.shape[1], h, k, s, p)
    with torch.no_grad():
        features = conv(x[:1].float()).numel()
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(features, 10)).to(
        x.dtype
    )


def _attack(model: nn.Module, x: torch.Tensor, **options) -> ConvInversionResult:
    y = torch.arange(x.shape[0]) % 10
    target = AttackTarget.from_gradients(model, _gradient(model, x, y), x.shape[1:])
    return ConvInversion(**options).run(target)


@pytest.fixture(scope="module")
def fashion4(fashion_mnist: Samples) -> torch.Tensor:
    return fashion_mnist.inputs[:4].double()


@pytest.mark.parametrize(
    ("kind", "size", "h", "k", "s", "p"),
    [
        ("fashion_mnist", None, 8, 5, 1, 0),  # C=1, stride 1
        ("fashion_mnist", None, 12, 5, 2, 2),  # C=1, stride 2, padding
        ("photos", 16, 16, 5, 1, 0),  # C=3, stride 1
        ("photos", 16, 32, 4, 2, 1),  # C=3, stride 2, padding
        ("ecg", None, 4, 7, 1, 0),  # Conv1d on an ECG window
    ],
)
def test_one_input_is_certified_exact_above_threshold(kind, size, h, k, s, p):
    # Arrange: one real input, conv -> ReLU -> FC classifier, float64
    x = load_samples(kind, 1, size=size, seed=5).inputs.double()
    model = _conv_classifier(x, h, k, s, p)

    # Act
    result = _attack(model, x)

    # Assert
    report = match_inputs(result.inputs, x, data_range=1.0)
    assert result.certificates == ["rank+residual"]
    assert report.scores[0].psnr >= 100.0
    (solve,) = result.solves
    assert solve.rank == solve.unknowns == x[0].numel()
    assert solve.uncovered == 0
    assert solve.residual <= 1e-11
    assert 0 < solve.kept < solve.equations  # ReLU dropped some equations


def test_below_threshold_is_not_certified_even_when_psnr_is_high(fashion4):
    # Arrange: 2 filters, no kernel equations: fewer kept equations than pixels
    x = fashion4[:1]
    model = _conv_classifier(x, 2, 5, 1, 0)

    # Act
    result = _attack(model, x, weight_equations=False)

    # Assert: certified by rank, whatever the PSNR on the black background says
    (solve,) = result.solves
    assert solve.rank is not None and solve.rank < solve.unknowns
    assert result.num_certified == 0
    assert "0 of 1 input(s) certified" in result.notes


def test_kernel_gradient_equations_lower_the_threshold(fashion4):
    # Arrange: 4 filters 5x5, stride 1: rank-deficient from the feature map alone
    x = fashion4[1:2]
    model = _conv_classifier(x, 4, 5, 1, 0)

    # Act
    plain = _attack(model, x, weight_equations=False)
    joint = _attack(model, x, weight_equations=True)

    # Assert
    assert plain.num_certified == 0 and plain.solves[0].rank < 784
    assert joint.num_certified == 1 and joint.solves[0].weight_equations == 100
    assert match_inputs(joint.inputs, x, data_range=1.0).scores[0].psnr >= 100.0


def test_uncovered_border_pixels_are_reported_apart(fashion4):
    # Arrange: kernel 5, stride 2, no padding: 55 pixels are read by no window
    x = fashion4[:1]
    model = _conv_classifier(x, 12, 5, 2, 0)

    # Act
    result = _attack(model, x)

    # Assert: the covered part is exact, the input is not certified
    (solve,) = result.solves
    assert solve.uncovered == 55
    assert solve.exact and solve.rank == 784 - 55
    assert result.num_certified == 0
    covered = result.inputs[0, 0, :27, :27]
    assert torch.allclose(covered, x[0, 0, :27, :27], atol=1e-9)


def test_batch_behind_the_classifier_is_separated_with_labels(fashion4):
    # Arrange: B = 4 behind a 10-class classifier, 8 filters
    model = _conv_classifier(fashion4, 8, 5, 1, 0)

    # Act
    result = _attack(model, fashion4)

    # Assert
    report = match_inputs(result.inputs, fashion4, data_range=1.0)
    assert result.batch_size_estimate == 4
    assert result.num_certified == 4
    assert min(s.psnr for s in report.scores) >= 100.0
    assert result.labels is not None
    assert sorted(int(result.labels[s.recon_index]) for s in report.scores) == list(
        range(4)
    )
    for s in report.scores:
        assert int(result.labels[s.recon_index]) == s.truth_index


def test_batch_at_classes_minus_one_is_not_certified(fashion_mnist: Samples):
    # Arrange: B = 12 > classes - 1: the classifier gradient has rank 9
    x = fashion_mnist.inputs[:12].double()
    model = _conv_classifier(x, 8, 5, 1, 0)

    # Act
    result = _attack(model, x)

    # Assert
    assert result.batch_size_estimate == 9
    assert result.num_certified == 0
    assert any("classes - 1" in n for n in result.notes)


def test_batch_at_a_hidden_fc_layer_is_peeled(fashion4):
    # Arrange: conv -> ReLU -> FC(., 32) -> ReLU -> FC(32, 10), B = 3
    x = fashion4[:3]
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 24 * 24, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).double()

    # Act
    result = _attack(model, x)

    # Assert
    report = match_inputs(result.inputs, x, data_range=1.0)
    assert result.num_certified == 3
    assert min(s.psnr for s in report.scores) >= 100.0


def test_lenet_style_model_with_two_convs_and_pooling_is_inverted(fashion4):
    # Arrange: conv -> avgpool -> ReLU -> conv -> avgpool -> ReLU -> FC -> FC
    x = fashion4[2:3]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 12, 5, padding=2),
        nn.AvgPool2d(2),
        nn.ReLU(),
        nn.Conv2d(12, 48, 3, padding=1),
        nn.AvgPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48 * 7 * 7, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).double()

    # Act
    result = _attack(model, x)

    # Assert: both segments solved exactly, top to bottom
    assert [s.layer for s in result.solves] == [
        "3 (Conv2d) -> 4 (AvgPool2d)",
        "0 (Conv2d) -> 1 (AvgPool2d)",
    ]
    assert all(s.exact for s in result.solves)
    assert result.num_certified == 1
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 100.0


def test_float32_gradient_is_certified_at_its_precision(fashion4):
    # Arrange: the whole model in float32, as a client would send it
    x = fashion4[:1].float()
    model = _conv_classifier(x, 12, 5, 1, 0)

    # Act
    result = _attack(model, x)

    # Assert
    assert result.num_certified == 1
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 60.0


def test_large_solves_use_lsmr_and_stay_exact(fashion4):
    # Arrange: the dense path is disabled below 784 unknowns
    x = fashion4[:1]
    model = _conv_classifier(x, 12, 5, 1, 0)

    # Act
    result = _attack(model, x, dense_limit=100)

    # Assert
    (solve,) = result.solves
    assert solve.solver == "lsmr" and solve.rank is None
    assert result.num_certified == 1
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 100.0


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x))) + x)


class _FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 5), nn.Linear(4 * 24 * 24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _declined() -> list[tuple[str, nn.Module, str]]:
    torch.manual_seed(0)
    bn_train = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 26 * 26, 10),
    )  # fmt: skip
    return [
        (
            "resnet",
            nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.ReLU(),
                _Block(4),
                nn.Flatten(),
                nn.Linear(4 * 784, 10),
            ),  # fmt: skip
            "residual connection",
        ),
        ("batchnorm_train", bn_train.train(), "1 (BatchNorm2d)"),
        (
            "maxpool",
            nn.Sequential(
                nn.Conv2d(1, 4, 3),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(4 * 13 * 13, 10),
            ),  # fmt: skip
            "2 (MaxPool2d) is not invertible",
        ),
        (
            "pool_after_relu",
            nn.Sequential(
                nn.Conv2d(1, 4, 3),
                nn.ReLU(),
                nn.AvgPool2d(2),
                nn.Flatten(),
                nn.Linear(4 * 13 * 13, 10),
            ),  # fmt: skip
            "2 (AvgPool2d) is not invertible",
        ),
        (
            "no_fc",
            nn.Sequential(
                nn.Conv2d(1, 10, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            ),
            "no nn.Linear",
        ),
        ("functional", _FunctionalRelu(), "not a module"),
        (
            "layernorm",
            nn.Sequential(
                nn.Conv2d(1, 4, 3),
                nn.GroupNorm(2, 4),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 26 * 26, 10),
            ),  # fmt: skip
            "1 (GroupNorm)",
        ),
    ]


@pytest.mark.parametrize(
    ("name", "model", "reason"), _declined(), ids=[d[0] for d in _declined()]
)
def test_models_whose_chain_stops_are_declined_with_the_layer(
    fashion4, name, model, reason
):
    # Arrange
    model = model.double()
    x = fashion4[:2]
    target = AttackTarget.from_gradients(
        model, _gradient(model, x, torch.tensor([0, 1])), (1, 28, 28)
    )

    # Act
    verdict = ConvInversion().applicability(target)

    # Assert
    assert not verdict
    assert reason in verdict.reason
    with pytest.raises(UnsupportedModelError, match="conv_inversion does not apply"):
        ConvInversion().run(target)


def test_eval_mode_batchnorm_is_inverted_as_an_affine_map(fashion4):
    # Arrange: BatchNorm with running statistics (eval mode)
    x = fashion4[:1]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 26 * 26, 10),
    ).double()  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()

    # Act
    result = _attack(model, x)

    # Assert
    assert result.num_certified == 1
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 100.0


def test_multi_step_update_and_linear_first_layer_are_declined(fashion4):
    # Arrange
    model = _conv_classifier(fashion4[:1], 4, 5, 1, 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moved = {k: v + 1e-3 for k, v in state.items()}
    update = AttackTarget.from_update(
        model, state, moved, (1, 28, 28), lr=0.1, local_steps=3
    )
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).double()
    fc_target = AttackTarget.from_gradients(
        mlp, _gradient(mlp, fashion4[:1], torch.tensor([0])), (1, 28, 28)
    )

    # Act
    on_update = ConvInversion().applicability(update)
    on_mlp = ConvInversion().applicability(fc_target)

    # Assert
    assert not on_update and "multi-step update" in on_update.reason
    assert not on_mlp and "Conv1d/nn.Conv2d" in on_mlp.reason


def test_options_are_checked_and_the_attack_is_registered():
    # Arrange / Act / Assert
    with pytest.raises(InvalidInputError) as err:
        ConvInversion(dense_limit=-1, max_batch=-1, weight_equations="yes", tolerance=2)  # type: ignore[arg-type]
    assert len(err.value.problems) == 4
    assert "tolerance" in str(err.value)
    assert isinstance(create_attack("conv_inversion"), ConvInversion)


def test_summary_carries_every_solve(fashion4):
    # Arrange
    x = fashion4[:1]
    model = _conv_classifier(x, 8, 5, 1, 0)

    # Act
    summary = _attack(model, x).summary()

    # Assert
    assert summary["certified"] == 1
    assert summary["solves"][0]["rank"] == 784
    assert summary["solves"][0]["exact"] is True


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(
            3, 24, 3, padding="same", padding_mode="reflect", dilation=2, groups=3
        ),
        nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular", bias=False),
    ],
    ids=["groups-dilation-reflect", "circular-no-bias"],
)
def test_general_convolutions_with_kernel_equations(conv):
    # Arrange: 16x16 photo, conv -> ReLU -> FC; the kernel rows follow the padding
    x = load_samples("photos", 1, size=16, seed=2).inputs.double()
    with torch.no_grad():
        features = conv(x.float()).numel()
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(features, 10))
    model = model.double()

    # Act
    result = _attack(model, x)

    # Assert
    (solve,) = result.solves
    assert solve.weight_equations == conv.weight.numel()
    assert result.num_certified == 1
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 100.0


@pytest.mark.parametrize(
    ("conv", "in_shape"),
    [
        (nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 9, 8)),
        (
            nn.Conv2d(
                4,
                6,
                (3, 2),
                dilation=(2, 1),
                groups=2,
                padding=2,
                padding_mode="reflect",
            ),
            (4, 7, 6),
        ),
        (
            nn.Conv2d(2, 5, 3, padding="same", padding_mode="circular", bias=False),
            (2, 5, 6),
        ),
        (nn.Conv1d(2, 3, 5, stride=3, padding=2), (2, 17)),
    ],
)
def test_a_convolutions_written_matrix_is_the_convolution(conv, in_shape):
    # Arrange
    torch.manual_seed(0)
    conv = conv.double()
    v = torch.randn(3, *in_shape, dtype=torch.float64)
    # Act
    op = conv_operator(conv, in_shape)
    # Assert
    with torch.no_grad():
        want = conv(v).flatten(1).numpy()
    got = (op.A @ v.flatten(1).numpy().T).T + op.b
    assert op.A.shape == (want.shape[1], v[0].numel())
    assert abs(got - want).max() <= 1e-12 * abs(want).max()


def test_a_loose_tolerance_gives_a_close_uncertified_input(fashion4):
    # Arrange: one garment, conv -> ReLU -> FC, every solve by LSMR
    x = fashion4[:1]
    model = _conv_classifier(x, 8, 5, 1, 0)
    # Act
    exact = _attack(model, x, dense_limit=0)
    loose = _attack(model, x, dense_limit=0, tolerance=1e-6)
    # Assert: machine precision is certified; the loose solve is close, not exact
    psnr = [
        match_inputs(r.inputs, x, data_range=1.0).scores[0].psnr for r in (exact, loose)
    ]
    assert exact.certificates == ["rank+residual"] and psnr[0] >= 100.0
    assert loose.certificates == [""] and 30.0 <= psnr[1] < psnr[0]
    assert exact.solves[0].solver == loose.solves[0].solver == "lsmr"


def test_an_underdetermined_walk_stops_when_asked(fashion4):
    # Arrange: 4 stride-2 filters see 784 pixels through at most 4 * 14 * 14
    # = 784 outputs (about half kept by the ReLU) + 100 kernel equations
    x = fashion4[:1]
    model = _conv_classifier(x, 4, 5, 2, 2)
    # Act
    solved = _attack(model, x)
    stopped = _attack(model, x, stop_underdetermined=True)
    # Assert
    assert solved.solves[0].solver == "cholesky"
    (skip,) = stopped.solves
    assert skip.solver == "skipped" and not stopped.certified.any()
    assert skip.kept + skip.weight_equations < skip.unknowns == 784
    assert any("the walk down stops there" in n for n in stopped.notes)


def test_the_time_budget_skips_the_solves_it_cannot_fit(fashion4):
    # Arrange: a two-convolution chain; a budget too small for any solve
    x = fashion4[:1]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 22 * 22, 10),
    ).double()
    # Act
    result = _attack(model, x, time_budget_s=1e-9, dense_limit=0)
    # Assert: the first solve is skipped and said so; nothing is certified
    (skip,) = result.solves
    assert skip.solver == "skipped" and not result.certified.any()
    assert result.residual is None  # nothing was solved
    assert any("the time budget ran out before" in n for n in result.notes)
    with pytest.raises(InvalidInputError, match="time_budget_s"):
        ConvInversion(time_budget_s=0)


@pytest.mark.parametrize(
    "act",
    [nn.Sigmoid, nn.Tanh, lambda: nn.LeakyReLU(0.2)],
    ids=["sigmoid", "tanh", "leaky"],
)
def test_a_short_layer_is_solved_jointly_with_the_one_below(act):
    # Arrange: an ECG window behind DLG's 1-D LeNet (three 5-tap convolutions
    # with a smooth activation, DLG's U(-0.5, 0.5) weights): the stride-2 second
    # convolution has 12 * 64 outputs + 720 kernel equations for 12 * 128
    # inputs, but those inputs are sigmoid(conv1(x)) of a 256-sample window
    x = load_samples("ecg", 1, seed=4).inputs.double()  # (1, 1, 256)
    torch.manual_seed(0)
    body = [nn.Conv1d(1, 12, 5, padding=2, stride=2), act()]
    body += [nn.Conv1d(12, 12, 5, padding=2, stride=2), act()]
    body += [nn.Conv1d(12, 12, 5, padding=2), act(), nn.Flatten()]
    model = nn.Sequential(*body, nn.Linear(12 * 64, 10)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    # Act
    result = _attack(model, x)
    # Assert: one Gauss-Newton solve for the two lower convolutions, certified
    assert result.certificates == ["rank+residual"]
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 100.0
    top, joint = result.solves
    assert top.solver == "cholesky" and joint.solver == "gauss-newton"
    assert joint.kept + joint.weight_equations == 12 * 64 + 720 < 12 * 128
    assert joint.rank == joint.unknowns == 256 and joint.residual <= 1e-11


def test_a_layer_short_of_rank_is_solved_jointly(digits):
    # Arrange: an 8x8 digit behind two 3x3 sigmoid convolutions (DLG's
    # weights): the stride-2 one has 420 equations for 384 unknowns but
    # rank 336 (its kernel rows leave one stride phase short)
    x = digits.inputs[2:3].double()
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(6, 6, 3, padding=1, stride=2),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(6 * 16, 10),
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    # Act
    result = _attack(model, x)
    # Assert
    assert result.certificates == ["rank+residual"]
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 100.0
    (joint,) = result.solves
    assert joint.solver == "gauss-newton" and joint.rank == 64
    assert any("has rank" in n and "solved jointly" in n for n in result.notes)


def test_float32_kernel_equations_survive_their_rounding():
    # Arrange: a garment behind DLG's LeNet in float32, as clients send it.
    # The error pushed down to the second convolution misses its observed
    # bias gradient by 1.3e-6 (rounding), which once dropped its kernel
    # equations and left that layer under-determined (-7 dB)
    x = load_samples("fashion_mnist", 2, seed=3).inputs[1:2]
    torch.manual_seed(101)
    body = [nn.Conv2d(1, 12, 5, padding=2, stride=2), nn.Sigmoid()]
    body += [nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid()]
    body += [nn.Conv2d(12, 12, 5, padding=2), nn.Sigmoid(), nn.Flatten()]
    model = nn.Sequential(*body, nn.Linear(12 * 7 * 7, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    # Act
    result = _attack(model, x)
    # Assert
    assert result.certificates == ["rank+residual"], result.notes
    assert all(s.weight_equations > 0 for s in result.solves)
    assert match_inputs(result.inputs, x, data_range=1.0).scores[0].psnr >= 60.0
