"""Prior-guided iterative reconstruction: gradient matching that converges.

DLG (Zhu et al. 2019) optimises a dummy input until its gradient matches the
observed one. This attack keeps that core and fixes, one configurable part
at a time, what makes DLG slow and unreliable:

* labels are fixed before optimising: given ones, the FC attack's, the iDLG
  sign rule for one input (Zhao et al. 2020), counts from the last-layer
  bias gradient for a batch;
* the distance is scale-free (squared L2 divided by the observed gradient's
  squared norm, or ``1 - cos`` per parameter tensor as in Geiping et al.
  2020), so the optimiser's tolerances mean the same for any model scale;
* L-BFGS with a strong-Wolfe line search (or Adam with a step schedule);
* initialisations: the analytic answer where one exists (the FC attack on a
  fully-connected first layer; the convolutional inversion, R-GAP style,
  solved to a loose tolerance where its walk down is determined and
  consistent; otherwise, on request, the input of the first linear layer,
  read off its gradient as in Qian & Hansen's result 1 or its row space for
  a batch, then inverted through the layers before it), the mean of a
  reference set, the centre of the input range, uniform noise over it (the
  seed paper's later version);
* priors: total variation for images, a second-difference smoothness prior
  for 1-D signals, the box of the input range; the prior is dropped for a
  final polish so it does not bias a converged answer;
* on ReLU models, a continuation in which the ReLUs' derivative is a
  shrinking continuous ramp, so the line search sees a continuous distance;
* restarts from several initialisations, keeping the trial whose gradient
  matches best (ground truth is never used), and a NaN/Inf or exploding
  objective restarts the trial rather than ending the attack;
* no compute spent once the answer is known: restarts end when two trials
  from different starts agree, and the polish ends once the answer has
  settled (see ``agree_db`` and ``settle_step``).

The result's ``residual`` is the relative gradient distance
``||g(x) - g_obs|| / ||g_obs||`` of the returned inputs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fl_audit._logging import logger
from fl_audit.attacks._matching import (
    Budget,
    Diverged,
    LabelSource,
    MatchingProblem,
    infer_labels,
    logits_applicability,
    progress_bar,
    run_trial,
)
from fl_audit.attacks.analytic_fc import AnalyticFCInversion
from fl_audit.attacks.base import Applicability, Attack
from fl_audit.attacks.conv_inversion import ConvInversion
from fl_audit.attacks.dlg import (
    Callback,
    batch_size_of,
    check_budget,
    positive_number,
)
from fl_audit.attacks.registry import register_attack
from fl_audit.core import AttackResult, AttackTarget
from fl_audit.errors import FLAuditError, InvalidInputError
from fl_audit.metrics import match_inputs

_INITS = ("analytic", "mean", "centre", "uniform", "normal")
_LABEL_MODES = ("auto", "optimise")
_CONV_START_TOLERANCE = 1e-4
"""LSMR tolerance of the conv_inversion start. Measured with DLG's LeNet against
DLG in the same runs (median time to 30 dB): on 10 Fashion-MNIST garments
5e-5, 1e-4, 2e-4 and 4e-4 gave 4.6x, 5.0x, 5.0x and 3.1x; on 5 32x32 photos
1e-4 and 1e-5 gave 14x and 26x. A start at 1e-4 is 38-43 dB on the garments
in about 40 ms and 11-27 dB on the photos; gradient matching with the TV
prior takes it the rest of the way."""
_CONV_START_DENSE = 512
"""Solves of the conv_inversion start with at most this many unknowns are dense
(Cholesky, a few ms); larger ones run LSMR to the tolerance above."""
_CONV_START_RESIDUAL = 0.25
"""Largest relative residual of a solve of the conv_inversion start. Measured at
the tolerance above: 2e-4 to 6e-2 where the start was close (Fashion-MNIST,
32x32 photos, DLG's LeNet); 0.59 to 0.92 below a layer whose rank fell short
of its equation count, so that its minimum-norm answer was noise (8x8
digits behind a ReLU CNN, rank 336-348 of 384; behind a sigmoid CNN before
such layers were solved jointly with the one below)."""


@dataclass
class _Trial:
    init: str
    x: torch.Tensor
    residual: float
    stopped: str
    tv_weight: float


@register_attack("prior_guided")
class PriorGuidedReconstruction(Attack):
    """Gradient matching with fixed labels, priors, a good start and restarts.

    Parameters
    ----------
    max_iterations:
        Optimiser iterations over all trials.
    time_budget_s:
        Wall-clock budget in seconds for the whole attack; the best trial
        so far is returned when it runs out.
    labels:
        ``"auto"``: the target's labels, else the FC attack's, else the
        iDLG rule (one input) or last-layer counts (a batch), else
        optimised. ``"optimise"``: DLG's soft labels, optimised jointly.
    inits:
        Initialisation of each trial, in order: ``"analytic"``, ``"mean"``
        (needs ``reference``), ``"centre"`` (the middle of the input range,
        jittered by 1 % for a batch), ``"uniform"`` or ``"normal"``. ``None``:
        analytic, then the reference mean when given, then uniform noise,
        ``restarts`` trials in all; ``"analytic"`` leads only where an
        analytic attack gave the start: the FC attack recovered inputs, or
        ``conv_inversion``'s loose solve had as many equations as unknowns
        at every layer and a consistent walk down (every solve's relative
        residual at most 0.25). Elsewhere an explicit ``"analytic"`` is the
        feature inversion (measured slower than uniform noise with the TV
        prior, so not a default).
    restarts:
        Number of trials when ``inits`` is ``None``.
    reference:
        Inputs ``(N, *input_shape)`` the server holds from the same domain
        (for the ``"mean"`` initialisation).
    tv_weight:
        Weight of the total-variation prior (images) relative to the
        current gradient distance: the prior's weight is rescaled to
        ``tv_weight * distance`` after every step, so it shapes the answer
        at every scale. It is annealed (divided by 10, then 100, each phase
        at most ``3 * patience`` iterations) before a polish without it.
        The default 3 was tuned on 32x32 photos (bench/iterative.py); the
        seed paper's 1e-4 is too weak to matter under this scaling. A
        sequence gives one weight per trial, cycled: the best weight
        depends on the image, and the trial whose gradient matches best is
        kept. ``None``: ``(3, 10)`` on models with ``nn.ReLU`` modules
        (measured on 32x32 photos with a default-initialised ReLU CNN),
        ``3`` otherwise.
    smooth_weight:
        Weight of the second-difference prior (1-D signals ``(C, L)``),
        relative and annealed like ``tv_weight``.
    box:
        Keep inputs inside ``AttackTarget.input_range``: a quadratic
        penalty outside it while optimising (clamping each step was
        measured to stall L-BFGS), a clamp of the answer.
    distance:
        ``"l2"`` (squared, divided by the observed squared norm) or
        ``"cosine"`` (mean of ``1 - cos`` per parameter tensor).
    optimizer:
        ``"lbfgs"`` (strong-Wolfe line search) or ``"adam"`` (step size
        divided by 10 at 3/8, 5/8 and 7/8 of the iterations).
    lr:
        Step size; ``None``: 1 for L-BFGS, 0.1 for Adam.
    accept_residual:
        A trial whose residual falls below this ends the restarts.
    agree_db:
        Restarts also end when a trial's answer agrees with an earlier
        trial's to at least this PSNR (over the input range, inputs matched
        one to one): two starts that reach the same answer show that more
        starts would reach it too. Measured on 32x32 photos and a ReLU CNN:
        three uniform starts agreed with each other to 14-35 dB where all
        failed (19-21 dB to the truth, a systematic answer rather than a bad
        start) and to 37-60 dB where all succeeded. ``None`` runs every
        trial of the plan.
    settle_step, settle_residual:
        The final polish (without the prior) ends once the residual is
        below ``settle_residual`` and the answer has moved by at most
        ``settle_step`` of the input range (largest pixel change) over
        ``patience`` iterations: its slow tail then still lowers the
        distance by more than 0.1 % per ``patience`` iterations, but
        changes the answer by less than a quarter of an 8-bit grey level.
        Measured on a Fashion-MNIST garment (sigmoid LeNet): 30 dB after
        0.3 s, 64.5 dB after 2 s, then 7 dB more in 16 s, to the
        iteration budget. ``settle_step=None`` polishes to the budget.
        L2 distance only.
    tolerance:
        Stop a trial when the normalised L2 distance falls below it.
    patience:
        Stop a trial when its objective has not improved by 0.1 % in this
        many iterations; phases before the polish last at most
        ``3 * patience`` iterations. ``None``: 50 on models with
        ``nn.ReLU`` modules (shorter continuation phases leave time for a
        second trial), 100 otherwise.
    precision:
        ``"float64"``: match in double precision whatever the client's
        dtype (needed on models with PyTorch's default initialisation, see
        Notes); ``"gradient"``: in the observed gradient's dtype.
    relu_smoothing:
        Widths, as fractions of the RMS of each ReLU's input, of the
        derivative ramp used in the first phases of every trial (see
        :class:`fl_audit.attacks._matching.SoftenedReLU` and Notes); only
        models with ``nn.ReLU`` modules. ``()`` matches with the exact ReLU
        throughout.
    seed:
        Seed of the random initialisations.
    progress:
        Show a progress bar; ``None`` shows one only when stderr is a
        terminal. The audit passes ``False``.
    callback:
        Called at the start of every trial and after every optimiser step
        with the best input of the trial ``(B, *input_shape)``, its
        objective and the elapsed seconds.
        Returning ``True`` stops the attack after that step (no further
        phase or trial); the result is the best trial so far and its notes
        say "cancelled".

    Notes
    -----
    With PyTorch's default initialisation (weights of order
    ``1/sqrt(fan_in)``) a sigmoid network runs in its near-linear regime:
    the gradient depends on many input directions only weakly, the
    matching problem is ill-conditioned, and in float32 the rounding floor
    of the double backward (a relative residual near 1e-5) is reached
    before those directions are resolved. Matching in float64 and a prior
    that keeps its weight relative to the current distance fix it; it is
    slower to converge than on DLG's large-weight initialisation.

    A ReLU's weight gradients contain its activation mask, so the
    gradient distance jumps whenever a unit flips: L-BFGS's line search
    fails on it and matching stalls (12-16 dB on 32x32 photos). Each
    trial therefore starts with the ReLU modules' derivative replaced by
    a continuous ramp of width ``relu_smoothing[i]`` times the RMS of the
    unit's input (the forward value stays exact), shrinking the width
    phase by phase, and finishes with the exact model. ReLUs called as
    functions (``torch.relu`` in ``forward``) are not replaced.

    Priors and the box need ``AttackTarget.input_range``; without it the
    box is off and uniform initialisations draw from [0, 1] (noted in the
    result). The conv_inversion start is a least-squares solve stopped at a
    relative tolerance of 1e-4: 38-43 dB on Fashion-MNIST and 11-27 dB on
    32x32 photos with DLG's LeNet, in about 40 and 110 ms; gradient
    matching refines it. It needs a single input (the kernel-gradient
    equations) and fails on ReLU models whose zeros leave a layer
    under-determined, where the plan starts from noise. The feature
    inversion is approximate where the stack loses information (strides,
    ReLU zeros). For a batch, the slots
    are matched to the true inputs in no particular order, and inputs that
    share a label can swap. See :mod:`fl_audit.attacks._matching` for the
    eval-mode and loss assumptions.
    """

    def __init__(
        self,
        *,
        max_iterations: int | None = 5000,
        time_budget_s: float | None = 60.0,
        labels: str = "auto",
        inits: Sequence[str] | None = None,
        restarts: int = 4,
        reference: torch.Tensor | None = None,
        tv_weight: float | Sequence[float] | None = None,
        smooth_weight: float = 1e-4,
        box: bool = True,
        distance: str = "l2",
        optimizer: str = "lbfgs",
        lr: float | None = None,
        accept_residual: float = 1e-5,
        agree_db: float | None = 30.0,
        settle_step: float | None = 1e-3,
        settle_residual: float = 1e-3,
        tolerance: float = 1e-10,
        patience: int | None = None,
        precision: str = "float64",
        relu_smoothing: Sequence[float] = (0.3, 0.1, 0.03),
        seed: int = 0,
        progress: bool | None = None,
        callback: Callback | None = None,
    ) -> None:
        problems: list[str] = []
        if precision not in ("float64", "gradient"):
            problems.append(
                f"precision must be 'float64' or 'gradient', got {precision!r}"
            )
        check_budget(problems, time_budget_s, max_iterations)
        if labels not in _LABEL_MODES:
            problems.append(f"labels must be one of {_LABEL_MODES}, got {labels!r}")
        if inits is not None:
            if isinstance(inits, str) or not len(inits):
                problems.append(
                    f"inits must be a non-empty sequence of {_INITS}, got {inits!r}"
                )
            else:
                bad = [i for i in inits if i not in _INITS]
                if bad:
                    problems.append(f"inits {bad} unknown; choose from {_INITS}")
                if "mean" in inits and reference is None:
                    problems.append("init 'mean' needs reference= inputs")
        if not isinstance(restarts, int) or restarts < 1:
            problems.append(f"restarts must be an int >= 1, got {restarts!r}")
        if reference is not None and not (
            isinstance(reference, torch.Tensor)
            and reference.dim() >= 2
            and reference.shape[0] >= 1
            and torch.isfinite(reference).all()
        ):
            problems.append(
                "reference must be a finite tensor (N, *input_shape) with N >= 1"
            )
        if not (isinstance(smooth_weight, int | float) and smooth_weight >= 0):
            problems.append(
                f"smooth_weight must be a number >= 0, got {smooth_weight!r}"
            )
        tv_weights: tuple[float, ...] | None = None
        if tv_weight is not None:
            seq = (tv_weight,) if isinstance(tv_weight, int | float) else tv_weight
            if isinstance(seq, str) or not (
                len(seq)
                and all(
                    isinstance(w, int | float) and math.isfinite(w) and w >= 0
                    for w in seq
                )
            ):
                problems.append(
                    "tv_weight must be a number >= 0, a non-empty sequence of them "
                    f"(one per trial, cycled) or None; got {tv_weight!r}"
                )
            else:
                tv_weights = tuple(float(w) for w in seq)
        if distance not in ("l2", "cosine"):
            problems.append(f"distance must be 'l2' or 'cosine', got {distance!r}")
        if optimizer not in ("lbfgs", "adam"):
            problems.append(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
        if lr is not None and not (
            isinstance(lr, int | float) and math.isfinite(lr) and lr > 0
        ):
            problems.append(f"lr must be a positive number or None, got {lr!r}")
        for name, value in (
            ("accept_residual", accept_residual),
            ("tolerance", tolerance),
        ):
            if not (isinstance(value, int | float) and value >= 0):
                problems.append(f"{name} must be a number >= 0, got {value!r}")
        for name, number, kind in (
            ("agree_db", agree_db, "a positive number of dB (e.g. 30) or None"),
            ("settle_step", settle_step, "a positive fraction of the range or None"),
            ("settle_residual", settle_residual, "a positive number"),
        ):
            optional = name != "settle_residual"
            if not (optional and number is None) and not positive_number(number):
                problems.append(f"{name} must be {kind}, got {number!r}")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            problems.append(f"patience must be an int >= 1 or None, got {patience!r}")
        if isinstance(relu_smoothing, str) or not all(
            isinstance(f, int | float) and math.isfinite(f) and f > 0
            for f in relu_smoothing
        ):
            problems.append(
                "relu_smoothing must be a sequence of positive numbers such as "
                f"(0.3, 0.1, 0.03), or () to match the exact ReLU; got "
                f"{relu_smoothing!r}"
            )
        if problems:
            raise InvalidInputError("PriorGuidedReconstruction options", problems)

        self.max_iterations = max_iterations
        self.time_budget_s = time_budget_s
        self.labels = labels
        self.inits = None if inits is None else tuple(inits)
        self.restarts = restarts
        self.reference = reference
        self.tv_weight = tv_weights
        self.smooth_weight = float(smooth_weight)
        self.box = box
        self.distance = distance
        self.optimizer = optimizer
        self.lr = lr if lr is not None else (1.0 if optimizer == "lbfgs" else 0.1)
        self.accept_residual = float(accept_residual)
        self.agree_db = None if agree_db is None else float(agree_db)
        self.settle_step = None if settle_step is None else float(settle_step)
        self.settle_residual = float(settle_residual)
        self.tolerance = float(tolerance)
        self.patience = patience
        self.precision = precision
        self.relu_smoothing = tuple(float(f) for f in relu_smoothing)
        self.seed = seed
        self.progress = progress
        self.callback = callback

    def __repr__(self) -> str:
        return (
            f"PriorGuidedReconstruction(distance={self.distance!r}, "
            f"optimizer={self.optimizer!r}, inits={self._init_plan(False)}, "
            f"time_budget_s={self.time_budget_s})"
        )

    def _tv_plan(self, has_relus: bool) -> tuple[float, ...]:
        """TV weights of the trials, cycled (see ``tv_weight``)."""
        if self.tv_weight is not None:
            return self.tv_weight
        return (3.0, 10.0) if has_relus else (3.0,)

    def _patience(self, has_relus: bool) -> int:
        if self.patience is not None:
            return self.patience
        return 50 if has_relus else 100

    def _agreement(self, trials: list[_Trial], target: AttackTarget) -> str | None:
        """A note when the newest trial agrees with an earlier one, else None."""
        if self.agree_db is None or len(trials) < 2:
            return None
        newest = trials[-1].x
        box = target.input_range
        for j, earlier in enumerate(trials[:-1]):
            span = box[1] - box[0] if box else float(earlier.x.max() - earlier.x.min())
            if span <= 0:
                continue
            psnr = match_inputs(newest, earlier.x, data_range=span).median_psnr
            if psnr >= self.agree_db:
                return (
                    f"trials {j + 1} and {len(trials)} (different starts) agree to "
                    f"{min(psnr, 999.0):.1f} dB (agree_db={self.agree_db:g}): "
                    "restarts stopped"
                )
        return None

    def _init_plan(
        self, has_reference: bool, has_analytic: bool = True
    ) -> tuple[str, ...]:
        if self.inits is not None:
            return self.inits
        # The feature-inversion start (no analytic result) was measured to
        # cost more than it saves against a uniform start with the TV prior:
        # "analytic" leads by default only where an analytic attack gave one.
        plan = (["analytic"] if has_analytic else []) + (
            ["mean"] if has_reference else []
        )
        plan += ["uniform"] * max(self.restarts - len(plan), 0)
        return tuple(plan[: self.restarts])

    # --------------------------------------------------------------------- run

    def applicability(self, target: AttackTarget) -> Applicability:
        """Applies when the model returns class logits (one forward pass)."""
        return logits_applicability(target)

    def run(self, target: AttackTarget) -> AttackResult:
        """Reconstruct the batch behind ``target``'s gradient.

        Raises
        ------
        UnsupportedModelError
            If the model does not return class logits ``(B, C)`` or the
            observed gradient is zero.
        InvalidInputError
            If ``reference`` does not have the target's input shape.
        """
        budget = Budget(self.time_budget_s, self.max_iterations)
        problem = MatchingProblem(
            target, torch.float64 if self.precision == "float64" else None
        )
        batch = batch_size_of(target)
        notes: list[str] = []
        if self.reference is not None and tuple(self.reference.shape[1:]) != tuple(
            target.input_shape
        ):
            raise InvalidInputError(
                "PriorGuidedReconstruction reference",
                [
                    f"has input shape {tuple(self.reference.shape[1:])}, the target "
                    f"{target.input_shape}; pass inputs of the attacked domain"
                ],
            )
        if target.input_range is None:
            notes.append(
                "no input_range: box and priors off, uniform starts drawn from [0, 1]"
            )
        lo, hi = target.input_range or (0.0, 1.0)

        analytic = self._analytic(target, batch, notes)
        labels, source = self._labels(target, problem, batch, analytic, notes)

        trials: list[_Trial] = []
        bar = progress_bar(self.progress, self.max_iterations, "prior_guided")
        plan = self._init_plan(self.reference is not None, analytic is not None)
        gen = torch.Generator().manual_seed(self.seed)
        tv_plan = self._tv_plan(bool(problem.relus))
        try:
            attempt = 0
            while attempt < len(plan) and not budget.exhausted():
                init = plan[attempt]
                attempt += 1
                x0 = self._initial(
                    init,
                    problem,
                    target,
                    batch,
                    gen,
                    analytic,
                    budget,
                    (lo, hi),
                    labels,
                    notes,
                )
                if x0 is None:
                    continue
                try:
                    trial = self._trial(
                        init,
                        x0,
                        labels,
                        problem,
                        target,
                        budget,
                        bar,
                        (lo, hi),
                        tv_plan[(attempt - 1) % len(tv_plan)],
                    )
                except Diverged as exc:
                    notes.append(
                        f"trial {attempt} ({init}) diverged ({exc}); restarted"
                    )
                    logger.debug("prior_guided: trial %d diverged: %s", attempt, exc)
                    if len(plan) < 2 * max(self.restarts, len(plan)):
                        plan = (*plan, "uniform")
                    continue
                trials.append(trial)
                logger.debug(
                    "prior_guided: trial %d (%s) residual %.3g, %s",
                    attempt,
                    init,
                    trial.residual,
                    trial.stopped,
                )
                if trial.residual <= self.accept_residual:
                    break
                agreement = self._agreement(trials, target)
                if agreement is not None:
                    notes.append(agreement)
                    break
        finally:
            bar.close()

        if not trials:
            notes.append("no trial finished within the budget")
            shape = (batch, *target.input_shape)
            return AttackResult(
                attack=self.name,
                inputs=torch.full(shape, (lo + hi) / 2, dtype=problem.dtype),
                certified=torch.zeros(batch, dtype=torch.bool),
                labels=None if labels.is_floating_point() else labels,
                residual=math.inf,
                elapsed_s=budget.elapsed,
                notes=notes,
                certificates=[""] * batch,
            )
        best = min(trials, key=lambda t: t.residual)
        notes.append(
            f"best of {len(trials)} trial(s): {best.init} start"
            + (
                f", TV weight {best.tv_weight:g}"
                if len(target.input_shape) == 3
                else ""
            )
            + f", residual "
            f"{best.residual:.3g} ({best.stopped}); labels: {source}; "
            f"{budget.used_iterations} iteration(s), {budget.evaluations} evaluation(s)"
        )
        out_labels = labels.argmax(dim=1) if labels.is_floating_point() else labels
        return AttackResult(
            attack=self.name,
            inputs=best.x,
            certified=torch.zeros(batch, dtype=torch.bool),
            labels=out_labels.detach().clone(),
            batch_size_estimate=analytic[1] if analytic is not None else None,
            residual=best.residual,
            elapsed_s=time.perf_counter() - budget.start,
            notes=notes,
            certificates=[""] * batch,
        )

    # ---------------------------------------------------------------- helpers

    def _analytic(
        self, target: AttackTarget, batch: int, notes: list[str]
    ) -> tuple[AttackResult, int | None] | None:
        """An analytic attack's inputs to start from, when one applies.

        The FC attack when the first layer is fully connected; otherwise the
        convolutional inversion, solved to a loose tolerance (a start, not
        an answer), kept only where every solve of the walk down had as many
        equations as unknowns and a relative residual of at most
        ``_CONV_START_RESIDUAL``.
        """
        fc = AnalyticFCInversion(time_budget_s=self._analytic_budget())
        if fc.applicability(target):
            if self.labels == "auto" or "analytic" in self._init_plan(False):
                return self._analytic_fc(fc, target, notes)
            return None
        if self.inits is None or "analytic" in self.inits:
            return self._conv_start(target, batch, notes)
        return None

    def _analytic_budget(self) -> float:
        """Seconds an analytic start may take: a fifth of the attack's budget."""
        return max(0.1, 0.2 * (self.time_budget_s or 60.0))

    def _conv_start(
        self, target: AttackTarget, batch: int, notes: list[str]
    ) -> tuple[AttackResult, int | None] | None:
        conv = ConvInversion(
            dense_limit=_CONV_START_DENSE,
            tolerance=_CONV_START_TOLERANCE,
            stop_underdetermined=True,
            time_budget_s=self._analytic_budget(),
        )
        if not conv.applicability(target):
            return None
        try:
            result = conv.run(target)
        except FLAuditError as exc:
            notes.append(f"no conv_inversion start: {exc}")
            return None
        samples = result.inputs.shape[0]
        worst = max((s.residual for s in result.solves), default=math.inf)
        problem = None
        short = any(
            s.uncovered > 0 or s.kept + s.weight_equations < s.unknowns
            for s in result.solves
        )
        skipped = [s.layer for s in result.solves if s.solver == "skipped"]
        if samples != batch:
            problem = f"it separated {samples} of {batch} input(s)"
        elif short:
            problem = "a layer of its walk down has fewer equations than unknowns"
        elif skipped:  # not for lack of equations: for lack of time
            problem = f"the time budget ran out before {skipped[0]}"
        elif not worst <= _CONV_START_RESIDUAL:
            problem = f"its walk down is inconsistent (relative residual {worst:.2g})"
        if problem is not None:
            notes.append(f"no conv_inversion start: {problem}")
            return None
        notes.append(
            f"analytic start: conv_inversion (tolerance {_CONV_START_TOLERANCE:g}, "
            f"{1000 * result.elapsed_s:.0f} ms)"
        )
        return result, result.batch_size_estimate

    @staticmethod
    def _analytic_fc(
        fc: AnalyticFCInversion, target: AttackTarget, notes: list[str]
    ) -> tuple[AttackResult, int | None] | None:
        """The FC attack's result when the first layer is fully connected."""
        try:
            result = fc.run(target)
        except FLAuditError as exc:
            notes.append(f"analytic_fc could not help: {exc}")
            return None
        if result.num_recovered == 0:
            return None
        return result, result.batch_size_estimate

    def _labels(
        self,
        target: AttackTarget,
        problem: MatchingProblem,
        batch: int,
        analytic: tuple[AttackResult, int | None] | None,
        notes: list[str],
    ) -> tuple[torch.Tensor, LabelSource]:
        if self.labels == "auto":
            if target.labels is not None and target.labels.numel() == batch:
                return target.labels.clone(), "given"
            if analytic is not None:
                fc_labels = analytic[0].labels
                if (
                    fc_labels is not None
                    and fc_labels.numel() == batch
                    and (fc_labels >= 0).all()
                ):
                    found_by: LabelSource = (
                        "conv_inversion"
                        if analytic[0].attack == "conv_inversion"
                        else "analytic_fc"
                    )
                    return fc_labels.clone(), found_by
            labels, source, note = infer_labels(problem, batch)
            if labels is not None and source is not None:
                return labels, source
            notes.append(note)
        gen = torch.Generator().manual_seed(self.seed + 7919)
        soft = torch.randn(
            batch, problem.num_classes, generator=gen, dtype=problem.dtype
        )
        return soft, "optimised"

    def _initial(
        self,
        init: str,
        problem: MatchingProblem,
        target: AttackTarget,
        batch: int,
        gen: torch.Generator,
        analytic: tuple[AttackResult, int | None] | None,
        budget: Budget,
        box: tuple[float, float],
        labels: torch.Tensor,
        notes: list[str],
    ) -> torch.Tensor | None:
        lo, hi = box
        shape = (batch, *target.input_shape)
        uniform = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=problem.dtype)
        if init == "uniform":
            return uniform
        if init == "centre":
            # the middle of the box; a little noise breaks the symmetry
            # between the slots of a batch
            centre = torch.full(shape, (lo + hi) / 2, dtype=problem.dtype)
            return centre + self._jitter(shape, box, gen, problem.dtype, batch)
        if init == "normal":
            return torch.randn(shape, generator=gen, dtype=problem.dtype)
        if init == "mean":
            assert self.reference is not None
            mean = self.reference.to(problem.dtype).mean(dim=0)  # (*input_shape)
            return mean.expand(shape) + self._jitter(
                shape, box, gen, problem.dtype, batch
            )
        if analytic is not None:
            found = analytic[0].inputs.to(problem.dtype)[:batch]  # (k, *input_shape)
            x0 = uniform.clone()
            x0[: found.shape[0]] = found.reshape(-1, *target.input_shape)
            return x0
        start = self._feature_start(problem, target, batch, uniform, budget, box, notes)
        if start is None:
            notes.append("no analytic start for this model: uniform start instead")
            return uniform
        return start

    @staticmethod
    def _jitter(
        shape: tuple[int, ...],
        box: tuple[float, float],
        gen: torch.Generator,
        dtype: torch.dtype,
        batch: int,
    ) -> torch.Tensor | float:
        """Noise of 1 % of the box that breaks the symmetry of a batch's slots."""
        if batch == 1:
            return 0.0
        lo, hi = box
        return 0.01 * (hi - lo) * torch.randn(shape, generator=gen, dtype=dtype)

    def _feature_start(
        self,
        problem: MatchingProblem,
        target: AttackTarget,
        batch: int,
        x0: torch.Tensor,
        budget: Budget,
        box: tuple[float, float],
        notes: list[str],
    ) -> torch.Tensor | None:
        """Invert the input of the first linear layer, read off its gradient.

        For a linear layer ``z = W u + b`` each sample adds ``delta u^T`` to
        ``dL/dW`` and ``delta`` to ``dL/db``: one sample's ``u`` is the
        least-squares ratio of the two, a batch's lie in the row space of
        ``[dL/dW | dL/db]``. The start minimises the distance of ``u(x)``
        to that target (a first-order problem: no double backward).
        """
        layers = [entry for entry in problem.linear_layers() if entry[2] is not None]
        if not layers:
            return None
        module, wname, bname = layers[0]
        assert bname is not None
        G = problem.observed_of(wname).double()  # (h, m)
        g = problem.observed_of(bname).double()  # (h,)
        if not float((g * g).sum()) > 0:
            return None
        if batch == 1:
            u_star = (g @ G) / (g @ g)  # (m,)
            basis = None
        else:
            M = torch.cat([G, g[:, None]], dim=1)  # (h, m + 1)
            _, S, Vt = torch.linalg.svd(M, full_matrices=False)
            rank = max(1, min(batch, int((1e-6 * S[0] < S).sum())))
            basis = Vt[:rank]  # (r, m + 1)
            u_star = None

        captured: list[torch.Tensor] = []

        def grab(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            captured.append(inputs[0])

        lo, hi = box
        tv_weight = self._tv_plan(bool(problem.relus))[0]
        x = x0.clone().requires_grad_(True)

        def objective() -> torch.Tensor:
            captured.clear()
            handle = module.register_forward_pre_hook(grab)
            try:
                problem.model(x)
            finally:
                handle.remove()
            u = captured[0].reshape(batch, -1).double()  # (B, m)
            if u_star is not None:
                fit = ((u[0] - u_star) ** 2).sum() / (u_star @ u_star + 1e-30)
            else:
                assert basis is not None
                aug = torch.cat([u, torch.ones(batch, 1, dtype=u.dtype)], dim=1)
                proj = (aug @ basis.T) @ basis  # (B, m + 1)
                fit = (((aug - proj) ** 2).sum(dim=1) / (aug * aug).sum(dim=1)).mean()
            # the prior's weight follows the fit reached, as in the trials
            prior = scale[0] * self._prior(x, target, tv_weight)
            return fit.to(x.dtype) + prior + self._box_penalty(x, box)

        scale = [1.0]

        def on_step(_n: int, value: float, _best: list[torch.Tensor]) -> None:
            scale[0] = max(value, 1e-300)

        def project() -> None:
            if self.box and target.input_range is not None:
                with torch.no_grad():
                    x.clamp_(lo, hi)

        try:
            run_trial(
                objective,
                [x],
                budget,
                optimizer="lbfgs",
                lr=1.0,
                line_search=True,
                max_iterations=300,
                chunk=10,
                patience=40,
                min_improvement=1e-3,
                tolerance=1e-10,
                explode_factor=1e6,
                on_step=on_step,
            )
        except Diverged as exc:
            notes.append(f"feature-inversion start diverged ({exc}): uniform start")
            return None
        project()
        path = wname.rsplit(".", 1)[0]
        notes.append(f"analytic start: inverted the input of linear layer {path!r}")
        return x.detach()

    # ----------------------------------------------------------------- priors

    def _prior(
        self, x: torch.Tensor, target: AttackTarget, tv_weight: float
    ) -> torch.Tensor | float:
        if target.input_range is None:
            return 0.0
        if x.dim() == 4 and tv_weight > 0:  # (B, C, H, W)
            dh = x[..., 1:, :] - x[..., :-1, :]
            dw = x[..., :, 1:] - x[..., :, :-1]
            eps = 1e-8
            tv = torch.sqrt(dh * dh + eps).mean() + torch.sqrt(dw * dw + eps).mean()
            return tv_weight * tv
        if x.dim() == 3 and self.smooth_weight > 0 and x.shape[-1] > 2:  # (B, C, L)
            d2 = x[..., 2:] - 2 * x[..., 1:-1] + x[..., :-2]
            return self.smooth_weight * (d2 * d2).mean()
        return 0.0

    def _box_penalty(
        self, x: torch.Tensor, box: tuple[float, float]
    ) -> torch.Tensor | float:
        if not self.box:
            return 0.0
        lo, hi = box
        return ((lo - x).clamp(min=0) ** 2 + (x - hi).clamp(min=0) ** 2).mean()

    # ------------------------------------------------------------------ trial

    def _settle(self, box: tuple[float, float]) -> tuple[float, float] | None:
        """When the polish has settled: ``(objective below, step)`` or None.

        The polish (no prior) stops once the residual is below
        ``settle_residual`` and the answer moves by at most
        ``settle_step`` of the input range over ``patience`` iterations.
        Only for the L2 distance, whose objective is the squared residual.
        """
        if self.settle_step is None or self.distance != "l2":
            return None
        return self.settle_residual**2, self.settle_step * (box[1] - box[0])

    def _phases(self, has_relus: bool) -> list[tuple[float | None, float]]:
        """``(ReLU ramp width or None for the exact model, prior factor)``."""
        phases: list[tuple[float | None, float]] = []
        if has_relus:
            phases += [(f, 1.0) for f in self.relu_smoothing]
        phases += [(None, 1.0), (None, 0.1), (None, 0.01), (None, 0.0)]
        return phases

    def _trial(
        self,
        init: str,
        x0: torch.Tensor,
        labels: torch.Tensor,
        problem: MatchingProblem,
        target: AttackTarget,
        budget: Budget,
        bar: object,
        box: tuple[float, float],
        tv_weight: float,
    ) -> _Trial:
        lo, hi = box
        patience = self._patience(bool(problem.relus))
        x = x0.clone().requires_grad_(True)
        soft = (
            labels.clone().requires_grad_(True) if labels.is_floating_point() else None
        )
        variables = [x] if soft is None else [x, soft]
        use_box = self.box and target.input_range is not None

        def project() -> None:
            if use_box:
                with torch.no_grad():
                    x.clamp_(lo, hi)

        # The prior's weight follows the distance reached (see tv_weight).
        # It starts at 1 whatever the start's distance: measured on photos,
        # starting it at a close conv_inversion start's distance (1e-4)
        # switched the prior off and the polish took 3x longer.
        scale = [1.0]

        def on_step(n: int, value: float, best: list[torch.Tensor]) -> None:
            scale[0] = max(value, 1e-300)
            bar.update(n, value)  # type: ignore[attr-defined]
            if self.callback is not None and self.callback(
                best[0].detach().clone(), value, budget.elapsed
            ):
                budget.cancel()

        if self.callback is not None:  # the start itself (an analytic one may do)
            lab0 = (soft if soft is not None else labels).detach()
            grads = problem.gradient(x.detach(), lab0, create_graph=False)
            budget.evaluations += 1
            if self.callback(
                x.detach().clone(),
                float(problem.distance(grads, self.distance)),
                budget.elapsed,
            ):
                budget.cancel()
        stopped = "budget"
        # Softened phases (ReLU models only: a continuous distance for the
        # line search), then the exact model with the prior, then a polish
        # without it: a prior that helps from noise would otherwise bias
        # the converged answer.
        # The prior is annealed (its weight divided by 10 twice) before the
        # polish, so a weight strong enough to guide 32x32 photos out of
        # noise does not pin small, sharp-edged inputs (8x8 digits) to a
        # smoothed answer.
        for fraction, prior_factor in self._phases(bool(problem.relus)):
            if budget.exhausted():
                break
            problem.soften(fraction, x)

            def objective(prior_factor: float = prior_factor) -> torch.Tensor:
                lab = soft if soft is not None else labels
                value = problem.distance(problem.gradient(x, lab), self.distance)
                if use_box:
                    value = value + self._box_penalty(x, box)
                if prior_factor > 0:
                    value = value + prior_factor * scale[0] * self._prior(
                        x, target, tv_weight
                    )
                return value

            try:
                outcome = run_trial(
                    objective,
                    variables,
                    budget,
                    optimizer=self.optimizer,
                    lr=self.lr,
                    line_search=True,
                    max_iterations=(
                        None if fraction is None and prior_factor == 0 else patience * 3
                    ),
                    chunk=10,
                    patience=patience if fraction is None else 30,
                    min_improvement=1e-3,
                    tolerance=self.tolerance,
                    explode_factor=1e4,
                    on_step=on_step,
                    settle=(
                        self._settle(box)
                        if fraction is None and prior_factor == 0
                        else None
                    ),
                )
            finally:
                problem.soften(None, x)
            stopped = outcome.stopped
            if stopped in ("budget", "cancelled"):
                break
        project()
        lab = soft if soft is not None else labels
        residual = problem.residual(x, lab)
        if not math.isfinite(residual):
            raise Diverged("the final residual is not finite")
        if soft is not None:
            labels.copy_(soft.detach())
        return _Trial(init, x.detach().clone(), residual, stopped, tv_weight)
