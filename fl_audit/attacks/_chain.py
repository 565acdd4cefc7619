"""The layers between a convolutional first layer and the first FC layer.

:func:`trace_chain` runs one forward pass with hooks on every leaf module and
reads off the sequence of modules that lead from the first convolution to
the first ``nn.Linear``. Each module must receive exactly what the previous
one returned (a reshape is allowed); otherwise an operation the hooks cannot
see sits between them (a residual addition, a functional ``F.relu``) and the
chain stops there, with the reason.

:func:`trace_first_segment` runs the same pass but stops at the first
activation above the convolution (the capacity bounds use it for the rank
behind a ReLU); it needs no FC layer above.

The chain is cut at its element-wise nonlinearities into *segments* of
linear (affine) modules. :func:`segment_operator` turns a segment into a
sparse matrix: a convolution's is written down from its weights, any other
module's is found by probing it with groups of basis vectors whose outputs do
not overlap (a graph colouring of the input grid), so the cost grows with the
number of non-zeros, not with the size of a dense operator.

Notes
-----
Probing assumes each output of a segment depends on a bounded window of its
input (true of convolutions, pooling, batch normalisation in eval mode and
reshapes). The assembled matrix is checked against the segment on random
vectors; a segment that fails the check at every probe spacing is probed
column by column.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from fl_audit.errors import UnsupportedModelError

StepKind = Literal["linear", "shape", "relu", "relu6", "leaky_relu", "sigmoid", "tanh"]
ELEMENTWISE: tuple[StepKind, ...] = ("relu", "relu6", "leaky_relu", "sigmoid", "tanh")

_SHAPE_ONLY = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_PER_SAMPLE_NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.LocalResponseNorm,
)


@dataclass
class Step:
    """One module of the chain, as called in the traced forward pass."""

    name: str
    module: nn.Module  # the float64 eval-mode copy
    kind: StepKind
    in_shape: tuple[int, ...]  # per sample
    out_shape: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.name or '<model>'} ({type(self.module).__name__})"


@dataclass
class Segment:
    """Consecutive linear/shape steps between two nonlinearities."""

    steps: list[Step]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def shape_only(self) -> bool:
        return all(s.kind == "shape" for s in self.steps)

    @property
    def label(self) -> str:
        return " -> ".join(s.label for s in self.steps) or "<reshape>"

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """Run the segment on ``(N, *in_shape)``; returns ``(N, prod(out_shape))``."""
        out = v.reshape(-1, *self.in_shape)
        for step in self.steps:
            out = step.module(out.reshape(-1, *step.in_shape))
        return out.reshape(v.shape[0], -1)


@dataclass
class Chain:
    """From the first convolution to the input of the first FC layer."""

    model: nn.Module  # float64 eval-mode copy the steps belong to
    segments: list[Segment]  # len(activations) + 1
    activations: list[Step]
    fc_name: str
    fc: nn.Linear
    fc_is_last: bool  # the FC layer's output is the model's output
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[Step]:
        out: list[Step] = []
        for i, seg in enumerate(self.segments):
            out.extend(seg.steps)
            if i < len(self.activations):
                out.append(self.activations[i])
        return out


class ChainStop(Exception):
    """The chain cannot be inverted; ``str(exc)`` names the layer and why."""


@dataclass
class _Trace:
    """One forward pass of a float64 eval-mode copy, every leaf call recorded."""

    work: nn.Module
    names: dict[nn.Module, str]
    original: dict[str, nn.Module]
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    probe: torch.Tensor
    start: int  # index of the first convolution's call


def _record(model: nn.Module, input_shape: tuple[int, ...], first_path: str) -> _Trace:
    work = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    names = {m: n for n, m in work.named_modules()}
    original = dict(model.named_modules())
    leaves = [m for m in work.modules() if not list(m.children())]
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple[object, ...], out: object) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            calls.append((module, args[0].detach(), out.detach()))

    gen = torch.Generator().manual_seed(1)
    probe = torch.rand((2, *input_shape), generator=gen, dtype=torch.float64) + 0.1
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            logits = work(probe)
    except Exception as exc:  # the user's model failed on this shape
        raise ChainStop(
            f"the model fails on a batch of shape {(2, *input_shape)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for h in handles:
            h.remove()

    start = next(
        (i for i, (m, _, _) in enumerate(calls) if names[m] == first_path), None
    )
    if start is None:
        raise ChainStop(f"the first convolution {first_path!r} was not called")
    return _Trace(work, names, original, calls, logits, probe, start)


def _step(trace: _Trace, i: int) -> Step:
    """The ``i``-th call as a chain step, once its input is checked."""
    module, received, out = trace.calls[i]
    name = trace.names[module]
    if i > trace.start:
        _check_link(trace.calls, i, trace.names, trace.probe)
    kind = _classify(name, module, trace.original.get(name))
    return Step(name, module, kind, tuple(received.shape[1:]), tuple(out.shape[1:]))


def trace_chain(
    model: nn.Module, input_shape: tuple[int, ...], first_path: str
) -> Chain:
    """Trace the modules from the convolution ``first_path`` to the first FC layer.

    Raises
    ------
    ChainStop
        With the layer that stops the chain and the reason.
    """
    trace = _record(model, input_shape, first_path)
    calls, names = trace.calls, trace.names
    steps: list[Step] = []
    fc: tuple[str, nn.Linear] | None = None
    fc_index = -1
    for i in range(trace.start, len(calls)):
        module = calls[i][0]
        if isinstance(module, nn.Linear):
            if i > trace.start:
                _check_link(calls, i, names, trace.probe)
            fc, fc_index = (names[module], module), i
            break
        steps.append(_step(trace, i))
    if fc is None:
        last = steps[-1].label if steps else first_path
        raise ChainStop(
            f"no nn.Linear is called after the first convolution (the chain ends "
            f"at {last}): there is no FC layer above whose input the gradient "
            "gives away"
        )
    fc_name, fc_module = fc
    if fc_module.bias is None:
        raise ChainStop(
            f"the first FC layer {fc_name} has no bias: its input is known only "
            "up to scale"
        )
    later_params = any(
        next(m.parameters(recurse=False), None) is not None
        for m, _, _ in calls[fc_index + 1 :]
    )
    fc_is_last = not later_params and calls[fc_index][2].shape == trace.logits.shape

    segments, activations = _segments(steps)
    _check_pool_bottlenecks(segments, activations)
    notes = [
        f"{name} is in train mode in the given model; it is inverted as in eval "
        "mode (a client's random dropout mask would make the chain inconsistent)"
        for name, m in trace.original.items()
        if isinstance(m, nn.Dropout | nn.Dropout1d | nn.Dropout2d)
        and m.training
        and any(s.name == name for s in steps)
    ]
    return Chain(
        trace.work, segments, activations, fc_name, fc_module, fc_is_last, notes
    )


@dataclass
class FirstSegment:
    """The first convolution and the linear steps after it, up to an activation.

    ``activation`` is the first element-wise nonlinearity applied to the
    segment's output, or ``None`` when the segment's output reaches an
    ``nn.Linear`` (or the model's output) without one; ``reason`` then says
    which.
    """

    segment: Segment
    activation: Step | None
    reason: str = ""


def trace_first_segment(
    model: nn.Module, input_shape: tuple[int, ...], first_path: str
) -> FirstSegment:
    """Trace from the convolution ``first_path`` to the first activation above it.

    Unlike :func:`trace_chain` this needs nothing above that activation (no FC
    layer), so it describes what the first layer's output goes through even
    when the whole chain cannot be inverted.

    Raises
    ------
    ChainStop
        When a module between the convolution and the activation is not a
        linear map the chain knows (max pooling, per-sample normalisation, a
        residual addition, ...); the message names it.
    """
    trace = _record(model, input_shape, first_path)
    steps: list[Step] = []
    for i in range(trace.start, len(trace.calls)):
        module = trace.calls[i][0]
        if isinstance(module, nn.Linear):
            label = f"{trace.names[module]} (Linear)"
            reason = f"the convolution's output reaches {label} with no activation"
            return FirstSegment(_segment_of(steps), None, reason)
        step = _step(trace, i)
        if step.kind in ELEMENTWISE:
            return FirstSegment(_segment_of(steps), step)
        steps.append(step)
    return FirstSegment(
        _segment_of(steps),
        None,
        "the convolution's output reaches the model's output with no activation",
    )


def _segment_of(steps: list[Step]) -> Segment:
    return Segment(steps, steps[0].in_shape, steps[-1].out_shape)


def _check_link(
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]],
    i: int,
    names: dict[nn.Module, str],
    probe: torch.Tensor,
) -> None:
    """Raise ChainStop unless call ``i`` receives exactly what ``i - 1`` returned."""
    module, received, _ = calls[i]
    prev_module, _, prev_out = calls[i - 1]
    here = f"{names[module]} ({type(module).__name__})"
    prev = f"{names[prev_module]} ({type(prev_module).__name__})"
    got, had = (
        received.reshape(received.shape[0], -1),
        prev_out.reshape(prev_out.shape[0], -1),
    )
    if got.shape == had.shape and torch.equal(got, had):
        return
    if got.shape == had.shape:
        diff = got - had
        earlier = [(c[2], names[c[0]]) for c in calls[: i - 1]] + [(probe, "<input>")]
        for tensor, name in earlier:
            flat = tensor.reshape(tensor.shape[0], -1)
            if flat.shape == diff.shape and torch.allclose(
                flat, diff, rtol=1e-9, atol=1e-12
            ):
                raise ChainStop(
                    f"{here} receives the output of {prev} plus the output of "
                    f"{name} (a residual connection): the two paths cannot be "
                    "separated, so the chain stops at the addition"
                )
    raise ChainStop(
        f"{here} does not receive the output of {prev}: an operation that is not "
        "a module sits between them (a functional call such as F.relu or "
        "F.max_pool2d, a concatenation or a branch); write it as an nn.Module "
        "so it can be inverted"
    )


def _classify(name: str, module: nn.Module, original: nn.Module | None) -> StepKind:
    label = f"{name} ({type(module).__name__})"
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return "linear"
    if isinstance(module, _SHAPE_ONLY):
        return "shape"
    if isinstance(module, _POOLS):
        return "linear"
    if isinstance(module, _MAX_POOLS):
        k = getattr(module, "kernel_size", None)
        if k is not None and all(v == 1 for v in np.atleast_1d(k)):
            return "linear"  # a pure subsampling
        raise ChainStop(
            f"{label} is not invertible: max pooling keeps the largest value of "
            "each window but not where it was, so the values below it are lost; "
            "an AvgPool or a strided convolution would keep the chain linear"
        )
    if isinstance(module, _BATCH_NORMS):
        ref = original if original is not None else module
        if ref.training or getattr(ref, "running_mean", None) is None:
            raise ChainStop(
                f"{label} normalises with the statistics of the batch (train mode "
                "or track_running_stats=False): they couple the samples and are "
                "not in the gradient; put the model in eval mode if the client "
                "trained with running statistics"
            )
        return "linear"
    if isinstance(module, _PER_SAMPLE_NORMS):
        raise ChainStop(
            f"{label} divides each sample by its own statistics, a nonlinear map "
            "that the chain cannot undo layer by layer"
        )
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.ReLU6):
        return "relu6"
    if isinstance(module, nn.LeakyReLU):
        if module.negative_slope == 0:
            return "relu"
        return "leaky_relu"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh):
        return "tanh"
    raise ChainStop(
        f"{label} has no inverse in fl-audit: the chain handles convolutions, "
        "average pooling, eval-mode BatchNorm, reshapes, dropout and the "
        "ReLU, ReLU6, LeakyReLU, Sigmoid and Tanh activations"
    )


def _segments(steps: list[Step]) -> tuple[list[Segment], list[Step]]:
    groups: list[list[Step]] = [[]]
    activations: list[Step] = []
    for step in steps:
        if step.kind in ELEMENTWISE:
            activations.append(step)
            groups.append([])
        else:
            groups[-1].append(step)
    segments = []
    for i, group in enumerate(groups):
        if group:
            in_shape, out_shape = group[0].in_shape, group[-1].out_shape
        else:  # two activations in a row, or one right below the FC layer
            shape = activations[i - 1].out_shape
            in_shape = out_shape = shape
        segments.append(Segment(group, in_shape, out_shape))
    return segments, activations


def _check_pool_bottlenecks(segments: list[Segment], activations: list[Step]) -> None:
    """Refuse a pooling that shrinks a segment's input before any conv sees it."""
    for i, seg in enumerate(segments):
        n_in = math.prod(seg.in_shape)
        for step in seg.steps:
            if isinstance(step.module, nn.Conv1d | nn.Conv2d):
                break
            if isinstance(step.module, _POOLS) and math.prod(step.out_shape) < n_in:
                below = activations[i - 1].label if i else "the input"
                raise ChainStop(
                    f"{step.label} is not invertible: it averages the {n_in} "
                    f"values coming out of {below} into "
                    f"{math.prod(step.out_shape)} before any convolution sees "
                    "them; pooling is inverted only where it follows a "
                    "convolution directly (conv -> pool -> activation)"
                )


# --------------------------------------------------------------------------
# Sparse operators


@dataclass
class Operator:
    """A segment as ``y = A v + b`` with ``A`` sparse (CSR), in float64."""

    A: scipy.sparse.csr_matrix  # (m, n)
    b: np.ndarray  # (m,)


def segment_operator(seg: Segment, max_entries: int = 2**23) -> Operator:
    """Assemble the sparse matrix of a segment.

    A convolution's matrix is written down from its weights and the input
    index each of its taps reads (:func:`tap_indices`); reshapes are the
    identity; any other linear module (pooling, eval-mode BatchNorm) is
    probed on its own by :func:`probe_operator`. The product is checked
    against the segment on random vectors; should that check fail, the
    whole segment is probed instead.
    """
    op: Operator | None = None
    for step in seg.steps:
        if step.kind == "shape":
            continue
        if isinstance(step.module, nn.Conv1d | nn.Conv2d):
            part = conv_operator(step.module, step.in_shape)
        else:
            part = probe_operator(_segment_of([step]), max_entries)
        op = part if op is None else Operator(part.A @ op.A, part.A @ op.b + part.b)
    n = math.prod(seg.in_shape)
    if op is None:
        op = Operator(scipy.sparse.identity(n, format="csr"), np.zeros(n))
    A = op.A.tocsr()
    if A.shape == (math.prod(seg.out_shape), n) and _reproduces(seg, A, op.b):
        return Operator(A, op.b)
    return probe_operator(seg, max_entries)


def conv_operator(conv: nn.Conv1d | nn.Conv2d, in_shape: tuple[int, ...]) -> Operator:
    """A convolution as ``y = A v + b``, written down from its weights.

    Row ``(j, p)`` (output channel, output position) holds the kernel
    entries ``K[j, c, t]`` at the input index that tap ``(c, t)`` reads at
    ``p``; padded taps are left out and a reflected or circular pad adds its
    entry to the index it copies.
    """
    idx = tap_indices(conv, in_shape)  # (C/g * K per group, L), 1-based, 0 = pad
    h, groups = conv.out_channels, conv.groups
    per = idx.shape[0] // groups
    L = idx.shape[1]
    weight = conv.weight.detach().cpu().double().numpy().reshape(h, per)
    A = block_rows(
        [idx[g * per : (g + 1) * per].T for g in range(groups)],  # (L, per) each
        [weight[g * (h // groups) : (g + 1) * (h // groups)] for g in range(groups)],
        math.prod(in_shape),
    )
    bias = (
        conv.bias.detach().cpu().double().numpy()
        if conv.bias is not None
        else np.zeros(h)
    )
    return Operator(A, np.repeat(bias, L))


def block_rows(
    taps: list[np.ndarray], coefficients: list[np.ndarray], n: int
) -> scipy.sparse.csr_matrix:
    """Rows ``(j, q)`` over groups: ``sum_t coefficients[j, t] v[taps[q, t] - 1]``.

    ``taps[g]`` ``(Q, T)`` holds 1 + the input index each term reads (0: none)
    and ``coefficients[g]`` ``(J, T)`` the weights of group ``g``; the rows of
    group ``g`` follow those of group ``g - 1``, ``j`` major. Written in CSR
    directly (a convolution's forward matrix and its kernel-gradient rows are
    both of this form).
    """
    indptr, indices, data = [np.zeros(1, np.int64)], [], []
    end = 0
    for tap, coef in zip(taps, coefficients, strict=True):
        q, t = np.nonzero(tap > 0)  # sorted by q: the row order within a j
        counts = np.bincount(q, minlength=tap.shape[0])
        J = coef.shape[0]
        indptr.append(end + np.cumsum(np.tile(counts, J)))
        end += J * q.size
        indices.append(np.tile(tap[q, t] - 1, J))
        data.append(coef[:, t].ravel())
    rows = sum(c.shape[0] * t.shape[0] for t, c in zip(taps, coefficients, strict=True))
    return scipy.sparse.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
        shape=(rows, n),
    )


def probe_operator(seg: Segment, max_entries: int = 2**23) -> Operator:
    """Assemble the sparse matrix of a segment by coloured probing.

    Input positions of one channel whose indices agree modulo ``P`` on every
    spatial axis are probed together, once with weight 1 and once with weight
    ``index + 1``; the ratio of the two outputs tells which input produced
    each output entry. ``P`` doubles until the matrix reproduces the segment
    on random vectors.
    """
    n, m = math.prod(seg.in_shape), math.prod(seg.out_shape)
    with torch.no_grad():
        b = seg.apply(torch.zeros((1, n), dtype=torch.float64))[0].numpy()
    channels, spatial = seg.in_shape[0], seg.in_shape[1:]
    period = 2
    while True:
        A = _probe(seg, channels, spatial, period, n, m, b, max_entries)
        if A is not None and _reproduces(seg, A, b):
            return Operator(A, b)
        if not spatial or period >= max(spatial):
            break
        period = min(2 * period, max(spatial))
    raise UnsupportedModelError(
        f"the segment {seg.label} is not a local linear map: its sparse operator "
        "could not be assembled"
    )


def _probe(
    seg: Segment,
    channels: int,
    spatial: tuple[int, ...],
    period: int,
    n: int,
    m: int,
    b: np.ndarray,
    max_entries: int,
) -> scipy.sparse.csr_matrix | None:
    grid = np.arange(n).reshape(channels, *spatial)
    # Colour of each input index: (channel, index mod P on each spatial axis).
    coords = np.indices(grid.shape).reshape(len(grid.shape), -1)  # (1 + dims, n)
    colour = coords[0].copy()
    for axis in range(1, coords.shape[0]):
        colour = colour * period + coords[axis] % period
    colours = np.unique(colour)
    chunk = max(1, max_entries // (2 * (m + n)))
    rows_all, cols_all, vals_all = [], [], []
    for lo in range(0, colours.size, chunk):
        group = colours[lo : lo + chunk]
        members = colour[None, :] == group[:, None]  # (g, n)
        ones = members.astype(np.float64)
        weighted = ones * (np.arange(n, dtype=np.float64) + 1.0)[None, :]
        probes = torch.from_numpy(np.concatenate([ones, weighted]))
        with torch.no_grad():
            out = seg.apply(probes).numpy() - b[None, :]  # (2g, m)
        plain, tagged = out[: group.size], out[group.size :]
        g_idx, o_idx = np.nonzero(plain)
        vals = plain[g_idx, o_idx]
        src = np.rint(tagged[g_idx, o_idx] / vals).astype(np.int64) - 1
        ok = (src >= 0) & (src < n)
        if not ok.all() or not members[g_idx, src].all():
            return None  # two inputs of one colour reach the same output
        rows_all.append(o_idx)
        cols_all.append(src)
        vals_all.append(vals)
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
    cols = np.concatenate(cols_all) if cols_all else np.zeros(0, np.int64)
    vals = np.concatenate(vals_all) if vals_all else np.zeros(0)
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(m, n))


def _reproduces(seg: Segment, A: scipy.sparse.csr_matrix, b: np.ndarray) -> bool:
    gen = torch.Generator().manual_seed(7)
    v = torch.randn((2, A.shape[1]), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        want = seg.apply(v).numpy()  # (2, m)
    got = (A @ v.numpy().T).T + b[None, :]
    scale = max(float(np.abs(want).max()), 1e-300)
    return bool(np.abs(got - want).max() <= 1e-10 * scale)


def tap_indices(conv: nn.Conv1d | nn.Conv2d, in_shape: tuple[int, ...]) -> np.ndarray:
    """For each (channel, tap) row and output position: 1 + the input index read."""
    n = math.prod(in_shape)
    idx = torch.arange(1, n + 1, dtype=torch.float64).reshape(1, *in_shape)
    dims = len(in_shape) - 1
    pads: list[int] = []
    for axis in reversed(range(dims)):
        k, gap = conv.kernel_size[axis], conv.dilation[axis]
        if conv.padding == "same":
            total = gap * (k - 1)
            left = total // 2
            right = total - left
        elif conv.padding == "valid":
            left = right = 0
        else:
            left = right = int(conv.padding[axis])  # type: ignore[index]
        pads += [left, right]
    if any(pads):
        if conv.padding_mode == "zeros":
            idx = F.pad(idx, pads, value=0.0)
        else:
            idx = F.pad(idx, pads, mode=conv.padding_mode)
    if dims == 1:
        idx = idx.unsqueeze(2)  # (1, C, 1, L)
        kernel: tuple[int, ...] = (1, *conv.kernel_size)
        dil: tuple[int, ...] = (1, *conv.dilation)
        stride: tuple[int, ...] = (1, *conv.stride)
    else:
        kernel, dil, stride = conv.kernel_size, conv.dilation, conv.stride
    cols = F.unfold(idx, kernel, dilation=dil, padding=0, stride=stride)  # (1, CK, L)
    return np.rint(cols[0].numpy()).astype(np.int64)
