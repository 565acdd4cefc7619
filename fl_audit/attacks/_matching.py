"""Shared pieces of the gradient-matching attacks (``dlg``, ``prior_guided``).

A :class:`MatchingProblem` holds a private copy of the target's model, its
parameters and the observed gradient, and computes, for a dummy batch and a
labelling, the gradient the model would have produced (with the graph kept,
so the distance can be differentiated once more with respect to the dummy).
The distances, the ground-truth-free residual, the label rules and the
optimisation loop with its budget, early stop and divergence checks live
here too, so the baseline and the prior-guided attack differ only in the
choices they make.

Notes
-----
The model is evaluated in eval mode: dropout is off and BatchNorm uses its
running statistics. A client that trained with BatchNorm in training mode
produced a gradient this copy cannot reproduce exactly; the residual then
stays above zero. The loss is cross-entropy averaged over the batch, the
loss of ``torch.nn.CrossEntropyLoss`` and of Flower's examples.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional

from fl_audit.attacks.base import Applicability
from fl_audit.core import AttackTarget
from fl_audit.errors import InvalidInputError, UnsupportedModelError
from fl_audit.layers import eval_mode

Distance = Literal["l2", "cosine"]
LabelSource = Literal[
    "given", "idlg", "counts", "analytic_fc", "conv_inversion", "optimised"
]


class Diverged(Exception):
    """The objective became NaN/Inf or exploded: the trial must restart."""


class BudgetExhausted(Exception):
    """The time or iteration budget ran out inside an optimiser step."""


@dataclass
class Budget:
    """Wall-clock and iteration budget shared by every trial of one run."""

    time_s: float | None
    iterations: int | None
    start: float = field(default_factory=time.perf_counter)
    used_iterations: int = 0
    evaluations: int = 0
    # Set by cancel(): the caller's callback asked the attack to stop.
    cancelled: bool = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def cancel(self) -> None:
        """End every trial at its next check, as if the budget had run out."""
        self.cancelled = True

    def exhausted(self) -> bool:
        if self.cancelled:
            return True
        if self.time_s is not None and self.elapsed >= self.time_s:
            return True
        return self.iterations is not None and self.used_iterations >= self.iterations


def logits_applicability(target: AttackTarget) -> Applicability:
    """Whether the target's model returns class logits, from one forward pass.

    Gradient matching re-runs the model on dummy inputs and takes the
    cross-entropy of its output, so the output must be one ``(B, C)`` tensor
    with ``C >= 2``. The pass runs on one zero input, in eval mode, without
    gradients; the model is left as it was.
    """
    first = next(target.model.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else None
    device = first.device if first is not None else None
    probe = torch.zeros((1, *target.input_shape), dtype=dtype, device=device)
    try:
        with torch.no_grad(), eval_mode(target.model):
            out = target.model(probe)
    except Exception as exc:  # the user's model fails on this shape
        return Applicability(
            False,
            f"the model fails on one input of shape {tuple(target.input_shape)}: "
            f"{type(exc).__name__}: {exc}",
        )
    if not isinstance(out, torch.Tensor):
        return Applicability(
            False,
            f"the model returns a {type(out).__name__}, not one tensor of class "
            "logits (B, C): wrap it so that forward returns the logits the loss "
            "was taken on",
        )
    if out.dim() != 2 or out.shape[1] < 2:
        return Applicability(
            False,
            f"gradient matching needs class logits (B, C) with C >= 2; the model "
            f"returns shape {tuple(out.shape)}",
        )
    return Applicability(True)


class SoftenedReLU(nn.Module):
    """ReLU whose derivative is a continuous ramp while ``width`` is set.

    The value is always the exact ``relu(z)``, so the features (and the
    gradient of every layer above the last ReLU) are exact. With
    ``width = w`` the derivative, which backpropagation multiplies into the
    weight gradients below, rises linearly from 0 at ``-w/2`` to 1 at
    ``w/2`` instead of jumping at 0: the derivative of a C1 ramp. A ReLU's
    weight gradients hold its activation mask, which jumps when a unit
    flips; the ramp makes the gradient distance continuous in the input,
    so a line search can work. Only units with ``|z| < w/2`` see a wrong
    mask, and the attack shrinks ``w`` to zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.width: float | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.width is None:
            return torch.relu(z)
        h = 0.5 * self.width
        ramp = (z.clamp(-h, h) + h) ** 2 / (2 * self.width) + (z - h).clamp(min=0)
        return torch.relu(z).detach() + ramp - ramp.detach()


class MatchingProblem:
    """The model, its parameters and the observed gradient, ready to match.

    Parameters
    ----------
    target:
        The attacked target; its model is deep-copied, put in eval mode and
        cast to ``dtype``.
    dtype:
        Precision of the matching; ``None``: that of the observed gradient
        (at least float32).
    """

    def __init__(self, target: AttackTarget, dtype: torch.dtype | None = None) -> None:
        first = next(iter(target.gradients.values()))
        if dtype is None:
            dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self.dtype = dtype
        self.model = copy.deepcopy(target.model).to(self.dtype).eval()
        self.names = [n for n, p in self.model.named_parameters()]
        self.params = [p for _, p in self.model.named_parameters()]
        for p in self.params:
            p.requires_grad_(True)
        self.observed = [
            target.gradients[n].detach().to(self.dtype).cpu() for n in self.names
        ]
        self.observed_sq = [float((g * g).sum()) for g in self.observed]
        self.total_sq = sum(self.observed_sq)
        if not self.total_sq > 0:
            raise UnsupportedModelError(
                "the observed gradient is zero everywhere: nothing to match "
                "(a saturated loss or a frozen model)"
            )
        self.input_shape = target.input_shape
        self.num_classes = self._num_classes(target)
        self.relus = self._swap_relus()

    def _swap_relus(self) -> list[SoftenedReLU]:
        """Replace every ``nn.ReLU`` module by an (exact) :class:`SoftenedReLU`."""
        swapped: list[SoftenedReLU] = []
        for parent in list(self.model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.ReLU:
                    soft = SoftenedReLU()
                    setattr(parent, name, soft)
                    swapped.append(soft)
        return swapped

    def soften(self, fraction: float | None, x: torch.Tensor) -> None:
        """Set each ReLU's ramp to ``fraction`` times the RMS of its input at ``x``.

        ``None`` restores the exact ReLU.
        """
        if fraction is None:
            for r in self.relus:
                r.width = None
            return
        seen: dict[int, float] = {}

        def grab(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            z = inputs[0].detach()
            seen[id(mod)] = float(torch.sqrt((z * z).mean()))

        hooks = [r.register_forward_pre_hook(grab) for r in self.relus]
        try:
            for r in self.relus:
                r.width = None
            with torch.no_grad():
                self.model(x.detach())
        finally:
            for h in hooks:
                h.remove()
        for r in self.relus:
            rms = seen.get(id(r), 0.0)
            r.width = fraction * rms if rms > 0 else None

    def _num_classes(self, target: AttackTarget) -> int:
        with torch.no_grad():
            out = self.model(torch.zeros(1, *self.input_shape, dtype=self.dtype))
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(
                f"gradient matching needs the model to return its class logits as "
                f"one tensor (B, C); it returns a {type(out).__name__}: wrap it so "
                "that forward returns the logits the loss was taken on"
            )
        if out.dim() != 2 or out.shape[1] < 2:
            raise UnsupportedModelError(
                f"gradient matching needs class logits of shape (B, C) with C >= 2; "
                f"the model returns {tuple(out.shape)}"
            )
        if target.num_classes is not None and target.num_classes != out.shape[1]:
            raise InvalidInputError(
                "AttackTarget.num_classes",
                [
                    f"is {target.num_classes} but the model returns "
                    f"{out.shape[1]} logits; fix num_classes or the model"
                ],
            )
        return int(out.shape[1])

    # ------------------------------------------------------------- gradients

    def gradient(
        self, x: torch.Tensor, labels: torch.Tensor, *, create_graph: bool = True
    ) -> list[torch.Tensor]:
        """Gradient of the mean cross-entropy at ``x`` for ``labels``.

        ``labels`` is either ``(B,)`` class indices or ``(B, C)`` label
        logits (DLG's soft label, passed through a softmax).
        """
        out = self.model(x)  # (B, C)
        if labels.is_floating_point():
            loss = -(
                functional.softmax(labels, dim=-1) * functional.log_softmax(out, dim=-1)
            )
            loss = loss.sum(dim=-1).mean()
        else:
            loss = functional.cross_entropy(out, labels)
        grads = torch.autograd.grad(
            loss, self.params, create_graph=create_graph, allow_unused=True
        )
        return [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(grads, self.params, strict=True)
        ]

    def distance(self, grads: list[torch.Tensor], kind: str) -> torch.Tensor:
        """Gradient distance to minimise.

        ``"l2_raw"``: DLG's sum of squared differences. ``"l2"``: the same
        divided by the squared norm of the observed gradient (scale-free).
        ``"cosine"``: mean over parameter tensors of ``1 - cos``.
        """
        if kind == "cosine":
            terms = []
            for g, o, osq in zip(grads, self.observed, self.observed_sq, strict=True):
                if osq == 0.0:
                    continue
                dot = (g * o).sum()
                norm = torch.sqrt((g * g).sum() + 1e-30) * math.sqrt(osq)
                terms.append(1.0 - dot / norm)
            return torch.stack(terms).mean()
        total = sum(
            ((g - o) ** 2).sum() for g, o in zip(grads, self.observed, strict=True)
        )
        assert isinstance(total, torch.Tensor)
        return total if kind == "l2_raw" else total / self.total_sq

    def residual(self, x: torch.Tensor, labels: torch.Tensor) -> float:
        """Relative gradient distance ``||g(x) - g_obs|| / ||g_obs||``."""
        grads = self.gradient(x.detach(), labels.detach(), create_graph=False)
        diff = sum(
            float(((g - o) ** 2).sum())
            for g, o in zip(grads, self.observed, strict=True)
        )
        return math.sqrt(diff / self.total_sq)

    # ---------------------------------------------------------------- layers

    def linear_layers(self) -> list[tuple[nn.Linear, str, str | None]]:
        """``nn.Linear`` modules in the order the forward pass calls them."""
        order: list[nn.Module] = []
        hooks = [
            m.register_forward_pre_hook(lambda mod, _inp: order.append(mod))
            for m in self.model.modules()
            if isinstance(m, nn.Linear)
        ]
        try:
            with torch.no_grad():
                self.model(torch.zeros(1, *self.input_shape, dtype=self.dtype))
        finally:
            for h in hooks:
                h.remove()
        names = {id(m): n for n, m in self.model.named_modules()}
        found: list[tuple[nn.Linear, str, str | None]] = []
        for m in order:
            assert isinstance(m, nn.Linear)
            path = names[id(m)]
            prefix = f"{path}." if path else ""
            bias = f"{prefix}bias" if m.bias is not None else None
            if all(found_m is not m for found_m, _, _ in found):
                found.append((m, f"{prefix}weight", bias))
        return found

    def observed_of(self, name: str) -> torch.Tensor:
        return self.observed[self.names.index(name)]


# ------------------------------------------------------------------- labels


def infer_labels(
    problem: MatchingProblem, batch_size: int
) -> tuple[torch.Tensor | None, LabelSource | None, str]:
    """Labels from the gradient of the last linear layer, without ground truth.

    One input (iDLG, Zhao et al. 2020): with softmax cross-entropy the
    last-layer bias gradient is ``p - onehot(y)``, negative only at the true
    class. Without a bias the row sums of the weight gradient carry the same
    sign when the layer's inputs are non-negative (sigmoid, ReLU). A batch:
    the mean bias gradient is ``mean(p) - counts / B``; every class with a
    negative entry is present, and counts are estimated as
    ``B * (p_bar - g_b)`` with ``p_bar`` the model's mean prediction on
    uniform noise, rounded by largest remainder to sum to ``B``.

    Returns
    -------
    (labels, source, note)
        ``labels`` is ``None`` when the model has no final linear layer that
        returns the logits; the note says why.
    """
    layers = problem.linear_layers()
    if not layers or layers[-1][0].out_features != problem.num_classes:
        return None, None, "no final nn.Linear returns the logits: labels optimised"
    _, wname, bname = layers[-1]
    if bname is not None:
        g = problem.observed_of(bname).double()  # (C,)
    else:
        g = problem.observed_of(wname).double().sum(dim=1)  # (C,)
    if batch_size == 1:
        return (
            torch.tensor([int(torch.argmin(g))]),
            "idlg",
            "label by the iDLG sign rule",
        )

    scale = 1.0
    if bname is None:
        # Row sums are (p - y) times the summed activations: rescale so the
        # most negative entry reads like a bias gradient of one count.
        scale = float(-g.min()) * batch_size if g.min() < 0 else 1.0
        g = g / scale
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(16, *problem.input_shape, generator=gen, dtype=problem.dtype)
    with torch.no_grad():
        p_bar = (
            functional.softmax(problem.model(noise), dim=-1).mean(dim=0).double()
        )  # (C,)
    est = (batch_size * (p_bar - g)).clamp(min=0.0)  # (C,)
    present = g < 0
    counts = torch.zeros_like(est, dtype=torch.long)
    counts[present] = 1
    left = batch_size - int(counts.sum())
    if left < 0:  # more negative classes than inputs: keep the most negative
        counts.zero_()
        counts[torch.argsort(g)[:batch_size]] = 1
        left = 0
    rest = (est - counts.double()).clamp(min=0.0)
    if left > 0:
        share = (
            rest / rest.sum() * left
            if rest.sum() > 0
            else torch.full_like(rest, left / len(rest))
        )
        whole = torch.floor(share).long()
        counts += whole
        remainder = left - int(whole.sum())
        if remainder > 0:
            counts[torch.argsort(share - whole, descending=True)[:remainder]] += 1
    labels = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return labels, "counts", "labels counted from the last-layer gradient"


# ---------------------------------------------------------------- progress


def progress_bar(enabled: bool | None, total: int | None, desc: str) -> _Progress:
    """A tqdm bar when ``enabled`` (``None``: only when stderr is a terminal)."""
    show = sys.stderr.isatty() if enabled is None else enabled
    return _Progress(show, total, desc)


class _Progress:
    def __init__(self, show: bool, total: int | None, desc: str) -> None:
        self._bar = None
        if show:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, unit="it")

    def update(self, n: int, residual: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(residual=f"{residual:.2e}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------- optimiser


@dataclass
class TrialOutcome:
    """What one optimisation trial reached."""

    best_objective: float
    iterations: int
    stopped: str  # converged, stalled, settled, budget, cancelled, max_iterations
    history: list[tuple[float, int, float]] = field(default_factory=list)


def run_trial(
    objective: Callable[[], torch.Tensor],
    variables: list[torch.Tensor],
    budget: Budget,
    *,
    optimizer: str,
    lr: float,
    line_search: bool,
    max_iterations: int | None,
    chunk: int,
    patience: int,
    min_improvement: float,
    tolerance: float,
    explode_factor: float | None,
    project: Callable[[], None] | None = None,
    on_step: Callable[[int, float, list[torch.Tensor]], None] | None = None,
    keep_best: bool = True,
    settle: tuple[float, float] | None = None,
) -> TrialOutcome:
    """Minimise ``objective`` over ``variables`` until a stop rule fires.

    Stops on: ``objective <= tolerance`` (converged), no relative
    improvement of ``min_improvement`` within ``patience`` iterations
    (stalled), the shared ``budget``, or ``max_iterations`` for this trial.
    With ``settle = (objective_below, step)``, also once the objective is
    below ``objective_below`` and the best point has moved by at most
    ``step`` (largest entry change) over the last ``patience`` iterations
    ("settled"): a slow tail of linear convergence still improves the
    objective by more than ``min_improvement`` while the answer no longer
    changes at any resolution that matters. The variables are left at the
    best point seen when ``keep_best``.

    Raises
    ------
    Diverged
        The objective became NaN/Inf, or exceeded ``explode_factor`` times
        its starting value.
    """
    start_value: list[float] = []
    best = [math.inf]
    best_state = [v.detach().clone() for v in variables]
    evaluations = [0]

    def closure() -> torch.Tensor:
        if budget.exhausted():
            raise BudgetExhausted
        opt.zero_grad(set_to_none=True)
        value = objective()
        fval = float(value.detach())
        if not math.isfinite(fval):
            raise Diverged(f"objective is {fval}")
        if not start_value:
            start_value.append(fval)
        elif explode_factor is not None and fval > explode_factor * max(
            start_value[0], 1e-300
        ):
            raise Diverged(
                f"objective exploded to {fval:.3g} from {start_value[0]:.3g}"
            )
        grads = torch.autograd.grad(value, variables)
        for v, g in zip(variables, grads, strict=True):
            if not torch.isfinite(g).all():
                raise Diverged("non-finite gradient of the objective")
            v.grad = g
        evaluations[0] += 1
        budget.evaluations += 1
        if fval < best[0]:
            best[0] = fval
            for b, v in zip(best_state, variables, strict=True):
                b.copy_(v.detach())
        return value

    opt: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            variables,
            lr=lr,
            max_iter=chunk,
            history_size=100,
            tolerance_grad=0.0 if line_search else 1e-7,
            tolerance_change=0.0 if line_search else 1e-9,
            line_search_fn="strong_wolfe" if line_search else None,
        )
    else:
        opt = torch.optim.Adam(variables, lr=lr)
        horizon = max_iterations or budget.iterations or 10_000
        milestones = [int(horizon * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)

    outcome = TrialOutcome(math.inf, 0, "max_iterations")
    last_best, last_best_iter = math.inf, 0
    # The best point at the start of the current settle window.
    anchor: list[torch.Tensor] | None = None
    anchor_iter = 0
    done_iter = [0]
    try:
        while True:
            if budget.exhausted():
                outcome.stopped = "cancelled" if budget.cancelled else "budget"
                break
            if max_iterations is not None and outcome.iterations >= max_iterations:
                break
            before = evaluations[0]
            if optimizer == "lbfgs":
                # A step runs up to `chunk` iterations; the last one of a
                # budget runs only what is left of it.
                left = [chunk]
                if max_iterations is not None:
                    left.append(max_iterations - outcome.iterations)
                if budget.iterations is not None:
                    left.append(budget.iterations - budget.used_iterations)
                opt.param_groups[0]["max_iter"] = max(min(left), 1)
            opt.step(closure)  # type: ignore[arg-type]
            if schedule is not None:
                schedule.step()
            if project is not None:
                project()
            steps = 1
            if optimizer == "lbfgs":
                n_iter = int(opt.state[variables[0]].get("n_iter", 0))
                steps, done_iter[0] = max(n_iter - done_iter[0], 1), n_iter
            outcome.iterations += steps
            budget.used_iterations += steps
            if on_step is not None:
                on_step(steps, best[0], best_state)
            outcome.history.append((budget.elapsed, budget.evaluations, best[0]))
            if best[0] <= tolerance:
                outcome.stopped = "converged"
                break
            if settle is not None and best[0] <= settle[0]:
                if anchor is None:
                    anchor = [b.clone() for b in best_state]
                    anchor_iter = outcome.iterations
                elif outcome.iterations - anchor_iter >= patience:
                    moved = max(
                        float((b - a).abs().max())
                        for b, a in zip(best_state, anchor, strict=True)
                    )
                    if moved <= settle[1]:
                        outcome.stopped = "settled"
                        break
                    anchor = [b.clone() for b in best_state]
                    anchor_iter = outcome.iterations
            if best[0] < last_best * (1.0 - min_improvement):
                last_best, last_best_iter = best[0], outcome.iterations
            elif outcome.iterations - last_best_iter >= patience:
                outcome.stopped = "stalled"
                break
            if evaluations[0] == before:  # L-BFGS met its own tolerances
                outcome.stopped = "stalled"
                break
    except BudgetExhausted:
        outcome.stopped = "cancelled" if budget.cancelled else "budget"
    finally:
        if keep_best and math.isfinite(best[0]):
            with torch.no_grad():
                for v, b in zip(variables, best_state, strict=True):
                    v.copy_(b)
    outcome.best_objective = best[0]
    return outcome
