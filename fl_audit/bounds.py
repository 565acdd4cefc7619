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
    than the kernel's reach) are lost whatever ``h`` is;
  - exact rank behind the activation (only with ``probe``): a ReLU after
    the layer hides its negative outputs, so the exact test for an input
    ``x`` is the rank of ``A`` restricted to the rows where the activation
    of ``A x + b`` is known (positive), computed for each probe input; for
    a single-sample gradient the rows of the kernel gradient
    ``dL/dK_j = sum_p delta_{j,p} patch_p(x)`` (R-GAP's equations, linear
    in ``x`` once the output error ``delta`` is known) join them.

Each check is a :class:`Verdict`; :class:`CapacityReport` gathers them with a
risk level for the client-round (:data:`RISK_LEVELS`):

``exposed``
    The first layer keeps every input of the round: FC with ``h >= B_eff``
    (and ``B_eff <= d``), where ``B_eff`` is the number of local examples
    ``N`` when given, else the batch size, else 1 (the worst case, one input
    per update); a convolution whose operator has full column rank (with
    a probe, behind a ReLU: full column rank on the kept outputs, and the
    kernel-gradient rows when ``B_eff = 1``, for at least half of the probe
    inputs: a typical input is exposed).
``partially_exposed``
    The first layer keeps part of each input or some of the inputs: FC with
    ``h < B_eff`` (at most ``h`` directions of the batch survive), or a
    convolution whose rank is below ``C d^2`` (shown by the exact rank, or by
    a failed count or uncovered pixels when the rank was not computed; with
    a probe, behind a ReLU: fewer than half of the probe inputs are
    determined by what the gradient keeps of them).
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fl_audit._logging import logger
from fl_audit.errors import InvalidInputError, ShapeError
from fl_audit.layers import FirstLayer, check_input_shape, find_first_layer

__all__ = [
    "DEFAULT_EXACT_RANK_LIMIT",
    "HOLDING_FRACTION",
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
        (a missing batch size, an operator above the size limit) or does not
        apply (``conv_exact_rank_relu`` without a zeroing activation).
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
    probe: torch.Tensor | np.ndarray | None = None,
    probe_labels: torch.Tensor | np.ndarray | list[int] | None = None,
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
        its operator, ``min(h d'^2, C d^2)``, is at most this. The same
        rule, on the operator of the layers up to the activation, applies to
        the ``conv_exact_rank_relu`` verdict.
    probe:
        Representative inputs, shape ``(P, *input_shape)``, floating point,
        scaled as the model receives them (e.g. a few real samples of the
        modality, not necessarily a client's). For a convolution followed by
        an activation that zeroes outputs (``nn.ReLU``, ``nn.ReLU6``,
        ``nn.LeakyReLU(0)``), adds the ``conv_exact_rank_relu`` verdict: the
        rank of the layer's operator restricted, for each probe input, to
        the outputs the activation keeps; and the risk level follows it.
        Ignored for a fully-connected first layer, whose bounds do not
        depend on the input values.
    probe_labels:
        Class index of each probe input, shape ``(P,)``, integers. Used only
        when the gradient is of one sample (``B_eff = 1`` below): the
        convolution's kernel-gradient rows then join each probe's system, and
        they depend on the output error of the clients' loss, taken as the
        cross-entropy of the model's output with this label. Defaults to the
        model's own prediction (the argmax of its output) for each probe
        input. Checked against the model's number of outputs when used.

    Returns
    -------
    CapacityReport
        The first layer, one :class:`Verdict` per bound and the risk level.
        An unsupported first layer gives an ``unsupported_first_layer``
        verdict, not an error.

    Raises
    ------
    InvalidInputError
        If ``model`` is not a module, a count is not a positive int,
        ``probe`` is not a floating-point tensor (or array) of finite values,
        or ``probe_labels`` is given without ``probe``, is not a 1-D integer
        tensor, array or list of one non-negative class index per probe
        input, or (when used) names a class the model does not output; every
        problem found before the model runs is listed.
    ShapeError
        If ``input_shape`` is malformed or the model fails on it, or
        ``probe`` is not of shape ``(P, *input_shape)``.

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

    Behind a ReLU only the positive outputs of the layer are known, so
    ``conv_exact_rank`` (all outputs) overstates what leaks: measured on real
    images, it says "exact" for filter counts up to about twice those at which
    the input is rebuilt (docs/theory.md, section 5). ``conv_exact_rank_relu``
    is the exact test for the inputs given as ``probe``; for other inputs it
    is a prediction, and inputs near the threshold split. It holds when at
    least half of the probe inputs (:data:`HOLDING_FRACTION`) are determined,
    not all of them: the fraction estimates how likely a client's input is to
    be exposed, and a rule that needs every probe input calls a modality safe
    when 7 of 8 of its inputs are rebuilt.

    Which equations count depends on the gradient. With one sample
    (``B_eff = 1``: ``local_examples`` when given, else ``batch_size``, else
    one, the worst case the risk level also assumes) the verdict adds the
    convolution's kernel-gradient rows, built and solved as
    :class:`~fl_audit.attacks.ConvInversion` (its default) does, and
    ``holds`` reads that rank (quantity ``kernel_equations: true``,
    ``probe_ranks_kernel``); the rank without them is reported beside it
    (``probe_ranks``). With more samples the kernel gradient sums over
    them and only the rank without those rows is read. The kernel rows need
    the error at the convolution's output, taken from the model at the
    probe input with the clients' cross-entropy loss: an attacker has it
    when the layers above give it away (``conv_inversion`` recovers it from
    an FC layer above). It costs one rank computation per probe input, two
    with the kernel rows (about 1 s more for a 3x32x32 input).
    """
    tensor, labels = _check_arguments(
        model, batch_size, local_examples, exact_rank_limit, probe, probe_labels
    )
    shape = check_input_shape(input_shape)
    if tensor is not None:
        tensor = _check_probe_shape(tensor, shape)
    first = find_first_layer(model, shape)
    _check_fits(first, shape)
    logger.debug("bounds: first layer %r is %s", first.path, first.kind)

    if first.kind == "linear":
        info, verdicts = _fc_verdicts(first, batch_size, local_examples)
    elif first.kind in ("conv1d", "conv2d"):
        info, verdicts = _conv_verdicts(first, batch_size, exact_rank_limit)
        if tensor is not None:
            plain = next(v for v in verdicts if v.name == "conv_exact_rank")
            samples = _effective_samples(batch_size, local_examples)
            verdicts.append(
                _conv_exact_rank_relu(
                    plain,
                    model,
                    first,
                    shape,
                    tensor,
                    labels,
                    samples,
                    exact_rank_limit,
                )
            )
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
    probe: object,
    probe_labels: object = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check every argument, raise once; return the probe (float64) and labels."""
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
    tensor = _probe_tensor(probe, problems)
    labels = _probe_labels(probe_labels, probe, tensor, problems)
    if problems:
        raise InvalidInputError("bounds.analyze arguments", problems)
    return tensor, labels


def _probe_labels(
    labels: object, probe: object, tensor: torch.Tensor | None, problems: list[str]
) -> torch.Tensor | None:
    """``probe_labels`` as an int64 tensor, or ``None``; problems are appended."""
    if labels is None:
        return None
    if probe is None:
        problems.append(
            "probe_labels was given without probe; pass the probe inputs they "
            "label, or leave probe_labels out"
        )
        return None
    if isinstance(labels, list | tuple):
        if not all(isinstance(v, int | np.integer) for v in labels) or any(
            isinstance(v, bool) for v in labels
        ):
            kinds = sorted({type(v).__name__ for v in labels})
            problems.append(
                f"probe_labels must hold class indices (int), got {kinds}; pass "
                "one int per probe input"
            )
            return None
        labels = torch.tensor([int(v) for v in labels], dtype=torch.int64)
    elif isinstance(labels, np.ndarray):
        if labels.dtype.kind not in "iu":
            problems.append(
                f"probe_labels must be integer class indices, got a NumPy array of "
                f"dtype {labels.dtype}; pass labels.astype(int) if they are whole"
            )
            return None
        labels = torch.from_numpy(labels.astype(np.int64))
    if not isinstance(labels, torch.Tensor):
        problems.append(
            f"probe_labels must be a torch.Tensor, NumPy array or list of class "
            f"indices, got {type(labels).__name__}"
        )
        return None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        problems.append(
            f"probe_labels must be integer class indices, got dtype {labels.dtype}; "
            "pass labels.long() if they are whole numbers"
        )
        return None
    labels = labels.detach().to(device="cpu", dtype=torch.int64)
    if labels.dim() != 1:
        problems.append(
            f"probe_labels must be 1-D (one class index per probe input), got "
            f"shape {tuple(labels.shape)}; pass class indices, not one-hot rows"
        )
        return None
    if tensor is not None and labels.numel() != tensor.shape[0]:
        problems.append(
            f"probe_labels has {labels.numel()} label(s) for {tensor.shape[0]} "
            "probe input(s); pass one label per probe input"
        )
        return None
    if labels.numel() and int(labels.min()) < 0:
        problems.append(
            f"probe_labels must be non-negative class indices, got {int(labels.min())}"
        )
        return None
    return labels


def _effective_samples(
    batch_size: int | None, local_examples: int | None
) -> tuple[int, str]:
    """``B_eff``, the inputs the gradient mixes, and how it was read."""
    if local_examples is not None:
        return local_examples, f"N = {local_examples} local examples"
    if batch_size is not None:
        return batch_size, f"a batch of B = {batch_size}"
    return 1, "one input (batch size unknown: worst case)"


def _probe_tensor(probe: object, problems: list[str]) -> torch.Tensor | None:
    """``probe`` as a float64 CPU tensor, or ``None``; problems are appended."""
    if probe is None:
        return None
    if isinstance(probe, np.ndarray):
        if probe.dtype.kind not in "fiub":
            problems.append(
                f"probe must hold real numbers, got a NumPy array of dtype "
                f"{probe.dtype}; pass the inputs as a float array"
            )
            return None
        probe = torch.from_numpy(np.ascontiguousarray(probe))
    if not isinstance(probe, torch.Tensor):
        problems.append(
            f"probe must be a torch.Tensor (or NumPy array) of inputs of shape "
            f"(P, *input_shape), got {type(probe).__name__}; stack the inputs, "
            "e.g. torch.stack(list_of_inputs)"
        )
        return None
    if not probe.is_floating_point():
        problems.append(
            f"probe must be floating point and scaled as the model receives its "
            f"inputs, got dtype {probe.dtype}; convert it as the clients "
            "preprocess (e.g. probe.float() / 255 for 8-bit images)"
        )
        return None
    tensor = probe.detach().to(device="cpu", dtype=torch.float64)
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        problems.append(
            f"probe holds {bad} NaN or infinite value(s) (of {tensor.numel()}); "
            "pass finite inputs"
        )
        return None
    return tensor


def _check_probe_shape(probe: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Raise ShapeError unless ``probe`` is ``(P, *shape)`` with ``P >= 1``."""
    got = tuple(probe.shape)
    if got[1:] == shape and got[0] >= 1:
        return probe
    if got == shape:
        fix = "add the batch dimension: probe.unsqueeze(0) for one input"
    elif got[1:] == shape:
        fix = "pass at least one input"
    else:
        fix = f"pass P inputs of the model's input shape {shape}, stacked"
    raise ShapeError(
        "probe",
        [f"expected shape (P, {', '.join(map(str, shape))}), got {got}; {fix}"],
    )


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
    # Imported here: fl_audit.attacks imports this module.
    from fl_audit.attacks._chain import conv_operator

    def outcome(ranks: list[int]) -> str:
        rank = ranks[0]
        if rank == n:
            return "the layer output determines the input exactly"
        return (
            f"the layer output determines a {rank}-dimensional projection "
            f"of the {n}-dimensional input"
        )

    return _exact_rank_verdict(
        name="conv_exact_rank",
        formula="rank(A) = C*d^2, A: (h*d'^2) x (C*d^2) the layer's linear map",
        quantities={**base, "equations": m, "unknowns": n},
        label=type(module).__name__,
        m=m,
        n=n,
        limit=limit,
        ranks=lambda: [_matrix_rank(conv_operator(module, in_shape).A)],
        outcome=outcome,
        note=f"numerical rank: singular values above {RANK_RTOL:g} * sigma_max",
    )


def _exact_rank_verdict(
    *,
    name: str,
    formula: str,
    quantities: dict[str, Quantity],
    label: str,
    m: int,
    n: int,
    limit: int,
    ranks: Callable[[], list[int]],
    outcome: Callable[[list[int]], str],
    note: str,
    extra: Callable[[list[int]], dict[str, Quantity]] | None = None,
    reading: Callable[[list[int]], int] = min,
) -> Verdict:
    """The exact-rank check of an ``m x n`` operator, one rank per input tried.

    ``ranks`` computes the ranks (one for the plain operator, one per probe
    input for a restricted one); ``reading`` turns them into the verdict's
    ``actual`` (by default the smallest), and the verdict holds when that is
    ``n``. It is declined above the size limit and reported, not raised, when
    the computation fails.
    """

    def verdict(
        rank: int | None, text: str, why: str, more: dict[str, Quantity]
    ) -> Verdict:
        return Verdict(
            name=name,
            source="exact rank",
            formula=formula,
            quantities={**quantities, **more},
            required=n,
            actual=rank,
            holds=None if rank is None else rank == n,
            outcome=text,
            note=why,
        )

    if min(m, n) > limit or m * n > _MAX_OPERATOR_ENTRIES:
        return verdict(
            None,
            "not evaluated",
            f"declined: the operator is {m} x {n}; the exact rank is computed "
            f"up to min(m, n) = {limit} (exact_rank_limit) and "
            f"{_MAX_OPERATOR_ENTRIES} entries. The counts are necessary "
            "conditions only",
            {},
        )
    try:
        found = ranks()
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
        logger.warning("bounds: %s of %s failed: %s", name, label, exc)
        return verdict(
            None, "not evaluated", f"failed: {type(exc).__name__}: {exc}", {}
        )
    more = extra(found) if extra is not None else {}
    return verdict(reading(found), outcome(found), note, more)


def gram_rank(N: np.ndarray | scipy.sparse.sparray) -> tuple[int, float]:
    """Numerical rank of ``M`` from its Gram matrix ``N`` (``M^T M`` or ``M M^T``).

    Counts the singular values of ``M`` above ``RANK_RTOL`` times the largest,
    i.e. the eigenvalues of ``N`` above ``tau = RANK_RTOL**2 * lambda_max``.
    ``N - tau I`` has a Cholesky factor exactly when all of them are; otherwise
    the inertia of its LDL^T factorisation counts them (Sylvester's law). Either
    costs a fraction of a symmetric eigendecomposition, and their rounding
    (about ``k * eps * lambda_max`` for ``k x k``) lies far below ``tau``.
    A sparse ``N`` gives ``lambda_max`` at the cost of its entries and is then
    factored dense. Returns the rank and ``lambda_max``.

    Raises :class:`InvalidInputError` when ``N`` is not a square matrix of
    finite numbers.
    """
    values = N if isinstance(N, np.ndarray) else N.data
    if N.ndim != 2 or N.shape[0] != N.shape[1]:
        raise InvalidInputError(
            "gram_rank argument",
            [f"N has shape {N.shape}; pass a square Gram matrix M^T M or M M^T"],
        )
    if not np.isfinite(values).all():
        raise InvalidInputError(
            "gram_rank argument",
            ["N holds NaN or Inf; build it from a matrix of finite numbers"],
        )
    k = N.shape[0]
    empty = not N.any() if isinstance(N, np.ndarray) else N.count_nonzero() == 0
    if k == 0 or empty:
        return 0, 0.0
    top = _top_eigenvalue(N)
    if top <= 0.0:
        return 0, 0.0
    dense = N if isinstance(N, np.ndarray) else N.toarray()
    shifted = dense - top * RANK_RTOL**2 * np.eye(k)
    try:
        scipy.linalg.cho_factor(shifted, lower=True, overwrite_a=False)
        return k, top
    except np.linalg.LinAlgError:
        _, d, _ = scipy.linalg.ldl(shifted, lower=True)
        eig = scipy.linalg.eigvalsh_tridiagonal(
            np.diag(d).copy(), np.diag(d, -1).copy()
        )
        return int((eig > 0).sum()), top


def _top_eigenvalue(N: np.ndarray | scipy.sparse.sparray) -> float:
    """Largest eigenvalue of a symmetric ``N``: Lanczos, or dense where it fails."""
    k = N.shape[0]
    if k > 2:
        try:
            return float(
                scipy.sparse.linalg.eigsh(
                    N, k=1, which="LA", tol=1e-6, return_eigenvectors=False
                )[0]
            )
        except scipy.sparse.linalg.ArpackError:  # no convergence
            pass
    dense = N if isinstance(N, np.ndarray) else N.toarray()
    return float(
        scipy.linalg.eigh(dense, eigvals_only=True, subset_by_index=[k - 1] * 2)[0]
    )


def _matrix_rank(A: scipy.sparse.sparray) -> int:
    """Numerical rank of a sparse ``A`` (:func:`gram_rank` of its smaller side)."""
    r, n = A.shape
    if min(r, n) == 0:
        return 0
    if n <= r:
        csc = A.tocsc()  # its transpose is CSR: the product measured 2x faster
        return gram_rank(csc.T @ csc)[0]
    csr = A.tocsr()
    return gram_rank(csr @ csr.T)[0]


# --------------------------------------------------------------------------
# Convolutional first layer behind an activation


_ZEROING = ("relu", "relu6")
"""Activation kinds (of :mod:`fl_audit.attacks._chain`) that zero outputs."""

_SUPPORT_EPS = 1e3
"""An output counts as positive above ``_SUPPORT_EPS * eps`` of the largest.

``eps`` is that of the model's dtype: the threshold ConvInversion applies to
the activations it recovers from a gradient of that precision.
"""

HOLDING_FRACTION = 0.5
"""``conv_exact_rank_relu`` holds when at least this fraction of probes is exact.

The probe inputs stand for the inputs of a modality: the fraction of them
that the gradient determines estimates how likely a client's input is to be
rebuilt exactly. Calling the input exposed when that estimate is at least
one half is the yes/no that is wrong least often for one unseen input, and
on a tie it errs on the side of exposure. Requiring every probe input would
turn "7 of 8 inputs rebuilt" into "not exact" and understate the risk.
"""


def _typical_rank(ranks: list[int]) -> int:
    """The rank reached by at least ``HOLDING_FRACTION`` of the probe inputs."""
    ordered = sorted(ranks, reverse=True)
    return ordered[max(1, math.ceil(HOLDING_FRACTION * len(ordered))) - 1]


@dataclass(frozen=True)
class _ProbeRank:
    """Ranks of the restricted operator for one probe input.

    ``rank_kernel`` is the rank with the kernel-gradient rows added, ``None``
    when they are left out.
    """

    rank: int
    kept: int
    uncovered: int
    rank_kernel: int | None = None


@dataclass(frozen=True)
class _KernelPlan:
    """What the kernel-equation reading needs, or why it is left out.

    ``errors`` holds, per probe input, the error ``dL/dz`` at the
    convolution's output ``(h, L)`` for the cross-entropy of its label
    (``labels``, from ``source``: ``"given"`` or ``"model prediction"``);
    ``rows`` is the number of kernel-gradient rows. Without ``errors``,
    ``why_not`` says why the rows are left out.
    """

    why_not: str = ""
    errors: list[np.ndarray] | None = None
    labels: list[int] | None = None
    source: str | None = None
    rows: int | None = None

    @property
    def used(self) -> bool:
        return self.errors is not None


def _conv_exact_rank_relu(
    plain: Verdict,
    model: nn.Module,
    first: FirstLayer,
    shape: tuple[int, ...],
    probe: torch.Tensor,
    probe_labels: torch.Tensor | None,
    samples: tuple[int, str],
    limit: int,
) -> Verdict:
    """The exact rank of the first segment on the outputs its activation keeps.

    The segment is the convolution and the linear steps after it (average
    pooling, eval-mode BatchNorm, reshapes) up to the first element-wise
    activation, as :func:`fl_audit.attacks._chain.trace_first_segment` finds
    them. ``samples`` is the number of inputs the gradient mixes and how it
    was read (``B_eff`` of the risk level); with one, the convolution's
    kernel-gradient rows join each probe's system and ``holds`` reads the
    rank with them.
    """
    # Imported here: fl_audit.attacks imports this module.
    from fl_audit.attacks._chain import ChainStop, segment_operator, trace_first_segment
    from fl_audit.attacks.conv_inversion import _kernel_rows, _rows

    n = int(plain.quantities["unknowns"])  # type: ignore[arg-type]
    base = {
        k: v for k, v in plain.quantities.items() if k not in ("equations", "unknowns")
    }
    quantities: dict[str, Quantity] = {
        **base,
        "unknowns": n,
        "probes": int(probe.shape[0]),
        "kernel_equations": False,
        "holding_fraction": HOLDING_FRACTION,
    }
    rule = f"for at least {HOLDING_FRACTION:g} of the probe inputs"
    plain_formula = (
        f"rank(A_+) = C*d^2 {rule}, A_+: the rows of the layer's map (up to its "
        "activation) whose activation output is known"
    )

    def not_applicable(why: str) -> Verdict:
        return Verdict(
            name="conv_exact_rank_relu",
            source="exact rank",
            formula=plain_formula,
            quantities=quantities,
            required=n,
            actual=None,
            holds=None,
            outcome="not applicable",
            note=why,
        )

    label = f"{first.path or '<model>'} ({type(first.module).__name__})"
    try:
        found = trace_first_segment(model, shape, first.path)
    except ChainStop as exc:
        return not_applicable(
            f"the output of {label} is not a linear map of the input up to an "
            f"activation: {exc}"
        )
    act = found.activation
    if act is None:
        return not_applicable(
            f"{found.reason}: the whole output is known to whoever obtains it, "
            "so conv_exact_rank is the exact test"
        )
    if act.kind not in _ZEROING:
        return not_applicable(
            f"{act.label} zeroes no output (it is invertible off saturation): "
            "the whole output is known to whoever obtains it, so "
            "conv_exact_rank is the exact test"
        )

    seg = found.segment
    m = math.prod(seg.out_shape)
    quantities.update({"equations": m, "layers": seg.label, "activation": act.label})
    with torch.no_grad():
        pre = seg.apply(probe.reshape(-1, *seg.in_shape))  # (P, m)
    dtype = cast(nn.Conv1d | nn.Conv2d, first.module).weight.dtype
    eps = _SUPPORT_EPS * float(torch.finfo(dtype).eps)
    plan = _kernel_plan(model, first, probe, probe_labels, samples, n, limit)
    quantities.update(
        {
            "kernel_equations": plan.used,
            "kernel_rows": plan.rows,
            "probe_labels": plan.labels,
            "probe_label_source": plan.source,
        }
    )
    formula = plain_formula
    if plan.used:
        formula = (
            f"rank([A_+; E]) = C*d^2 {rule}, A_+: the rows of the layer's map (up "
            "to its activation) whose activation output is known, E: the rows of "
            "its kernel gradient (one sample)"
        )

    def measure() -> list[_ProbeRank]:
        op = segment_operator(seg)
        out = []
        for i, row in enumerate(pre):
            post = act.module(row)
            thr = eps * max(float(post.abs().max()), 1e-300)
            keep = post > thr
            if act.kind == "relu6":
                keep &= post < 6.0 - thr
            rows = np.flatnonzero(keep.numpy())
            kept = op.A[rows]
            rank = _matrix_rank(kept)
            rank_kernel = None
            if plan.errors is not None:
                # The rows ConvInversion solves for this input, kernel rows added
                # (its own row scaling; the right-hand side plays no part).
                conv = seg.steps[0]
                E = _kernel_rows(
                    cast(nn.Conv1d | nn.Conv2d, conv.module),
                    conv.in_shape,
                    plan.errors[i],
                )
                assert E is not None  # the plan checked the size
                system, _, _, _ = _rows(
                    op, row.numpy(), keep.numpy(), (E, np.zeros(E.shape[0]))
                )
                rank_kernel = _matrix_rank(system)
            out.append(_ProbeRank(rank, int(rows.size), _uncovered(kept), rank_kernel))
        return out

    results: list[_ProbeRank] = []

    def ranks() -> list[int]:
        results.extend(measure())
        if plan.used:
            return [int(cast(int, r.rank_kernel)) for r in results]
        return [r.rank for r in results]

    what = f"the outputs {act.label} keeps" + (
        " and the kernel gradient" if plan.used else ""
    )

    def outcome(found_ranks: list[int]) -> str:
        full = sum(r == n for r in found_ranks)
        total = len(found_ranks)
        without = ""
        if plan.used:
            alone = sum(r.rank == n for r in results)
            without = f" ({alone} of {total} without the kernel gradient)"
        if full == total:
            return (
                f"every one of the {total} probe input(s) is determined by "
                f"{what}{without}"
            )
        share = (
            "at least half: a typical input of this kind is exposed"
            if full >= HOLDING_FRACTION * total
            else "fewer than half: a typical input is exposed only in part"
        )
        return (
            f"{full} of {total} probe input(s) are determined by {what}{without}, "
            f"{share}; the others only up to a projection (smallest rank "
            f"{min(found_ranks)} of {n})"
        )

    def extra(found_ranks: list[int]) -> dict[str, Quantity]:
        full = sum(r.rank == n for r in results)
        more: dict[str, Quantity] = {
            "probe_ranks": [r.rank for r in results],
            "probe_kept": [r.kept for r in results],
            "probe_uncovered": [r.uncovered for r in results],
            "full_rank_probes": full,
            "full_rank_fraction": full / len(results),
            "probe_ranks_kernel": None,
            "full_rank_probes_kernel": None,
            "full_rank_fraction_kernel": None,
        }
        if plan.used:
            full_k = sum(r == n for r in found_ranks)
            more.update(
                {
                    "probe_ranks_kernel": found_ranks,
                    "full_rank_probes_kernel": full_k,
                    "full_rank_fraction_kernel": full_k / len(found_ranks),
                }
            )
        return more

    reading = (
        "probe_ranks_kernel (the kernel-gradient rows included)"
        if plan.used
        else "probe_ranks (no kernel-gradient rows: " + plan.why_not + ")"
    )
    return _exact_rank_verdict(
        name="conv_exact_rank_relu",
        formula=formula,
        quantities=quantities,
        label=seg.label,
        m=m,
        n=n,
        limit=limit,
        ranks=ranks,
        outcome=outcome,
        note=(
            f"holds when at least {HOLDING_FRACTION:g} of the probe inputs give "
            f"full column rank {n} (actual: the rank reached by that many); it "
            f"reads {reading}. An input value no kept output reads counts as "
            f"lost (probe_uncovered); outputs count as kept above {eps:.0e} of "
            f"the largest; numerical rank: singular values above {RANK_RTOL:g} "
            "* sigma_max (with kernel rows, of the row-normalised system, as "
            "conv_inversion solves it). Whether an attacker obtains the "
            "activation output (and, for the kernel rows, the error above it) "
            f"is a question for the layers above: "
            f"{_chain_status(model, shape, first.path)}"
        ),
        extra=extra,
        reading=_typical_rank,
    )


def _kernel_plan(
    model: nn.Module,
    first: FirstLayer,
    probe: torch.Tensor,
    probe_labels: torch.Tensor | None,
    samples: tuple[int, str],
    n: int,
    limit: int,
) -> _KernelPlan:
    """The output errors the kernel-gradient rows need, or why they are left out.

    The kernel gradient of one sample is linear in its input once the error at
    the convolution's output is known; a batch's kernel gradient sums over its
    samples, so with more than one sample the rows do not apply. The error is
    that of the cross-entropy of each probe input with its label (given, or
    the model's own prediction), computed on a float64 eval-mode copy.

    Raises
    ------
    InvalidInputError
        If a given label is not an output index of the model.
    """
    from fl_audit.attacks.conv_inversion import _MAX_KERNEL_ENTRIES

    count, what = samples
    if count > 1:
        return _KernelPlan(
            f"the gradient mixes {what}, whose kernel gradients sum, so its rows "
            "do not determine any one input"
        )
    if n > limit:
        return _KernelPlan(
            f"the system with them has {n} unknowns, above exact_rank_limit = {limit}"
        )
    conv = cast(nn.Conv1d | nn.Conv2d, first.module)
    per = conv.in_channels // conv.groups * math.prod(conv.kernel_size)

    work = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    layer = work.get_submodule(first.path)
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    x = probe.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = work(x)
    finally:
        handle.remove()
    where = f"{first.path or '<model>'} ({type(conv).__name__})"
    if len(outputs) != 1:
        return _KernelPlan(
            f"{where} is called {len(outputs)} times in one forward pass, so its "
            "kernel gradient sums several calls"
        )
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else "no tensor"
        return _KernelPlan(
            f"the model's output {got} is not a batch of class scores (P, classes), "
            "so the clients' cross-entropy loss is not defined on it"
        )
    positions = math.prod(outputs[0].shape[2:])
    if conv.out_channels * per * positions > _MAX_KERNEL_ENTRIES:
        return _KernelPlan(
            f"its {conv.out_channels * per} kernel-gradient rows would hold more "
            f"than {_MAX_KERNEL_ENTRIES} entries"
        )
    classes = int(logits.shape[1])
    if probe_labels is None:
        labels = logits.detach().argmax(dim=1)
        source = "model prediction"
    else:
        labels = probe_labels
        source = "given"
        bad = [int(v) for v in labels if not 0 <= int(v) < classes]
        if bad:
            raise InvalidInputError(
                "bounds.analyze arguments",
                [
                    f"probe_labels must be class indices in [0, {classes}) for a "
                    f"model with {classes} outputs, got {bad[:5]}; pass each probe "
                    "input's class index"
                ],
            )
    loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
    # Summed: each sample's loss reaches only its own output of the layer.
    (grad,) = torch.autograd.grad(loss, outputs[0])  # (P, h, *spatial')
    errors = [g.reshape(conv.out_channels, -1).numpy() for g in grad.detach()]
    return _KernelPlan(
        errors=errors,
        labels=[int(v) for v in labels],
        source=source,
        rows=conv.out_channels * per,
    )


def _uncovered(kept: scipy.sparse.csr_matrix) -> int:
    """Input values that no kept output depends on (zero columns of ``A[rows]``)."""
    reads = np.asarray(abs(kept).sum(axis=0)).reshape(-1)
    return int((reads == 0).sum())


def _chain_status(model: nn.Module, shape: tuple[int, ...], path: str) -> str:
    """Whether the chain above the convolution reaches an FC layer."""
    from fl_audit.attacks._chain import ChainStop, trace_chain

    try:
        chain = trace_chain(model, shape, path)
    except ChainStop as exc:
        return f"the chain to an FC layer stops ({exc}); conv_inversion does not apply"
    return (
        f"the chain reaches FC layer {chain.fc_name}, whose gradient gives the "
        "activation output away (conv_inversion)"
    )


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
    eff, what = _effective_samples(batch_size, local_examples)

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
    relu = by_name.get("conv_exact_rank_relu")
    if relu is not None and relu.holds is not None:
        with_kernel = (
            " with the kernel gradient"
            if relu.quantities.get("kernel_equations")
            else ""
        )
        rule = f"behind the activation{with_kernel}, for at least "
        rule += f"{HOLDING_FRACTION:g} of the probe inputs"
        if relu.holds:
            return "exposed", f"full column rank {relu.actual} {rule}: {relu.outcome}"
        return "partially_exposed", (
            f"rank {relu.actual} < {relu.required} {rule}: {relu.outcome}"
        )
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
