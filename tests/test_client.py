"""The client mod: what it attaches to a train reply, and when."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fl_audit.client import META_KEY, TRUTH_KEY, audit_mod, describe_training
from tests.flower_fakes import context, metadata


def _instruction(message_type: str = "train", lr: float | None = 0.05) -> Message:
    config = ConfigRecord({} if lr is None else {"lr": lr})
    return Message(
        content=RecordDict({"config": config}), metadata=metadata(0, message_type)
    )


def _reply(ctx, x=None, declare=True) -> Message:
    if declare:
        describe_training(
            ctx,
            batch_size=4,
            local_steps=2,
            optimizer="sgd",
            input_shape=(1, 8, 8),
            inputs=x,
            labels=torch.arange(4),
        )
    content = RecordDict({"metrics": MetricRecord({"num-examples": 8})})
    return Message(content=content, metadata=metadata(1))


def test_metadata_is_attached_with_fallbacks():
    ctx = context(partition=3)
    reply = audit_mod(_instruction(), ctx, lambda m, c: _reply(c))
    meta = dict(reply.content[META_KEY])
    assert meta["partition-id"] == 3 and meta["batch-size"] == 4
    assert meta["local-steps"] == 2 and meta["lr"] == 0.05  # lr from the message
    assert meta["num-examples"] == 8 and meta["input-shape"] == [1, 8, 8]
    assert meta["ground-truth-sent"] is False
    assert TRUTH_KEY not in reply.content


def test_ground_truth_only_when_the_run_asks_for_it():
    x = torch.rand(4, 1, 8, 8)
    off = audit_mod(_instruction(), context(0), lambda m, c: _reply(c, x))
    on = audit_mod(
        _instruction(),
        context(0, {"audit.send-ground-truth": True}),
        lambda m, c: _reply(c, x),
    )
    assert TRUTH_KEY not in off.content
    sent = on.content[TRUTH_KEY]
    assert np.array_equal(sent["inputs"].numpy(), x.numpy())
    assert dict(on.content[META_KEY])["ground-truth-sent"] is True


def test_evaluate_replies_are_untouched():
    reply = audit_mod(_instruction("evaluate"), context(0), lambda m, c: _reply(c))
    assert META_KEY not in reply.content


def test_declared_fields_do_not_leak_into_the_next_round():
    ctx = context(1)
    audit_mod(_instruction(), ctx, lambda m, c: _reply(c))
    second = audit_mod(
        _instruction(lr=None), ctx, lambda m, c: _reply(c, declare=False)
    )
    meta = dict(second.content[META_KEY])
    assert "batch-size" not in meta and meta["partition-id"] == 1


def test_legacy_replies_get_prefixed_metrics():
    ctx = context(2, {"audit.send-ground-truth": True})

    def legacy(m, c):
        describe_training(
            c, batch_size=1, input_shape=(1, 8, 8), inputs=np.zeros((1, 64))
        )
        return Message(
            content=RecordDict({"fitres.metrics": ConfigRecord({"loss": 0.1})}),
            metadata=metadata(1),
        )

    reply = audit_mod(_instruction(), ctx, legacy)
    metrics = dict(reply.content["fitres.metrics"])
    assert (
        metrics["fl-audit.partition-id"] == 2
        and metrics["fl-audit.input-shape"] == "1,8,8"
    )
    assert (
        isinstance(metrics["fl-audit.truth"], bytes) and META_KEY not in reply.content
    )


def test_a_failing_description_never_fails_the_reply():
    ctx = context(0)
    ctx.node_config["partition-id"] = "not a number"
    reply = audit_mod(_instruction(), ctx, lambda m, c: _reply(c))
    assert META_KEY not in reply.content and "metrics" in reply.content
