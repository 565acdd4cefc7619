"""Inversion of a convolutional model: from the first FC layer down to the input.

For a model whose raw input meets an ``nn.Conv1d``/``nn.Conv2d`` and that
reaches an ``nn.Linear`` later, the gradient leaks the input in two steps
(Qian & Hansen, arXiv 2010.15718, result 3, worked out in docs/theory.md):

1. *The FC step.* The first FC layer's input ``f`` is the flattened
   activation of the layers below, and ``dL/dW_fc = delta f^T``,
   ``dL/db_fc = delta`` give it exactly (result 1). A batch is separated
   there first: by the peeling of :class:`AnalyticFCInversion` when the FC
   layer is hidden, or, when it is the classifier (few outputs, gradient rank
   at most classes - 1), by successive projection on the columns of
   ``dL/dW_fc``: a feature position lit by one sample only gives a column
   parallel to that sample's output error, the extreme columns are those
   errors, and ``dL/db_fc`` fixes their scales.
2. *The walk down.* The chain below is cut at its element-wise
   nonlinearities. Each linear segment (convolutions, average pooling,
   eval-mode BatchNorm, reshapes) is a sparse operator ``A`` (assembled by
   probing, see :mod:`fl_audit.attacks._chain`); its output is known where the
   activation above it can be undone (ReLU: where the output is positive;
   LeakyReLU, Sigmoid, Tanh: everywhere off saturation), and its input is the
   least-squares solution of ``A v + b = z`` on those rows. A segment that
   starts with a convolution adds that convolution's weight-gradient
   equations ``dL/dK_j = sum_p delta_{j,p} patch_p(v)``, linear in ``v`` once
   the error ``delta`` below the FC layer is known (one sample only), as
   R-GAP (Zhu & Blaschko, ICLR 2021) does.

Each solve is certified without ground truth by the rank of the restricted
system (full column rank: the input is unique) and its relative residual (at
machine precision: the equations are consistent). An input is certified when
every solve on its way down is, no input value is left without equations,
and the model maps it back onto the recovered FC input.

Notes
-----
The weight-gradient equations need a single sample: a batch's kernel
gradient sums over its samples. Successive projection needs non-negative
features (a ReLU below the FC layer) and at most ``classes - 2`` samples for
a certain count: at ``rank = classes - 1`` the batch may hold more samples
than the rank shows, and the separation is not certified. Max pooling,
train-mode BatchNorm, per-sample normalisation, residual connections,
functional activations between modules, multi-step updates (the weights
moved) and models without an FC layer above the convolution are refused by
:meth:`ConvInversion.applicability`, which names the layer.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import nn

from fl_audit._logging import logger
from fl_audit.attacks._chain import (
    Chain,
    ChainStop,
    Operator,
    Segment,
    Step,
    block_rows,
    segment_operator,
    tap_indices,
    trace_chain,
)
from fl_audit.attacks.analytic_fc import AnalyticFCInversion, _anchor_pixels
from fl_audit.attacks.base import Applicability, Attack
from fl_audit.attacks.registry import register_attack
from fl_audit.bounds import RANK_RTOL, gram_rank
from fl_audit.core import AttackResult, AttackTarget
from fl_audit.errors import FLAuditError, InvalidInputError, UnsupportedModelError
from fl_audit.layers import find_first_layer

__all__ = ["ConvInversion", "ConvInversionResult", "LayerSolve"]

_MAX_KERNEL_ENTRIES = 2**25
"""Most entries of one convolution's kernel-gradient rows (left out above)."""


@dataclass(frozen=True)
class LayerSolve:
    """One least-squares solve of the walk down, for one sample.

    Attributes
    ----------
    sample:
        Index of the sample in the result.
    layer:
        The segment solved, e.g. ``"0 (Conv2d) -> 1 (AvgPool2d)"``.
    unknowns:
        Values of the segment's input.
    equations:
        Outputs of the segment.
    kept:
        Outputs whose value is known (positive ReLU outputs, ...).
    weight_equations:
        Rows added from the convolution's kernel gradient (0 if none).
    uncovered:
        Unknowns that no kept equation touches (lost, reported apart).
    rank:
        Numerical rank of the restricted system on the covered unknowns
        (singular values above ``RANK_RTOL`` of the largest); ``None`` when
        the iterative solver was used.
    condition:
        Ratio of extreme singular values (estimated by LSMR when ``rank`` is
        ``None``).
    residual:
        ``||M v - r|| / ||r||`` of the row-normalised system.
    solver:
        ``"cholesky"`` (normal equations), ``"lsmr"``, ``"none"`` (no
        unknown covered) or ``"skipped"`` (fewer equations than unknowns,
        with ``stop_underdetermined``).
    exact:
        Full column rank on the covered unknowns and residual at machine
        precision.
    """

    sample: int
    layer: str
    unknowns: int
    equations: int
    kept: int
    weight_equations: int
    uncovered: int
    rank: int | None
    condition: float
    residual: float
    solver: str
    exact: bool


@dataclass
class ConvInversionResult(AttackResult):
    """An :class:`AttackResult` with the certificate of every solve."""

    solves: list[LayerSolve] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["solves"] = [asdict(s) for s in self.solves]
        return out


@dataclass
class _Tol:
    """Thresholds set from the precision of the observed gradient."""

    eps: float

    @property
    def residual(self) -> float:
        return max(1e-11, 1e3 * self.eps)

    @property
    def support(self) -> float:
        # Relative to the largest activation: float32 rounding of the FC step
        # leaves about 1e-7 on zero features, so 1e-4 in float32, 2e-13 in float64.
        return 1e3 * self.eps

    @property
    def rank(self) -> float:
        return max(1e-10, 1e3 * self.eps)


@dataclass
class _Sample:
    """One sample on its way down."""

    features: np.ndarray  # (d_fc,) the FC layer's input
    label: int
    fc_certified: bool
    delta_fc: np.ndarray | None  # (out_fc,) its FC output error, B = 1 only


@register_attack("conv_inversion")
class ConvInversion(Attack):
    """Rebuild the inputs of a convolutional model from its gradient.

    Parameters
    ----------
    weight_equations:
        Add each convolution's kernel-gradient equations to its solve (one
        sample only). Lowers the filter count needed for exactness.
    dense_limit:
        Largest number of unknowns of one solve handled by a dense Cholesky
        factorisation of the normal equations (exact rank included); larger
        solves use LSMR on the sparse system (columns equilibrated),
        certified by its condition estimate instead of the rank. ``0``:
        LSMR for every solve.
    time_budget_s:
        Wall-clock budget for the whole attack. A solve that would start
        after it is skipped (reported as ``"skipped"``, the input left at
        zero), and an LSMR solve runs at most the iterations that fit in what
        is left (timed on one product); dense solves (``dense_limit``) are
        not interrupted. ``None``: no budget.
    stop_underdetermined:
        End a sample's walk down at the first solve with fewer equations
        than unknowns (its input cannot be unique there; the solve is
        reported as ``"skipped"`` and the input left at zero) instead of
        returning the minimum-norm answer. Saves the time of solves that
        cannot be certified.
    tolerance:
        LSMR's stopping tolerance (``atol`` and ``btol``). The default
        solves to machine precision; a looser one (``1e-8``) returns a close
        input several times faster, but its residual stays above machine
        precision, so it is never certified (prior_guided's start uses it).
    max_batch:
        Largest batch separated at the FC layer.

    Notes
    -----
    See the module docstring for the method and its limits.
    """

    def __init__(
        self,
        *,
        weight_equations: bool = True,
        dense_limit: int = 4096,
        max_batch: int = 64,
        tolerance: float = 1e-15,
        stop_underdetermined: bool = False,
        time_budget_s: float | None = None,
    ) -> None:
        problems = []
        for flag, given in (
            ("weight_equations", weight_equations),
            ("stop_underdetermined", stop_underdetermined),
        ):
            if not isinstance(given, bool):
                problems.append(f"{flag} must be True or False, got {given!r}")
        for name, value, least in (
            ("dense_limit", dense_limit, 0),
            ("max_batch", max_batch, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                problems.append(f"{name} must be an int >= {least}, got {value!r}")
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, int | float)
            or not 0 < tolerance < 1
        ):
            problems.append(
                f"tolerance must be a number in (0, 1), e.g. 1e-8, got {tolerance!r}"
            )
        if time_budget_s is not None and (
            isinstance(time_budget_s, bool)
            or not isinstance(time_budget_s, int | float)
            or not time_budget_s > 0
        ):
            problems.append(
                f"time_budget_s must be a positive number of seconds or None, "
                f"got {time_budget_s!r}"
            )
        if problems:
            raise InvalidInputError("ConvInversion options", problems)
        self.weight_equations = weight_equations
        self.dense_limit = dense_limit
        self.max_batch = max_batch
        self.tolerance = float(tolerance)
        self.stop_underdetermined = stop_underdetermined
        self.time_budget_s = None if time_budget_s is None else float(time_budget_s)

    def __repr__(self) -> str:
        return (
            f"ConvInversion(weight_equations={self.weight_equations}, "
            f"dense_limit={self.dense_limit}, max_batch={self.max_batch}, "
            f"tolerance={self.tolerance:g}, "
            f"stop_underdetermined={self.stop_underdetermined}, "
            f"time_budget_s={self.time_budget_s})"
        )

    # ------------------------------------------------------------------ checks

    def applicability(self, target: AttackTarget) -> Applicability:
        try:
            chain = self._chain(target)
        except ChainStop as exc:
            return Applicability(False, str(exc))
        return Applicability(
            True,
            f"convolutional chain {' -> '.join(s.label for s in chain.steps)} "
            f"into FC layer {chain.fc_name}",
        )

    def _chain(self, target: AttackTarget) -> Chain:
        if target.source == "update":
            raise ChainStop(
                "a multi-step update: the weights moved during local training, so "
                "the feature maps were computed at weights the server does not have"
            )
        first = find_first_layer(target.model, target.input_shape)
        if first.kind not in ("conv1d", "conv2d"):
            raise ChainStop(
                first.reason
                or f"the first layer {first.path} is "
                f"{type(first.module).__name__}, not nn.Conv1d/nn.Conv2d"
            )
        return trace_chain(target.model, target.input_shape, first.path)

    # --------------------------------------------------------------------- run

    def run(self, target: AttackTarget) -> ConvInversionResult:
        """Invert ``target``: separate at the FC layer, then walk down.

        Raises
        ------
        UnsupportedModelError
            If :meth:`applicability` rejects the target.
        """
        start = time.perf_counter()
        try:
            chain = self._chain(target)
        except ChainStop as exc:
            raise UnsupportedModelError(
                f"conv_inversion does not apply: {exc}"
            ) from None
        notes = list(chain.notes)
        raw = target.gradients[f"{chain.fc_name}.weight"]
        tol = _Tol(float(torch.finfo(raw.dtype).eps))
        try:
            samples, estimate = self._separate(target, chain, tol, notes)
            deadline = (
                None if self.time_budget_s is None else start + self.time_budget_s
            )
            inputs, certified, solves = self._walk_all(
                target, chain, samples, tol, notes, deadline
            )
        except (RuntimeError, ValueError, np.linalg.LinAlgError, FLAuditError) as exc:
            # A model the chain could not be solved on is reported, not raised.
            notes.append(f"the inversion failed: {type(exc).__name__}: {exc}")
            logger.warning("conv_inversion failed: %s", exc)
            return self._result(target, [], [], [], [], None, start, notes)
        labels = [s.label for s in samples]
        residual = max(
            (s.residual for s in solves if s.solver != "skipped"), default=None
        )
        return self._result(
            target, inputs, certified, labels, solves, estimate, start, notes, residual
        )

    def _result(
        self,
        target: AttackTarget,
        inputs: list[np.ndarray],
        certified: list[bool],
        labels: list[int],
        solves: list[LayerSolve],
        estimate: int | None,
        start: float,
        notes: list[str],
        residual: float | None = None,
    ) -> ConvInversionResult:
        order = sorted(range(len(inputs)), key=lambda i: not certified[i])
        shape = (len(inputs), *target.input_shape)
        tensor = (
            torch.from_numpy(np.stack([inputs[i] for i in order])).reshape(shape)
            if inputs
            else torch.zeros(shape, dtype=torch.float64)
        )
        remap = {old: new for new, old in enumerate(order)}
        solves = [
            LayerSolve(**{**asdict(s), "sample": remap[s.sample]}) for s in solves
        ]
        return ConvInversionResult(
            attack=self.name,
            inputs=tensor,
            certified=torch.tensor([certified[i] for i in order], dtype=torch.bool),
            labels=(
                torch.tensor([labels[i] for i in order], dtype=torch.long)
                if any(v >= 0 for v in labels)
                else None
            ),
            batch_size_estimate=estimate,
            residual=residual,
            elapsed_s=time.perf_counter() - start,
            notes=notes,
            certificates=["rank+residual" if certified[i] else "" for i in order],
            solves=solves,
        )

    # ------------------------------------------------------------ the FC step

    def _separate(
        self, target: AttackTarget, chain: Chain, tol: _Tol, notes: list[str]
    ) -> tuple[list[_Sample], int]:
        G = target.gradients[f"{chain.fc_name}.weight"].detach().cpu().double().numpy()
        g = target.gradients[f"{chain.fc_name}.bias"].detach().cpu().double().numpy()
        M = np.hstack([G, g[:, None]])  # (out, d + 1)
        S = np.linalg.svd(M, compute_uv=False)
        rank = int((tol.rank * S[0] < S).sum()) if S.size and S[0] > 0 else 0
        if rank == 0:
            notes.append(
                f"the gradient of {chain.fc_name} is zero (dead units or a saturated "
                "loss): nothing leaks through it"
            )
            return [], 0
        if rank == 1:
            f = g @ G / float(g @ g)  # theorem 1: every unit's ratio is f
            label = _label_of(g) if chain.fc_is_last else -1
            return [_Sample(f, label, True, g)], 1
        if rank > self.max_batch:
            notes.append(f"rank {rank} exceeds max_batch={self.max_batch}")
            return [], rank
        if chain.fc_is_last:
            return (
                self._separate_classifier(
                    chain, G, g, rank, target.batch_size, tol, notes
                ),
                rank,
            )
        return self._separate_hidden(target, chain, rank, notes), rank

    def _separate_classifier(
        self,
        chain: Chain,
        G: np.ndarray,
        g: np.ndarray,
        rank: int,
        batch_size: int | None,
        tol: _Tol,
        notes: list[str],
    ) -> list[_Sample]:
        """Successive projection on the columns of the classifier's gradient.

        The rank tells the batch size while it stays below ``classes - 1``; at
        ``classes - 1`` only a declared ``batch_size`` equal to it does.
        """
        classes = G.shape[0]
        below = chain.activations[-1].kind if chain.activations else "none"
        if not chain.segments[-1].shape_only or below not in ("relu", "relu6"):
            notes.append(
                "the classifier's input is not a ReLU output: successive projection "
                "needs non-negative features with zeros, the batch is not separated"
            )
            return []
        certain = rank < classes - 1 or batch_size == rank
        if not certain:
            notes.append(
                f"the classifier gradient has rank {rank} = classes - 1: the batch "
                f"may hold more than {rank} samples, which this route cannot "
                "separate; samples are not certified by the FC step"
            )
        U, _, _ = np.linalg.svd(G, full_matrices=False)
        anchors = _anchor_pixels(U[:, :rank].T @ G, rank)
        if len(anchors) < rank:
            notes.append(
                f"successive projection found {len(anchors)} of {rank} extreme "
                "columns: some samples share all their features"
            )
            return []
        D = G[:, anchors] / np.linalg.norm(G[:, anchors], axis=0)  # (classes, B)
        scales, *_ = np.linalg.lstsq(D, g, rcond=None)
        Delta = D * scales[None, :]  # (classes, B) per-sample output errors
        Ft = np.linalg.lstsq(Delta, G, rcond=None)[0]  # (B, d)
        fit = np.linalg.norm(Delta @ Ft - G) / np.linalg.norm(G)
        fit_b = np.linalg.norm(Delta.sum(axis=1) - g) / np.linalg.norm(g)
        ok = bool(certain and max(fit, fit_b) <= tol.residual)
        if not ok and certain:
            notes.append(
                f"the separated errors do not reproduce the classifier gradient "
                f"(relative residual {max(fit, fit_b):.2e})"
            )
        return [
            _Sample(Ft[b], _label_of(Delta[:, b]), ok, None)
            for b in range(Delta.shape[1])
        ]

    def _separate_hidden(
        self, target: AttackTarget, chain: Chain, rank: int, notes: list[str]
    ) -> list[_Sample]:
        """Peel the batch at a hidden FC layer with :class:`AnalyticFCInversion`."""
        tail = _Tail(target.model, chain, target.input_shape)
        grads = {
            name: target.gradients[name.removeprefix("inner.")]
            for name, _ in tail.named_parameters()
        }
        sub = AttackTarget.from_gradients(
            tail,
            grads,
            (chain.fc.in_features,),
            batch_size=target.batch_size,
            labels=target.labels,
            num_classes=target.num_classes,
        )
        fc_result = AnalyticFCInversion(vertex_candidates=False).run(sub)
        notes.extend(f"FC step: {n}" for n in fc_result.notes)
        labels = (
            fc_result.labels.tolist()
            if fc_result.labels is not None
            else [-1] * fc_result.num_recovered
        )
        return [
            _Sample(
                fc_result.inputs[i].numpy(),
                int(labels[i]),
                bool(fc_result.certified[i].item()),
                None,
            )
            for i in range(fc_result.num_recovered)
        ]

    # ------------------------------------------------------------ the walk

    def _walk_all(
        self,
        target: AttackTarget,
        chain: Chain,
        samples: list[_Sample],
        tol: _Tol,
        notes: list[str],
        deadline: float | None = None,
    ) -> tuple[list[np.ndarray], list[bool], list[LayerSolve]]:
        ops: dict[int, Operator] = {}  # assembled when a walk first reaches them
        use_weights = self.weight_equations and len(samples) == 1
        inputs, certified, solves = [], [], []
        for i, sample in enumerate(samples):
            x, exact, own = self._walk(
                target, chain, ops, sample, i, use_weights, tol, notes, deadline
            )
            roundtrip = _roundtrip(chain, x, sample.features)
            ok = exact and sample.fc_certified and roundtrip <= tol.residual
            if exact and sample.fc_certified and not ok:
                notes.append(
                    f"sample {i}: the model maps the solution to an FC input "
                    f"{roundtrip:.2e} away (relative) from the recovered one"
                )
            inputs.append(x)
            certified.append(ok)
            solves.extend(own)
        n_ok = sum(certified)
        if samples and n_ok < len(samples):
            notes.append(f"{n_ok} of {len(samples)} input(s) certified")
        return inputs, certified, solves

    def _walk(
        self,
        target: AttackTarget,
        chain: Chain,
        ops: dict[int, Operator],
        sample: _Sample,
        index: int,
        use_weights: bool,
        tol: _Tol,
        notes: list[str],
        deadline: float | None = None,
    ) -> tuple[np.ndarray, bool, list[LayerSolve]]:
        value = sample.features.astype(np.float64)
        known = np.ones(value.size, dtype=bool)
        delta: np.ndarray | None = None
        if use_weights and sample.delta_fc is not None:
            W = chain.fc.weight.detach().cpu().double().numpy()
            delta = W.T @ sample.delta_fc  # (d_fc,) error at the FC input
        exact = True
        solves: list[LayerSolve] = []
        if self.stop_underdetermined:  # a layer below that no values can determine
            for j, seg in enumerate(chain.segments[:-1]):
                most = _most_rows(seg, math.prod(seg.out_shape), delta is not None)
                if (
                    not seg.shape_only
                    and most < math.prod(seg.in_shape)
                    and not _joinable(chain, j, most)
                ):
                    everything = np.ones(math.prod(seg.out_shape), dtype=bool)
                    return self._stop(
                        target, seg, everything, most, index, [], notes, short=True
                    )

        s = len(chain.segments) - 1
        while s >= 0:
            seg = chain.segments[s]
            lowest = s  # the lowest segment this pass solves
            if not seg.shape_only:
                unknowns = math.prod(seg.in_shape)
                at_most = _most_rows(seg, int(known.sum()), delta is not None)
                joint = at_most < unknowns and _joinable(chain, s, at_most)
                if self.stop_underdetermined and at_most < unknowns and not joint:
                    return self._stop(
                        target, seg, known, at_most, index, solves, notes, short=True
                    )
                if deadline is not None and time.perf_counter() > deadline:
                    return self._stop(
                        target, seg, known, at_most, index, solves, notes, short=False
                    )
                if s not in ops:
                    ops[s] = segment_operator(seg)
                op = ops[s]
                extra = (
                    self._kernel_equations(target, seg, delta, tol, notes)
                    if delta is not None
                    else None
                )
                rows = int(known.sum()) + (extra[0].shape[0] if extra else 0)
                joint = rows < unknowns and _joinable(chain, s, rows)
                if self.stop_underdetermined and rows < unknowns and not joint:
                    return self._stop(
                        target, seg, known, rows, index, solves, notes, short=True
                    )
                alone: tuple[np.ndarray, np.ndarray, LayerSolve] | None = None
                if not joint:
                    alone = _solve(
                        op,
                        value,
                        known,
                        extra,
                        tol,
                        self.dense_limit,
                        index,
                        seg.label,
                        self.tolerance,
                        deadline,
                    )
                    solved = alone[2]
                    # enough rows but a short rank (the dense path knows it)
                    joint = (
                        solved.rank is not None
                        and solved.rank < solved.unknowns - solved.uncovered
                        and _joinable(chain, s, rows)
                    )
                    if joint:
                        notes.append(
                            f"sample {index}: {seg.label} has rank {solved.rank} of "
                            f"{solved.unknowns - solved.uncovered}; solved jointly "
                            "with the segment below"
                        )
                if joint:
                    lowest = s - 1
                    value, known, delta, report = self._jointly(
                        chain, ops, s, value, known, extra, delta, tol, index, deadline
                    )
                else:
                    assert alone is not None
                    value, out_k, report = alone
                    if delta is not None:
                        delta = op.A.T @ delta if out_k.all() else None
                    known = out_k
                solves.append(report)
                exact = exact and report.exact and report.uncovered == 0
            if lowest > 0:
                act = chain.activations[lowest - 1]
                if delta is not None:
                    delta = delta * _derivative(act, value, tol)
                value, known = _invert(act, value, known, tol)
            s = lowest - 1
        x = value.copy()
        x[~known] = 0.0
        return x, exact and bool(known.all()), solves

    def _jointly(
        self,
        chain: Chain,
        ops: dict[int, Operator],
        s: int,
        value: np.ndarray,
        known: np.ndarray,
        extra: tuple[scipy.sparse.csr_matrix, np.ndarray] | None,
        delta: np.ndarray | None,
        tol: _Tol,
        index: int,
        deadline: float | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, LayerSolve]:
        """Segments ``s`` and ``s - 1`` in one solve (see :func:`_joint`)."""
        lower = s - 1
        if lower not in ops:
            ops[lower] = segment_operator(chain.segments[lower])
        act = chain.activations[lower]
        v, a, report = _joint(
            ops[s],
            value,
            known,
            extra,
            act,
            ops[lower],
            tol,
            self.dense_limit,
            index,
            f"{chain.segments[s].label} + {chain.segments[lower].label}",
            self.tolerance,
            deadline,
        )
        if delta is not None:  # down to the lower segment's input
            delta = ops[lower].A.T @ (ops[s].A.T @ delta * _derivative(act, a, tol))
        return v, np.ones(v.size, dtype=bool), delta, report

    @staticmethod
    def _stop(
        target: AttackTarget,
        seg: Segment,
        known: np.ndarray,
        rows: int,
        index: int,
        solves: list[LayerSolve],
        notes: list[str],
        *,
        short: bool,
    ) -> tuple[np.ndarray, bool, list[LayerSolve]]:
        """End a walk before a solve: under-determined (``short``) or out of time."""
        unknowns = math.prod(seg.in_shape)
        solves.append(
            LayerSolve(
                sample=index,
                layer=seg.label,
                unknowns=unknowns,
                equations=math.prod(seg.out_shape),
                kept=int(known.sum()),
                weight_equations=rows - int(known.sum()),
                uncovered=0,
                rank=None,
                condition=math.inf,
                residual=math.inf,
                solver="skipped",
                exact=False,
            )
        )
        notes.append(
            f"sample {index}: {seg.label} has at most {rows} equations for "
            f"{unknowns} unknowns; the walk down stops there"
            if short
            else f"sample {index}: the time budget ran out before {seg.label}; "
            "the walk down stops there"
        )
        return np.zeros(math.prod(target.input_shape)), False, solves

    def _kernel_equations(
        self,
        target: AttackTarget,
        seg: Segment,
        delta_out: np.ndarray,
        tol: _Tol,
        notes: list[str],
    ) -> tuple[scipy.sparse.csr_matrix, np.ndarray] | None:
        """Kernel-gradient rows ``dL/dK = sum_p delta_p patch_p(v)`` of a conv."""
        if not seg.steps or not isinstance(seg.steps[0].module, nn.Conv1d | nn.Conv2d):
            return None
        conv_step = seg.steps[0]
        conv = conv_step.module
        assert isinstance(conv, nn.Conv1d | nn.Conv2d)
        delta = _pull_back(seg.steps[1:], conv_step.out_shape, delta_out)
        h = conv.out_channels
        delta = delta.reshape(h, -1)  # (h, L)
        bias_name = f"{conv_step.name}.bias"
        if conv.bias is not None and bias_name in target.gradients:
            observed = target.gradients[bias_name].detach().cpu().double().numpy()
            gap = float(np.linalg.norm(delta.sum(axis=1) - observed))
            err = gap / max(float(np.linalg.norm(observed)), 1e-300)
            # The gradient's rounding (float32: about 1e-6 after the solves
            # above) and a looser solve above leave a gap of their own.
            if err > max(1e-6, tol.residual, 1e3 * self.tolerance):
                notes.append(
                    f"{conv_step.label}: the error recomputed from the FC layer "
                    f"misses the observed bias gradient by {err:.1e}; its kernel "
                    "equations are left out"
                )
                return None
        E = _kernel_rows(conv, conv_step.in_shape, delta)
        if E is None:
            notes.append(f"{conv_step.label}: too many kernel equations, left out")
            return None
        e = target.gradients[f"{conv_step.name}.weight"].detach().cpu().double().numpy()
        return E, e.reshape(-1)


# --------------------------------------------------------------------------
# Solves


def _joinable(chain: Chain, s: int, rows: int) -> bool:
    """Whether segment ``s``, short of equations, can be solved with the one below.

    The activation between them must be smooth and invertible (no equation
    lost) and the lower segment's input no larger than ``rows``.
    """
    if s < 1 or chain.activations[s - 1].kind not in _SMOOTH:
        return False
    lower = chain.segments[s - 1]
    return not lower.shape_only and math.prod(lower.in_shape) <= rows


def _most_rows(seg: Segment, outputs: int, weights: bool) -> int:
    """Most equations a segment's solve can have: its known outputs + kernel rows."""
    first = seg.steps[0].module if seg.steps else None
    if weights and isinstance(first, nn.Conv1d | nn.Conv2d):
        return outputs + first.weight.numel()
    return outputs


def _solve(
    op: Operator,
    value: np.ndarray,
    known: np.ndarray,
    extra: tuple[scipy.sparse.csr_matrix, np.ndarray] | None,
    tol: _Tol,
    dense_limit: int,
    sample: int,
    layer: str,
    tolerance: float = 1e-15,
    deadline: float | None = None,
) -> tuple[np.ndarray, np.ndarray, LayerSolve]:
    """Least squares for a segment's input on the known outputs (+ kernel rows)."""
    m, n = op.A.shape
    M, rhs, kept, n_extra = _rows(op, value, known, extra)
    col = np.sqrt(np.bincount(M.indices, weights=M.data**2, minlength=n))
    covered = col > 0
    if not covered.all():
        M = M[:, covered]
    k = int(covered.sum())

    x = np.zeros(k)
    rank: int | None
    if k == 0:
        rank, cond, solver = 0, math.inf, "none"
    elif k <= dense_limit:
        x, rank, cond = _dense(M, rhs)
        solver = "cholesky"
    else:
        # Equilibrated columns: LSMR needs several times fewer iterations.
        scaled = M.copy()
        scaled.data /= col[covered][scaled.indices]
        out = scipy.sparse.linalg.lsmr(
            scaled,
            rhs,
            atol=tolerance,
            btol=tolerance,
            conlim=1e15,
            maxiter=_iterations_left(scaled, 20 * k, deadline),
        )
        x, rank, cond, solver = out[0] / col[covered], None, float(out[6]), "lsmr"
    scale = max(float(np.linalg.norm(rhs)), 1e-300)
    residual = float(np.linalg.norm(M @ x - rhs) / scale) if k else 1.0
    full = (rank == k) if rank is not None else cond < 1.0 / RANK_RTOL
    exact = bool(k > 0 and full and residual <= tol.residual)

    full_x = np.zeros(n)
    full_x[covered] = x
    report = LayerSolve(
        sample=sample,
        layer=layer,
        unknowns=n,
        equations=m,
        kept=kept,
        weight_equations=n_extra,
        uncovered=n - k,
        rank=rank,
        condition=cond,
        residual=residual,
        solver=solver,
        exact=exact,
    )
    logger.debug(
        "conv_inversion: sample %d %s: %d unknowns, %d/%d kept, rank %s, res %.1e",
        sample,
        layer,
        n,
        kept,
        m,
        rank,
        residual,
    )
    return full_x, covered, report


_SMOOTH = ("sigmoid", "tanh", "leaky_relu")
"""Activations a joint solve can pass through: invertible, no equation lost."""


def _forward(act: Step, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A smooth activation and its derivative at the pre-activation ``z``."""
    if act.kind == "sigmoid":
        a = 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|
        return a, a * (1.0 - a)
    if act.kind == "tanh":
        a = np.tanh(z)
        return a, 1.0 - a * a
    slope = float(act.module.negative_slope)  # type: ignore[arg-type]
    return np.where(z >= 0, z, slope * z), np.where(z >= 0, 1.0, slope)


def _joint(
    hi: Operator,
    value: np.ndarray,
    known: np.ndarray,
    extra: tuple[scipy.sparse.csr_matrix, np.ndarray] | None,
    act: Step,
    lo: Operator,
    tol: _Tol,
    dense_limit: int,
    sample: int,
    layer: str,
    tolerance: float = 1e-15,
    deadline: float | None = None,
) -> tuple[np.ndarray, np.ndarray, LayerSolve]:
    """Two segments at once, through the smooth activation between them.

    The upper segment has fewer equations than unknowns, but its unknowns are
    ``a = act(A_lo v + b_lo)`` for the lower segment's smaller input ``v``:
    Gauss-Newton on ``v`` for ``M act(A_lo v + b_lo) = r``, with Jacobian
    ``M diag(act') A_lo``, from the minimum-norm ``a`` pulled back through
    the activation and ``A_lo``. Certified like a single solve, by the rank
    of the Jacobian at the answer and the relative residual.

    Returns ``v``, the upper segment's input ``a`` and the report.
    """
    M, rhs, kept, n_extra = _rows(hi, value, known, extra)
    A, b = lo.A.tocsr(), lo.b
    n = A.shape[1]
    goal = max(tol.residual, tolerance)
    scale = max(float(np.linalg.norm(rhs)), 1e-300)
    # The start only seeds Gauss-Newton: loose solves suffice.
    least = scipy.sparse.linalg.lsmr(M, rhs, atol=1e-6, btol=1e-6, maxiter=200)[0]
    z0 = _preimage(act, least, 1e-6)
    v = scipy.sparse.linalg.lsmr(A, z0 - b, atol=1e-6, btol=1e-6, maxiter=200)[0]

    def residual_at(point: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, slope_at = _forward(act, A @ point + b)
        return M @ a - rhs, a, slope_at

    r, a, d = residual_at(v)
    for _ in range(50):
        if np.linalg.norm(r) / scale <= goal:
            break
        if deadline is not None and time.perf_counter() > deadline:
            break
        J = (M @ scipy.sparse.diags(d) @ A).tocsr()
        step_v = _gauss_newton_step(J, r, dense_limit, goal)
        for shrink in 0.5 ** np.arange(20):
            r_new, a_new, d_new = residual_at(v + shrink * step_v)
            if np.linalg.norm(r_new) < np.linalg.norm(r):
                break
        else:
            break  # no decrease along the step: stalled
        gain = np.linalg.norm(r_new) / max(float(np.linalg.norm(r)), 1e-300)
        v, r, a, d = v + shrink * step_v, r_new, a_new, d_new
        if gain > 0.99:
            break
    J = (M @ scipy.sparse.diags(d) @ A).tocsr()
    col = np.sqrt(np.bincount(J.indices, weights=J.data**2, minlength=n))
    uncovered = int((col == 0).sum())
    rank: int | None
    if n <= dense_limit:
        _, rank, cond = _dense(J[:, col > 0].toarray(), -r)
        full = rank == n - uncovered
    else:
        out = scipy.sparse.linalg.lsmr(J, -r, atol=goal, btol=goal, maxiter=20)
        rank, cond = None, float(out[6])
        full = cond < 1.0 / RANK_RTOL
    residual = float(np.linalg.norm(r)) / scale
    report = LayerSolve(
        sample=sample,
        layer=layer,
        unknowns=n,
        equations=hi.A.shape[0],
        kept=kept,
        weight_equations=n_extra,
        uncovered=uncovered,
        rank=rank,
        condition=cond,
        residual=residual,
        solver="gauss-newton",
        exact=bool(full and residual <= tol.residual),
    )
    logger.debug(
        "conv_inversion: sample %d %s (joint): %d unknowns, rank %s, res %.1e",
        sample,
        layer,
        n,
        rank,
        residual,
    )
    return v, a, report


def _gauss_newton_step(
    J: scipy.sparse.csr_matrix, r: np.ndarray, dense_limit: int, goal: float
) -> np.ndarray:
    """The least-squares step ``argmin ||J s + r||``."""
    n = J.shape[1]
    if n <= dense_limit:  # its rows are dense: a BLAS product beats a sparse one
        Jd = J.toarray()
        N = Jd.T @ Jd
        ridge = 1e-13 * max(float(np.trace(N)) / max(n, 1), 1e-300)
        factor = scipy.linalg.cho_factor(N + ridge * np.eye(n), lower=True)
        return scipy.linalg.cho_solve(factor, -(Jd.T @ r))
    return scipy.sparse.linalg.lsmr(J, -r, atol=goal, btol=goal, maxiter=20 * n)[0]


def _rows(
    op: Operator,
    value: np.ndarray,
    known: np.ndarray,
    extra: tuple[scipy.sparse.csr_matrix, np.ndarray] | None,
) -> tuple[scipy.sparse.csr_matrix, np.ndarray, int, int]:
    """The rows of a solve, equilibrated: known outputs, then kernel rows.

    Returns the matrix (CSR, unit rows, empty rows dropped), its right-hand
    side, the number of known outputs kept and of kernel rows added.
    """
    m = op.A.shape[0]
    rows = np.flatnonzero(known)
    M = op.A[rows] if rows.size < m else op.A.copy()
    rhs = value[rows] - op.b[rows]
    n_extra = 0
    if extra is not None:
        M = scipy.sparse.vstack([M, extra[0]], format="csr")
        rhs = np.concatenate([rhs, extra[1]])
        n_extra = extra[0].shape[0]
    # Equilibrate rows (the kernel rows have another scale), drop empty ones.
    M.sum_duplicates()
    lengths = np.diff(M.indptr)
    norms = np.sqrt(
        np.bincount(
            np.repeat(np.arange(M.shape[0]), lengths),
            weights=M.data**2,
            minlength=M.shape[0],
        )
    )
    live = norms > 0
    M.data /= np.repeat(np.where(live, norms, 1.0), lengths)
    if not live.all():
        M = M[live]
    return M, rhs[live] / norms[live], int(rows.size), n_extra


def _iterations_left(
    M: scipy.sparse.csr_matrix, most: int, deadline: float | None
) -> int:
    """LSMR iterations that fit before ``deadline`` (one product each way)."""
    if deadline is None:
        return most
    start = time.perf_counter()
    M.T @ (M @ np.ones(M.shape[1]))
    cost = max(time.perf_counter() - start, 1e-9)
    return max(1, min(most, int((deadline - time.perf_counter()) / cost)))


def _dense(
    M: scipy.sparse.csr_matrix | np.ndarray, rhs: np.ndarray
) -> tuple[np.ndarray, int, float]:
    """Normal equations: rank by factorisation (:func:`gram_rank`), solution by
    Cholesky with iterative refinement, condition by inverse iteration."""
    if isinstance(M, np.ndarray):
        N = M.T @ M
        rank, top = gram_rank(N)
    else:
        M = M.tocsc()  # its transpose is CSR: the product measured 2x faster
        gram = M.T @ M
        rank, top = gram_rank(gram)
        N = gram.toarray()  # (k, k)
    k = N.shape[0]
    r = M.T @ rhs
    top = max(top, 1e-300)

    # A tiny ridge keeps the factorisation defined; refinement removes its bias.
    factor = scipy.linalg.cho_factor(N + 1e-13 * top * np.eye(k), lower=True)
    x = scipy.linalg.cho_solve(factor, r)
    for _ in range(4):
        x = x + scipy.linalg.cho_solve(factor, M.T @ (rhs - M @ x))
    # Smallest eigenvalue by inverse iteration with the same factor.
    v = np.random.default_rng(0).standard_normal(k)
    low = top
    for _ in range(12):
        w = scipy.linalg.cho_solve(factor, v / np.linalg.norm(v))
        low = 1.0 / max(float(np.linalg.norm(w)), 1e-300)
        v = w
    low = max(low - 1e-13 * top, 0.0)
    cond = math.sqrt(top / low) if low > 0 else math.inf
    return x, rank, cond


def _invert(
    act: Step, post: np.ndarray, known: np.ndarray, tol: _Tol
) -> tuple[np.ndarray, np.ndarray]:
    """Undo an element-wise activation where it can be undone."""
    peak = max(float(np.abs(post[known]).max()) if known.any() else 0.0, 1e-300)
    thr = tol.support * peak
    pre = post  # the ReLUs pass what they keep unchanged
    if act.kind == "relu":
        ok = known & (post > thr)
    elif act.kind == "relu6":
        ok = known & (post > thr) & (post < 6.0 - thr)
    else:
        pre = _preimage(act, post, 1e-16)
        if act.kind == "leaky_relu":
            ok = known
        elif act.kind == "sigmoid":
            ok = known & (post > tol.support) & (post < 1.0 - tol.support)
        else:  # tanh
            ok = known & (np.abs(post) < 1.0 - tol.support)
    return np.where(ok, pre, 0.0), ok


def _preimage(act: Step, a: np.ndarray, margin: float) -> np.ndarray:
    """A smooth activation's input for its output ``a``.

    ``a`` is first clipped to ``margin`` inside the activation's range, so
    values at or past its bounds map to large finite inputs.
    """
    if act.kind == "sigmoid":
        clipped = np.clip(a, margin, 1.0 - margin)
        return np.log(clipped) - np.log1p(-clipped)
    if act.kind == "tanh":
        return np.arctanh(np.clip(a, -1.0 + margin, 1.0 - margin))
    slope = float(act.module.negative_slope)  # type: ignore[arg-type]
    return np.where(a >= 0, a, a / slope)


def _derivative(act: Step, post: np.ndarray, tol: _Tol) -> np.ndarray:
    """The activation's derivative, written in terms of its output.

    Solved outputs carry rounding noise around their zeros, so ReLU outputs
    below the support threshold count as zero.
    """
    thr = tol.support * max(float(np.abs(post).max()), 1e-300)
    if act.kind == "relu":
        return (post > thr).astype(np.float64)
    if act.kind == "relu6":
        return ((post > thr) & (post < 6 - thr)).astype(np.float64)
    if act.kind == "leaky_relu":
        slope = float(act.module.negative_slope)  # type: ignore[arg-type]
        return np.where(post >= 0, 1.0, slope)
    if act.kind == "sigmoid":
        return post * (1.0 - post)
    return 1.0 - post**2


def _pull_back(
    steps: list[Step], in_shape: tuple[int, ...], delta_out: np.ndarray
) -> np.ndarray:
    """``J^T delta`` for the (affine) steps after a segment's convolution."""
    if not steps:
        return delta_out
    v = torch.zeros((1, *in_shape), dtype=torch.float64, requires_grad=True)
    out = v
    for step in steps:
        out = step.module(out.reshape(-1, *step.in_shape))
    (grad,) = torch.autograd.grad(
        out.reshape(-1), v, torch.from_numpy(np.ascontiguousarray(delta_out))
    )
    return grad.reshape(-1).numpy()


def _kernel_rows(
    conv: nn.Conv1d | nn.Conv2d, in_shape: tuple[int, ...], delta: np.ndarray
) -> scipy.sparse.csr_matrix | None:
    """The kernel-gradient rows of a convolution, linear in its input ``v``.

    ``dL/dK[j, c, t] = sum_p delta[j, p] * v[input index of tap (c, t) at p]``:
    one row per kernel entry (``h * C/groups * K`` rows, ``prod(in_shape)``
    columns), so that ``E @ v`` is the flattened weight gradient. ``delta``
    ``(h, L)`` is the error at the convolution's output. ``None`` when the
    rows would hold more than ``_MAX_KERNEL_ENTRIES`` entries. Shared with the capacity
    bounds (:mod:`fl_audit.bounds`), which add these rows to their rank.
    """
    idx = tap_indices(conv, in_shape)  # (C*K, L) 1-based, 0 = pad
    h = conv.out_channels
    groups = conv.groups
    per = idx.shape[0] // groups  # C_g * K
    h_g = h // groups
    if h * per * idx.shape[1] > _MAX_KERNEL_ENTRIES:
        return None
    # Row (j, r) reads input taps[r, p] with weight delta[j, p], over p.
    return block_rows(
        [idx[g * per : (g + 1) * per] for g in range(groups)],
        [delta[g * h_g : (g + 1) * h_g] for g in range(groups)],
        math.prod(in_shape),
    )


def _roundtrip(chain: Chain, x: np.ndarray, features: np.ndarray) -> float:
    """Relative distance between the model's FC input for ``x`` and ``features``."""
    with torch.no_grad():
        v = torch.from_numpy(x)[None]
        for i, seg in enumerate(chain.segments):
            v = seg.apply(v)
            if i < len(chain.activations):
                act = chain.activations[i]
                v = act.module(v.reshape(1, *act.in_shape)).reshape(1, -1)
    gap = float(np.linalg.norm(v.reshape(-1).numpy() - features))
    return gap / max(float(np.linalg.norm(features)), 1e-300)


def _label_of(error: np.ndarray) -> int:
    """The label of a cross-entropy output error: its only negative entry."""
    negative = np.flatnonzero(error < 0)
    return int(negative[0]) if negative.size == 1 else -1


# --------------------------------------------------------------------------
# The model above the FC layer, as a model of the FC input


class _Holder:
    value: torch.Tensor | None = None


class _Feed(nn.Module):
    """Stands in for the last chain module: returns the fed FC input."""

    def __init__(self, holder: _Holder, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.holder = holder
        self.out_shape = out_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.holder.value is not None
        return self.holder.value.reshape(-1, *self.out_shape)


class _Zeros(nn.Module):
    """Stands in for a chain module below the last one (its output is unused)."""

    def __init__(self, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_shape = out_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros((x.shape[0], *self.out_shape), dtype=x.dtype)


class _Tail(nn.Module):
    """The model with its chain cut out: maps an FC input to the logits."""

    def __init__(
        self, model: nn.Module, chain: Chain, input_shape: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.inner = copy.deepcopy(model).cpu()
        self.input_shape = input_shape
        self.holder = _Holder()
        steps = chain.steps
        for i, step in enumerate(steps):
            stand_in: nn.Module = (
                _Feed(self.holder, step.out_shape)
                if i == len(steps) - 1
                else _Zeros(step.out_shape)
            )
            parent_name, _, child = step.name.rpartition(".")
            parent = self.inner.get_submodule(parent_name)
            setattr(parent, child, stand_in)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        self.holder.value = f
        dummy = torch.zeros((f.shape[0], *self.input_shape), dtype=f.dtype)
        return self.inner(dummy)  # type: ignore[no-any-return]
