"""Deep Leakage from Gradients, as published: the yardstick of iterative attacks.

Zhu, Liu and Han, "Deep Leakage from Gradients" (NeurIPS 2019): draw a dummy
input and a dummy soft label from a standard normal, and minimise the sum of
squared differences between their gradient and the observed one with
L-BFGS (learning rate 1, no line search in the reference code). Nothing
else: no label rule, no prior, no box, no restart. The prior-guided attack
(:mod:`fl_audit.attacks.prior_guided`) is measured against it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from fl_audit._logging import logger
from fl_audit.attacks._matching import (
    Budget,
    Diverged,
    MatchingProblem,
    logits_applicability,
    progress_bar,
    run_trial,
)
from fl_audit.attacks.base import Applicability, Attack
from fl_audit.attacks.registry import register_attack
from fl_audit.core import AttackResult, AttackTarget
from fl_audit.errors import InvalidInputError, UnsupportedModelError

Callback = Callable[[torch.Tensor, float, float], bool | None]
"""``callback(best_input, objective, elapsed_s)``; a true return stops the attack."""


def positive_number(value: object) -> bool:
    """Whether ``value`` is a finite real number above 0 (a bool is not)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def check_budget(
    problems: list[str], time_budget_s: object, max_iterations: object
) -> None:
    """Append a message per invalid budget argument to ``problems``."""
    if time_budget_s is not None and not positive_number(time_budget_s):
        problems.append(
            f"time_budget_s must be a positive number of seconds or None, "
            f"got {time_budget_s!r}"
        )
    if max_iterations is not None and (
        not isinstance(max_iterations, int)
        or isinstance(max_iterations, bool)
        or max_iterations < 1
    ):
        problems.append(
            f"max_iterations must be an int >= 1 or None, got {max_iterations!r}"
        )
    if time_budget_s is None and max_iterations is None:
        problems.append(
            "set time_budget_s or max_iterations (or both): an iterative attack "
            "needs a budget"
        )


def batch_size_of(target: AttackTarget) -> int:
    """The batch size to reconstruct: declared, else the number of labels, else 1."""
    if target.batch_size is not None:
        return target.batch_size
    if target.labels is not None:
        return int(target.labels.numel())
    return 1


@register_attack("dlg")
class DLGBaseline(Attack):
    """DLG (Zhu et al. 2019): L-BFGS on the squared gradient distance from noise.

    Parameters
    ----------
    max_iterations:
        L-BFGS iterations in all (the reference code runs 300 steps of up
        to 20 iterations each).
    time_budget_s:
        Wall-clock budget in seconds; the best point so far is returned when
        it runs out.
    lr:
        L-BFGS step size (1 in the reference code).
    line_search:
        Use a strong-Wolfe line search. Off by default: the published method
        has none, which is why it often stalls or diverges.
    tolerance:
        Stop when the squared gradient distance falls below it.
    patience:
        Stop when the distance has not improved by 0.1 % in this many
        iterations.
    seed:
        Seed of the dummy input and label.
    progress:
        Show a progress bar; ``None`` shows one only when stderr is a
        terminal. The audit passes ``False``.
    callback:
        Called after every L-BFGS step (up to 20 iterations) with the best input so far
        ``(B, *input_shape)``, its objective and the elapsed seconds (for
        benchmarks and monitoring). Returning ``True`` stops the attack
        after that step; the result is the best input so far and its notes
        say "cancelled".

    Notes
    -----
    The batch size is the target's ``batch_size`` (else the number of its
    labels, else 1); DLG uses neither the labels nor the input range. A
    NaN/Inf objective ends the run with the best point seen before it and a
    note: the baseline is kept plain, restarts belong to ``prior_guided``.
    """

    def __init__(
        self,
        *,
        max_iterations: int | None = 6000,
        time_budget_s: float | None = 60.0,
        lr: float = 1.0,
        line_search: bool = False,
        tolerance: float = 1e-12,
        patience: int = 200,
        seed: int = 0,
        progress: bool | None = None,
        callback: Callback | None = None,
    ) -> None:
        problems: list[str] = []
        check_budget(problems, time_budget_s, max_iterations)
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            problems.append(f"lr must be a positive number, got {lr!r}")
        if not (isinstance(tolerance, int | float) and tolerance >= 0):
            problems.append(f"tolerance must be a number >= 0, got {tolerance!r}")
        if not isinstance(patience, int) or patience < 1:
            problems.append(f"patience must be an int >= 1, got {patience!r}")
        if problems:
            raise InvalidInputError("DLGBaseline options", problems)
        self.max_iterations = max_iterations
        self.time_budget_s = time_budget_s
        self.lr = float(lr)
        self.line_search = line_search
        self.tolerance = float(tolerance)
        self.patience = patience
        self.seed = seed
        self.progress = progress
        self.callback = callback

    def __repr__(self) -> str:
        return (
            f"DLGBaseline(max_iterations={self.max_iterations}, "
            f"time_budget_s={self.time_budget_s}, line_search={self.line_search})"
        )

    def applicability(self, target: AttackTarget) -> Applicability:
        """Applies when the model returns class logits (one forward pass)."""
        return logits_applicability(target)

    def run(self, target: AttackTarget) -> AttackResult:
        """Reconstruct the batch behind ``target``'s gradient.

        Raises
        ------
        UnsupportedModelError
            If the model does not return class logits ``(B, C)``.
        """
        budget = Budget(self.time_budget_s, self.max_iterations)
        problem = MatchingProblem(target)
        batch = batch_size_of(target)
        gen = torch.Generator().manual_seed(self.seed)
        shape = (batch, *target.input_shape)
        x = torch.randn(shape, generator=gen, dtype=problem.dtype).requires_grad_(True)
        soft = torch.randn(
            batch, problem.num_classes, generator=gen, dtype=problem.dtype
        ).requires_grad_(True)

        def objective() -> torch.Tensor:
            return problem.distance(problem.gradient(x, soft), "l2_raw")

        bar = progress_bar(self.progress, self.max_iterations, "dlg")

        def on_step(n: int, value: float, best: list[torch.Tensor]) -> None:
            bar.update(n, value)
            if self.callback is not None and self.callback(
                best[0].detach().clone(), value, budget.elapsed
            ):
                budget.cancel()

        notes: list[str] = []
        try:
            outcome = run_trial(
                objective,
                [x, soft],
                budget,
                optimizer="lbfgs",
                lr=self.lr,
                line_search=self.line_search,
                max_iterations=self.max_iterations,
                chunk=20,
                patience=self.patience,
                min_improvement=1e-3,
                tolerance=self.tolerance,
                explode_factor=None,
                on_step=on_step,
            )
            stopped = outcome.stopped
        except Diverged as exc:
            # run_trial restored the best point seen before the failure
            stopped = "diverged"
            notes.append(f"diverged ({exc}); returning the best point seen before")
        finally:
            bar.close()

        labels = soft.detach().argmax(dim=1)
        try:
            residual = problem.residual(x, soft)
        except RuntimeError as exc:  # pragma: no cover - a model that fails here
            raise UnsupportedModelError(f"cannot evaluate the model: {exc}") from exc
        if not math.isfinite(residual):
            residual = math.inf
        notes.append(
            f"stopped: {stopped} after {budget.used_iterations} iteration(s), "
            f"{budget.evaluations} evaluation(s)"
        )
        logger.debug("dlg: %s, residual %.3g", stopped, residual)
        return AttackResult(
            attack=self.name,
            inputs=x.detach().clone(),
            certified=torch.zeros(batch, dtype=torch.bool),
            labels=labels,
            batch_size_estimate=None,
            residual=residual,
            elapsed_s=time.perf_counter() - budget.start,
            notes=notes,
            certificates=[""] * batch,
        )
