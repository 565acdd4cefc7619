"""The federated-hospitals example: a real Flower simulation with the audit."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from fl_audit.report import RoundReport, RunSummary

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "federated-hospitals"


def _flatten(table: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_pyproject_run_config_matches_the_task_defaults():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from hospitals import task
    finally:
        sys.path.remove(str(EXAMPLE))
    pyproject = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert _flatten(pyproject["tool"]["flwr"]["app"]["config"]) == task.DEFAULTS


def test_simulation_audits_every_round_and_recovers_single_examples(tmp_path):
    # Arrange: 3 hospitals with real MRI slices, batch 1, one step, 2 rounds
    out = tmp_path / "reports"
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }

    # Act
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "run.py"),
            "--hospitals",
            "3",
            "--rounds",
            "2",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )

    # Assert: both rounds reported, every client's input certified exact
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"reports: {out}" in proc.stdout
    summary = RunSummary.model_validate_json((out / "summary.json").read_text())
    assert [r.round for r in summary.rounds] == [1, 2]
    for server_round in (1, 2):
        report = RoundReport.model_validate_json(
            (out / f"round-{server_round:04d}.json").read_text()
        )
        assert sorted(c.partition_id for c in report.clients) == [0, 1, 2]
        for client in report.clients:
            (fc,) = client.attacks
            assert client.ground_truth_used
            assert fc.certified == 1, fc.notes
            assert fc.ground_truth.recovered_60db == 1
            assert (out / fc.reconstruction_file).exists()
