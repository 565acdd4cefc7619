"""Closed-form inversion of a fully-connected first layer.

For a first layer ``z = W x + b`` and any loss, the gradient of one input is
``dL/dW[i] = (dL/dz_i) x`` and ``dL/db_i = dL/dz_i``, so the input is the
ratio of the two for any unit with a non-zero bias gradient (Qian & Hansen,
"What can we learn from gradients?", arXiv 2010.15718, result 1). For a batch
of B inputs, ``dL/dW = Delta X`` and ``dL/db = Delta 1`` with one error column
per input: the rank of ``dL/dW`` is B when the layer has enough units (result
2), and individual inputs are found as follows.

1. Candidates. (a) The ratio vector of every unit: a unit that only one input
   activates gives that input exactly. (b) Vertices of the polytope
   ``{v : [v, 1] in rowspace([dL/dW | dL/db]), low <= v <= high}``: every
   ratio vector, hence every input, lies in this affine slice of the row
   space, and an input that lights a pixel no other input lights is one of
   its vertices with the right scale. Vertices are reached by linear programs
   that maximise one pixel; the pixels are chosen by the successive
   projection algorithm on the columns of the gradient (its "anchor" columns
   are the pixels lit by a single input). (c) Vertices of small faces: the
   pixels where a unit's ratio sits at a bound of the input range are at
   that bound for every input the unit sees, so they cut out a face that
   holds those inputs as vertices; faces of units that few inputs activate
   are small, and peeling makes more of them small. Candidates are tried
   cheapest first (separable read-off, unit ratios, small faces, then the
   linear programs over the whole polytope).
2. Certificates, none of which uses ground truth. *model*: with the weights
   the gradient was taken at, the model's own first-layer error signal
   ``d(x, y)`` for some label ``y`` lies in the column space of ``dL/dW``;
   then ``dL/dW - a d x^T`` has rank one less (it is "peeled") and the search
   repeats on the rest. *units*: two or more units whose ratio vectors agree
   to within rounding are, almost surely, units of a single input (for an
   update, within the rounding each ratio carries; see
   :func:`_units_certified`).
3. FedAvg updates (several local steps): the first-layer delta still mixes
   exactly the N distinct inputs touched. The first step's inputs are
   certified at the known starting weights and peeled (*trajectory*); when a
   step's inputs are all found, the step is replayed (plain SGD with the
   target's ``lr``) and the next step's inputs are certified at the new
   weights. Without ``lr`` and ``local_steps`` only the *units* certificate
   is available.

Notes
-----
The model certificate assumes a per-sample loss (cross-entropy by default)
and no coupling between samples (BatchNorm in training mode couples them);
the model is evaluated in eval mode. It is the target's own model, run on
float64 copies of its weights (``torch.func.functional_call``) with its
modules' modes switched to eval and restored after each call: the model
object must not be run by another thread while an attack runs (the audit
gives each target a model of its own). Weight decay adds ``lr * lambda * W`` to
an update, outside the span of the inputs: ratios are then no longer exact,
and a units certificate is not issued when the update is inconsistent.
Vertex candidates need the input range (``AttackTarget.input_range``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn
from torch.func import functional_call

from fl_audit._logging import logger
from fl_audit.attacks.base import Applicability, Attack
from fl_audit.attacks.registry import register_attack
from fl_audit.core import AttackResult, AttackTarget
from fl_audit.errors import InvalidInputError, UnsupportedModelError
from fl_audit.layers import FirstLayer, eval_mode, find_first_layer


@dataclass
class _Found:
    """One recovered input and its evidence."""

    x: np.ndarray  # (d,)
    label: int = -1
    certificate: str = ""
    weight: float | None = None  # the peeled scale a in dL/dW -= a d x^T


@dataclass
class _Tolerances:
    """Numerical thresholds, set from the precision of the observed gradient."""

    rank: float
    subspace: float
    units: float
    box: float
    # Absolute rounding of one gradient entry, when known (an update global -
    # client); 0 for a gradient handed over as it is.
    entry: float = 0.0

    @classmethod
    def for_precision(cls, eps: float, span: float) -> _Tolerances:
        # Residuals of true inputs sit near eps (measured: 0.3 eps in float32,
        # 1-2 eps in float64); wrong candidates sit orders of magnitude above.
        return cls(
            rank=max(1e-10, 1e3 * eps),
            subspace=10 * eps if eps > 1e-10 else 1e-9,
            units=max(1e-10, 1e2 * eps),
            box=max(1e-12, 10 * eps) * span,
        )

    def with_noise(self, rel: float, span: float, entry: float) -> _Tolerances:
        """Widen the thresholds to a known noise floor (relative to sigma_max).

        ``entry`` is the absolute rounding of one gradient entry.
        """
        return _Tolerances(
            rank=max(self.rank, 5 * rel),
            subspace=max(self.subspace, 5 * rel),
            units=max(self.units, 5 * rel),
            box=max(self.box, 5 * rel * span),
            entry=entry,
        )


@dataclass
class _Gradient:
    """The first-layer gradient being peeled, with its SVD kept current."""

    G: np.ndarray  # (h, d)
    g: np.ndarray  # (h,)
    rank_tol: float
    rank: int = 0
    U: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    S: np.ndarray = field(default_factory=lambda: np.zeros(0))
    Vt: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    scale: float = 1.0
    # Largest singular value dropped by peeling, relative to ``scale``: the
    # rounding that peeled (float64-exact, not exact) inputs leave behind.
    peel_noise: float = 0.0

    def refresh(self) -> None:
        # Rank and bases of the stacked matrix [G | g]: its rows are
        # combinations of [x_k, 1], one per input.
        M = np.hstack([self.G, self.g[:, None]])  # (h, d + 1)
        U, S, Vt = np.linalg.svd(M, full_matrices=False)
        if self.scale == 1.0 and S.size:
            self.scale = float(S[0])
        self.rank = int((self.rank_tol * self.scale < S).sum())
        self.U, self.S, self.Vt = U[:, : self.rank], S[: self.rank], Vt[: self.rank]

    def downdate(self, terms: list[tuple[float, np.ndarray, np.ndarray]]) -> None:
        """Subtract ``a d [x, 1]`` for each ``(a, d, x)`` and update the SVD.

        Every peeled term lies in the current column and row spaces, so the
        new SVD is that of the small r x r core ``S - sum a (U^T d)(V^T xe)^T``
        (``xe = [x, 1]``), rotated back: no SVD of the full h x (d + 1) matrix.
        What lies outside the two spaces was below the rank tolerance before
        and is not changed by the subtraction.
        """
        A = np.stack([a * d for a, d, _ in terms], axis=1)  # (h, k)
        Xe = np.stack([np.append(x, 1.0) for _, _, x in terms])  # (k, d + 1)
        self.G -= A @ Xe[:, :-1]
        self.g -= A.sum(axis=1)
        core = np.diag(self.S) - (self.U.T @ A) @ (Xe @ self.Vt.T)  # (r, r)
        Uc, Sc, Vct = np.linalg.svd(core)
        self.rank = int((self.rank_tol * self.scale < Sc).sum())
        k = self.rank
        if Sc.size > k:
            self.peel_noise = max(self.peel_noise, float(Sc[k]) / self.scale)
        self.U, self.S, self.Vt = self.U @ Uc[:, :k], Sc[:k], Vct[:k] @ self.Vt

    def snapshot(self) -> tuple[np.ndarray, ...]:
        return (self.G.copy(), self.g.copy(), self.U, self.S, self.Vt)

    def restore(self, saved: tuple[np.ndarray, ...]) -> None:
        self.G, self.g, self.U, self.S, self.Vt = saved
        self.rank = self.S.size


@register_attack("analytic_fc")
class AnalyticFCInversion(Attack):
    """Recover the inputs of a batch from the gradient of an FC first layer.

    Parameters
    ----------
    use_model:
        Certify candidates with the model and peel them off (needs the
        weights the gradient was taken at; ignored for multi-step updates).
    vertex_candidates:
        Search the vertices of the affine slice of the row space (needs
        ``input_range``). Off, only unit ratios are tried.
    max_peel_rounds:
        Upper bound on certify-and-subtract rounds.
    max_candidates:
        Upper bound on candidates tried per round (unit ratios first).
    max_face_dim:
        Largest dimension of a face searched for vertex candidates (see
        the module docstring; 0 turns face candidates off).
    time_budget_s:
        Stop peeling when exceeded and report what was found so far.

    Notes
    -----
    See the module docstring for the method and its limits.
    """

    def __init__(
        self,
        *,
        use_model: bool = True,
        vertex_candidates: bool = True,
        max_peel_rounds: int = 64,
        max_candidates: int = 4096,
        max_face_dim: int = 6,
        time_budget_s: float | None = None,
    ) -> None:
        problems = []
        if not isinstance(max_peel_rounds, int) or max_peel_rounds < 1:
            problems.append(
                f"max_peel_rounds must be an int >= 1, got {max_peel_rounds!r}"
            )
        if not isinstance(max_candidates, int) or max_candidates < 1:
            problems.append(
                f"max_candidates must be an int >= 1, got {max_candidates!r}"
            )
        if not isinstance(max_face_dim, int) or max_face_dim < 0:
            problems.append(
                f"max_face_dim must be an int >= 0 (0 turns face candidates "
                f"off), got {max_face_dim!r}"
            )
        if time_budget_s is not None and not (
            isinstance(time_budget_s, int | float) and time_budget_s > 0
        ):
            problems.append(
                f"time_budget_s must be a positive number or None, "
                f"got {time_budget_s!r}"
            )
        if problems:
            raise InvalidInputError("AnalyticFCInversion options", problems)
        self.use_model = use_model
        self.vertex_candidates = vertex_candidates
        self.max_peel_rounds = max_peel_rounds
        self.max_candidates = max_candidates
        self.max_face_dim = max_face_dim
        self.time_budget_s = time_budget_s

    def __repr__(self) -> str:
        return (
            f"AnalyticFCInversion(use_model={self.use_model}, "
            f"vertex_candidates={self.vertex_candidates})"
        )

    # ------------------------------------------------------------------ checks

    def applicability(self, target: AttackTarget) -> Applicability:
        return self._applicable(find_first_layer(target.model, target.input_shape))

    @staticmethod
    def _applicable(layer: FirstLayer) -> Applicability:
        if layer.kind != "linear":
            kind = type(layer.module).__name__ if layer.module is not None else "?"
            reason = layer.reason or (
                f"the first layer {layer.path} is {kind}, not nn.Linear with bias; "
                "the FC closed form does not apply to it"
            )
            return Applicability(False, reason)
        if not layer.has_bias:
            return Applicability(
                False,
                f"the first layer {layer.path} has no bias: "
                "the input is recoverable only up to scale",
            )
        return Applicability(True, f"fully-connected first layer {layer.path}")

    def _first_layer(self, target: AttackTarget) -> FirstLayer:
        layer = find_first_layer(target.model, target.input_shape)
        verdict = self._applicable(layer)
        if not verdict:
            raise UnsupportedModelError(f"analytic_fc does not apply: {verdict.reason}")
        return layer

    # --------------------------------------------------------------------- run

    def run(self, target: AttackTarget) -> AttackResult:
        """Invert the first-layer gradient of ``target``.

        Raises
        ------
        UnsupportedModelError
            If the first layer is not an ``nn.Linear`` with bias.
        """
        start = time.perf_counter()
        layer = self._first_layer(target)
        assert layer.weight_name is not None and layer.bias_name is not None
        raw_w = target.gradients[layer.weight_name]
        eps = float(torch.finfo(raw_w.dtype).eps)
        if target.source == "update":
            eps = max(eps, float(torch.finfo(torch.float32).eps))
        span = (
            target.input_range[1] - target.input_range[0] if target.input_range else 1.0
        )
        tol = _Tolerances.for_precision(eps, span)
        grad = _Gradient(
            # Copies: peeling subtracts in place and must not touch the target.
            G=raw_w.detach().double().cpu().numpy().copy(),
            g=target.gradients[layer.bias_name].detach().double().cpu().numpy().copy(),
            rank_tol=tol.rank,
        )
        grad.refresh()
        noise = max(
            target.rounding.get(layer.weight_name, 0.0),
            target.rounding.get(layer.bias_name, 0.0),
        )
        if noise > 0.0 and grad.scale > 0.0:
            # An update global - client carries the rounding of both models:
            # its spectral norm is about noise * (sqrt(h) + sqrt(d)).
            h, d = grad.G.shape
            rel = noise * (np.sqrt(h) + np.sqrt(d + 1)) / grad.scale
            tol = tol.with_noise(rel, span, noise)
            grad.rank_tol = tol.rank
            grad.refresh()
        estimate = grad.rank
        notes: list[str] = []
        logger.debug(
            "analytic_fc: first layer %s, h=%d d=%d, rank %d",
            layer.path,
            grad.G.shape[0],
            grad.G.shape[1],
            estimate,
        )

        if estimate == 0:
            notes.append(
                "the first-layer gradient is zero (dead units or a saturated "
                "loss): nothing leaks through this layer"
            )
            return self._result(target, [], estimate, None, start, notes)

        certifier = self._certifier(target, layer, notes)
        if estimate == 1 and target.batch_size == 1:
            # Theorem 1: one input makes every unit's ratio the input itself;
            # the least-squares ratio over all units is it, nothing to search.
            x = _single_input(grad)
            label = certifier.best_labels(grad, [x])[0] if certifier else -1
            notes.append("certified by the declared batch size 1 and a rank-1 gradient")
            found = [_Found(x, label=label, certificate="batch_size_1")]
            misfit = float(np.linalg.norm(grad.G - np.outer(grad.g, x)))
            residual = misfit / max(float(np.linalg.norm(grad.G)), 1e-300)
            return self._result(target, found, estimate, residual, start, notes)
        if certifier is not None and certifier.steps is not None:
            certifier.steps.fix_batch(estimate)
        found = self._peel(target, grad, certifier, tol, start, notes)
        if certifier is not None and certifier.steps is not None:
            notes.append(certifier.steps.describe())
        residual = float(np.linalg.norm(grad.S) / grad.scale) if grad.rank else 0.0
        certified = sum(bool(f.certificate) for f in found)
        if certified < estimate:
            notes.append(f"{certified} of {estimate} input(s) certified")
        if estimate > grad.G.shape[0] - 1:
            notes.append(
                f"rank {estimate} reaches the layer width h={grad.G.shape[0]}: "
                "the batch may be larger than the rank shows (h >= B fails)"
            )
        return self._result(target, found, estimate, residual, start, notes)

    def _result(
        self,
        target: AttackTarget,
        found: list[_Found],
        estimate: int,
        residual: float | None,
        start: float,
        notes: list[str],
    ) -> AttackResult:
        found = sorted(found, key=lambda f: not f.certificate)
        shape = (len(found), *target.input_shape)
        inputs = (
            torch.from_numpy(np.stack([f.x for f in found])).reshape(shape)
            if found
            else torch.zeros(shape, dtype=torch.float64)
        )
        labels = (
            torch.tensor([f.label for f in found], dtype=torch.long)
            if any(f.label >= 0 for f in found)
            else None
        )
        return AttackResult(
            attack=self.name,
            inputs=inputs,
            certified=torch.tensor(
                [bool(f.certificate) for f in found], dtype=torch.bool
            ),
            labels=labels,
            batch_size_estimate=estimate,
            residual=residual,
            elapsed_s=time.perf_counter() - start,
            notes=notes,
            certificates=[f.certificate for f in found],
        )

    # ----------------------------------------------------------------- peeling

    def _certifier(
        self, target: AttackTarget, layer: FirstLayer, notes: list[str]
    ) -> _ModelCertifier | None:
        if not self.use_model:
            return None
        steps: _Trajectory | None = None
        if target.source == "update":
            steps = _Trajectory.plan(target, notes)
            if steps is None:
                return None
        try:
            return _ModelCertifier(target, layer, steps)
        except UnsupportedModelError as exc:
            notes.append(f"model certificate unavailable: {exc}")
            return None

    def _peel(
        self,
        target: AttackTarget,
        grad: _Gradient,
        certifier: _ModelCertifier | None,
        tol: _Tolerances,
        start: float,
        notes: list[str],
    ) -> list[_Found]:
        found: list[_Found] = []
        uncertified: list[np.ndarray] = []
        for round_ in range(self.max_peel_rounds):
            if grad.rank == 0:
                break
            if self.time_budget_s is not None and (
                time.perf_counter() - start > self.time_budget_s
            ):
                notes.append(
                    f"time budget {self.time_budget_s} s reached after "
                    f"{round_} peeling round(s)"
                )
                break
            if certifier is None:
                _, plausible = self._candidates(
                    target, grad, tol, notes if round_ == 0 else None
                )
                found.extend(_new_inputs(_units_certified(grad, tol), found, tol))
                uncertified = plausible
                break
            plausible = []
            try:
                accepted, plausible = self._certify_cheap_first(
                    target, grad, certifier, tol, notes if round_ == 0 else None, found
                )
            except (
                RuntimeError,
                ValueError,
                UnsupportedModelError,
                np.linalg.LinAlgError,
            ) as exc:
                # A model that cannot be re-run on candidates (odd outputs,
                # custom losses) leaves the gradient-only evidence.
                notes.append(f"model certificate failed ({type(exc).__name__}: {exc})")
                certifier = None
                found.extend(_new_inputs(_units_certified(grad, tol), found, tol))
                uncertified = plausible
                break
            if certifier.steps is not None:
                accepted = certifier.steps.trim(accepted)
            if not accepted:
                # The model test can be vacuous (too few live units); coinciding
                # unit ratios still prove single inputs.
                found.extend(_new_inputs(_units_certified(grad, tol), found, tol))
                uncertified = plausible
                break
            # Peel all accepted inputs at once; true inputs drop the rank by one
            # each. If they do not, keep only the best-supported one.
            before, rank = grad.snapshot(), grad.rank
            _subtract(grad, accepted)
            if grad.rank != rank - len(accepted) and len(accepted) > 1:
                grad.restore(before)
                accepted = accepted[:1]
                _subtract(grad, accepted)
            kind = "model" if certifier.steps is None else "trajectory"
            found.extend(_Found(a.x, a.label, kind, a.weight) for a in accepted)
            if certifier.steps is not None and certifier.steps.record(accepted):
                certifier.advance()
        else:
            notes.append(f"stopped after max_peel_rounds={self.max_peel_rounds}")

        # Reported candidates closer to each other or to a found input than
        # the gradient's noise allows telling apart are one input.
        rest = _distinct(uncertified, found, tol, rel=max(1e-6, 10 * tol.rank))
        labels = (
            certifier.best_labels(grad, rest)
            if certifier and rest
            else [-1] * len(rest)
        )
        found.extend(_Found(x, label) for x, label in zip(rest, labels, strict=True))
        return found

    def _certify_cheap_first(
        self,
        target: AttackTarget,
        grad: _Gradient,
        certifier: _ModelCertifier,
        tol: _Tolerances,
        notes: list[str] | None,
        found: list[_Found],
    ) -> tuple[list[_Accepted], list[np.ndarray]]:
        """Certify the cheap candidates; run the linear programs only if none pass.

        Candidates that repeat an input already peeled are dropped first: an
        input peeled with rounding leaves a trace of itself behind. Returns
        the accepted inputs and the candidates worth reporting uncertified.
        """
        if grad.rank == 1:
            single = [_single_input(grad)]
            accepted = certifier.certify(grad, _distinct(single, found, tol), tol)
            return self._trimmed(certifier, accepted), single
        # Cheapest first: the separable read-off (r candidates), the unit
        # ratios (h), then the small faces; each is certified in one batched
        # model call.
        tried: dict[str, list[np.ndarray]] = {}
        for tier in ("separable", "units", "faces"):
            tried[tier], _ = self._candidates(target, grad, tol, notes, tier, found)
            accepted = certifier.certify(grad, tried[tier], tol)
            accepted = self._trimmed(certifier, accepted)
            if accepted:
                return accepted, []
        full, plausible = self._candidates(target, grad, tol, notes, "full", found)
        # Face vertices that cannot be certified (e.g. inputs of later local
        # steps of a FedAvg update) are still vertices: worth reporting.
        return certifier.certify(grad, full, tol), tried["faces"] + plausible

    @staticmethod
    def _trimmed(
        certifier: _ModelCertifier, accepted: list[_Accepted]
    ) -> list[_Accepted]:
        return accepted if certifier.steps is None else certifier.steps.trim(accepted)

    # -------------------------------------------------------------- candidates

    def _candidates(
        self,
        target: AttackTarget,
        grad: _Gradient,
        tol: _Tolerances,
        notes: list[str] | None,
        tier: str = "full",
        known: list[_Found] | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Candidates to certify, and those worth reporting uncertified.

        Candidates repeat neither each other nor a ``known`` input (an input
        peeled with rounding leaves a trace of itself behind). Unit ratios
        of multi-input units are mixtures, so only vertices (and the
        single-input ratio) are reported when they cannot be certified.
        ``tier`` is ``"separable"`` (the read-off only), ``"units"`` (unit
        ratios only), ``"faces"`` (vertices of the small faces the units'
        bound pixels cut out) or ``"full"`` (vertices by linear programs
        over the whole polytope, then unit ratios).
        """
        if grad.rank == 1:
            # One input left: the least-squares ratio over all units.
            single = [_single_input(grad)]
            return single, single
        known = known or []
        box = target.input_range if self.vertex_candidates else None
        if tier == "separable":
            cands = _separable(grad, box) if box is not None else []
        elif tier == "units":
            cands = _unit_ratios(grad)
        elif tier == "faces":
            cands = []
            if box is not None and self.max_face_dim >= 1:
                cands = _face_vertices(grad, box, tol, self.max_face_dim)
        else:
            vertices: list[np.ndarray] = []
            if box is not None:
                vertices = _distinct(_vertices(grad, box, tol), [], tol)
            elif notes is not None and self.vertex_candidates:
                notes.append(
                    "no input_range given: vertex candidates skipped, only unit "
                    "ratios tried"
                )
            cands = _distinct(vertices + _unit_ratios(grad), known, tol)
            return cands[: self.max_candidates], vertices
        return _distinct(cands, known, tol)[: self.max_candidates], []


def _subtract(grad: _Gradient, accepted: list[_Accepted]) -> None:
    """Remove the accepted inputs' terms a d x^T and a d from the gradient."""
    grad.downdate([(item.weight, item.d, item.x) for item in accepted])


# ------------------------------------------------------------------ candidates


def _single_input(grad: _Gradient) -> np.ndarray:
    """Least-squares x with G ~ g x^T (exact for one input)."""
    return grad.g @ grad.G / float(grad.g @ grad.g)


def _live_units(grad: _Gradient) -> np.ndarray:
    """Indices of the units with a clearly non-zero bias gradient."""
    mags = np.abs(grad.g)
    if not mags.size:
        return np.array([], int)
    return np.flatnonzero(mags > 1e-6 * mags.max())


def _unit_ratios(grad: _Gradient) -> list[np.ndarray]:
    """Ratio vectors G[i] / g[i] of units with a clearly non-zero bias gradient."""
    return [grad.G[i] / grad.g[i] for i in _live_units(grad)]


def _units_certified(grad: _Gradient, tol: _Tolerances) -> list[_Found]:
    """Inputs shown by two or more units whose ratio vectors coincide.

    A ratio vector mixes the inputs that activate the unit, weighted by their
    error signals; two units agreeing to rounding on such a mixture would need
    equal weight ratios, which almost surely happens only when each unit sees
    a single input.

    Notes
    -----
    Inputs of one label have nearly equal error signals at a model that has
    not learnt yet, so two units that see the same two such inputs can give
    the same mixture to a few 1e-5 (measured on a float32 FedAvg update of
    Fashion-MNIST garments: 1.3e-5). When the rounding of each gradient entry
    is known, two units must also agree within the noise their own ratios
    carry: a ratio ``G[i] / g[i]`` is off by about ``(rounding * (sqrt(d) +
    |x|) + peeled) / (|g_i| |x|)`` (relative), with ``peeled`` the largest
    singular value peeling dropped (what peeled inputs left in the rows). So
    units with a large bias gradient must agree more tightly (measured:
    true pairs at 0.08-0.17 of this bound, the mixture at 1.7).
    """
    live = _live_units(grad)
    if live.size < 2:
        return []
    R = grad.G[live] / grad.g[live, None]  # (u, d)
    norms = np.linalg.norm(R, axis=1)
    ok = norms > 0
    R, norms, mags = R[ok], norms[ok], np.abs(grad.g[live[ok]])
    unit = R / norms[:, None]
    cos = unit @ unit.T  # (u, u)
    close = (cos > 1 - tol.units**2 * 0.5 - 1e-15) & (
        np.abs(norms[:, None] - norms[None, :]) <= tol.units * norms[:, None]
    )
    np.fill_diagonal(close, False)
    if tol.entry > 0.0:
        # Rounding of the row and its bias, plus what peeling left in it
        # (at most the largest singular value peeling dropped).
        spread = tol.entry * (np.sqrt(R.shape[1]) + norms)
        sigma = (spread + grad.peel_noise * grad.scale) / (mags * norms)  # (u,)
        for a, b in zip(*np.nonzero(np.triu(close)), strict=True):
            gap = np.linalg.norm(R[a] - R[b]) / norms[a]
            if gap > np.hypot(sigma[a], sigma[b]):
                close[a, b] = close[b, a] = False
    found: list[_Found] = []
    taken = np.zeros(len(R), dtype=bool)
    for i in np.argsort(-close.sum(axis=1)):
        if taken[i] or not close[i].any():
            continue
        group = np.flatnonzero(close[i] & ~taken)
        taken[group] = taken[i] = True
        found.append(_Found(R[np.append(group, i)].mean(axis=0), certificate="units"))
    return found


def _vertices(
    grad: _Gradient, input_range: tuple[float, float], tol: _Tolerances
) -> list[np.ndarray]:
    """Vertices of {v : [v, 1] in the row space, low <= v <= high}.

    One linear program per anchor pixel (the successive projection algorithm
    on the shifted columns ``G - low * g 1^T`` picks pixels lit by one input),
    maximising that pixel.
    """
    lo, hi = input_range
    basis = grad.Vt.T  # (d + 1, r)
    V, last = basis[:-1], basis[-1]
    d = V.shape[0]

    shifted = grad.G - lo * grad.g[:, None]  # columns: Delta (X - low)[:, p]
    anchors = _anchor_pixels(grad.U.T @ shifted, grad.rank)
    out: list[np.ndarray] = []
    A_ub = np.vstack([V, -V])
    b_ub = np.concatenate([np.full(d, hi + tol.box), np.full(d, -lo + tol.box)])
    for p in anchors:
        res = linprog(
            -V[p],
            A_ub=A_ub,
            b_ub=b_ub,
            A_eq=last[None, :],
            b_eq=[1.0],
            bounds=(None, None),
            method="highs-ds",
        )
        if res.status == 0:
            out.append(_snap_to_face(V, last, res.x, lo, hi, tol))
    return out


def _face_vertices(
    grad: _Gradient,
    input_range: tuple[float, float],
    tol: _Tolerances,
    max_dim: int,
    seed: int = 0,
) -> list[np.ndarray]:
    """Vertices of the polytope's faces cut out by the units' bound pixels.

    A unit's ratio vector ``G[i] / g[i]`` is an affine combination of the
    inputs that activate the unit, so where it sits at a bound of the input
    range all of those inputs do (almost surely). The inputs at that bound on
    those pixels span a face of ``{v : [v, 1] in the row space, low <= v <=
    high}`` of dimension one less than their number; when few inputs activate
    the unit the face is small and its vertices are those inputs (each has
    a pixel at the bound where another does not). Faces of dimension at most
    ``max_dim`` are searched, with ``4 dim + 2`` linear programs each in the
    face's own coordinates (both ends of every axis, then random directions).
    After peeling, the ratios mix only the inputs not yet found, so more faces
    become small.
    """
    lo, hi = input_range
    span = hi - lo
    near = 1e-9 * span  # "at the bound": above float64 rounding
    basis = grad.Vt.T  # (d + 1, r)
    V, last = basis[:-1], basis[-1]
    r = V.shape[1]
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    faces: set[bytes] = set()
    for i in _live_units(grad):
        ratio = grad.G[i] / grad.g[i]  # (d,)
        at_lo = np.abs(ratio - lo) <= near
        at_hi = np.abs(ratio - hi) <= near
        if not (at_lo.any() or at_hi.any()):
            continue
        key = np.packbits(np.r_[at_lo, at_hi]).tobytes()
        if key in faces:
            continue  # units that see the same inputs cut the same face
        faces.add(key)
        # The face's affine hull: c with last . c = 1 and V[p] c at the bound.
        A = np.vstack([V[at_lo], V[at_hi], last[None, :]])
        b = np.r_[np.full(at_lo.sum(), lo), np.full(at_hi.sum(), hi), 1.0]
        _, sv, vt = np.linalg.svd(A, full_matrices=True)
        rank = int((sv > max(1e-9, tol.rank) * sv[0]).sum())
        dim = r - rank
        if dim > max_dim:
            continue
        c0, *_ = np.linalg.lstsq(A, b, rcond=None)
        v0 = V @ c0  # (d,)
        if dim == 0:
            out.append(v0)
            continue
        VN = V @ vt[rank:].T  # (d, dim): the face's directions in input space
        A_ub = np.vstack([VN, -VN])
        b_ub = np.r_[hi - v0, v0 - lo] + tol.box
        # Both ends of every axis of the face, then random directions.
        axes = np.vstack([np.eye(dim), -np.eye(dim)])
        for objective in (*axes, *rng.normal(size=(2 * (dim + 1), dim))):
            res = linprog(
                objective,
                A_ub=A_ub,
                b_ub=b_ub,
                bounds=(None, None),
                method="highs-ds",
            )
            if res.status == 0:
                out.append(v0 + VN @ res.x)
    return out


def _separable(grad: _Gradient, input_range: tuple[float, float]) -> list[np.ndarray]:
    """Inputs read off at once when every input lights a pixel of its own.

    At such anchor pixels the columns of ``G - low * g 1^T`` are the inputs'
    error signals, scaled; inverting them on the stacked gradient gives one
    row per input, exact up to scale, and the bias entry fixes the scale.
    One successive projection and one r x r solve, no linear program; a
    mixture (anchors not pure) fails the model certificate downstream.
    """
    lo = input_range[0]
    shifted = grad.G - lo * grad.g[:, None]  # (h, d)
    Y = grad.U.T @ shifted  # (r, d)
    anchors = _anchor_pixels(Y, grad.rank)
    if len(anchors) < grad.rank:
        return []
    A = Y[:, anchors]  # (r, r): anchor columns in the column basis
    if np.linalg.cond(A) > 1e12:
        return []
    rows = np.linalg.solve(A, grad.S[:, None] * grad.Vt)  # (r, d + 1)
    last = rows[:, -1]
    ok = np.abs(last) > 1e-12 * np.abs(rows).max(axis=1)
    return [rows[i, :-1] / last[i] for i in np.flatnonzero(ok)]


def _snap_to_face(
    V: np.ndarray,
    last: np.ndarray,
    c: np.ndarray,
    lo: float,
    hi: float,
    tol: _Tolerances,
) -> np.ndarray:
    """Remove the box slack from an LP vertex.

    The LP runs on a box widened by ``tol.box`` so rounding cannot make it
    infeasible; the vertex found is then moved onto its active faces exactly
    (least squares on the active bounds and the affine constraint).
    """
    v = V @ c
    at_lo, at_hi = np.abs(v - lo) <= 2 * tol.box, np.abs(v - hi) <= 2 * tol.box
    A = np.vstack([V[at_lo], V[at_hi], last[None, :]])
    b = np.concatenate([np.full(at_lo.sum(), lo), np.full(at_hi.sum(), hi), [1.0]])
    if np.linalg.matrix_rank(A) < V.shape[1]:
        return v
    snapped, *_ = np.linalg.lstsq(A, b, rcond=None)
    return V @ snapped


def _anchor_pixels(Y: np.ndarray, k: int) -> list[int]:
    """Successive projection on the columns of ``Y`` (r, d): up to k anchors.

    Columns are first scaled onto a common affine slice of their cone (a
    direction ``q`` with ``q . y_p > 0`` for every column, found by one small
    linear program); then the column of largest norm is taken and all columns
    are projected away from it, k times.
    """
    norms = np.linalg.norm(Y, axis=0)
    live = np.flatnonzero(norms > 1e-9 * (norms.max() if norms.size else 0.0))
    if live.size == 0:
        return []
    unit = Y[:, live] / norms[live]  # (r, n)
    r = Y.shape[0]
    # The mean direction of the columns usually sees them all on one side;
    # otherwise max t s.t. q . unit_p >= t, -1 <= q <= 1 (one small LP).
    q = _pointing_direction(unit)
    if q is None:
        res = linprog(
            np.r_[np.zeros(r), -1.0],
            A_ub=np.hstack([-unit.T, np.ones((live.size, 1))]),
            b_ub=np.zeros(live.size),
            bounds=[(-1, 1)] * r + [(None, None)],
            method="highs",
        )
        if res.status != 0 or res.x[-1] <= 1e-12:
            return []  # the columns do not lie in a pointed cone: no anchors
        q = res.x[:r]
    Z = Y[:, live] / (q @ Y[:, live])  # (r, n) on the slice q . z = 1

    anchors: list[int] = []
    R = Z.copy()
    for _ in range(min(k, live.size)):
        j = int(np.argmax((R * R).sum(axis=0)))
        if (R[:, j] @ R[:, j]) <= 1e-20:
            break
        anchors.append(int(live[j]))
        u = R[:, j] / np.linalg.norm(R[:, j])
        R -= np.outer(u, u @ R)
    return anchors


def _pointing_direction(unit: np.ndarray, steps: int = 200) -> np.ndarray | None:
    """A direction q with ``q . u > 0`` for every unit column u (r, n), cheaply.

    Starts from the mean direction and adds the worst-served column
    (perceptron updates: at most ``1 / margin^2`` of them); ``None`` when
    that does not settle, and the caller solves the linear program instead.
    """
    q = unit.sum(axis=1)
    q /= max(float(np.linalg.norm(q)), 1e-300)
    for _ in range(steps):
        dots = q @ unit  # (n,)
        worst = int(np.argmin(dots))
        if dots[worst] > 1e-6 * float(np.linalg.norm(q)):
            return q / float(np.linalg.norm(q))
        q = q + unit[:, worst]
    return None


def _onto_slice(grad: _Gradient, X: np.ndarray) -> np.ndarray:
    """Project candidates (n, d) onto the row space, scaled to [x, 1].

    Vertices of a noisy update sit slightly off the affine slice (the LP's
    box slack); the model certificate is evaluated at the projected point.
    """
    Xe = np.hstack([X, np.ones((len(X), 1))])  # (n, d + 1)
    P = (Xe @ grad.Vt.T) @ grad.Vt  # (n, d + 1)
    last = P[:, -1:]
    ok = np.abs(last[:, 0]) > 1e-12
    out = X.copy()
    out[ok] = P[ok, :-1] / last[ok]
    return out


def _new_inputs(
    certified: list[_Found], known: list[_Found], tol: _Tolerances
) -> list[_Found]:
    """Certified inputs that repeat neither each other nor an input peeled.

    Rounding left by peeling can split one input's units into several
    groups, each certifying the same input.
    """
    kept: list[_Found] = []
    for f in certified:
        if _distinct([f.x], known + kept, tol):
            kept.append(f)
    return kept


def _distinct(
    cands: list[np.ndarray],
    known: list[_Found],
    tol: _Tolerances,
    rel: float = 1e-6,
) -> list[np.ndarray]:
    """Drop candidates that repeat each other or an input already found.

    A candidate repeats another when they differ by at most ``rel`` of its
    norm; the first of a group is kept, in the given order.
    """
    cands = [c for c in cands if np.all(np.isfinite(c))]
    if not cands:
        return []
    C = np.stack(cands)  # (n, d)
    R = np.stack([f.x for f in known]) if known else np.zeros((0, C.shape[1]))
    sq_c = np.einsum("nd,nd->n", C, C)
    limit = (rel * np.maximum(np.sqrt(sq_c), 1e-300)) ** 2  # (n,)
    # Squared distances from the Gram matrix; rounding there is far below
    # the 1e-6 relative threshold for inputs of similar norm.
    to_known = (
        sq_c[:, None] + np.einsum("kd,kd->k", R, R)[None, :] - 2 * C @ R.T
    )  # (n, k)
    dup_known = (to_known <= limit[:, None]).any(axis=1)
    among = sq_c[:, None] + sq_c[None, :] - 2 * C @ C.T  # (n, n)
    kept: list[int] = []
    for i in range(len(cands)):
        if dup_known[i] or (kept and bool((among[i, kept] <= limit[i]).any())):
            continue
        kept.append(i)
    return [cands[i] for i in kept]


# ------------------------------------------------------------ model certifier


@dataclass
class _Accepted:
    x: np.ndarray
    d: np.ndarray
    label: int
    weight: float


class _ModelCertifier:
    """Checks candidates against the model's own first-layer error signal.

    For a true input ``x`` with label ``y``, the column of ``Delta`` that
    belongs to it is ``a * d(x, y)``, where ``d`` is the gradient of the
    per-sample cross-entropy with respect to the first layer's output and
    ``a`` the batch weight (1/B for a mean loss). So ``d(x, y)`` lies in the
    column space of ``dL/dW`` and, with ``x`` in its row space, removing
    ``a d x^T`` drops the rank by one.
    """

    def __init__(
        self,
        target: AttackTarget,
        layer: FirstLayer,
        steps: _Trajectory | None = None,
    ) -> None:
        # The target's own model, run on float64 copies of its parameters
        # and buffers (functional_call): a deepcopy of the module cost more
        # than the rest of a small batch's attack. The copies are the
        # certifier's own, so replayed local steps never touch the target.
        self.model = target.model
        self.state = {
            name: tensor.detach().to(
                "cpu",
                torch.float64 if tensor.is_floating_point() else tensor.dtype,
                copy=True,
            )
            for name, tensor in (
                *target.model.named_parameters(),
                *target.model.named_buffers(),
            )
        }
        self.trainable = [
            name for name, p in target.model.named_parameters() if p.requires_grad
        ]
        self.steps = steps
        self.layer = dict(self.model.named_modules())[layer.path]
        self.input_shape = target.input_shape
        self.h = int(target.gradients[layer.weight_name or ""].shape[0])
        self.num_classes = target.num_classes or self._infer_classes()
        self.loss = nn.CrossEntropyLoss(reduction="sum")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's logits for float64 ``inputs``, in eval mode, at ``state``."""
        with eval_mode(self.model):
            out = functional_call(self.model, self.state, (inputs,))
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModelError(
                f"the model returns a {type(out).__name__}, not one tensor of class "
                "logits (B, C); wrap it so that forward returns the logits the loss "
                "was taken on"
            )
        return out

    def _infer_classes(self) -> int:
        with torch.no_grad():
            out = self.forward(torch.zeros((1, *self.input_shape), dtype=torch.float64))
        if out.dim() != 2 or out.shape[1] < 2:
            raise UnsupportedModelError(
                f"the model's output has shape {tuple(out.shape)}; "
                "the model certificate "
                "needs class logits (B, C) with C >= 2"
            )
        return int(out.shape[1])

    def error_signals(self, X: np.ndarray) -> np.ndarray:
        """``d(x, y)`` for every candidate row of X and every label: (n, C, h)."""
        n, C = X.shape[0], self.num_classes
        inputs = torch.from_numpy(np.repeat(X, C, axis=0)).reshape(
            n * C, *self.input_shape
        )
        inputs.requires_grad_(True)  # z needs a graph even for frozen weights
        labels = torch.arange(C).repeat(n)
        captured: dict[str, torch.Tensor] = {}

        def keep_output(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            captured["z"] = out

        handle = self.layer.register_forward_hook(keep_output)
        try:
            logits = self.forward(inputs)
        finally:
            handle.remove()
        # Only the first layer's output needs its gradient: no parameter
        # gradients are formed.
        (dz,) = torch.autograd.grad(self.loss(logits, labels), [captured["z"]])
        return dz.detach().numpy().reshape(n, C, -1)

    def _residuals(
        self, grad: _Gradient, X: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Error signals (n, C, h) and their relative distance to col(G) (n, C)."""
        D = self.error_signals(X)  # (n, C, h)
        U = grad.U  # (h, r)
        dn = np.linalg.norm(D, axis=2)
        inside = np.einsum("hr,ncr->nch", U, np.einsum("hr,nch->ncr", U, D))
        resid = np.linalg.norm(D - inside, axis=2) / np.maximum(dn, 1e-300)  # (n, C)
        resid[dn <= 0] = np.inf
        return D, resid

    def best_labels(self, grad: _Gradient, candidates: list[np.ndarray]) -> list[int]:
        """Most consistent label of each (uncertified) candidate: a guess.

        ``-1`` where no label stands out (the runner-up fits within 10x):
        after peeling, a few live units can hold the error signals of every
        label, and the "best" one would be an arbitrary pick.
        """
        if grad.rank == 0:
            return [-1] * len(candidates)
        _, resid = self._residuals(grad, np.stack(candidates))
        if resid.shape[1] < 2:
            return [int(i) for i in np.argmin(resid, axis=1)]
        two = np.sort(resid, axis=1)[:, :2]  # (n, 2)
        best = np.argmin(resid, axis=1)
        clear = two[:, 1] > 10.0 * two[:, 0]
        return [int(b) if ok else -1 for b, ok in zip(best, clear, strict=True)]

    def certify(
        self, grad: _Gradient, candidates: list[np.ndarray], tol: _Tolerances
    ) -> list[_Accepted]:
        """Candidates whose error signal lies in the column space of G."""
        if not candidates or grad.rank >= self.h:
            return []  # col(G) is the whole space: the test would prove nothing
        X = _onto_slice(grad, np.stack(candidates))  # (n, d)
        D, resid = self._residuals(grad, X)

        # After many peels the residual gradient carries the peeled inputs'
        # rounding (measured: 1e-9-3e-8 after 54 peels of B = 64, against a
        # second label at 0.3); the test widens with it, at most to 1e-6. A
        # noisy update's tolerance is already wider than that.
        subspace = max(tol.subspace, min(1e3 * grad.peel_noise, 1e-6))
        accepted: list[_Accepted] = []
        for i in np.argsort(resid.min(axis=1)):
            order = np.argsort(resid[i])
            y = int(order[0])
            if resid[i, y] > subspace:
                break
            # Exactly one label may pass, by a wide margin: a second passing
            # label means the test cannot tell labels, nor inputs, apart. This
            # also rejects a vacuous test: when the signals of x for all labels
            # lie in col(G) (few live units, fewer units than classes, inputs
            # sharing one activation pattern) every label would pass.
            if resid[i, order[1]] <= 1e3 * subspace:
                continue
            x, d = X[i], D[i, y]
            weight = self._weight(grad, x, d)
            if self.steps is not None and not self.steps.weight_ok(weight):
                continue
            if weight is None or any(
                np.linalg.norm(x - a.x) <= 1e-6 * np.linalg.norm(x) for a in accepted
            ):
                continue
            accepted.append(_Accepted(x, d, y, weight))
        return accepted

    def advance(self) -> None:
        """Replay one local SGD step on the inputs certified for it."""
        assert self.steps is not None
        X, y = self.steps.completed[-1]
        inputs = torch.from_numpy(X).reshape(len(X), *self.input_shape)
        params = [self.state[name].requires_grad_(True) for name in self.trainable]
        try:
            loss = nn.functional.cross_entropy(
                self.forward(inputs), torch.from_numpy(y)
            )
            grads = torch.autograd.grad(loss, params)
        finally:
            for p in params:
                p.requires_grad_(False)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(self.steps.lr * g)
        logger.debug("analytic_fc: replayed local step %d", len(self.steps.completed))

    @staticmethod
    def _weight(grad: _Gradient, x: np.ndarray, d: np.ndarray) -> float | None:
        """Scale a with rank(G - a d x^T) = rank(G) - 1, from the pseudo-inverse."""
        xe = np.append(x, 1.0)  # the stacked row [x, 1]
        coeff_x = grad.Vt @ xe  # (r,)
        if np.linalg.norm(xe - grad.Vt.T @ coeff_x) > 1e-6 * np.linalg.norm(xe):
            return None  # x is not in the row space: not an input of this batch
        inner = float(coeff_x @ ((grad.U.T @ d) / grad.S))
        if inner <= 0:
            return None
        return 1.0 / inner


@dataclass
class _Trajectory:
    """The local SGD steps of a FedAvg update, replayed as they are certified.

    Step ``t``'s gradient was taken at the weights ``theta_t``; its inputs'
    error signals at ``theta_t`` are columns of the update's first-layer
    delta. The weights the client started from are known (``theta_0``), so
    the first step's inputs are certified and peeled like a batch's; once
    all ``batch`` of them are found, ``theta_1 = theta_0 - lr * grad`` is
    replayed from them and the next step's inputs become certifiable.
    """

    lr: float
    batch: int
    steps: int
    current: list[_Accepted] = field(default_factory=list)
    completed: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @classmethod
    def plan(cls, target: AttackTarget, notes: list[str]) -> _Trajectory | None:
        """The replay plan, or None (with a note) when it cannot be known."""
        steps, lr = target.local_steps, target.lr
        if lr is None or steps is None:
            notes.append(
                "multi-step update without lr and local_steps: the weights of "
                "later local steps are unknown, so candidates are not checked "
                "against the model (no peeling)"
            )
            return None
        return cls(lr=float(lr), batch=target.batch_size or 0, steps=int(steps))

    def fix_batch(self, rank: int) -> None:
        """Infer the local batch from the rank (N distinct inputs, equal steps)."""
        if self.batch == 0 and self.steps > 0 and rank % self.steps == 0:
            self.batch = rank // self.steps

    def trim(self, accepted: list[_Accepted]) -> list[_Accepted]:
        """At most the inputs still missing from the current step."""
        if self.batch == 0 or len(self.completed) >= self.steps:
            return []
        return accepted[: self.batch - len(self.current)]

    def record(self, accepted: list[_Accepted]) -> bool:
        """Add certified inputs; True when the current step is complete."""
        self.current.extend(accepted)
        if len(self.current) < self.batch:
            return False
        X = np.stack([a.x for a in self.current])
        y = np.array([a.label for a in self.current], dtype=np.int64)
        self.completed.append((X, y))
        self.current = []
        return len(self.completed) < self.steps

    def weight_ok(self, weight: float | None) -> bool:
        """A step's inputs enter the mean loss of its batch with weight 1/batch."""
        return weight is not None and abs(weight * self.batch - 1.0) <= 1e-4

    def describe(self) -> str:
        if self.batch == 0:
            return (
                "multi-step update: the local batch size is unknown (give "
                "batch_size) so local steps were not replayed"
            )
        return (
            f"multi-step update: replayed {len(self.completed)} of {self.steps} "
            f"local step(s) of {self.batch}; {len(self.current)} input(s) of the "
            "next step certified before candidates ran out"
        )
