"""AuditStrategy on the Message API, with replies built by hand (no Ray)."""

from __future__ import annotations

import copy
import json
import stat

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from fl_audit import AuditConfig, ConfigError, InvalidInputError
from fl_audit.attacks import Applicability, Attack, AttackResult, AttackTarget
from fl_audit.client import META_KEY, TRUTH_KEY, audit_mod, describe_training
from fl_audit.data import load_samples
from fl_audit.report import RoundReport, RunSummary
from fl_audit.strategies import AuditStrategy
from tests.flower_fakes import (
    QuietFedAvg,
    arrays_of,
    audited_strategy,
    context,
    error_reply,
    mlp,
    sgd_step,
    train_reply,
)


class _Quiet(FedMedian):
    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[override]
        return []


def _random_round(rng: np.random.Generator, model, clients: int, with_records: bool):
    """Replies of one round: random client states, some with audit records.

    The states depend on ``rng`` only, so the same seed gives the same
    states with or without records.
    """
    state = model.state_dict()
    extra = np.random.default_rng(12345)
    replies = []
    for node in range(1, clients + 1):
        client = {
            k: torch.from_numpy(rng.standard_normal(tuple(v.shape)).astype(np.float32))
            for k, v in state.items()
        }
        examples = int(rng.integers(1, 50))
        meta = truth = None
        if with_records and node % 2:
            meta = {"partition-id": node, "batch-size": 2, "local-steps": 1}
            truth = {"inputs": extra.random((2, 64)).astype(np.float32)}
        replies.append(train_reply(node, client, examples, meta=meta, truth=truth))
    return replies


@pytest.mark.parametrize("inner_cls", [FedAvg, FedMedian])
def test_aggregate_is_bit_identical_over_many_rounds(tmp_path, inner_cls):
    # Arrange: the same random replies, with audit records for the wrapped
    # strategy and without them for the plain one (clients without the mod)
    model = mlp()
    quiet = {FedAvg: QuietFedAvg, FedMedian: _Quiet}[inner_cls]
    audited = AuditStrategy(
        quiet(), model=model, input_shape=(1, 8, 8), config={"output_dir": tmp_path}
    )
    plain = inner_cls()
    rng = np.random.default_rng(0)

    for server_round in range(1, 9):
        seed = int(rng.integers(1 << 30))
        with_records = _random_round(np.random.default_rng(seed), model, 5, True)
        without = _random_round(np.random.default_rng(seed), model, 5, False)
        with_records.append(error_reply(99))
        without.append(error_reply(99))
        audited.configure_train(
            server_round, arrays_of(model.state_dict()), ConfigRecord({"lr": 0.1}), None
        )

        # Act
        arrays_a, metrics_a = audited.aggregate_train(server_round, iter(with_records))
        arrays_b, metrics_b = plain.aggregate_train(server_round, without)

        # Assert: same bytes, same metrics
        assert arrays_a is not None and arrays_b is not None
        assert list(arrays_a.keys()) == list(arrays_b.keys())
        for key in arrays_a:
            assert arrays_a[key].numpy().tobytes() == arrays_b[key].numpy().tobytes()
        assert dict(metrics_a) == dict(metrics_b)
    assert sorted(audited.reports) == list(range(1, 9))


def test_audit_records_never_reach_the_inner_strategy(tmp_path):
    # Arrange: an inner strategy that records what it is handed
    seen: list[list[str]] = []

    class Spy(QuietFedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen.append(sorted(k for m in replies for k in m.content))
            return super().aggregate_train(server_round, replies)

    model = mlp()
    audit = AuditStrategy(
        Spy(), model=model, input_shape=(1, 8, 8), config={"output_dir": tmp_path}
    )
    replies = _random_round(np.random.default_rng(1), model, 3, True)
    audit.configure_train(1, arrays_of(model.state_dict()), ConfigRecord(), None)

    # Act
    audit.aggregate_train(1, replies)

    # Assert
    assert seen and all(META_KEY not in keys and TRUTH_KEY not in keys for keys in seen)
    assert set(seen[0]) == {"arrays", "metrics"}


def _hospital_reply(model, x, y, partition, lr, run_config) -> Message:
    """A real client round through the audit mod: one SGD step on (x, y)."""
    ctx = context(partition, run_config)
    instruction = Message(
        content=RecordDict(
            {
                "arrays": arrays_of(model.state_dict()),
                "config": ConfigRecord({"lr": lr}),
            }
        ),
        metadata=__import__("tests.flower_fakes", fromlist=["metadata"]).metadata(0),
    )

    def train(msg, ctx_):
        state = sgd_step(model, x, y, lr)
        describe_training(
            ctx_,
            batch_size=len(x),
            local_steps=1,
            num_examples=len(x),
            optimizer="sgd",
            lr=lr,
            input_shape=tuple(x.shape[1:]),
            input_range=(0.0, 1.0),
            inputs=x,
            labels=y,
        )
        return train_reply(100 + partition, state, len(x))

    return audit_mod(instruction, ctx, train)


def test_single_example_clients_are_recovered_exactly_on_real_mri(tmp_path):
    # Arrange: three hospitals, one real MRI slice each, one SGD step
    samples = load_samples("mri", 3, seed=2)
    x, y = samples.inputs, torch.tensor([0, 1, 2])
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(1024, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 3),
    )
    cfg = AuditConfig(output_dir=tmp_path, allow_ground_truth=True, simulation=True)
    audit = audited_strategy(
        model=model, input_shape=(1, 32, 32), config=cfg, train_config={"lr": 0.1}
    )
    replies = [
        _hospital_reply(
            model, x[i : i + 1], y[i : i + 1], i, 0.1, {"audit.send-ground-truth": True}
        )
        for i in range(3)
    ]

    # Act
    audit.aggregate_train(1, replies)

    # Assert: every client's input certified and above 60 dB
    report = RoundReport.model_validate_json((tmp_path / "round-0001.json").read_text())
    assert [c.client for c in report.clients] == [
        "partition-0",
        "partition-1",
        "partition-2",
    ]
    for client in report.clients:
        (fc,) = client.attacks
        assert client.ground_truth_used and client.metadata.batch_size == 1
        assert fc.status == "completed" and fc.certified == 1
        assert (
            fc.ground_truth is not None and fc.ground_truth.min_certified_psnr >= 60.0
        )
        assert client.risk == "exposed"
        npz = tmp_path / fc.reconstruction_file
        assert stat.S_IMODE(npz.stat().st_mode) == 0o600
    summary = RunSummary.model_validate_json((tmp_path / "summary.json").read_text())
    assert summary.rounds[0].certified == 3


def test_clients_without_the_mod_are_audited_with_what_the_update_gives(tmp_path):
    # Arrange: no metadata; one real digit per client
    samples = load_samples("digits", 2, seed=0)
    model = mlp(64, 16, 10)
    audit = audited_strategy(
        model=model,
        input_shape=(1, 8, 8),
        config={"output_dir": tmp_path},
        train_config={"lr": 0.1},
    )
    replies = [
        train_reply(
            i + 1,
            sgd_step(model, samples.inputs[i : i + 1], samples.labels[i : i + 1], 0.1),
            1,
        )
        for i in range(2)
    ]

    # Act
    audit.aggregate_train(1, replies)

    # Assert: audited by node id, the lr taken from the server's config, and
    # the report says what was missing
    report = audit.reports[1]
    assert [c.client for c in report.clients] == ["node-1", "node-2"]
    for client in report.clients:
        assert not client.metadata_from_client
        assert any("no audit metadata" in n for n in client.notes)
        assert any("taken from the server's train config" in n for n in client.notes)
        assert client.attacks[0].status == "completed"
        assert client.attacks[0].batch_size_estimate == 1


def test_error_replies_and_malformed_metadata_are_reported(tmp_path):
    # Arrange
    model = mlp()
    audit = audited_strategy(
        model=model,
        input_shape=(1, 8, 8),
        config={"output_dir": tmp_path},
        server_round=3,
    )
    good = train_reply(
        1,
        model.state_dict(),
        4,
        meta={"batch-size": "lots", "partition-id": 5, "colour": "red"},
    )
    replies = [good, error_reply(7, "out of memory")]

    # Act
    aggregate, _ = audit.aggregate_train(3, replies)

    # Assert
    assert aggregate is not None
    report = audit.reports[3]
    assert (
        report.failed_replies[0].node_id == 7
        and "out of memory" in report.failed_replies[0].reason
    )
    (client,) = report.clients
    assert client.client == "partition-5" and client.metadata.batch_size is None
    assert any("batch_size" in n and "ignored" in n for n in client.notes)
    assert any("'colour'" in n for n in client.notes)


def test_ground_truth_is_discarded_unless_allowed(tmp_path):
    # Arrange: a client sends its input; the audit config does not allow it
    samples = load_samples("digits", 1, seed=3)
    model = mlp(64, 16, 10)
    audit = audited_strategy(
        model=model,
        input_shape=(1, 8, 8),
        config={"output_dir": tmp_path},
        train_config={"lr": 0.1},
    )
    reply = _hospital_reply(
        model, samples.inputs, samples.labels, 0, 0.1, {"audit.send-ground-truth": True}
    )
    assert TRUTH_KEY in reply.content

    # Act
    audit.aggregate_train(1, [reply])

    # Assert
    (client,) = audit.reports[1].clients
    assert not client.ground_truth_used
    assert client.attacks[0].ground_truth is None
    assert any("discarded unused" in n for n in client.notes)


class _Boom(Attack):
    name = "boom"

    def run(self, target: AttackTarget) -> AttackResult:
        raise RuntimeError("the attack blew up")


class _Never(Attack):
    name = "never"

    def applicability(self, target: AttackTarget) -> Applicability:
        return Applicability(False, "needs a transformer")

    def run(self, target: AttackTarget) -> AttackResult:  # pragma: no cover
        raise AssertionError("must not run")


def test_an_attack_that_raises_is_reported_not_raised(tmp_path):
    # Arrange
    model = mlp()
    audit = audited_strategy(
        model=model,
        input_shape=(1, 8, 8),
        attacks=[_Boom(), _Never()],
        config={"output_dir": tmp_path},
    )

    # Act
    aggregate, _ = audit.aggregate_train(
        1, _random_round(np.random.default_rng(2), model, 2, True)
    )

    # Assert
    assert aggregate is not None
    for client in audit.reports[1].clients:
        boom, never = client.attacks
        assert boom.status == "failed" and "blew up" in boom.reason
        assert (
            never.status == "not_applicable" and never.reason == "needs a transformer"
        )


def test_identical_arrays_from_every_client_are_audited_once_as_an_aggregate(tmp_path):
    # Arrange: every reply carries the same arrays (what secure aggregation shows)
    model = mlp()
    audit = audited_strategy(
        model=model, input_shape=(1, 8, 8), config={"output_dir": tmp_path}
    )
    shared = {k: v + 0.01 for k, v in model.state_dict().items()}
    replies = [train_reply(n, shared, 10, meta={"partition-id": n}) for n in (1, 2, 3)]

    # Act
    audit.aggregate_train(1, replies)

    # Assert
    report = audit.reports[1]
    assert report.aggregate_only
    (client,) = report.clients
    assert client.update_kind == "aggregate" and client.metadata.num_examples == 30


def test_aggregate_train_without_configure_train_still_aggregates(tmp_path):
    model = mlp()
    audit = AuditStrategy(
        QuietFedAvg(),
        model=model,
        input_shape=(1, 8, 8),
        config={"output_dir": tmp_path},
    )
    aggregate, _ = audit.aggregate_train(
        1, _random_round(np.random.default_rng(3), model, 2, True)
    )
    assert aggregate is not None and 1 not in audit.reports


def test_configure_train_keeps_the_config_the_inner_strategy_sends(tmp_path):
    model = mlp()
    audit = audited_strategy(
        model=model,
        input_shape=(1, 8, 8),
        config={"output_dir": tmp_path},
        server_round=4,
        train_config={"lr": 0.05},
    )
    audit.aggregate_train(4, _random_round(np.random.default_rng(4), model, 1, False))
    report = json.loads((tmp_path / "round-0004.json").read_text())
    assert report["settings"]["train_config"] == {"lr": 0.05, "server-round": 4}


def test_bad_construction_is_rejected_with_the_fix(tmp_path):
    model = mlp()
    with pytest.raises(ConfigError, match="LegacyAuditStrategy"):
        AuditStrategy(object(), model=model, input_shape=(1, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no attack named 'nope'"):
        AuditStrategy(
            FedAvg(),
            model=model,
            input_shape=(1, 8, 8),
            attacks=["nope"],
            config={"output_dir": tmp_path},
        )
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InvalidInputError, match="cannot be written"):
        AuditStrategy(
            FedAvg(),
            model=model,
            input_shape=(1, 8, 8),
            config={"output_dir": blocker / "sub"},
        )


def test_replies_are_not_consumed_twice(tmp_path):
    # A generator of replies is materialised once and still aggregated.
    model = mlp()
    audit = audited_strategy(
        model=model, input_shape=(1, 8, 8), config={"output_dir": tmp_path}
    )
    replies = _random_round(np.random.default_rng(5), model, 3, True)
    expected, _ = FedAvg().aggregate_train(
        1,
        [
            copy.deepcopy(m)
            for m in _random_round(np.random.default_rng(5), model, 3, False)
        ],
    )
    arrays, _ = audit.aggregate_train(1, (m for m in replies))
    assert arrays is not None and expected is not None
    assert all(
        arrays[k].numpy().tobytes() == expected[k].numpy().tobytes() for k in arrays
    )
    assert len(audit.reports[1].clients) == 3


def test_two_replies_claiming_one_partition_are_both_reported(tmp_path):
    model = mlp()
    audit = audited_strategy(
        model=model, input_shape=(1, 8, 8), config={"output_dir": tmp_path}
    )
    state = model.state_dict()
    replies = [
        train_reply(
            n, {k: v + n for k, v in state.items()}, 1, meta={"partition-id": 4}
        )
        for n in (1, 2)
    ]
    audit.aggregate_train(1, replies)
    first, second = audit.reports[1].clients
    assert (first.client, second.client) == ("partition-4", "partition-4~2")
    assert any("also claims 'partition-4'" in n for n in second.notes)
