"""Framework-neutral core types: what an attack sees and what it returns.

An :class:`AttackTarget` bundles a model (with the weights the gradient was
taken at), the observed gradients keyed like ``model.named_parameters()``,
the shape of one input and whatever the server knows about the round
(batch size, labels, input range, learning rate, local steps). An
:class:`AttackResult` is what an attack recovered from it. Neither imports
Flower: the same objects serve live audits, offline replay and other
frameworks.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fl_audit.errors import GradientError, InvalidInputError
from fl_audit.layers import check_input_shape

ArrayLike = torch.Tensor | np.ndarray
TargetSource = Literal["gradient", "update"]


def _as_tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.as_tensor(np.asarray(value))


@dataclass(frozen=True, eq=False)
class AttackTarget:
    """One client's observed gradient (or model update) and its context.

    Build it with :meth:`from_gradients` or :meth:`from_update`; direct
    construction runs the same checks. Every problem found is reported at
    once in a :class:`~fl_audit.errors.GradientError` or
    :class:`~fl_audit.errors.InvalidInputError`.

    Attributes
    ----------
    model:
        The architecture with the weights the gradient was taken at. For an
        update this is the global model the client started from.
    gradients:
        One tensor per name of ``model.named_parameters()``, same shapes.
        For an update: ``(global - client) / lr`` when ``lr`` is known,
        else ``global - client``.
    input_shape:
        Shape of one input without the batch dimension, e.g. ``(1, 28, 28)``.
    source:
        ``"gradient"`` for one gradient at ``model``'s weights, ``"update"``
        for a multi-step client update (weights moved during it).
    rounding:
        Per parameter name, the absolute rounding error of one entry of the
        gradient (its noise floor) when it was formed by subtracting two
        stored models; empty for gradients computed directly. A float32
        update ``global - client`` loses about ``eps * |w|`` per entry, far
        more than the gradient's own precision when ``lr`` is small.
    """

    model: nn.Module
    gradients: Mapping[str, torch.Tensor]
    input_shape: tuple[int, ...]
    batch_size: int | None = None
    num_classes: int | None = None
    labels: torch.Tensor | None = None
    input_range: tuple[float, float] | None = None
    lr: float | None = None
    local_steps: int | None = None
    source: TargetSource = "gradient"
    rounding: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", check_input_shape(self.input_shape))
        object.__setattr__(
            self, "gradients", _check_gradients(self.model, self.gradients)
        )
        problems = _check_metadata(self)
        if problems:
            raise InvalidInputError("AttackTarget metadata", problems)
        if self.labels is not None:
            object.__setattr__(
                self, "labels", _as_tensor(self.labels).long().reshape(-1)
            )
        if self.input_range is not None:
            lo, hi = self.input_range
            object.__setattr__(self, "input_range", (float(lo), float(hi)))

    @property
    def input_dim(self) -> int:
        """Number of values in one input."""
        return math.prod(self.input_shape)

    @staticmethod
    def start_model(
        model: nn.Module, global_state: Mapping[str, ArrayLike]
    ) -> nn.Module:
        """A copy of ``model`` at ``global_state``, for ``from_update``."""
        return _loaded(model, global_state)

    @classmethod
    def from_gradients(
        cls,
        model: nn.Module,
        gradients: Mapping[str, ArrayLike],
        input_shape: tuple[int, ...],
        *,
        input_range: tuple[float, float] | None = None,
        batch_size: int | None = None,
        labels: ArrayLike | None = None,
        num_classes: int | None = None,
    ) -> AttackTarget:
        """Target for one gradient taken at ``model``'s current weights."""
        return cls(
            model=model,
            gradients=gradients,  # type: ignore[arg-type]
            input_shape=input_shape,
            batch_size=batch_size,
            num_classes=num_classes,
            labels=None if labels is None else _as_tensor(labels),
            input_range=input_range,
            source="gradient",
        )

    @classmethod
    def from_update(
        cls,
        model: nn.Module,
        global_state: Mapping[str, ArrayLike],
        client_state: Mapping[str, ArrayLike],
        input_shape: tuple[int, ...],
        *,
        lr: float | None = None,
        local_steps: int | None = None,
        input_range: tuple[float, float] | None = None,
        batch_size: int | None = None,
        labels: ArrayLike | None = None,
        num_classes: int | None = None,
        start_model: nn.Module | None = None,
    ) -> AttackTarget:
        """Target for a client update: the pseudo-gradient ``(global - client) / lr``.

        ``model`` is copied and loaded with ``global_state``, the weights the
        client started from; buffers absent from a state dict keep the
        model's values. ``start_model``, when given, is that copy already
        made (one per round serves every client of the round: attacks never
        change a target's model). With ``local_steps == 1`` (or unknown) and plain SGD
        the pseudo-gradient is the gradient itself, and the target is treated
        as a gradient at the global weights when ``local_steps == 1``.
        """
        params = dict(model.named_parameters())
        problems: list[str] = []
        for label, state in (
            ("global_state", global_state),
            ("client_state", client_state),
        ):
            missing = sorted(set(params) - set(state))
            if missing:
                problems.append(
                    f"{label} lacks parameters {missing}; send the full state dict"
                )
        if lr is not None and not (
            isinstance(lr, int | float) and math.isfinite(lr) and lr > 0
        ):
            problems.append(f"lr must be a positive finite number, got {lr!r}")
        if problems:
            raise GradientError("model update", problems)

        scale = 1.0 / lr if lr else 1.0
        pseudo: dict[str, torch.Tensor] = {}
        rounding: dict[str, float] = {}
        for name in params:
            g, c = _as_tensor(global_state[name]), _as_tensor(client_state[name])
            if g.shape != c.shape:
                problems.append(
                    f"{name}: global shape {tuple(g.shape)} != client shape "
                    f"{tuple(c.shape)}"
                )
                continue
            pseudo[name] = (g.double() - c.double()) * scale
            eps = float(torch.finfo(torch.promote_types(g.dtype, c.dtype)).eps)
            if g.is_floating_point() and g.numel():
                rms = float(g.double().pow(2).mean().sqrt())
                rounding[name] = eps * rms * scale
        if problems:
            raise GradientError("model update", problems)

        start = start_model if start_model is not None else _loaded(model, global_state)
        return cls(
            model=start,
            gradients=pseudo,
            input_shape=input_shape,
            batch_size=batch_size,
            num_classes=num_classes,
            labels=None if labels is None else _as_tensor(labels),
            input_range=input_range,
            lr=lr,
            local_steps=local_steps,
            source="gradient" if local_steps == 1 else "update",
            rounding=rounding,
        )


def _loaded(model: nn.Module, state: Mapping[str, ArrayLike]) -> nn.Module:
    """A copy of ``model`` with the entries of ``state`` that fit it loaded."""
    start = copy.deepcopy(model)
    own = start.state_dict()
    loadable = {
        k: _as_tensor(v).to(own[k].dtype)
        for k, v in state.items()
        if k in own and tuple(own[k].shape) == tuple(np.shape(v))
    }
    start.load_state_dict(loadable, strict=False)
    return start


def _check_gradients(
    model: nn.Module, gradients: Mapping[str, object]
) -> dict[str, torch.Tensor]:
    if not isinstance(gradients, Mapping):
        raise GradientError(
            "gradients",
            [
                "expected a mapping of parameter name to tensor, "
                f"got {type(gradients).__name__}"
            ],
        )
    params = dict(model.named_parameters())
    problems: list[str] = []
    missing = sorted(set(params) - set(gradients))
    unknown = sorted(set(gradients) - set(params))
    if missing:
        problems.append(
            f"missing gradients for {missing}; key them as model.named_parameters()"
        )
    if unknown:
        problems.append(
            f"names {unknown} are not parameters of the model "
            f"(known: {sorted(params)[:8]}{' ...' if len(params) > 8 else ''})"
        )
    checked: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        if name not in gradients:
            continue
        try:
            grad = _as_tensor(gradients[name])
        except (TypeError, ValueError) as exc:
            problems.append(f"{name}: cannot be read as a tensor ({exc})")
            continue
        if tuple(grad.shape) != tuple(param.shape):
            problems.append(
                f"{name}: shape {tuple(grad.shape)}, the model has {tuple(param.shape)}"
            )
            continue
        if not grad.is_floating_point():
            problems.append(f"{name}: dtype {grad.dtype} is not floating point")
            continue
        bad = int((~torch.isfinite(grad)).sum())
        if bad:
            problems.append(f"{name}: {bad} NaN/Inf value(s); the update is corrupt")
            continue
        checked[name] = grad
    if problems:
        raise GradientError("gradients", problems)
    return checked


def _check_metadata(t: AttackTarget) -> list[str]:
    problems: list[str] = []

    def positive_int(name: str, value: object, minimum: int = 1) -> None:
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < minimum
        ):
            problems.append(
                f"{name} must be an int >= {minimum} or None, got {value!r}"
            )

    positive_int("batch_size", t.batch_size)
    positive_int("num_classes", t.num_classes, minimum=2)
    positive_int("local_steps", t.local_steps)
    if t.lr is not None and not (
        isinstance(t.lr, int | float) and math.isfinite(t.lr) and t.lr > 0
    ):
        problems.append(f"lr must be a positive finite number or None, got {t.lr!r}")
    if t.input_range is not None:
        try:
            lo, hi = (float(v) for v in t.input_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError
        except (TypeError, ValueError):
            problems.append(
                f"input_range must be a (low, high) pair with low < high, "
                f"e.g. (0.0, 1.0); got {t.input_range!r}"
            )
    if t.labels is not None:
        labels = _as_tensor(t.labels)
        if labels.is_floating_point() or labels.dim() > 1:
            problems.append(
                f"labels must be a 1-D integer tensor, got dtype {labels.dtype} "
                f"shape {tuple(labels.shape)}"
            )
        elif t.batch_size is not None and labels.numel() != t.batch_size:
            problems.append(f"{labels.numel()} labels for batch_size {t.batch_size}")
        elif (
            t.num_classes is not None
            and labels.numel()
            and (int(labels.min()) < 0 or int(labels.max()) >= t.num_classes)
        ):
            problems.append(
                f"labels must lie in [0, {t.num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
    return problems


@dataclass
class AttackResult:
    """What one attack recovered from one target.

    Attributes
    ----------
    attack:
        Registry name of the attack.
    inputs:
        Recovered inputs, shape ``(k, *input_shape)``, certified ones first.
    certified:
        Bool per input: exact, proven without ground truth.
    labels:
        Recovered label per input (``-1`` where unknown), or ``None``.
    batch_size_estimate:
        Number of distinct inputs the gradient mixes, when the attack can
        tell (the numerical rank of the first-layer gradient for FC layers).
    residual:
        Ground-truth-free fit measure of the attack (relative; 0 is perfect).
    certificates:
        Per input, the evidence behind ``certified`` (e.g. ``"model"``,
        ``"units"``), empty for uncertified inputs.
    """

    attack: str
    inputs: torch.Tensor
    certified: torch.Tensor
    labels: torch.Tensor | None = None
    batch_size_estimate: int | None = None
    residual: float | None = None
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    certificates: list[str] = field(default_factory=list)

    @property
    def num_recovered(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def num_certified(self) -> int:
        return int(self.certified.sum())

    def summary(self) -> dict[str, Any]:
        """JSON-ready description without the arrays."""
        return {
            "attack": self.attack,
            "recovered": self.num_recovered,
            "certified": self.num_certified,
            "labels": None if self.labels is None else [int(v) for v in self.labels],
            "certificates": list(self.certificates),
            "batch_size_estimate": self.batch_size_estimate,
            "residual": self.residual,
            "elapsed_s": round(self.elapsed_s, 6),
            "notes": list(self.notes),
        }

    def save(self, path: str | Path) -> Path:
        """Write the arrays and the summary to one ``.npz`` file."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "inputs": self.inputs.detach().cpu().numpy(),
            "certified": self.certified.detach().cpu().numpy(),
            "summary": np.array(json.dumps(self.summary())),
        }
        if self.labels is not None:
            arrays["labels"] = self.labels.detach().cpu().numpy()
        with path.open("wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttackResult:
        """Read a result written by :meth:`save`."""
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["summary"]))
            labels = torch.from_numpy(data["labels"]) if "labels" in data else None
            return cls(
                attack=meta["attack"],
                inputs=torch.from_numpy(data["inputs"]),
                certified=torch.from_numpy(data["certified"]),
                labels=labels,
                batch_size_estimate=meta["batch_size_estimate"],
                residual=meta["residual"],
                elapsed_s=meta["elapsed_s"],
                notes=meta["notes"],
                certificates=meta["certificates"],
            )
