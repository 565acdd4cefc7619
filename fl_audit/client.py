"""The client side of the audit: a Flower mod that describes each train reply.

Install the mod on the ClientApp and tell it what the round did::

    from fl_audit.client import audit_mod, describe_training

    app = ClientApp(mods=[audit_mod])

    @app.train()
    def train(msg, context):
        ...  # local training
        describe_training(context, batch_size=32, local_steps=len(loader),
                          num_examples=len(dataset), optimizer="sgd", lr=lr,
                          input_shape=(1, 28, 28), inputs=x, labels=y)
        return Message(content=..., reply_to=msg)

After each train message the mod attaches a ConfigRecord of audit metadata
(``fl-audit.meta``) to the reply: partition id (from the node config),
batch size, local steps, number of examples, optimizer, learning rate,
input shape and range. Fields not declared fall back on the run config
(``batch-size``, ``local-steps``, ``lr``), the message's config (``lr``) and
the reply's metrics (``num-examples``). The server's
:class:`~fl_audit.strategies.AuditStrategy` removes the record before the
inner strategy aggregates.

Ground truth (the inputs and labels trained on) is for simulations only: the
client keeps it only when its run config sets ``audit.send-ground-truth =
true``, and then sends it as an ArrayRecord ``fl-audit.truth`` that the
server uses only if its audit config allows it.

Legacy clients (``NumPyClient``) reply through ``fitres.*`` records, which
the legacy server API rebuilds into a ``FitRes``; there the mod puts its
fields into the reply's metrics under ``fl-audit.<field>`` keys, and ground
truth as ``.npz`` bytes under ``fl-audit.truth``.

The mod never fails a reply: if describing it fails, the reply goes out
unchanged and a warning is logged.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fl_audit._logging import logger

__all__ = [
    "LEGACY_PREFIX",
    "META_KEY",
    "TRUTH_KEY",
    "audit_mod",
    "describe_training",
    "ground_truth_requested",
]

META_KEY = "fl-audit.meta"
"""Key of the metadata ConfigRecord in a train reply."""
TRUTH_KEY = "fl-audit.truth"
"""Key of the ground-truth ArrayRecord in a train reply (simulation only)."""
LEGACY_PREFIX = "fl-audit."
"""Prefix of the audit's keys in a legacy reply's metrics."""

_STATE_META = "fl-audit.declared"
_STATE_TRUTH = "fl-audit.declared-truth"
_GROUND_TRUTH_FLAG = "audit.send-ground-truth"
_LEGACY_METRICS = "fitres.metrics"

CallNext = Callable[[Message, Context], Message]


def ground_truth_requested(context: Context) -> bool:
    """Whether this run asks clients to send their inputs (simulation only)."""
    value = context.run_config.get(_GROUND_TRUTH_FLAG, False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def describe_training(
    context: Context,
    *,
    batch_size: int | None = None,
    local_steps: int | None = None,
    num_examples: int | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    input_shape: Sequence[int] | None = None,
    input_range: tuple[float, float] | None = None,
    inputs: torch.Tensor | np.ndarray | None = None,
    labels: torch.Tensor | np.ndarray | None = None,
    send_ground_truth: bool | None = None,
) -> None:
    """Record what this round's local training did, for :func:`audit_mod`.

    Call it in the train function before returning the reply. ``inputs`` and
    ``labels`` (every example trained on this round) are kept only when
    ``send_ground_truth`` is true, or, when it is ``None``, when the run
    config sets ``audit.send-ground-truth``; otherwise they are ignored and
    never leave the client.
    """
    fields: dict[str, Any] = {
        "batch-size": batch_size,
        "local-steps": local_steps,
        "num-examples": num_examples,
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum,
        "weight-decay": weight_decay,
        "input-shape": None if input_shape is None else [int(s) for s in input_shape],
        "input-range": None if input_range is None else [float(v) for v in input_range],
    }
    record = ConfigRecord({k: _plain(v) for k, v in fields.items() if v is not None})
    context.state[_STATE_META] = record

    if send_ground_truth is None:
        send_ground_truth = ground_truth_requested(context)
    if inputs is not None and send_ground_truth:
        arrays = {"inputs": Array(_numpy(inputs))}
        if labels is not None:
            arrays["labels"] = Array(_numpy(labels))
        context.state[_STATE_TRUTH] = ArrayRecord(arrays)


def audit_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Flower client mod: attach audit metadata to every train reply."""
    reply = call_next(msg, context)
    if not msg.metadata.message_type.startswith("train") or reply.has_error():
        return reply
    try:
        _describe(msg, reply, context)
    except Exception as exc:  # describing must never fail the reply
        logger.warning("fl-audit mod: reply sent without audit metadata: %s", exc)
    return reply


def _describe(msg: Message, reply: Message, context: Context) -> None:
    declared = context.state.pop(_STATE_META, None)
    truth = context.state.pop(_STATE_TRUTH, None)
    meta: dict[str, Any] = dict(declared) if isinstance(declared, ConfigRecord) else {}

    partition = context.node_config.get("partition-id")
    if partition is not None:
        meta.setdefault("partition-id", int(partition))
    for key in ("batch-size", "local-steps", "lr"):
        value = context.run_config.get(key)
        if value is not None and not isinstance(value, str):
            meta.setdefault(key, value)
    sent_config = next(iter(msg.content.config_records.values()), None)
    if sent_config is not None and "lr" in sent_config:
        meta.setdefault("lr", sent_config["lr"])
    for record in reply.content.metric_records.values():
        if "num-examples" in record:
            meta.setdefault("num-examples", int(record["num-examples"]))  # type: ignore[arg-type]
            break
    meta["ground-truth-sent"] = isinstance(truth, ArrayRecord)

    legacy = reply.content.config_records.get(_LEGACY_METRICS)
    if legacy is not None:
        for key, value in meta.items():
            legacy[f"{LEGACY_PREFIX}{key}"] = _legacy_value(value)
        if isinstance(truth, ArrayRecord):
            legacy[TRUTH_KEY] = _npz_bytes(truth)
        return
    reply.content[META_KEY] = ConfigRecord(meta)
    if isinstance(truth, ArrayRecord):
        reply.content[TRUTH_KEY] = truth


def _plain(value: object) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _legacy_value(value: Any) -> Any:
    # A legacy FitRes's metrics hold scalars only: lists travel as text.
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def _npz_bytes(record: ArrayRecord) -> bytes:
    buffer = io.BytesIO()
    arrays = {k: v.numpy() for k, v in record.items()}
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()
