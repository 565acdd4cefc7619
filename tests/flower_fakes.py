"""Hand-built Flower messages for the strategy and client-mod tests (no Ray)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_audit.client import META_KEY, TRUTH_KEY

_ids = itertools.count(1)


def metadata(node: int, message_type: str = "train") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"msg-{next(_ids)}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="instruction",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )


def arrays_of(state: Mapping[str, Any]) -> ArrayRecord:
    return ArrayRecord(
        {
            k: Array(np.asarray(torch.as_tensor(v).detach().numpy()))
            for k, v in state.items()
        }
    )


def train_reply(
    node: int,
    state: Mapping[str, Any],
    num_examples: int,
    *,
    meta: Mapping[str, Any] | None = None,
    truth: Mapping[str, np.ndarray] | None = None,
    loss: float = 0.5,
) -> Message:
    content = RecordDict(
        {
            "arrays": arrays_of(state),
            "metrics": MetricRecord({"num-examples": num_examples, "train_loss": loss}),
        }
    )
    if meta is not None:
        content[META_KEY] = ConfigRecord(dict(meta))
    if truth is not None:
        content[TRUTH_KEY] = ArrayRecord({k: Array(v) for k, v in truth.items()})
    return Message(content=content, metadata=metadata(node))


def error_reply(node: int, reason: str = "client crashed") -> Message:
    return Message(error=Error(code=1, reason=reason), metadata=metadata(node))


class QuietFedAvg(FedAvg):
    """FedAvg whose configure_train sends nothing (no run, no grid needed).

    It touches the config as FedAvg does (``server-round``) so the wrapper's
    copy is checked against what a real round would send.
    """

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[override]
        config["server-round"] = server_round
        return []


def audited_strategy(
    *,
    model: nn.Module,
    input_shape: tuple[int, ...],
    config: Any,
    server_round: int = 1,
    train_config: Mapping[str, Any] | None = None,
    **kwargs: Any,
):
    """``AuditStrategy(QuietFedAvg(), ...)`` with round ``server_round`` configured.

    The global arrays are the model's own weights; ``kwargs`` (e.g.
    ``attacks``) go to the strategy.
    """
    from fl_audit.strategies import AuditStrategy

    strategy = AuditStrategy(
        QuietFedAvg(), model=model, input_shape=input_shape, config=config, **kwargs
    )
    strategy.configure_train(
        server_round,
        arrays_of(model.state_dict()),
        ConfigRecord(dict(train_config or {})),
        None,
    )
    return strategy


def context(
    partition: int | None = 0,
    run_config: Mapping[str, Any] | None = None,
) -> Context:
    node_config = {} if partition is None else {"partition-id": partition}
    return Context(
        run_id=1,
        node_id=42,
        node_config=node_config,
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )


def mlp(d: int = 64, h: int = 16, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, h), nn.ReLU(), nn.Linear(h, classes)
    )


def sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict:
    """The client state after one SGD step on (x, y), as a state dict copy."""
    import copy

    local = copy.deepcopy(model)
    loss = nn.functional.cross_entropy(local(x), y)
    grads = torch.autograd.grad(loss, list(local.parameters()))
    with torch.no_grad():
        for p, g in zip(local.parameters(), grads, strict=True):
            p -= lr * g
    return {k: v.detach().clone() for k, v in local.state_dict().items()}
