"""Tests for fl_audit.bounds: each verdict, its boundaries and the risk level."""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fl_audit.attacks import AttackTarget, ConvInversion
from fl_audit.bounds import (
    HOLDING_FRACTION,
    RANK_RTOL,
    CapacityReport,
    _typical_rank,
    analyze,
)
from fl_audit.data import load_samples
from fl_audit.errors import InvalidInputError, ShapeError

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _fashion(count: int) -> torch.Tensor:
    """The first ``count`` Fashion-MNIST test images, float64 in [0, 1]."""
    if not FASHION.exists():
        pytest.skip(f"{FASHION} not installed (Debian package dataset-fashion-mnist)")
    with gzip.open(FASHION, "rb") as fh:
        raw = fh.read(16 + count * 784)
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).astype(np.float64)
    return torch.from_numpy(pixels / 255.0).reshape(count, 1, 28, 28)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test builds its layers from the same random weights."""
    torch.manual_seed(0)


def _mlp(h: int, bias: bool = True, d: int = 784) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, h, bias=bias), nn.ReLU(), nn.Linear(h, 10)
    )


def _dense_rank(conv: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Rank of the layer's linear map: SVD of its dense Jacobian (reference)."""
    lin = copy.deepcopy(conv).double().requires_grad_(False)
    jac = torch.func.jacrev(lin)(torch.zeros((1, *in_shape), dtype=torch.float64))
    sv = np.linalg.svd(
        jac.reshape(-1, int(np.prod(in_shape))).numpy(), compute_uv=False
    )
    return int((sv > RANK_RTOL * sv[0]).sum())


# --------------------------------------------------------------------------
# Fully-connected first layer


def test_fc_one_input_with_bias_is_exact() -> None:
    # Arrange
    model = _mlp(h=8)

    # Act
    report = analyze(model, (1, 28, 28))

    # Assert
    v = report.verdict("fc_single_input")
    assert (v.holds, v.required, v.actual, v.source) == (True, 1, 8, "seed theorem 1")
    assert v.quantities == {"h": 8, "d": 784, "bias": True}
    assert "exactly" in v.outcome
    assert report.first_layer.path == "1"
    assert report.risk == "exposed"


def test_fc_one_input_formula_recovers_a_real_image() -> None:
    # Arrange: the verdict's formula, applied to a real gradient.
    x = _fashion(1).float()
    model = _mlp(h=8)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([3]))
    gw, gb = torch.autograd.grad(loss, [model[1].weight, model[1].bias])

    # Act
    unit = int(gb.abs().argmax())
    recovered = gw[unit] / gb[unit]  # (784,)

    # Assert
    assert analyze(model, (1, 28, 28)).verdict("fc_single_input").holds
    assert torch.allclose(recovered, x.reshape(-1), atol=1e-5)


def test_fc_one_input_without_bias_is_up_to_scale() -> None:
    report = analyze(_mlp(h=8, bias=False), (1, 28, 28))

    v = report.verdict("fc_single_input")
    assert v.holds is True
    assert v.quantities["bias"] is False
    assert "up to scale" in v.outcome
    assert report.first_layer.bias_name is None
    assert "up to scale" in report.risk_reason


@pytest.mark.parametrize(
    ("batch", "holds", "risk"),
    [(15, True, "exposed"), (16, True, "exposed"), (17, False, "partially_exposed")],
)
def test_fc_batch_boundary_h_equals_b(batch: int, holds: bool, risk: str) -> None:
    report = analyze(_mlp(h=16), (1, 28, 28), batch_size=batch)

    v = report.verdict("fc_batch")
    assert (v.holds, v.required, v.actual) == (holds, batch, 16)
    assert v.source == "seed theorem 2"
    assert report.risk == risk


@pytest.mark.parametrize("batch", [15, 16, 17])
def test_fc_batch_verdict_matches_gradient_rank_on_real_images(batch: int) -> None:
    # Arrange: a batch of real images, mean cross-entropy, h = 16 units.
    h = 16
    model = _mlp(h=h).double()
    x = _fashion(batch)
    labels = torch.arange(batch) % 10

    # Act
    loss = nn.functional.cross_entropy(model(x), labels)
    (gw,) = torch.autograd.grad(loss, [model[1].weight])  # (h, 784)
    rank = int(torch.linalg.matrix_rank(gw))
    verdict = analyze(model, (1, 28, 28), batch_size=batch).verdict("fc_batch")

    # Assert: rank(dL/dW) = min(B, h), and equals B exactly when h >= B.
    assert rank == min(batch, h)
    assert verdict.holds == (rank == batch)


def test_fc_batch_not_evaluated_without_batch_size() -> None:
    report = analyze(_mlp(h=4), (784,))

    v = report.verdict("fc_batch")
    assert v.holds is None and v.required is None
    assert "batch_size" in v.note
    assert "worst case" in report.risk_reason
    with pytest.raises(KeyError, match="fc_fedavg.*fc_single_input"):
        report.verdict("fc_fedavg")


@pytest.mark.parametrize(
    ("examples", "holds", "risk"),
    [(63, True, "exposed"), (64, True, "exposed"), (65, False, "partially_exposed")],
)
def test_fc_fedavg_uses_local_examples(examples: int, holds: bool, risk: str) -> None:
    report = analyze(_mlp(h=64), (1, 28, 28), batch_size=8, local_examples=examples)

    v = report.verdict("fc_fedavg")
    assert (v.holds, v.required, v.actual) == (holds, examples, 64)
    assert report.verdict("fc_batch").holds is True
    assert report.risk == risk
    assert f"N = {examples}" in report.risk_reason


def test_fc_batch_larger_than_input_is_partial() -> None:
    report = analyze(_mlp(h=64, d=10), (10,), batch_size=32)

    assert report.verdict("fc_batch").holds is True
    assert "> d = 10" in report.verdict("fc_batch").note
    assert report.risk == "partially_exposed"


# --------------------------------------------------------------------------
# Convolutional first layer


def _cnn(conv: nn.Module) -> nn.Module:
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten())


@pytest.mark.parametrize(
    ("h", "v1", "per_sample"), [(5, False, True), (6, True, True), (7, True, True)]
)
def test_conv_stride1_seed_v1_boundary(h: int, v1: bool, per_sample: bool) -> None:
    # 28x28 -> 24x24: (d/d')^2 * B * C = 784/576 * 4 -> 6 filters.
    report = analyze(_cnn(nn.Conv2d(1, h, 5)), (1, 28, 28), batch_size=4)

    seed = report.verdict("conv_seed_v1")
    assert (seed.required, seed.actual, seed.holds) == (6, h, v1)
    assert seed.quantities["d"] == [28, 28] and seed.quantities["d'"] == [24, 24]
    assert seed.quantities["B"] == 4 and seed.quantities["C"] == 1
    assert report.verdict("conv_per_sample").required == 2
    assert report.verdict("conv_per_sample").holds is per_sample


def test_conv_stride1_count_is_not_sufficient() -> None:
    # Arrange: two 5x5 filters give 1152 outputs for 784 unknowns.
    conv = nn.Conv2d(1, 2, 5)

    # Act
    report = analyze(_cnn(conv), (1, 28, 28))

    # Assert: the count holds, yet the operator loses 32 directions.
    assert report.verdict("conv_per_sample").holds is True
    rank = report.verdict("conv_exact_rank")
    assert rank.actual == _dense_rank(conv, (1, 28, 28)) == 752
    assert rank.holds is False
    assert report.risk == "partially_exposed"


@pytest.mark.parametrize(("h", "holds"), [(3, False), (4, True), (5, True)])
def test_conv_stride2_per_sample_boundary(h: int, holds: bool) -> None:
    # 28x28, k=5, s=2, p=2 -> 14x14: 784 / 196 * C = 4 filters.
    conv = nn.Conv2d(1, h, 5, stride=2, padding=2)

    report = analyze(_cnn(conv), (1, 28, 28), batch_size=1)

    per_sample = report.verdict("conv_per_sample")
    assert (per_sample.required, per_sample.holds) == (4, holds)
    assert per_sample.quantities["s"] == [2, 2] and per_sample.quantities["p"] == [2, 2]
    rank = report.verdict("conv_exact_rank")
    assert rank.actual == _dense_rank(conv, (1, 28, 28))
    assert rank.holds is (rank.actual == 784)
    assert report.risk == ("exposed" if rank.holds else "partially_exposed")


def test_conv_stride2_rank_is_full_one_filter_past_the_count() -> None:
    # At h = 4 the operator is square and often worse conditioned than
    # RANK_RTOL; one filter more it is full rank with a wide margin.
    low = analyze(nn.Conv2d(1, 3, 5, stride=2, padding=2), (1, 28, 28))
    high = analyze(nn.Conv2d(1, 5, 5, stride=2, padding=2), (1, 28, 28))

    assert low.verdict("conv_exact_rank").actual == 3 * 196
    assert high.verdict("conv_exact_rank").holds is True
    assert (low.risk, high.risk) == ("partially_exposed", "exposed")


@pytest.mark.parametrize("h", [3, 4, 5])
def test_conv_exact_rank_predicts_least_squares_on_real_images(h: int) -> None:
    # Arrange: real images through the layer alone (no bias, no ReLU).
    conv = nn.Conv2d(1, h, 5, stride=2, padding=2, bias=False).double()
    x = _fashion(4)
    a = torch.func.jacrev(conv)(torch.zeros(1, 1, 28, 28, dtype=torch.float64))
    a = a.reshape(-1, 784)  # (h * 196, 784)

    # Act
    z = conv(x).reshape(4, -1).detach()  # (4, h * 196)
    solution = torch.linalg.lstsq(
        a.detach(), z.T, rcond=RANK_RTOL, driver="gelsd"
    ).solution.T
    error = float((solution - x.reshape(4, -1)).abs().max())
    verdict = analyze(conv, (1, 28, 28)).verdict("conv_exact_rank")

    # Assert: least squares (cut at RANK_RTOL) is exact when the verdict holds.
    assert verdict.holds is (error < 1e-8)
    assert error < 1e-8 or error > 1e-2


def test_conv_padding_same_size_output() -> None:
    conv = nn.Conv2d(3, 3, 3, padding=1)

    report = analyze(_cnn(conv), (3, 12, 12), batch_size=2)

    assert report.first_layer.out_shape == [3, 12, 12]
    assert report.verdict("conv_per_sample").required == 3
    assert report.verdict("conv_seed_v1").required == 6
    assert report.verdict("conv_exact_rank").actual == _dense_rank(conv, (3, 12, 12))


def test_conv_padding_string_and_reflect_mode() -> None:
    conv = nn.Conv2d(1, 2, 3, padding="same", padding_mode="reflect")

    report = analyze(_cnn(conv), (1, 10, 10))

    assert report.first_layer.out_shape == [2, 10, 10]
    assert report.verdict("conv_per_sample").quantities["p"] == "same"
    assert report.verdict("conv_coverage").actual == 0
    assert report.verdict("conv_exact_rank").actual == _dense_rank(conv, (1, 10, 10))


def test_conv_stride_beyond_kernel_leaves_pixels_uncovered() -> None:
    # k=2, s=3 on 8x8: rows/cols {0,1,3,4,6,7} are read, 28 of 64 pixels not.
    conv = nn.Conv2d(1, 40, 2, stride=3)

    report = analyze(_cnn(conv), (1, 8, 8))

    coverage = report.verdict("conv_coverage")
    assert (coverage.actual, coverage.holds) == (28, False)
    assert report.verdict("conv_per_sample").holds is True
    assert report.verdict("conv_exact_rank").actual == 36
    assert report.risk == "partially_exposed"


def test_conv_non_square_input_uses_area_ratio() -> None:
    # 20x12, k=3, s=2 -> 9x5: ceil(240 / 45 * C) = 6 filters per sample.
    conv = nn.Conv2d(1, 6, 3, stride=2)

    report = analyze(_cnn(conv), (1, 20, 12), batch_size=2)

    per_sample = report.verdict("conv_per_sample")
    assert per_sample.quantities["d"] == [20, 12]
    assert per_sample.quantities["d'"] == [9, 5]
    assert (per_sample.required, per_sample.holds) == (6, True)
    assert report.verdict("conv_seed_v1").required == 11
    assert report.verdict("conv_exact_rank").actual == _dense_rank(conv, (1, 20, 12))


@pytest.mark.parametrize(("h", "holds"), [(4, False), (5, True)])
def test_conv1d_uses_lengths_without_square(h: int, holds: bool) -> None:
    # C=2, L=48, k=4, s=2 -> L'=23: ceil(2 * 48 / 23) = 5 filters.
    conv = nn.Conv1d(2, h, 4, stride=2)

    report = analyze(_cnn(conv), (2, 48), batch_size=3)

    per_sample = report.verdict("conv_per_sample")
    assert per_sample.quantities["d"] == 48 and per_sample.quantities["d'"] == 23
    assert per_sample.formula == "h >= (d/d') * C"
    assert (per_sample.required, per_sample.holds) == (5, holds)
    assert report.verdict("conv_seed_v1").required == 13
    assert report.verdict("conv_coverage").actual == 0
    assert report.verdict("conv_exact_rank").actual == _dense_rank(conv, (2, 48))


def test_conv1d_stride_leaves_last_sample_uncovered() -> None:
    conv = nn.Conv1d(2, 8, 5, stride=2)  # L=50 -> 23 outputs, sample 49 unread

    report = analyze(_cnn(conv), (2, 50))

    assert report.verdict("conv_coverage").actual == 2
    assert report.verdict("conv_exact_rank").actual == 98


def test_conv_groups_and_dilation_rank_matches_dense() -> None:
    conv = nn.Conv2d(4, 8, 3, dilation=2, groups=2)

    report = analyze(_cnn(conv), (4, 9, 9))

    rank = report.verdict("conv_exact_rank")
    assert rank.quantities["groups"] == 2 and rank.quantities["dilation"] == [2, 2]
    assert rank.actual == _dense_rank(conv, (4, 9, 9))


def test_conv_wide_operator_uses_smaller_gram() -> None:
    # m = 2 * 4 * 4 = 32 outputs < n = 100 unknowns: rank <= 32.
    conv = nn.Conv2d(1, 2, 4, stride=2)

    report = analyze(_cnn(conv), (1, 10, 10))

    assert report.verdict("conv_exact_rank").actual == _dense_rank(conv, (1, 10, 10))


def test_conv_exact_rank_declines_above_limit() -> None:
    # Arrange: counts hold, the rank is too large to compute under the limit.
    model = _cnn(nn.Conv2d(1, 8, 3, padding=1))

    # Act
    report = analyze(model, (1, 28, 28), exact_rank_limit=100)

    # Assert
    rank = report.verdict("conv_exact_rank")
    assert rank.holds is None and rank.actual is None
    assert "6272 x 784" in rank.note and "100" in rank.note
    assert report.risk == "not_determined"


def test_conv_declined_rank_with_failed_count_is_partial() -> None:
    report = analyze(_cnn(nn.Conv2d(1, 1, 3)), (1, 28, 28), exact_rank_limit=10)

    assert report.verdict("conv_exact_rank").holds is None
    assert report.verdict("conv_per_sample").holds is False
    assert report.risk == "partially_exposed"


# --------------------------------------------------------------------------
# Unsupported first layers


class _EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens.long()).mean(1))


@pytest.mark.parametrize(
    ("model", "shape", "path", "module"),
    [
        (_EmbeddingModel(), (12,), "embed", "Embedding"),
        (
            nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3)),
            (1, 8, 8),
            "0",
            "BatchNorm2d",
        ),
        (nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 4)), (16,), "0", "LayerNorm"),
        (nn.Sequential(nn.Conv3d(1, 2, 3)), (1, 6, 6, 6), "0", "Conv3d"),
    ],
)
def test_unsupported_first_layer_names_the_module(
    model: nn.Module, shape: tuple[int, ...], path: str, module: str
) -> None:
    report = analyze(model, shape, batch_size=4)

    assert report.risk == "unsupported"
    assert [v.name for v in report.verdicts] == ["unsupported_first_layer"]
    v = report.verdicts[0]
    assert v.holds is False
    assert v.quantities == {"path": path, "module": module}
    assert f"{path} ({module})" in v.note
    assert report.first_layer.out_shape is None


def test_transformed_input_is_unsupported() -> None:
    # A parameter-free scaling before the Linear: not the raw input.
    model = nn.Sequential(
        nn.Flatten(), nn.Dropout(0.0), nn.Hardtanh(0, 0.5), nn.Linear(16, 4)
    )

    report = analyze(model, (16,))

    assert report.risk == "unsupported"
    assert "transformed" in report.risk_reason


# --------------------------------------------------------------------------
# Behind a ReLU: the exact rank on the outputs the activation keeps


def _relu_cnn(h: int, seed: int) -> nn.Module:
    """The bench's C=1 28x28 k5 s2 p2 model: conv -> ReLU -> flatten -> FC."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(1, h, 5, stride=2, padding=2)
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(h * 196, 10)).double()


def _restricted_dense_rank(model: nn.Module, x: torch.Tensor) -> int:
    """Reference: SVD of the dense Jacobian of conv(+pool) on its positive outputs."""
    segment = model[:-3]  # everything below the ReLU
    jac = torch.func.jacrev(lambda v: segment(v).reshape(-1))(x)
    jac = jac.reshape(-1, x.numel())  # (m, n)
    rows = segment(x).reshape(-1) > 0
    sv = np.linalg.svd(jac[rows].detach().numpy(), compute_uv=False)
    return int((sv > RANK_RTOL * sv[0]).sum()) if sv.size else 0


def _inverted(model: nn.Module, x: torch.Tensor) -> tuple[bool, float]:
    """ConvInversion (no kernel equations) on the gradient of one sample."""
    loss = nn.functional.cross_entropy(model(x), torch.tensor([3]))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    named = {n: g for (n, _), g in zip(model.named_parameters(), grads, strict=True)}
    target = AttackTarget.from_gradients(model, named, tuple(x.shape[1:]))
    result = ConvInversion(weight_equations=False).run(target)
    error = float((result.inputs - x).abs().max())
    return bool(result.certified[0]), error


@pytest.mark.parametrize(("h", "holds"), [(8, False), (10, True)])
def test_relu_rank_holds_from_the_measured_threshold_on_real_images(
    h: int, holds: bool
) -> None:
    # Arrange: the bench measured exact inversions from h = 10 for this
    # configuration, while the rank of the whole operator holds from h = 8.
    model = _relu_cnn(h, seed=h)
    probe = load_samples("fashion_mnist", 3, seed=5).inputs.double()

    # Act
    plain = analyze(model, (1, 28, 28))
    report = analyze(model, (1, 28, 28), probe=probe)
    certified, error = _inverted(model, probe[:1])

    # Assert: the old verdict holds at both h; the new one follows the attack.
    assert plain.verdict("conv_exact_rank").holds is True
    assert plain.risk == "exposed"
    verdict = report.verdict("conv_exact_rank_relu")
    assert verdict.holds is holds
    assert verdict.quantities["probes"] == 3
    assert verdict.quantities["full_rank_probes"] == (3 if holds else 0)
    assert (verdict.actual == 784) is holds
    assert report.risk == ("exposed" if holds else "partially_exposed")
    assert certified is holds
    assert (error < 1e-8) is holds
    # Without a probe nothing changes: same verdicts, same names.
    assert [v.name for v in report.verdicts] == [
        *(v.name for v in plain.verdicts),
        "conv_exact_rank_relu",
    ]
    assert report.verdicts[:-1] == plain.verdicts


def test_relu_rank_matches_dense_reference_through_pooling() -> None:
    # Arrange: conv -> AvgPool -> ReLU; 2 filters keep fewer rows than
    # unknowns (the wide Gram), 6 filters more (the tall one).
    x = load_samples("cells", 2, size=12, seed=1).inputs.double()
    ranks, kept = {}, {}
    for h in (2, 6):
        torch.manual_seed(h)
        model = nn.Sequential(
            nn.Conv2d(1, h, 3, padding=1),
            nn.AvgPool2d(2, stride=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(h * 121, 4),
        ).double()

        # Act
        verdict = analyze(model, (1, 12, 12), probe=x).verdict("conv_exact_rank_relu")

        # Assert: one rank per probe input, as the dense SVD gives it.
        want = [_restricted_dense_rank(model, x[i : i + 1]) for i in range(2)]
        assert verdict.quantities["probe_ranks"] == want
        assert "AvgPool2d" in str(verdict.quantities["layers"])
        ranks[h], kept[h] = want, verdict.quantities["probe_kept"]
    assert max(kept[2]) < 144 < min(kept[6])  # type: ignore[type-var]
    assert max(ranks[2]) < 144 and min(ranks[6]) > max(ranks[2])


@pytest.mark.parametrize(
    ("after", "match"),
    [
        (nn.LeakyReLU(0.1), "LeakyReLU\\) zeroes no output"),
        (nn.Tanh(), "Tanh\\) zeroes no output"),
        (nn.Identity(), "reaches 3 \\(Linear\\) with no activation"),
        (nn.MaxPool2d(2), "max pooling"),
    ],
)
def test_relu_rank_not_applicable_without_a_zeroing_activation(
    after: nn.Module, match: str
) -> None:
    # Arrange
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3)
    features = conv(torch.zeros(1, 1, 10, 10)).numel()
    if isinstance(after, nn.MaxPool2d):
        features //= 4
    model = nn.Sequential(conv, after, nn.Flatten(), nn.Linear(features, 3))
    probe = load_samples("cells", 2, size=10, seed=0).inputs

    # Act
    plain = analyze(model, (1, 10, 10))
    report = analyze(model, (1, 10, 10), probe=probe)

    # Assert: no verdict either way, the risk of the plain rank stands.
    verdict = report.verdict("conv_exact_rank_relu")
    assert (verdict.holds, verdict.actual, verdict.outcome) == (
        None,
        None,
        "not applicable",
    )
    assert re.search(match, verdict.note)
    assert report.risk == plain.risk


def test_relu_rank_counts_leaky_relu_with_zero_slope_and_respects_the_limit() -> None:
    # Arrange
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.LeakyReLU(0.0), nn.Flatten(), nn.Linear(6 * 64, 3)
    )
    probe = load_samples("cells", 2, size=10, seed=0).inputs

    # Act
    report = analyze(model, (1, 10, 10), probe=probe)
    declined = analyze(model, (1, 10, 10), probe=probe, exact_rank_limit=50)

    # Assert
    verdict = report.verdict("conv_exact_rank_relu")
    assert verdict.holds is not None and verdict.quantities["activation"] == (
        "1 (LeakyReLU)"
    )
    assert len(verdict.quantities["probe_kept"]) == 2  # type: ignore[arg-type]
    assert CapacityReport.model_validate_json(report.to_json()) == report
    late = declined.verdict("conv_exact_rank_relu")
    assert late.holds is None and "exact_rank_limit" in late.note


def test_probe_is_ignored_for_a_fully_connected_first_layer() -> None:
    probe = load_samples("fashion_mnist", 2, seed=0).inputs

    report = analyze(_mlp(8), (1, 28, 28), probe=probe)

    assert report == analyze(_mlp(8), (1, 28, 28))


@pytest.mark.parametrize(
    ("probe", "error", "match"),
    [
        ([[0.0] * 100], InvalidInputError, "probe must be a torch.Tensor.*got list"),
        ("images", InvalidInputError, "got str; stack the inputs"),
        (
            torch.zeros(2, 1, 10, 10, dtype=torch.uint8),
            InvalidInputError,
            "floating point.*torch.uint8.*/ 255",
        ),
        (
            torch.full((2, 1, 10, 10), float("nan")),
            InvalidInputError,
            "200 NaN or infinite value",
        ),
        (torch.zeros(1, 10, 10), ShapeError, r"got \(1, 10, 10\).*unsqueeze\(0\)"),
        (torch.zeros(2, 3, 10, 10), ShapeError, r"\(P, 1, 10, 10\), got \(2, 3"),
        (torch.zeros(0, 1, 10, 10), ShapeError, "at least one input"),
    ],
)
def test_bad_probe_raises_a_typed_error_with_the_fix(
    probe: object, error: type[Exception], match: str
) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten())

    with pytest.raises(error, match=match) as info:
        analyze(model, (1, 10, 10), probe=probe)  # type: ignore[arg-type]

    assert "probe" in str(info.value)


# --------------------------------------------------------------------------
# Behind a ReLU: kernel-gradient rows and the holding rule


def _stride1_cnn(h: int) -> nn.Module:
    """The bench's C=1 28x28 k5 s1 model: conv -> ReLU -> flatten -> FC."""
    torch.manual_seed(h)
    conv = nn.Conv2d(1, h, 5)
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(h * 576, 10)).double()


def _attack_one(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kernel: bool
) -> tuple[bool, int | None]:
    """ConvInversion on the gradient of one sample: certified, and its solve's rank."""
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    named = {n: g for (n, _), g in zip(model.named_parameters(), grads, strict=True)}
    target = AttackTarget.from_gradients(model, named, tuple(x.shape[1:]))
    result = ConvInversion(weight_equations=kernel).run(target)
    return bool(result.certified[0]), result.solves[0].rank


def test_kernel_rows_make_the_relu_rank_hold_where_the_plain_rank_does_not() -> None:
    # Arrange: 2 filters of 5x5, stride 1 on Fashion-MNIST: behind the ReLU the
    # kept outputs alone determine no input; the kernel gradient's 50 rows
    # (one sample) complete most of them.
    model = _stride1_cnn(2)
    x = load_samples("fashion_mnist", 4, seed=21).inputs.double()
    y = torch.arange(4)

    # Act
    report = analyze(model, (1, 28, 28), batch_size=1, probe=x, probe_labels=y)
    attacks = [
        [_attack_one(model, x[i : i + 1], y[i : i + 1], kernel) for i in range(4)]
        for kernel in (False, True)
    ]

    # Assert: holds reads the rank with the kernel rows, which is the rank of
    # the very system ConvInversion solves, sample by sample.
    verdict = report.verdict("conv_exact_rank_relu")
    q = verdict.quantities
    assert q["kernel_equations"] is True and q["kernel_rows"] == 50
    assert q["probe_labels"] == [0, 1, 2, 3] and q["probe_label_source"] == "given"
    assert q["full_rank_probes"] == 0
    assert max(q["probe_ranks"]) < 784  # type: ignore[type-var, arg-type]
    assert q["full_rank_probes_kernel"] == 3
    assert verdict.holds is True and verdict.actual == 784
    assert report.risk == "exposed" and "kernel gradient" in report.risk_reason
    assert [rank for _, rank in attacks[1]] == q["probe_ranks_kernel"]
    assert [ok for ok, _ in attacks[0]] == [False] * 4
    assert [ok for ok, _ in attacks[1]] == [r == 784 for r in q["probe_ranks_kernel"]]
    assert CapacityReport.model_validate_json(report.to_json()) == report


@pytest.mark.parametrize(
    ("batch_size", "local_examples", "used"),
    [(1, None, True), (None, None, True), (4, None, False), (1, 3, False)],
)
def test_kernel_rows_only_for_a_single_sample_gradient(
    batch_size: int | None, local_examples: int | None, used: bool
) -> None:
    # Arrange: the model of the test above; a batch's kernel gradient sums its
    # samples, so only B_eff = 1 (unknown counts as one, the worst case) adds
    # the rows.
    model = _stride1_cnn(2)
    x = load_samples("fashion_mnist", 2, seed=21).inputs.double()

    # Act
    report = analyze(
        model,
        (1, 28, 28),
        batch_size=batch_size,
        local_examples=local_examples,
        probe=x,
    )

    # Assert: the rank without the rows is always there; holds reads it for a
    # batch, and the rows' reading is absent, not merely ignored.
    verdict = report.verdict("conv_exact_rank_relu")
    q = verdict.quantities
    assert q["kernel_equations"] is used
    assert max(q["probe_ranks"]) < 784  # type: ignore[type-var, arg-type]
    if used:
        assert q["probe_label_source"] == "model prediction"
        assert len(q["probe_labels"]) == 2  # type: ignore[arg-type]
        assert q["full_rank_probes_kernel"] == 2
        assert verdict.holds is True and report.risk == "exposed"
        assert verdict.formula.startswith("rank([A_+; E])")
    else:
        assert q["probe_ranks_kernel"] is None and q["kernel_rows"] is None
        assert verdict.holds is False and report.risk == "partially_exposed"
        assert verdict.actual == max(q["probe_ranks"])  # type: ignore[type-var, arg-type]
        assert "kernel gradients sum" in verdict.note


def test_relu_rank_holds_when_most_probe_inputs_are_determined() -> None:
    # Arrange: 3 filters, stride 1: 3 of these 4 images are determined by the
    # kept outputs alone, the fourth is not (batch of 2: no kernel rows).
    model = _stride1_cnn(3)
    x = load_samples("fashion_mnist", 4, seed=21).inputs.double()
    y = torch.arange(4)

    # Act
    report = analyze(model, (1, 28, 28), batch_size=2, probe=x)
    few = analyze(model, (1, 28, 28), batch_size=2, probe=x[3:])
    certified = [
        _attack_one(model, x[i : i + 1], y[i : i + 1], False)[0] for i in range(4)
    ]

    # Assert: at least half determined: holds, and the attack (no kernel
    # equations) certifies exactly the determined inputs.
    verdict = report.verdict("conv_exact_rank_relu")
    q = verdict.quantities
    assert q["full_rank_probes"] == 3 and q["full_rank_fraction"] == 0.75
    assert verdict.holds is True and verdict.actual == 784
    assert "3 of 4" in verdict.outcome and "at least half" in verdict.outcome
    assert report.risk == "exposed"
    assert certified == [r == 784 for r in q["probe_ranks"]]  # type: ignore[union-attr]
    # The undetermined input alone: the verdict fails and says by how much.
    alone = few.verdict("conv_exact_rank_relu")
    assert alone.holds is False and alone.actual == q["probe_ranks"][3]  # type: ignore[index]
    assert few.risk == "partially_exposed"


@given(st.lists(st.booleans(), min_size=1, max_size=12))
def test_typical_rank_is_full_exactly_when_half_the_probes_are(
    full: list[bool],
) -> None:
    ranks = [10 if f else 9 - i % 3 for i, f in enumerate(full)]

    typical = _typical_rank(ranks)

    assert (typical == 10) is (sum(full) >= HOLDING_FRACTION * len(full))
    assert sum(r >= typical for r in ranks) >= HOLDING_FRACTION * len(ranks)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.tensor([0.0, 1.0]), "integer class indices, got dtype torch.float32"),
        (torch.tensor([True, False]), "integer class indices, got dtype torch.bool"),
        (np.array([0.5, 1.0]), "NumPy array of dtype float64"),
        ([0, "cat"], r"class indices \(int\), got \['int', 'str'\]"),
        ([True, 1], r"got \['bool', 'int'\]"),
        (torch.tensor([[0, 1]]), r"1-D .*got shape \(1, 2\); pass class indices"),
        (torch.tensor([0, 1, 2]), "has 3 label\\(s\\) for 2 probe input\\(s\\)"),
        ([0, -1], "non-negative class indices, got -1"),
        ("01", "torch.Tensor, NumPy array or list of class indices, got str"),
        ([0, 4], r"class indices in \[0, 3\) for a model with 3 outputs, got \[4\]"),
    ],
)
def test_bad_probe_labels_raise_a_typed_error_with_the_fix(
    labels: object, match: str
) -> None:
    # Arrange: a single-sample gradient, so the labels are used.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)
    )
    probe = load_samples("cells", 2, size=10, seed=0).inputs

    # Act, Assert
    with pytest.raises(InvalidInputError, match=match) as info:
        analyze(model, (1, 10, 10), batch_size=1, probe=probe, probe_labels=labels)  # type: ignore[arg-type]
    assert "probe_labels" in str(info.value)


def test_probe_labels_without_a_probe_are_rejected() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)
    )

    with pytest.raises(InvalidInputError, match="probe_labels was given without probe"):
        analyze(model, (1, 10, 10), probe_labels=[0, 1])


def test_kernel_rows_left_out_when_the_output_is_not_class_scores() -> None:
    # Arrange: the model ends in the ReLU's flattened output, no classifier.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Unflatten(1, (4, 64))
    )
    probe = load_samples("cells", 2, size=10, seed=0).inputs

    # Act
    verdict = analyze(model, (1, 10, 10), probe=probe).verdict("conv_exact_rank_relu")

    # Assert: the plain reading stands, and the note says why.
    assert verdict.quantities["kernel_equations"] is False
    assert verdict.holds is not None
    assert "not a batch of class scores" in verdict.note


# --------------------------------------------------------------------------
# Arguments, errors and serialisation


def test_bad_arguments_are_all_reported_at_once() -> None:
    with pytest.raises(InvalidInputError) as info:
        analyze(
            _mlp(4),
            (784,),
            batch_size=0,
            local_examples=2.5,  # type: ignore[arg-type]
            exact_rank_limit=True,
        )

    assert len(info.value.problems) == 3
    assert "batch_size must be an int >= 1 or None, got 0" in str(info.value)


def test_local_examples_below_batch_size_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="swapped"):
        analyze(_mlp(4), (784,), batch_size=32, local_examples=8)


def test_not_a_module_is_rejected() -> None:
    with pytest.raises(InvalidInputError, match="torch.nn.Module, got function"):
        analyze(lambda x: x, (784,))  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(), (0, 28), "1,28,28", (1, -28, 28)])
def test_bad_input_shape_raises_shape_error(shape: object) -> None:
    with pytest.raises(ShapeError):
        analyze(_mlp(4), shape)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "shape", "match"),
    [
        (_mlp(4), (1, 27, 27), "expects 784 features.*gives it 729"),
        (_cnn(nn.Conv2d(1, 2, 5)), (3, 28, 28), r"1 channels.*\(3, 28, 28\)"),
        (_cnn(nn.Conv2d(1, 2, 5)), (1, 3, 3), "cannot take"),
        (nn.Sequential(nn.Unflatten(1, (2, 8)), nn.Linear(8, 2)), (15,), "fails"),
    ],
)
def test_model_failing_on_the_shape_raises_shape_error(
    model: nn.Module, shape: tuple[int, ...], match: str
) -> None:
    with pytest.raises(ShapeError, match=match):
        analyze(model, shape)


def test_report_round_trips_through_json() -> None:
    report = analyze(_cnn(nn.Conv2d(3, 8, 3, stride=2)), (3, 16, 16), batch_size=4)

    text = report.to_json()
    again = CapacityReport.model_validate_json(text)

    assert again == report
    data = json.loads(text)
    assert data["risk"] == report.risk
    assert {v["source"] for v in data["verdicts"]} == {
        "seed v1 formula",
        "per-sample count",
        "window coverage",
        "exact rank",
    }


def test_analyze_leaves_the_model_unchanged() -> None:
    model = _cnn(nn.Conv2d(1, 3, 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    analyze(model, (1, 8, 8), batch_size=2)

    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("singular", "expected"),
    [
        ([3.0, 1.0, 1e-3, 2e-5 * 3.0, 0.5e-5 * 3.0], 4),
        ([2.0, 2.0, 2.0], 3),
        ([1.0, 0.0, 0.0, 0.0], 1),
        ([0.0, 0.0, 0.0], 0),
    ],
)
@pytest.mark.parametrize("sparse", [False, True])
def test_gram_rank_counts_singular_values_above_the_tolerance(
    singular, expected, sparse
):
    # Arrange: M = U diag(s) V^T, 6 x k, with singular values either side of
    # RANK_RTOL * s_max
    from fl_audit.bounds import gram_rank

    rng = np.random.default_rng(0)
    k = len(singular)
    u, _ = np.linalg.qr(rng.standard_normal((6, k)))
    v, _ = np.linalg.qr(rng.standard_normal((k, k)))
    M = u @ np.diag(singular) @ v.T

    gram = M.T @ M
    if sparse:
        gram = scipy.sparse.csr_array(gram)

    # Act
    rank, top = gram_rank(gram)

    # Assert
    assert rank == expected
    assert top == pytest.approx(max(singular) ** 2, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize(
    ("gram", "fragment"),
    [
        (np.ones((3, 2)), "square"),
        (np.ones(4), "square"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), "NaN or Inf"),
        (scipy.sparse.csr_array(np.array([[np.inf, 0.0], [0.0, 1.0]])), "NaN or Inf"),
    ],
)
def test_gram_rank_names_a_bad_matrix(gram, fragment):
    from fl_audit.bounds import gram_rank

    with pytest.raises(InvalidInputError, match=fragment):
        gram_rank(gram)
