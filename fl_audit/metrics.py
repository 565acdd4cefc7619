"""Scores of a reconstruction against ground truth (simulation only).

:func:`match_inputs` pairs each true input with the reconstruction closest
to it (a Hungarian assignment on the logarithm of the mean squared error, so two
true inputs never claim the same reconstruction and an exact pair is never
traded away to lower the total) and scores every pair: MSE, PSNR in dB for a
stated data range, SSIM for images (scikit-image's implementation) and the
Pearson correlation for 1-D signals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from skimage.metrics import structural_similarity

from fl_audit.errors import InvalidInputError, ShapeError


@dataclass(frozen=True)
class SampleScore:
    """Scores of one true input against its matched reconstruction."""

    truth_index: int
    recon_index: int | None
    mse: float
    psnr: float
    ssim: float | None = None
    correlation: float | None = None


@dataclass(frozen=True)
class MatchReport:
    """All true inputs of a batch, each with its best-matched reconstruction."""

    scores: list[SampleScore]
    data_range: float

    def recovered(self, min_psnr: float = 30.0) -> int:
        """How many true inputs were rebuilt to at least ``min_psnr`` dB."""
        return sum(s.psnr >= min_psnr for s in self.scores)

    def fraction_recovered(self, min_psnr: float = 30.0) -> float:
        return self.recovered(min_psnr) / len(self.scores) if self.scores else 0.0

    @property
    def median_psnr(self) -> float:
        return float(np.median([s.psnr for s in self.scores])) if self.scores else 0.0


def psnr(mse: float, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for a perfect match."""
    if mse <= 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _is_image(sample_shape: tuple[int, ...]) -> bool:
    # (H, W) or (C, H, W) with a spatial extent in both axes
    return len(sample_shape) in (2, 3) and min(sample_shape[-2:]) > 1


def _ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    channel_axis = 0 if a.ndim == 3 else None
    side = min(a.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return float("nan")
    return float(
        structural_similarity(
            a, b, data_range=data_range, win_size=win, channel_axis=channel_axis
        )
    )


def match_inputs(
    reconstructed: torch.Tensor | np.ndarray,
    truth: torch.Tensor | np.ndarray,
    *,
    data_range: float | None = None,
) -> MatchReport:
    """Match each true input to one reconstruction and score the pairs.

    Parameters
    ----------
    reconstructed:
        ``(k, *input_shape)``; ``k`` may differ from the number of true inputs.
    truth:
        ``(n, *input_shape)``.
    data_range:
        Span of valid input values used by PSNR and SSIM (1.0 for inputs in
        [0, 1]). Default: ``truth.max() - truth.min()``.

    Returns
    -------
    MatchReport
        One :class:`SampleScore` per true input; true inputs left without a
        reconstruction (``k < n``) score against zeros with
        ``recon_index=None``.
    """
    rec = np.asarray(torch.as_tensor(reconstructed).detach().cpu().double())
    tru = np.asarray(torch.as_tensor(truth).detach().cpu().double())
    if rec.ndim == 0 or tru.ndim == 0 or rec.shape[1:] != tru.shape[1:]:
        raise ShapeError(
            "match_inputs",
            [
                f"reconstructed {rec.shape} and truth {tru.shape} must both be "
                "(batch, *input_shape) with the same input_shape"
            ],
        )
    if data_range is None:
        data_range = float(tru.max() - tru.min()) if tru.size else 1.0
        data_range = data_range or 1.0
    elif not (math.isfinite(data_range) and data_range > 0):
        raise InvalidInputError(
            "data_range", [f"must be a positive number such as 1.0, got {data_range!r}"]
        )
    if not np.all(np.isfinite(tru)):
        raise InvalidInputError(
            "truth", ["contains NaN/Inf; ground truth must be finite"]
        )

    n, k = tru.shape[0], rec.shape[0]
    d = math.prod(tru.shape[1:])
    flat_t, flat_r = tru.reshape(n, d), rec.reshape(k, d)
    finite_r = np.where(np.isfinite(flat_r), flat_r, 0.0)
    # Assign on log-MSE: summing raw MSEs lets the solver trade an exact pair
    # for two mediocre ones; in log scale an exact pair always wins.
    cost = np.log10(cdist(flat_t, finite_r, "sqeuclidean") / max(d, 1) + 1e-300)
    empty = (np.array([], int), np.array([], int))
    rows, cols = linear_sum_assignment(cost) if k else empty
    match = dict(zip(rows.tolist(), cols.tolist(), strict=True))

    sample_shape = tru.shape[1:]
    scores = []
    for i in range(n):
        j = match.get(i)
        r = finite_r[j] if j is not None else np.zeros_like(flat_t[i])
        mse = float(((flat_t[i] - r) ** 2).mean())
        ssim = corr = None
        if _is_image(sample_shape):
            ssim = _ssim(tru[i], r.reshape(sample_shape), data_range)
        else:
            std = flat_t[i].std() * r.std()
            corr = float(np.corrcoef(flat_t[i], r)[0, 1]) if std > 0 else 0.0
        scores.append(SampleScore(i, j, mse, psnr(mse, data_range), ssim, corr))
    return MatchReport(scores, data_range)
