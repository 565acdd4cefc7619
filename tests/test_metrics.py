"""Tests of fl_audit.metrics on real images and ECG beats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_audit.data import Samples, load_samples
from fl_audit.errors import InvalidInputError, ShapeError
from fl_audit.metrics import MatchReport, match_inputs, psnr


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """12 RGB crops, (12, 3, 32, 32)."""
    return load_samples("photos", 12, seed=0).inputs


@pytest.fixture(scope="module")
def beats() -> torch.Tensor:
    """10 ECG windows, (10, 1, 256)."""
    return load_samples("ecg", 10, seed=0).inputs


def _noisy(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["digits", "fashion_mnist"])
def test_hungarian_matching_recovers_a_permutation(
    source: str, request: pytest.FixtureRequest
) -> None:
    truth = request.getfixturevalue(source).inputs[:32]
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    reconstructed = _noisy(truth[perm], 0.02)  # reconstructed[j] ~ truth[perm[j]]

    report = match_inputs(reconstructed, truth, data_range=1.0)

    expected = torch.argsort(perm).tolist()  # truth i sits at reconstruction j
    assert [s.recon_index for s in report.scores] == expected
    assert [s.truth_index for s in report.scores] == list(range(32))
    assert min(s.psnr for s in report.scores) > 30.0
    assert report.recovered(30.0) == 32 and report.fraction_recovered(30.0) == 1.0


def test_matching_never_gives_one_reconstruction_to_two_truths(digits: Samples) -> None:
    truth = digits.inputs[:8]
    # Every reconstruction is the same image: a greedy nearest match would
    # hand it to all eight truths.
    reconstructed = truth[:1].repeat(8, 1, 1, 1)

    report = match_inputs(reconstructed, truth, data_range=1.0)

    assert sorted(s.recon_index for s in report.scores) == list(range(8))  # type: ignore[type-var]
    assert sum(s.psnr == math.inf for s in report.scores) == 1


def test_fewer_reconstructions_than_truths(digits: Samples) -> None:
    truth = digits.inputs[:5]
    reconstructed = truth[[4, 1, 2]]

    report = match_inputs(reconstructed, truth, data_range=1.0)

    by_truth = {s.truth_index: s for s in report.scores}
    assert len(report.scores) == 5
    assert [by_truth[i].recon_index for i in (1, 2, 4)] == [1, 2, 0]
    assert all(by_truth[i].psnr == math.inf for i in (1, 2, 4))
    for i in (0, 3):  # unmatched: scored against zeros
        assert by_truth[i].recon_index is None
        assert by_truth[i].mse == pytest.approx(float((truth[i].double() ** 2).mean()))
    assert report.recovered() == 3 and report.fraction_recovered() == pytest.approx(0.6)


def test_no_reconstructions_scores_every_truth_against_zeros(digits: Samples) -> None:
    truth = digits.inputs[:3]

    report = match_inputs(truth[:0], truth, data_range=1.0)

    assert [s.recon_index for s in report.scores] == [None, None, None]
    assert report.recovered() == 0


def test_more_reconstructions_than_truths(digits: Samples) -> None:
    truth = digits.inputs[:4]
    reconstructed = torch.cat([digits.inputs[10:16], truth.flip(0)])

    report = match_inputs(reconstructed, truth, data_range=1.0)

    assert [s.recon_index for s in report.scores] == [9, 8, 7, 6]


def test_non_finite_reconstructions_are_scored_not_raised(digits: Samples) -> None:
    truth = digits.inputs[:4]
    reconstructed = truth.clone()
    reconstructed[0, 0, 0, 0] = float("nan")
    reconstructed[1] = float("inf")

    report = match_inputs(reconstructed, truth, data_range=1.0)

    assert all(math.isfinite(s.mse) and not math.isnan(s.psnr) for s in report.scores)
    # The all-inf reconstruction counts as zeros for whichever truth gets it.
    (paired,) = [s for s in report.scores if s.recon_index == 1]
    zeros_mse = float((truth[paired.truth_index].double() ** 2).mean())
    assert paired.mse == pytest.approx(zeros_mse)
    assert report.scores[2].psnr == math.inf and report.scores[3].psnr == math.inf


@settings(max_examples=30, deadline=None)
@given(order=st.permutations(list(range(10))))
def test_matching_is_invariant_to_permuting_reconstructions(
    digits: Samples, order: list[int]
) -> None:
    truth = digits.inputs[:10]
    reconstructed = _noisy(truth, 0.15, seed=3)
    base = match_inputs(reconstructed, truth, data_range=1.0)

    shuffled = match_inputs(reconstructed[order], truth, data_range=1.0)

    # reconstructed[order][j] is reconstructed[order[j]]
    for a, b in zip(base.scores, shuffled.scores, strict=True):
        assert b.recon_index is not None
        assert order[b.recon_index] == a.recon_index
        assert b.mse == a.mse and b.psnr == a.psnr and b.ssim == a.ssim


# ---------------------------------------------------------------------------
# PSNR
# ---------------------------------------------------------------------------


def test_psnr_of_an_exact_copy_is_infinite(photos: torch.Tensor) -> None:
    report = match_inputs(photos.clone(), photos, data_range=1.0)

    assert all(s.mse == 0.0 and s.psnr == math.inf for s in report.scores)
    assert report.median_psnr == math.inf
    assert psnr(0.0, 1.0) == math.inf


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_psnr_of_a_known_shift_matches_the_formula(
    photos: torch.Tensor, data_range: float
) -> None:
    truth = photos.double() * data_range
    shift = 0.05 * data_range  # every value moved: mse = shift ** 2

    report = match_inputs(truth + shift, truth, data_range=data_range)

    expected = 10 * math.log10(data_range**2 / shift**2)  # 26.02 dB
    for s in report.scores:
        assert s.mse == pytest.approx(shift**2)
        assert s.psnr == pytest.approx(expected)
    assert expected == pytest.approx(26.0206, abs=1e-4)


def test_psnr_of_gaussian_noise_matches_its_mse(digits: Samples) -> None:
    truth = digits.inputs[:16]
    reconstructed = _noisy(truth, 0.1)

    report = match_inputs(reconstructed, truth, data_range=1.0)

    for s in report.scores:
        assert s.recon_index is not None
        mse = float(((reconstructed[s.recon_index] - truth[s.truth_index]) ** 2).mean())
        assert s.mse == pytest.approx(mse, rel=1e-5)
        assert s.psnr == pytest.approx(-10 * math.log10(mse), rel=1e-5)
    assert 15.0 < report.median_psnr < 30.0


def test_default_data_range_is_the_span_of_the_truth(digits: Samples) -> None:
    truth = digits.inputs[:8] * 0.5 + 0.25  # spans [0.25, 0.75]

    report = match_inputs(truth + 0.01, truth)

    assert report.data_range == pytest.approx(0.5)
    assert report.scores[0].psnr == pytest.approx(
        10 * math.log10(0.25 / 1e-4), rel=1e-4
    )


# ---------------------------------------------------------------------------
# SSIM and correlation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["fashion_mnist", "photos"])
def test_ssim_is_one_for_copies_and_falls_with_noise(
    source: str, request: pytest.FixtureRequest
) -> None:
    value = request.getfixturevalue(source)
    truth = value if isinstance(value, torch.Tensor) else value.inputs[:12]

    same = match_inputs(truth.clone(), truth, data_range=1.0)
    mild = match_inputs(_noisy(truth, 0.05), truth, data_range=1.0)
    heavy = match_inputs(_noisy(truth, 0.3), truth, data_range=1.0)

    for s, m, h in zip(same.scores, mild.scores, heavy.scores, strict=True):
        assert s.ssim == pytest.approx(1.0)
        assert m.ssim is not None and h.ssim is not None
        assert 0.0 < h.ssim < m.ssim < 1.0
        assert s.correlation is None
    assert np.mean([h.ssim for h in heavy.scores]) < 0.5


def test_ssim_is_computed_for_8x8_digits(digits: Samples) -> None:
    truth = digits.inputs[:6]

    report = match_inputs(_noisy(truth, 0.2), truth, data_range=1.0)

    assert all(s.ssim is not None and 0.0 < s.ssim < 1.0 for s in report.scores)


def test_correlation_scores_ecg_beats(beats: torch.Tensor) -> None:
    scaled = match_inputs(0.5 * beats + 0.2, beats, data_range=1.0)
    noisy = match_inputs(_noisy(beats, 0.1), beats, data_range=1.0)
    inverted = [
        match_inputs(1.0 - beat[None], beat[None], data_range=1.0).scores[0]
        for beat in beats
    ]

    for s, n, i in zip(scaled.scores, noisy.scores, inverted, strict=True):
        assert s.ssim is None
        assert s.recon_index == s.truth_index
        assert s.correlation == pytest.approx(1.0)  # shape kept, scale lost
        assert s.psnr < 40.0
        assert n.correlation is not None and 0.5 < n.correlation < 0.999
        assert i.correlation == pytest.approx(-1.0)


def test_correlation_of_a_flat_reconstruction_is_zero(beats: torch.Tensor) -> None:
    report = match_inputs(torch.full_like(beats, 0.5), beats, data_range=1.0)

    assert all(s.correlation == 0.0 for s in report.scores)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reconstructed", "truth"),
    [
        (torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 28, 28)),
        (torch.zeros(4, 64), torch.zeros(4, 1, 8, 8)),
        (torch.tensor(1.0), torch.zeros(4, 1, 8, 8)),
    ],
)
def test_shape_mismatch_raises_shape_error(
    reconstructed: torch.Tensor, truth: torch.Tensor
) -> None:
    with pytest.raises(ShapeError, match="same input_shape"):
        match_inputs(reconstructed, truth)


@pytest.mark.parametrize("data_range", [0.0, -1.0, math.nan, math.inf])
def test_data_range_must_be_positive_and_finite(
    digits: Samples, data_range: float
) -> None:
    with pytest.raises(InvalidInputError, match="data_range"):
        match_inputs(digits.inputs[:2], digits.inputs[:2], data_range=data_range)


def test_empty_report_summaries() -> None:
    report = MatchReport(scores=[], data_range=1.0)

    assert report.recovered() == 0
    assert report.fraction_recovered() == 0.0
    assert report.median_psnr == 0.0
