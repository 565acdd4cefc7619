"""Capacity bounds: what a model's first layer lets a gradient leak.

Before any attack runs, the architecture alone says whether a client's input
can be rebuilt from its update. :func:`analyze` finds the layer that sees the
raw input (:func:`fl_audit.layers.find_first_layer`) and checks it against
the bounds of Qian & Hansen, "What can we learn from gradients?"
(arXiv 2010.15718) and its later versions, worked out in docs/theory.md:

* fully-connected first layer ``z = W x + b`` with ``W`` of shape ``(h, d)``

  - one input (seed theorem 1): ``x = dL/dW[i, :] / dL/db[i]`` for any unit
    with a non-zero bias gradient, so one unit with a bias suffices; without
    a bias ``x`` is known up to scale;
  - a batch of ``B`` inputs (seed theorem 2): ``dL/dW = Delta X`` has rank
    ``B`` only when ``h >= B``; a FedAvg update mixes all ``N`` distinct
    examples of the round, so the same holds with ``N`` for ``B``;

* convolutional first layer, ``C`` channels in, ``h`` filters, input side
  ``d``, output side ``d'`` (``d^2 := H * W`` and ``d'^2 := H' * W'`` for a
  non-square 2-D input; ``d`` and ``d'`` are lengths, not squared, in 1-D):

  - seed v1 formula: ``h >= (d / d')^2 * B * C``;
  - per-sample count: ``h >= (d / d')^2 * C`` (``h d'^2`` outputs against
    ``C d^2`` unknowns per sample);
  - exact rank: the layer is ``z = A x + b`` with ``A`` of shape
    ``(h d'^2, C d^2)``; the output determines the input exactly when ``A``
    has full column rank. Computed on the real weights for moderate sizes;
  - window coverage: pixels that no filter window touches (a stride larger
    than the kernel's reach) are lost whatever ``h`` is.

Each check is a :class:`Verdict`; :class:`CapacityReport` gathers them with a
risk level for the client-round (:data:`RISK_LEVELS`):

``exposed``
    The first layer keeps every input of the round: FC with ``h >= B_eff``
    (and ``B_eff <= d``), where ``B_eff`` is the number of local examples
    ``N`` when given, else the batch size, else 1 (the worst case, one input
    per update); a convolution whose operator has full column rank.
``partially_exposed``
    The first layer keeps part of each input or some of the inputs: FC with
    ``h < B_eff`` (at most ``h`` directions of the batch survive), or a
    convolution whose rank is below ``C d^2`` (shown by the exact rank, or by
    a failed count or uncovered pixels when the rank was not computed).
``not_determined``
    The counts hold but the exact rank was declined (operator above the size
    limit): the counts are necessary conditions only.
``unsupported``
    The first layer is not an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``
    that receives the raw input; the verdict names the module.

The level describes the first layer only. For a convolution, whether an
attacker obtains the layer's output depends on the layers after it; that is
what the attacks measure.
"""

from __future__ import annotations

import copy
import math
from typing import Literal, cast

import numpy as np
import scipy.linalg
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fl_audit._logging import logger
from fl_audit.errors import InvalidInputError, ShapeError
from fl_audit.layers import FirstLayer, check_input_shape, find_first_layer

__all__ = [
    "DEFAULT_EXACT_RANK_LIMIT",
    "RANK_RTOL",
    "RISK_LEVELS",
    "CapacityReport",
    "FirstLayerInfo",
    "RiskLevel",
    "Verdict",
    "analyze",
]

Source = Literal[
    "seed theorem 1",
    "seed theorem 2",
    "seed v1 formula",
    "per-sample count",
    "exact rank",
    "window coverage",
    "first-layer discovery",
]
RiskLevel = Literal["exposed", "partially_exposed", "not_determined", "unsupported"]
Quantity = int | float | bool | str | list[int] | None

RISK_LEVELS: dict[str, str] = {
    "exposed": "the first layer keeps every input of the round",
    "partially_exposed": "the first layer keeps part of each input or some inputs",
    "not_determined": "the counts hold but the exact rank was not computed",
    "unsupported": "the first layer is outside what the bounds cover",
}

DEFAULT_EXACT_RANK_LIMIT = 4096
"""Largest ``min(h d'^2, C d^2)`` for which the exact rank is computed."""

RANK_RTOL = 1e-5
"""Singular values below ``RANK_RTOL * sigma_max`` count as zero.

Chosen for the precision updates are shared in: a direction kept at this
tolerance amplifies the float32 rounding of the layer output (about 6e-8) to
at most about 6e-3 of the input, still above 40 dB. Operators near the
equation count are often full-rank in exact arithmetic yet worse conditioned
than this; they are reported rank-deficient.
"""

_MAX_OPERATOR_ENTRIES = 2**28
"""Largest ``h d'^2 * C d^2`` for which the exact rank is computed."""

_CHUNK_ENTRIES = 2**22
"""Entries per chunk of basis vectors pushed through the layer (32 MiB)."""


class Verdict(BaseModel):
    """One bound checked on the model's first layer.

    Attributes
    ----------
    name:
        Stable identifier, e.g. ``"fc_batch"`` or ``"conv_exact_rank"``.
    source:
        Where the bound comes from (seed theorem, count, exact rank, ...).
    formula:
        The condition as text, e.g. ``"h >= B"``.
    quantities:
        The values plugged in (``h``, ``d``, ``d'``, ``C``, ``k``, ``s``,
        ``p``, ``dilation``, ``groups``, ``B``, ``N``).
    required, actual:
        The two sides of the condition (``actual >= required`` for the
        counts; ``actual == required`` for rank and coverage). ``None`` when
        the check was not evaluated.
    holds:
        Whether the condition holds; ``None`` when it could not be evaluated
        (a missing batch size, an operator above the size limit).
    outcome:
        What the result means for the client's data.
    note:
        Why the check was not evaluated, or a caveat.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    source: Source
    formula: str
    quantities: dict[str, Quantity]
    required: int | None
    actual: int | None
    holds: bool | None
    outcome: str
    note: str = ""


class FirstLayerInfo(BaseModel):
    """The layer that receives the raw input, as found by the hooks.

    ``in_shape`` and ``out_shape`` are per sample; ``out_shape`` is ``None``
    for an unsupported layer.
    """

    model_config = ConfigDict(frozen=True)

    path: str
    kind: Literal["linear", "conv1d", "conv2d", "unsupported"]
    module_type: str
    reason: str
    in_shape: list[int]
    out_shape: list[int] | None
    weight_name: str | None
    bias_name: str | None


class CapacityReport(BaseModel):
    """Every bound checked on one model, input shape and batch size."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    input_shape: list[int]
    batch_size: int | None
    local_examples: int | None
    first_layer: FirstLayerInfo
    verdicts: list[Verdict]
    risk: RiskLevel
    risk_reason: str

    def verdict(self, name: str) -> Verdict:
        """Return the verdict called ``name``.

        Raises
        ------
        KeyError
            If no verdict has that name; the message lists the names present.
        """
        for v in self.verdicts:
            if v.name == name:
                return v
        names = [v.name for v in self.verdicts]
        raise KeyError(f"no verdict {name!r} in this report; it has {names}")

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON; ``CapacityReport.model_validate_json`` reads it."""
        return self.model_dump_json(indent=indent)


def analyze(
    model: nn.Module,
    input_shape: tuple[int, ...] | list[int],
    batch_size: int | None = None,
    local_examples: int | None = None,
    *,
    exact_rank_limit: int = DEFAULT_EXACT_RANK_LIMIT,
) -> CapacityReport:
    """Check a model's first layer against the capacity bounds.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module`` taking a batch of shape ``(B, *input_shape)``.
        Its weights are read, never changed.
    input_shape:
        Shape of one input without the batch dimension, e.g. ``(1, 28, 28)``.
    batch_size:
        Inputs per local step ``B``; ``None`` when unknown (the batch bounds
        are then not evaluated and the risk level assumes one input).
    local_examples:
        Distinct examples ``N`` a client trains on in one round (FedAvg
        updates mix all of them); ``None`` for single-step gradients.
    exact_rank_limit:
        Compute the exact rank of a convolution only when the smaller side of
        its operator, ``min(h d'^2, C d^2)``, is at most this.

    Returns
    -------
    CapacityReport
        The first layer, one :class:`Verdict` per bound and the risk level.
        An unsupported first layer gives an ``unsupported_first_layer``
        verdict, not an error.

    Raises
    ------
    InvalidInputError
        If ``model`` is not a module or a count is not a positive int; every
        problem is listed.
    ShapeError
        If ``input_shape`` is malformed or the model fails on it.

    Notes
    -----
    The exact rank builds the Gram matrix of the layer's linear map by
    pushing basis vectors through the module itself (so padding modes,
    dilation and groups are handled as torch handles them) and counts its
    eigenvalues above ``RANK_RTOL**2`` times the largest (singular values
    above :data:`RANK_RTOL` times the largest). It costs ``min(m, n)`` layer
    applications and one symmetric eigendecomposition of that size: a few
    seconds for a 3x32x32 input on two cores. It is declined above
    ``exact_rank_limit`` or ``2**28`` operator entries.
    """
    _check_arguments(model, batch_size, local_examples, exact_rank_limit)
    shape = check_input_shape(input_shape)
    first = find_first_layer(model, shape)
    _check_fits(first, shape)
    logger.debug("bounds: first layer %r is %s", first.path, first.kind)

    if first.kind == "linear":
        info, verdicts = _fc_verdicts(first, batch_size, local_examples)
    elif first.kind in ("conv1d", "conv2d"):
        info, verdicts = _conv_verdicts(first, batch_size, exact_rank_limit)
    else:
        info, verdicts = _unsupported_verdict(first)
    risk, reason = _risk(info, verdicts, batch_size, local_examples)

    for v in verdicts:
        logger.debug(
            "bounds: %s holds=%s (%s vs %s)", v.name, v.holds, v.actual, v.required
        )
    logger.debug("bounds: risk %s: %s", risk, reason)
    return CapacityReport(
        architecture=type(model).__name__,
        input_shape=list(shape),
        batch_size=batch_size,
        local_examples=local_examples,
        first_layer=info,
        verdicts=verdicts,
        risk=risk,
        risk_reason=reason,
    )


def _check_arguments(
    model: object,
    batch_size: object,
    local_examples: object,
    exact_rank_limit: object,
) -> None:
    problems: list[str] = []
    if not isinstance(model, nn.Module):
        problems.append(f"model must be a torch.nn.Module, got {type(model).__name__}")

    def count(name: str, value: object, optional: bool = True) -> None:
        if value is None and optional:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            none = " or None" if optional else ""
            problems.append(f"{name} must be an int >= 1{none}, got {value!r}")

    count("batch_size", batch_size)
    count("local_examples", local_examples)
    count("exact_rank_limit", exact_rank_limit, optional=False)
    if (
        isinstance(batch_size, int)
        and isinstance(local_examples, int)
        and local_examples < batch_size
    ):
        problems.append(
            f"local_examples (N={local_examples}) is smaller than batch_size "
            f"(B={batch_size}); N counts the distinct examples of the whole round, "
            "B those of one step: were they swapped?"
        )
    if problems:
        raise InvalidInputError("bounds.analyze arguments", problems)


def _check_fits(first: FirstLayer, shape: tuple[int, ...]) -> None:
    """Raise ShapeError when the first layer cannot take what it receives.

    The forward pass of :func:`find_first_layer` stops before the first layer
    runs, so a size mismatch there is caught here.
    """
    module, got = first.module, first.in_shape
    if isinstance(module, nn.Linear) and first.kind == "linear":
        if got[0] != module.in_features:
            raise ShapeError(
                "input_shape",
                [
                    f"{first.path or '<model>'} (Linear) expects {module.in_features} "
                    f"features but an input of shape {shape} gives it {got[0]}; pass "
                    "the shape the model was built for"
                ],
            )
    elif isinstance(module, nn.Conv1d | nn.Conv2d) and first.kind != "unsupported":
        spatial = got[1:]
        dims = 1 if isinstance(module, nn.Conv1d) else 2
        too_small = len(spatial) == dims and any(
            a.d_out < 1 for a in _axes(module, spatial)
        )
        if len(spatial) != dims or got[0] != module.in_channels or too_small:
            raise ShapeError(
                "input_shape",
                [
                    f"{first.path or '<model>'} ({type(module).__name__}, "
                    f"{module.in_channels} channels, kernel {module.kernel_size}) "
                    f"cannot take a per-sample input of shape {got} (from input_shape "
                    f"{shape}); pass the shape the model was built for"
                ],
            )


# --------------------------------------------------------------------------
# Fully-connected first layer


def _fc_verdicts(
    first: FirstLayer, batch_size: int | None, local_examples: int | None
) -> tuple[FirstLayerInfo, list[Verdict]]:
    module = cast(nn.Linear, first.module)  # kind "linear" guarantees it
    h, d = module.out_features, module.in_features
    info = _info(first, [h])
    verdicts = [_fc_single(h, d, first.has_bias), _fc_batch(h, d, batch_size)]
    if local_examples is not None:
        verdicts.append(_fc_fedavg(h, d, local_examples))
    return info, verdicts


def _fc_single(h: int, d: int, bias: bool) -> Verdict:
    if bias:
        formula = "h >= 1 unit with a bias: x = dL/dW[i,:] / dL/db[i]"
        outcome = "one input is recovered exactly from its gradient"
    else:
        formula = "h >= 1 unit, no bias: x is parallel to dL/dW[i,:]"
        outcome = "one input is recovered up to scale (no bias to fix it)"
    return Verdict(
        name="fc_single_input",
        source="seed theorem 1",
        formula=formula,
        quantities={"h": h, "d": d, "bias": bias},
        required=1,
        actual=h,
        holds=h >= 1,
        outcome=outcome,
        note="needs dL/dz[i] != 0 for the unit used (an active ReLU, no "
        "saturated loss)",
    )


def _fc_mixture(
    name: str, source: Source, h: int, d: int, count: int | None, symbol: str
) -> Verdict:
    quantities: dict[str, Quantity] = {"h": h, "d": d, symbol: count}
    formula = f"h >= {symbol}"
    if count is None:
        return Verdict(
            name=name,
            source=source,
            formula=formula,
            quantities=quantities,
            required=None,
            actual=h,
            holds=None,
            outcome="not evaluated",
            note="the batch size is unknown; pass batch_size",
        )
    holds = h >= count
    if holds:
        outcome = (
            f"rank(dL/dW) = {symbol}: the gradient spans every input and "
            f"reveals {symbol}"
        )
    else:
        outcome = (
            f"rank(dL/dW) <= h = {h} < {symbol} = {count}: not every "
            "input can be recovered"
        )
    note = "necessary, not sufficient: separating the inputs needs structure"
    if count > d:
        note += f"; {symbol} = {count} > d = {d} caps the rank at d"
    return Verdict(
        name=name,
        source=source,
        formula=formula,
        quantities=quantities,
        required=count,
        actual=h,
        holds=holds,
        outcome=outcome,
        note=note,
    )


def _fc_batch(h: int, d: int, batch_size: int | None) -> Verdict:
    return _fc_mixture("fc_batch", "seed theorem 2", h, d, batch_size, "B")


def _fc_fedavg(h: int, d: int, local_examples: int) -> Verdict:
    v = _fc_mixture("fc_fedavg", "seed theorem 2", h, d, local_examples, "N")
    return v.model_copy(
        update={
            "note": v.note
            + "; a FedAvg update mixes the N examples of all local steps",
        }
    )


# --------------------------------------------------------------------------
# Convolutional first layer


class _Axis:
    """Geometry of a convolution along one spatial axis."""

    def __init__(self, d: int, k: int, s: int, dil: int, left: int, total: int) -> None:
        self.d, self.k, self.s, self.dil, self.left = d, k, s, dil, left
        self.d_out = (d + total - dil * (k - 1) - 1) // s + 1

    def covered(self, padding_mode: str) -> int:
        """Number of input positions that some filter window reads."""
        taps = (
            np.arange(self.d_out)[:, None] * self.s
            - self.left
            + np.arange(self.k)[None, :] * self.dil
        ).ravel()  # (d_out * k,)
        d = self.d
        if padding_mode == "reflect":
            taps = np.abs(taps)
            taps = np.where(taps >= d, 2 * (d - 1) - taps, taps)
        elif padding_mode == "replicate":
            taps = np.clip(taps, 0, d - 1)
        elif padding_mode == "circular":
            taps = np.mod(taps, d)
        return int(np.unique(taps[(taps >= 0) & (taps < d)]).size)


def _axes(module: nn.Conv1d | nn.Conv2d, spatial: tuple[int, ...]) -> list[_Axis]:
    axes = []
    for i, d in enumerate(spatial):
        k, s, dil = module.kernel_size[i], module.stride[i], module.dilation[i]
        if module.padding == "same":
            total = dil * (k - 1)
            left = total // 2
        elif module.padding == "valid":
            total = left = 0
        else:
            left = int(module.padding[i])  # type: ignore[index]
            total = 2 * left
        axes.append(_Axis(d, k, s, dil, left, total))
    return axes


def _conv_verdicts(
    first: FirstLayer, batch_size: int | None, exact_rank_limit: int
) -> tuple[FirstLayerInfo, list[Verdict]]:
    module = cast(nn.Conv1d | nn.Conv2d, first.module)  # kind "conv*" guarantees it
    c, spatial = first.in_shape[0], tuple(first.in_shape[1:])
    h = module.out_channels
    axes = _axes(module, spatial)
    out_spatial = tuple(a.d_out for a in axes)
    info = _info(first, [h, *out_spatial])

    # Unknowns and equations per sample: C d^2 against h d'^2.
    area, area_out = math.prod(spatial), math.prod(out_spatial)
    n, m = c * area, h * area_out
    two_d = len(spatial) == 2
    base: dict[str, Quantity] = {
        "h": h,
        "C": c,
        "d": list(spatial) if two_d else spatial[0],
        "d'": list(out_spatial) if two_d else out_spatial[0],
        "k": list(module.kernel_size),
        "s": list(module.stride),
        "p": pad if isinstance(pad := module.padding, str) else list(pad),
        "dilation": list(module.dilation),
        "groups": module.groups,
    }
    ratio = "(H*W)/(H'*W')" if two_d else "(d/d')"
    verdicts = [
        _conv_seed_v1(base, ratio, area, area_out, batch_size),
        _conv_per_sample(base, ratio, area, area_out, m, n),
        _conv_coverage(base, module, axes, area),
        _conv_exact_rank(base, module, tuple(first.in_shape), m, n, exact_rank_limit),
    ]
    return info, verdicts


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _conv_seed_v1(
    base: dict[str, Quantity],
    ratio: str,
    area: int,
    area_out: int,
    batch_size: int | None,
) -> Verdict:
    c = int(base["C"])  # type: ignore[arg-type]
    h = int(base["h"])  # type: ignore[arg-type]
    formula = f"h >= {ratio} * B * C"
    quantities = {**base, "B": batch_size}
    if batch_size is None:
        return Verdict(
            name="conv_seed_v1",
            source="seed v1 formula",
            formula=formula,
            quantities=quantities,
            required=None,
            actual=h,
            holds=None,
            outcome="not evaluated",
            note="the batch size is unknown; pass batch_size",
        )
    required = _ceil_div(batch_size * c * area, area_out)
    holds = h >= required
    return Verdict(
        name="conv_seed_v1",
        source="seed v1 formula",
        formula=formula,
        quantities=quantities,
        required=required,
        actual=h,
        holds=holds,
        outcome=(
            "the batch's outputs outnumber its unknowns"
            if holds
            else "fewer outputs than unknowns over the whole batch"
        ),
        note="counts the whole batch against one sample's outputs; each sample "
        "has its own outputs, so B cancels (see conv_per_sample)",
    )


def _conv_per_sample(
    base: dict[str, Quantity], ratio: str, area: int, area_out: int, m: int, n: int
) -> Verdict:
    c = int(base["C"])  # type: ignore[arg-type]
    h = int(base["h"])  # type: ignore[arg-type]
    required = _ceil_div(c * area, area_out)
    holds = h >= required
    return Verdict(
        name="conv_per_sample",
        source="per-sample count",
        formula=f"h >= {ratio} * C",
        quantities={**base, "equations": m, "unknowns": n},
        required=required,
        actual=h,
        holds=holds,
        outcome=(
            f"{m} outputs for {n} unknowns per sample"
            if holds
            else f"only {m} outputs for {n} unknowns: the input is not determined"
        ),
        note="necessary, not sufficient: uncovered pixels and ReLU zeros remove "
        "equations",
    )


def _conv_coverage(
    base: dict[str, Quantity],
    module: nn.Conv1d | nn.Conv2d,
    axes: list[_Axis],
    area: int,
) -> Verdict:
    c = int(base["C"])  # type: ignore[arg-type]
    covered = math.prod(a.covered(module.padding_mode) for a in axes)
    uncovered = c * (area - covered)
    return Verdict(
        name="conv_coverage",
        source="window coverage",
        formula="every input value lies in some filter window",
        quantities={**base, "padding_mode": module.padding_mode},
        required=0,
        actual=uncovered,
        holds=uncovered == 0,
        outcome=(
            "every input value reaches the output"
            if uncovered == 0
            else f"{uncovered} input values reach no filter: lost for any h"
        ),
    )


def _conv_exact_rank(
    base: dict[str, Quantity],
    module: nn.Conv1d | nn.Conv2d,
    in_shape: tuple[int, ...],
    m: int,
    n: int,
    limit: int,
) -> Verdict:
    formula = "rank(A) = C*d^2, A: (h*d'^2) x (C*d^2) the layer's linear map"
    quantities = {**base, "equations": m, "unknowns": n}

    def verdict(rank: int | None, outcome: str, note: str) -> Verdict:
        return Verdict(
            name="conv_exact_rank",
            source="exact rank",
            formula=formula,
            quantities=quantities,
            required=n,
            actual=rank,
            holds=None if rank is None else rank == n,
            outcome=outcome,
            note=note,
        )

    if min(m, n) > limit or m * n > _MAX_OPERATOR_ENTRIES:
        return verdict(
            None,
            "not evaluated",
            f"declined: the operator is {m} x {n}; the exact rank is computed "
            f"up to min(m, n) = {limit} (exact_rank_limit) and "
            f"{_MAX_OPERATOR_ENTRIES} entries. The counts are necessary "
            "conditions only",
        )
    try:
        rank = _operator_rank(module, in_shape, m, n)
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
        logger.warning(
            "bounds: exact rank of %s failed: %s", type(module).__name__, exc
        )
        return verdict(None, "not evaluated", f"failed: {type(exc).__name__}: {exc}")
    outcome = (
        "the layer output determines the input exactly"
        if rank == n
        else f"the layer output determines a {rank}-dimensional projection "
        f"of the {n}-dimensional input"
    )
    return verdict(
        rank,
        outcome,
        f"numerical rank: singular values above {RANK_RTOL:g} * sigma_max",
    )


def _operator_rank(
    module: nn.Conv1d | nn.Conv2d, in_shape: tuple[int, ...], m: int, n: int
) -> int:
    """Numerical rank of the layer's linear map ``A`` (``m x n``), in float64.

    The Gram matrix of the smaller side (``A^T A`` or ``A A^T``) is built by
    applying the module, without its bias, to basis vectors; ``A^T`` is its
    adjoint, obtained by autograd.
    """
    lin = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    lin.bias = None
    lin.requires_grad_(False)
    side = min(m, n)
    chunk = max(1, min(side, _CHUNK_ENTRIES // max(m, n)))
    gram = np.empty((side, side), dtype=np.float64)

    with torch.enable_grad():
        probe_out = lin(torch.zeros((1, *in_shape), dtype=torch.float64))
        out_shape = tuple(probe_out.shape[1:])
        for start in range(0, side, chunk):
            stop = min(side, start + chunk)
            basis = torch.zeros((stop - start, side), dtype=torch.float64)
            basis[:, start:stop] = torch.eye(stop - start, dtype=torch.float64)
            if n <= m:
                # A^T A e_j: apply A, then its adjoint.
                x = basis.reshape(-1, *in_shape).requires_grad_(True)
                y = lin(x)  # (c, h, *d')
                (col,) = torch.autograd.grad(y, x, grad_outputs=y.detach())
            else:
                # A A^T e_j: adjoint first (gradient of <A x, e_j>), then A.
                x = torch.zeros(
                    (stop - start, *in_shape), dtype=torch.float64, requires_grad=True
                )
                (adj,) = torch.autograd.grad(
                    lin(x), x, grad_outputs=basis.reshape(-1, *out_shape)
                )
                col = lin(adj)  # (c, h, *d')
            gram[start:stop] = col.detach().reshape(stop - start, side).numpy()

    # Singular values of A are the square roots of the Gram's eigenvalues.
    gram = (gram + gram.T) / 2
    eig = scipy.linalg.eigh(gram, eigvals_only=True, driver="evr")
    top = float(eig[-1])
    if top <= 0.0:
        return 0
    return int((eig > top * RANK_RTOL**2).sum())


# --------------------------------------------------------------------------
# Shared pieces


def _info(first: FirstLayer, out_shape: list[int] | None) -> FirstLayerInfo:
    return FirstLayerInfo(
        path=first.path,
        kind=first.kind,
        module_type="" if first.module is None else type(first.module).__name__,
        reason=first.reason,
        in_shape=list(first.in_shape),
        out_shape=out_shape,
        weight_name=first.weight_name,
        bias_name=first.bias_name,
    )


def _unsupported_verdict(first: FirstLayer) -> tuple[FirstLayerInfo, list[Verdict]]:
    module_type = "" if first.module is None else type(first.module).__name__
    verdict = Verdict(
        name="unsupported_first_layer",
        source="first-layer discovery",
        formula="the raw input reaches an nn.Linear, nn.Conv1d or nn.Conv2d first",
        quantities={"path": first.path or "<model>", "module": module_type},
        required=None,
        actual=None,
        holds=False,
        outcome=f"no bound applies to {first.path or '<model>'}",
        note=first.reason,
    )
    return _info(first, None), [verdict]


def _risk(
    info: FirstLayerInfo,
    verdicts: list[Verdict],
    batch_size: int | None,
    local_examples: int | None,
) -> tuple[RiskLevel, str]:
    by_name = {v.name: v for v in verdicts}
    if info.kind == "unsupported":
        return "unsupported", by_name["unsupported_first_layer"].note
    if info.kind == "linear":
        return _fc_risk(by_name, batch_size, local_examples)
    return _conv_risk(by_name)


def _fc_risk(
    by_name: dict[str, Verdict], batch_size: int | None, local_examples: int | None
) -> tuple[RiskLevel, str]:
    single = by_name["fc_single_input"]
    h = int(single.quantities["h"])  # type: ignore[arg-type]
    d = int(single.quantities["d"])  # type: ignore[arg-type]
    if local_examples is not None:
        eff, what = local_examples, f"N = {local_examples} local examples"
    elif batch_size is not None:
        eff, what = batch_size, f"a batch of B = {batch_size}"
    else:
        eff, what = 1, "one input (batch size unknown: worst case)"

    if eff == 1:
        return "exposed", f"{what}: {single.outcome} (seed theorem 1)"
    if h < eff:
        return "partially_exposed", (
            f"h = {h} < {what}: the first-layer gradient keeps at most {h} "
            "directions of the inputs; some leak, not all can be recovered"
        )
    if eff > d:
        return "partially_exposed", (
            f"{what} exceeds the input size d = {d}: the gradient's rank is "
            "capped at d and cannot separate every input"
        )
    return "exposed", (
        f"h = {h} >= {what}: the first-layer gradient spans every input "
        "(seed theorem 2; necessary for full recovery, which ReLU sparsity "
        "or known weights then make exact)"
    )


def _conv_risk(by_name: dict[str, Verdict]) -> tuple[RiskLevel, str]:
    rank = by_name["conv_exact_rank"]
    if rank.holds is True:
        return "exposed", f"full column rank {rank.actual}: {rank.outcome}"
    if rank.holds is False:
        return "partially_exposed", f"rank {rank.actual} < {rank.required}: " + (
            rank.outcome
        )
    failed = [
        v
        for v in (by_name["conv_per_sample"], by_name["conv_coverage"])
        if v.holds is False
    ]
    if failed:
        return "partially_exposed", (
            "exact rank not computed, but " + "; ".join(v.outcome for v in failed)
        )
    return "not_determined", (
        "the per-sample count holds and every input value is covered, but the "
        "exact rank was declined (operator too large); the counts are necessary "
        "conditions only"
    )
