"""The federated-hospitals example: a real Flower simulation with the audit."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fl_audit.report import RoundReport, RunSummary

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "federated-hospitals"


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


@pytest.fixture(scope="module")
def simulation(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The README's main command, run once: 3 hospitals, real MRI, 2 rounds."""
    tmp_path = tmp_path_factory.mktemp("hospitals")
    out = tmp_path / "reports"
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # this checkout's fl_audit, whatever the venv's editable install points to
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
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
    return proc, out


def test_simulation_audits_every_round_and_recovers_single_examples(simulation):
    # Arrange / Act: 3 hospitals with real MRI slices, batch 1, one step, 2 rounds
    proc, out = simulation

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


def test_the_main_command_ends_with_the_html_report_and_its_verdicts(simulation):
    # Arrange / Act
    proc, out = simulation

    # Assert: the default policy fails batch-1 clients whose inputs are certified
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = out / "report.html"
    assert f"HTML report: {page}" in proc.stdout
    assert "verdict: FAIL (policy 'fl-audit default')" in proc.stdout
    html = page.read_text()
    assert html.count('alt="true input"') == 6  # 3 hospitals x 2 rounds
    assert stat.S_IMODE(page.stat().st_mode) == 0o600  # it embeds MRI slices
    report = RoundReport.model_validate_json((out / "round-0001.json").read_text())
    assert report.verdict.status == "fail"
    for client in report.clients:
        fired = {f.rule for f in client.verdict.fired}
        assert {"fc-bound-exposed", "no-certified-reconstruction"} <= fired
        truth = out / client.ground_truth_file
        assert stat.S_IMODE(truth.stat().st_mode) == 0o600


def test_the_example_page_renders_in_chromium_without_console_errors(
    simulation, tmp_path
):
    # Arrange
    browser = _load_bench("report_browser")
    if browser.find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    _, out = simulation

    # Act
    result = browser.screenshot(out / "report.html", tmp_path / "page.png")

    # Assert
    assert result.returncode == 0 and result.console == []
    assert (tmp_path / "page.png").stat().st_size > 50_000


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
