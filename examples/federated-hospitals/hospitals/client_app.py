"""A hospital: trains on its share and describes the round for the audit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_audit.client import audit_mod, describe_training
from hospitals import task


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """The hospital ClientApp; ``overrides`` sit over the run config.

    ``flwr run`` uses ``app`` (run config from pyproject.toml); the in-process
    runner (run.py) builds one with its command-line settings.
    """
    extra = dict(overrides or {})
    client = ClientApp(mods=[audit_mod])

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, extra)

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, extra)

    return client


def _setup(msg: Message, context: Context, extra: Mapping[str, Any]):
    cfg = task.settings({**context.run_config, **extra})
    model = task.make_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    inputs, labels = task.hospital_data(cfg, partition_id, num_partitions)
    return cfg, model, inputs, labels


def train(msg: Message, context: Context, extra: Mapping[str, Any]) -> Message:
    """Local SGD on the hospital's share, described for the audit."""
    cfg, model, inputs, labels = _setup(msg, context, extra)
    sent = msg.content["config"]
    lr = float(sent.get("lr", cfg["lr"]))
    loss, used_x, used_y = task.train(
        model,
        inputs,
        labels,
        batch_size=int(cfg["batch-size"]),
        local_steps=int(cfg["local-steps"]),
        lr=lr,
        server_round=int(sent.get("server-round", 1)),
    )
    describe_training(
        context,
        batch_size=int(cfg["batch-size"]),
        local_steps=int(cfg["local-steps"]),
        num_examples=int(used_x.shape[0]),
        optimizer="sgd",
        lr=lr,
        input_shape=tuple(inputs.shape[1:]),
        input_range=(0.0, 1.0),
        inputs=used_x,
        labels=used_y,
        # A server without the audit would refuse a second ArrayRecord.
        send_ground_truth=bool(cfg["audit.send-ground-truth"] and cfg["enable-audit"]),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"train_loss": loss, "num-examples": int(used_x.shape[0])}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context, extra: Mapping[str, Any]) -> Message:
    """Loss and accuracy of the global model on the hospital's share."""
    _, model, inputs, labels = _setup(msg, context, extra)
    loss, accuracy = task.evaluate(model, inputs, labels)
    metrics = MetricRecord(
        {"eval_loss": loss, "eval_acc": accuracy, "num-examples": int(inputs.shape[0])}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


app = make_client_app()
