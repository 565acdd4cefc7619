"""Find the first parametrised layer the raw input of a model reaches.

Every analytic result in fl-audit starts from the layer that sees the raw
input: a fully-connected layer (``nn.Linear``, after any flatten/view) or a
convolution (``nn.Conv1d``/``nn.Conv2d``). :func:`find_first_layer` finds it on
a real ``torch.nn.Module`` by running one forward pass with pre-hooks and
stopping at the first module that owns parameters, so the cost does not grow
with the depth of the model.

Notes
-----
A layer counts as "first" only if the tensor it receives is the raw input,
value for value (a reshape is allowed). A model that scales, normalises or
pools the input before its first parametrised layer is reported as
``unsupported`` with the reason; so are parameters used functionally by a
parent module (``F.linear(x, self.weight)``), which no hook can see.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fl_audit.errors import ShapeError

LayerKind = Literal["linear", "conv1d", "conv2d", "unsupported"]


@dataclass(frozen=True)
class FirstLayer:
    """The layer that receives a model's raw input.

    Attributes
    ----------
    path:
        Module path as in ``model.named_modules()`` ("" for the model itself).
    kind:
        ``"linear"``, ``"conv1d"``, ``"conv2d"`` or ``"unsupported"``.
    module:
        The module itself, or ``None`` when nothing was found.
    reason:
        Why the layer is unsupported; empty when it is supported.
    in_shape:
        Per-sample shape of the tensor the layer receives: ``(d,)`` for a
        linear layer, ``(C, L)`` or ``(C, H, W)`` for a convolution.
    weight_name, bias_name:
        Keys of its parameters in ``model.named_parameters()``; ``bias_name``
        is ``None`` for a layer without bias.
    """

    path: str
    kind: LayerKind
    module: nn.Module | None
    reason: str
    in_shape: tuple[int, ...]
    weight_name: str | None = None
    bias_name: str | None = None

    @property
    def supported(self) -> bool:
        return self.kind != "unsupported"

    @property
    def has_bias(self) -> bool:
        return self.bias_name is not None


class _Reached(Exception):
    """Raised by the pre-hook to stop the forward pass early."""


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode inside the block, then restore every module's mode.

    ``model.train(flag)`` would overwrite submodules a user put in eval mode
    (a frozen BatchNorm), so each module's own flag is restored. No BatchNorm
    statistics change and no dropout is drawn inside the block.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def check_input_shape(
    input_shape: object, what: str = "input_shape"
) -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple of positive ints or raise ShapeError."""
    try:
        shape = tuple(int(s) for s in input_shape)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise ShapeError(
            what,
            [
                "expected a sequence of positive ints such as (1, 28, 28), "
                f"got {input_shape!r}"
            ],
        ) from None
    if not shape or any(s <= 0 for s in shape):
        raise ShapeError(
            what,
            [
                f"expected a non-empty shape of positive sizes without the batch "
                f"dimension, e.g. (1, 28, 28); got {shape}"
            ],
        )
    return shape


def find_first_layer(model: nn.Module, input_shape: tuple[int, ...]) -> FirstLayer:
    """Locate the first parametrised layer the raw input reaches.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module`` taking a batch of shape ``(B, *input_shape)``.
    input_shape:
        Shape of one input, without the batch dimension.

    Returns
    -------
    FirstLayer
        Always returned, with ``kind="unsupported"`` and a reason when the
        first layer is not one fl-audit can analyse.

    Raises
    ------
    ShapeError
        If ``input_shape`` is malformed or the model fails before reaching any
        parametrised layer with an input of that shape.
    """
    shape = check_input_shape(input_shape)
    names = {module: name for name, module in model.named_modules()}
    first_param = next(model.parameters(), None)
    if first_param is None:
        return FirstLayer("", "unsupported", None, "the model has no parameters", shape)

    # Hook every module that owns parameters directly; the root only when it
    # has no children (otherwise its own parameters are used functionally).
    owners = [
        m
        for m in model.modules()
        if next(m.parameters(recurse=False), None) is not None
        and (m is not model or not list(model.children()))
    ]
    seen: dict[str, object] = {}

    def pre_hook(module: nn.Module, args: tuple[object, ...]) -> None:
        seen["module"] = module
        seen["input"] = args[0] if args else None
        raise _Reached

    gen = torch.Generator().manual_seed(0)
    probe = torch.rand((2, *shape), generator=gen, dtype=torch.float64)
    probe = probe.to(dtype=first_param.dtype, device=first_param.device)
    handles = [m.register_forward_pre_hook(pre_hook) for m in owners]
    try:
        with torch.no_grad(), eval_mode(model):
            model(probe)
    except _Reached:
        pass
    except Exception as exc:  # the user's model failed on this shape
        raise ShapeError(
            "input_shape",
            [
                f"the model fails on a batch of shape {(2, *shape)}: "
                f"{type(exc).__name__}: {exc}; pass the shape of one input "
                f"without the batch dimension"
            ],
        ) from exc
    finally:
        for h in handles:
            h.remove()

    module = seen.get("module")
    if not isinstance(module, nn.Module):
        return FirstLayer(
            "",
            "unsupported",
            None,
            "no parametrised submodule was called (parameters used functionally?)",
            shape,
        )
    return _describe(model, names[module], module, seen.get("input"), probe, shape)


def _describe(
    model: nn.Module,
    path: str,
    module: nn.Module,
    received: object,
    probe: torch.Tensor,
    shape: tuple[int, ...],
) -> FirstLayer:
    label = f"{path or '<model>'} ({type(module).__name__})"
    if not isinstance(received, torch.Tensor) or received.shape[:1] != probe.shape[:1]:
        return FirstLayer(
            path,
            "unsupported",
            module,
            f"{label} does not receive a batched tensor",
            shape,
        )
    in_shape = tuple(received.shape[1:])
    same_values = received.numel() == probe.numel() and torch.equal(
        received.reshape(-1).to(probe.dtype), probe.reshape(-1)
    )

    prefix = f"{path}." if path else ""
    bias = getattr(module, "bias", None)
    bias_name = f"{prefix}bias" if isinstance(bias, torch.Tensor) else None
    weight_name = f"{prefix}weight"

    if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d) and not same_values:
        return FirstLayer(
            path,
            "unsupported",
            module,
            f"the raw input is transformed before it reaches {label}; "
            "fl-audit inverts the layer that sees the raw input",
            in_shape,
            weight_name,
            bias_name,
        )
    if isinstance(module, nn.Linear):
        if len(in_shape) != 1:
            return FirstLayer(
                path,
                "unsupported",
                module,
                f"{label} acts on the last axis of a {in_shape} "
                "input, not on the whole flattened input",
                in_shape,
                weight_name,
                bias_name,
            )
        return FirstLayer(path, "linear", module, "", in_shape, weight_name, bias_name)
    if isinstance(module, nn.Conv1d):
        return FirstLayer(path, "conv1d", module, "", in_shape, weight_name, bias_name)
    if isinstance(module, nn.Conv2d):
        return FirstLayer(path, "conv2d", module, "", in_shape, weight_name, bias_name)
    return FirstLayer(
        path,
        "unsupported",
        module,
        f"the first parametrised layer is {label}; fl-audit analyses "
        "nn.Linear, nn.Conv1d and nn.Conv2d first layers",
        in_shape,
    )
