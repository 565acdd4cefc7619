"""Capture during a run, replay later, restarts, DP (fl_audit.replay)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fl_audit import AuditConfig
from fl_audit.cli import main as cli
from fl_audit.data import load_samples
from fl_audit.replay import load_capture, replay
from fl_audit.report import RoundReport
from fl_audit.strategies import AuditStrategy
from tests.flower_fakes import (
    QuietFedAvg,
    arrays_of,
    audited_strategy,
    mlp,
    sgd_step,
    train_reply,
)


def _run(tmp_path: Path, rounds: int = 2, **cfg) -> AuditStrategy:
    samples = load_samples("digits", 4, seed=7)
    model = mlp(64, 16, 10)
    config = AuditConfig(output_dir=tmp_path / "live", allow_ground_truth=True, **cfg)
    audit = AuditStrategy(
        QuietFedAvg(), model=model, input_shape=(1, 8, 8), config=config
    )
    for r in range(1, rounds + 1):
        audit.configure_train(
            r, arrays_of(model.state_dict()), ConfigRecord({"lr": 0.1}), None
        )
        replies = []
        for i in range(2):
            x, y = (
                samples.inputs[2 * (r - 1) + i : 2 * (r - 1) + i + 1],
                samples.labels[2 * (r - 1) + i : 2 * (r - 1) + i + 1],
            )
            replies.append(
                train_reply(
                    i + 1,
                    sgd_step(model, x, y, 0.1),
                    1,
                    meta={"partition-id": i, "batch-size": 1, "local-steps": 1},
                    truth={"inputs": x.numpy(), "labels": y.numpy()},
                )
            )
        audit.aggregate_train(r, replies)
    return audit


def _essentials(report: RoundReport) -> list[tuple]:
    return [
        (
            c.client,
            c.risk,
            [
                (a.attack, a.recovered, a.certified, a.batch_size_estimate)
                for a in c.attacks
            ],
        )
        for c in report.clients
    ]


def test_replay_of_a_capture_gives_the_live_reports(tmp_path):
    # Arrange: a live audit that also captures
    audit = _run(tmp_path, capture_dir=tmp_path / "capture")
    capture = tmp_path / "capture"
    assert (
        stat.S_IMODE((capture / "round-0001" / "partition-0.npz").stat().st_mode)
        == 0o600
    )

    # Act
    reports = replay(
        capture,
        mlp(64, 16, 10),
        AuditConfig(output_dir=tmp_path / "replayed", allow_ground_truth=True),
    )

    # Assert: same clients, same outcomes, ground truth kept for scoring
    assert [r.round for r in reports] == [1, 2]
    for r in reports:
        assert _essentials(r) == _essentials(audit.reports[r.round])
        assert all(c.ground_truth_used for c in r.clients)
    assert (tmp_path / "replayed" / "round-0002.json").exists()


def test_replay_command_line(tmp_path, monkeypatch, capsys):
    _run(tmp_path, rounds=1, capture_dir=tmp_path / "capture")
    factory = tmp_path / "models.py"
    factory.write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    nn = torch.nn\n"
        "    return nn.Sequential(\n"
        "        nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)\n"
        "    )\n"
    )
    code = cli(
        [
            "replay",
            str(tmp_path / "capture"),
            "--model",
            f"{factory}:make",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "replayed 1 round(s), 2 client update(s)" in capsys.readouterr().out
    assert cli(["replay", str(tmp_path / "nothing"), "--model", f"{factory}:make"]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_incomplete_captured_round_is_skipped(tmp_path):
    _run(tmp_path, capture_dir=tmp_path / "capture")
    (tmp_path / "capture" / "round-0002" / "round.json").unlink()
    _, rounds = load_capture(tmp_path / "capture")
    assert [r.server_round for r in rounds] == [1]


def test_restarting_into_the_same_folder_continues(tmp_path):
    _run(tmp_path, rounds=2)
    second = _run(tmp_path, rounds=1)
    report = second.reports[1]
    assert report.round == 3 and report.server_round == 1
    summary = json.loads((tmp_path / "live" / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert (
        RoundReport.model_validate_json(
            (tmp_path / "live" / "round-0001.json").read_text()
        ).round
        == 1
    )


def test_dp_wrapper_is_recorded_and_noise_placement_reported(tmp_path):
    model = mlp()
    inner = DifferentialPrivacyServerSideFixedClipping(
        QuietFedAvg(), noise_multiplier=1.1, clipping_norm=0.5, num_sampled_clients=2
    )
    audit = AuditStrategy(
        inner, model=model, input_shape=(1, 8, 8), config={"output_dir": tmp_path}
    )
    audit.configure_train(1, arrays_of(model.state_dict()), ConfigRecord(), None)
    state = model.state_dict()
    audit.aggregate_train(
        1,
        [
            train_reply(n, {k: v + 0.01 * n for k, v in state.items()}, 3)
            for n in (1, 2)
        ],
    )
    report = audit.reports[1]
    assert (
        report.settings.privacy.mechanism
        == "DifferentialPrivacyServerSideFixedClipping"
    )
    assert report.settings.privacy.noise_multiplier == 1.1
    assert all("before any noise" in " ".join(c.notes) for c in report.clients)


def test_local_dp_reports_noise_against_the_update(tmp_path):
    model = mlp()
    cfg = AuditConfig(
        output_dir=tmp_path,
        privacy={"noise_multiplier": 1.0, "clipping_norm": 1.0, "noise_on": "update"},
    )
    audit = audited_strategy(model=model, input_shape=(1, 8, 8), config=cfg)
    state = model.state_dict()
    audit.aggregate_train(
        1,
        [
            train_reply(n, {k: v + 0.01 * n for k, v in state.items()}, 3)
            for n in (1, 2)
        ],
    )
    (a, b) = audit.reports[1].clients
    assert a.update_norm > 0 and b.update_norm > a.update_norm
    assert a.noise_to_update > b.noise_to_update > 0


def test_declared_update_noise_sets_the_attack_noise_floor(tmp_path):
    # Arrange: one real digit, one SGD step, Gaussian noise of std 1e-5 added
    # to every entry of the update (as local DP or quantisation would)
    samples = load_samples("digits", 1, seed=5)
    model = mlp(64, 16, 10)
    state = sgd_step(model, samples.inputs, samples.labels, 0.1)
    gen = torch.Generator().manual_seed(0)
    noisy = {
        k: v + 1e-5 * torch.randn(v.shape, generator=gen) for k, v in state.items()
    }
    meta = {"partition-id": 0, "batch-size": 1, "local-steps": 1, "lr": 0.1}

    def audit(noise):
        cfg = AuditConfig(
            output_dir=tmp_path / str(noise),
            update_noise_std=noise,
            allow_ground_truth=True,
        )
        strategy = audited_strategy(model=model, input_shape=(1, 8, 8), config=cfg)
        truth = {"inputs": samples.inputs.numpy(), "labels": samples.labels.numpy()}
        strategy.aggregate_train(1, [train_reply(1, noisy, 1, meta=meta, truth=truth)])
        return strategy.reports[1].clients[0].attacks[0]

    # Act
    blind, told = audit(None), audit(1e-5)

    # Assert: unaware of the noise the rank fills up and the metadata looks
    # like a lie; told the noise, the attack sees the one input again
    assert blind.batch_size_estimate > 1
    assert told.batch_size_estimate == 1 and told.recovered == 1
    assert told.ground_truth.min_certified_psnr >= 40.0  # exact up to the noise
