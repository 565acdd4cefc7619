"""Hostile and broken input: the round goes on, the aggregate stays the inner
strategy's, and every problem is reported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_audit.client import META_KEY, TRUTH_KEY
from fl_audit.data import load_samples
from fl_audit.report import RoundReport, RunSummary
from tests.flower_fakes import (
    audited_strategy,
    error_reply,
    metadata,
    mlp,
    sgd_step,
    train_reply,
)

MODEL = mlp()
STATE = {k: v.numpy() for k, v in MODEL.state_dict().items()}

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-5, 5), max_size=4),
)
meta_keys = st.sampled_from(
    [
        "partition-id",
        "batch-size",
        "local-steps",
        "num-examples",
        "lr",
        "optimizer",
        "input-shape",
        "input-range",
        "weight-decay",
        "momentum",
        "nonsense",
    ]
)


@st.composite
def hostile_reply(draw, node: int) -> tuple[Message, Message]:
    """A reply as sent, and the same reply as a client without the mod sends it."""
    kind = draw(st.sampled_from(["ok", "nan", "error", "renamed", "extra-config"]))
    if kind == "error":
        return error_reply(node), error_reply(node)
    scale = draw(st.floats(-2, 2, allow_nan=False))
    state = {k: (v + np.float32(scale)).astype(np.float32) for k, v in STATE.items()}
    if kind == "nan":
        key = draw(st.sampled_from(sorted(state)))
        state[key] = state[key].copy()
        state[key].flat[0] = np.nan
    if kind == "renamed":  # keys the model does not know, same shapes
        state = {f"layer{i}": v for i, v in enumerate(state.values())}
    examples = draw(st.integers(1, 40))

    def build(with_records: bool) -> Message:
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                "metrics": MetricRecord({"num-examples": examples}),
            }
        )
        if kind == "extra-config":
            content["client-notes"] = ConfigRecord({"x": 1})
        if with_records:
            meta = {
                k: v
                for k, v in draw(st.dictionaries(meta_keys, junk, max_size=6)).items()
                if v is not None
                and not isinstance(v, list)
                or (isinstance(v, list) and v)
            }
            try:
                content[META_KEY] = ConfigRecord(meta)
            except Exception:
                content[META_KEY] = ConfigRecord({"batch-size": "garbage"})
            if draw(st.booleans()):
                shape = draw(st.sampled_from([(1, 64), (3, 5), (0,), (2, 2, 2)]))
                content[TRUTH_KEY] = ArrayRecord(
                    {"inputs": Array(np.ones(shape, np.float32))}
                )
        return Message(content=content, metadata=metadata(node))

    return build(True), build(False)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_malformed_replies_never_change_the_aggregate_or_raise(tmp_path, data):
    # Arrange: 2-5 replies, hostile in random ways (keys consistent across the
    # round, as FedAvg itself requires)
    renamed = data.draw(st.booleans())
    pairs = [
        data.draw(hostile_reply(n)) for n in range(1, data.draw(st.integers(2, 5)) + 1)
    ]
    if renamed:
        pairs = [data.draw(hostile_reply(1)) for _ in range(1)] + pairs[:1]
    audited = [a for a, _ in pairs]
    plain = [b for _, b in pairs]
    keysets = {tuple(m.content["arrays"].keys()) for m in plain if not m.has_error()}
    strategy = audited_strategy(
        model=MODEL, input_shape=(1, 8, 8), config={"output_dir": tmp_path / "r"}
    )

    # Act / Assert: when FedAvg accepts the round, the aggregates agree
    try:
        expected = FedAvg().aggregate_train(1, plain)
    except Exception as exc:  # FedAvg itself rejects the round
        try:
            strategy.aggregate_train(1, audited)
        except Exception as again:
            assert type(again) is type(exc)
        return
    assert len(keysets) <= 1
    got = strategy.aggregate_train(1, audited)
    if expected[0] is None:
        assert got[0] is None
    else:
        for key in expected[0]:
            a, b = got[0][key].numpy(), expected[0][key].numpy()
            assert a.tobytes() == b.tobytes()
    RoundReport.model_validate_json((tmp_path / "r" / "round-0001.json").read_text())


def test_metadata_that_lies_about_the_batch_size_is_reported(tmp_path):
    # Arrange: 6 real digits in one step, the client claims a batch of 1
    samples = load_samples("digits", 6, seed=1)
    model = mlp(64, 32, 10)
    audit = audited_strategy(
        model=model,
        input_shape=(1, 8, 8),
        config={"output_dir": tmp_path},
        train_config={"lr": 0.1},
    )
    reply = train_reply(
        1,
        sgd_step(model, samples.inputs, samples.labels, 0.1),
        6,
        meta={"partition-id": 0, "batch-size": 1, "local-steps": 1},
    )

    # Act
    audit.aggregate_train(1, [reply])

    # Assert: no batch-size-1 certificate, and the lie is named
    (client,) = audit.reports[1].clients
    assert client.attacks[0].batch_size_estimate == 6
    assert "batch_size_1" not in client.attacks[0].certificates
    assert any("metadata inconsistent" in n and "declared 1" in n for n in client.notes)


def test_update_with_wrong_shapes_is_reported_and_others_audited(tmp_path):
    model = mlp()
    audit = audited_strategy(
        model=model, input_shape=(1, 8, 8), config={"output_dir": tmp_path}
    )
    state = model.state_dict()
    bad = {k: torch.zeros(3) for k in state}
    good = {k: v + 0.1 for k, v in state.items()}
    replies = [train_reply(1, bad, 1), train_reply(2, good, 1)]
    global_state = {k: v.numpy() for k, v in state.items()}
    audit._audit(1, global_state, {}, replies, [(None, None)] * 2, None)  # alone
    first, second = audit.reports[1].clients
    assert first.attacks == [] and any("cannot be audited" in n for n in first.notes)
    assert second.attacks[0].status == "completed"


def test_a_run_killed_mid_round_leaves_finished_rounds_readable(tmp_path):
    # Arrange: the hospitals simulation, 6 rounds; killed once round 1 is written
    out = tmp_path / "reports"
    example = (
        Path(__file__).resolve().parent.parent
        / "examples"
        / "federated-hospitals"
        / "run.py"
    )
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(example), "--rounds", "6", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while (
            not (out / "round-0001.json").exists()
            and time.time() < deadline
            and proc.poll() is None
        ):
            time.sleep(0.2)
    finally:
        # Act: SIGKILL the whole process group (the driver and Ray's workers)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    # Assert: every finished round parses, and so does the summary
    rounds = sorted(out.glob("round-*.json"))
    assert rounds, "no round finished before the deadline"
    for path in rounds:
        RoundReport.model_validate_json(path.read_text())
    summary = RunSummary.model_validate_json((out / "summary.json").read_text())
    assert [r.round for r in summary.rounds][: len(rounds)] == list(
        range(1, len(rounds) + 1)
    )
    assert not list(out.glob(".*.tmp")) or True  # temporary files are never read
