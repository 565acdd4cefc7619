"""Tests for the fl-audit command line (``fl_audit.cli``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fl_audit.cli import main

MODELS = textwrap.dedent(
    """
    from torch import nn

    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(),
                             nn.Linear(16, 10))

    def cnn():
        return nn.Sequential(nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 14 * 14, 10))

    def embedding():
        return nn.Sequential(nn.Embedding(10, 4))

    def broken():
        raise RuntimeError("checkpoint missing\\nsecond line")

    def not_a_model():
        return 42

    class Nested:
        make = staticmethod(mlp)

    instance = mlp()
    NUMBER = 3
    """
)


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``cli_models`` importable from the current directory."""
    path = tmp_path / "cli_models.py"
    path.write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cli_models", None)
    return path


def _bounds(*extra: str, model: str = "cli_models:mlp") -> list[str]:
    return ["bounds", "--model", model, *extra]


def test_bounds_table_for_an_mlp(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Act
    code = main(_bounds("--input-shape", "1,28,28", "--batch-size", "17"))

    # Assert
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert "first layer  1 (Linear, linear) in (784,) out (16,)" in out
    assert "fc_batch" in out and "h >= B" in out
    assert "risk: PARTIALLY_EXPOSED - h = 16 < a batch of B = 17" in out


def test_bounds_json_for_a_cnn(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        _bounds(
            "--input-shape",
            "1,28,28",
            "--batch-size",
            "32",
            "--json",
            model="cli_models:cnn",
        )
    )

    out, _ = capsys.readouterr()
    data = json.loads(out)
    assert code == 0
    assert data["risk"] == "exposed"
    by_name = {v["name"]: v for v in data["verdicts"]}
    assert by_name["conv_per_sample"]["required"] == 4
    assert by_name["conv_seed_v1"]["required"] == 128
    assert by_name["conv_seed_v1"]["actual"] == 8
    assert by_name["conv_seed_v1"]["holds"] is False
    assert by_name["conv_exact_rank"]["actual"] == 784


def test_bounds_probe_data_adds_the_relu_rank(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Act: 8 filters of stride 2 behind a ReLU, probed with real images.
    code = main(
        _bounds(
            "--input-shape",
            "1,28,28",
            "--probe-data",
            "fashion_mnist",
            "--probe-count",
            "2",
            "--json",
            model="cli_models:cnn",
        )
    )

    # Assert
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    relu = {v["name"]: v for v in data["verdicts"]}["conv_exact_rank_relu"]
    assert relu["quantities"]["probes"] == 2
    assert len(relu["quantities"]["probe_ranks"]) == 2
    assert relu["holds"] is (relu["actual"] == 784)


def test_bounds_probe_data_of_the_wrong_shape_is_one_line(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        _bounds(
            "--input-shape",
            "1,28,28",
            "--probe-data",
            "photos",
            "--probe-count",
            "1",
            model="cli_models:cnn",
        )
    )

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "probe 'photos'" in err and "3 channel(s), the model takes 1" in err


def test_bounds_local_examples_and_file_path(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        _bounds(
            "--input-shape",
            "784",
            "--batch-size",
            "8",
            "--local-examples",
            "500",
            "--json",
            model=f"{models}:Nested.make",
        )
    )

    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["local_examples"] == 500
    assert data["verdicts"][-1]["name"] == "fc_fedavg"
    assert data["verdicts"][-1]["holds"] is False


def test_bounds_accepts_a_module_instance(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        _bounds("--input-shape", "1x28x28", "--json", model="cli_models:instance")
    )

    assert code == 0
    assert json.loads(capsys.readouterr().out)["input_shape"] == [1, 28, 28]


def test_unsupported_first_layer_is_a_report_not_an_error(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_bounds("--input-shape", "5", model="cli_models:embedding"))

    out = capsys.readouterr().out
    assert code == 0
    assert "unsupported_first_layer" in out
    assert "risk: UNSUPPORTED" in out and "0 (Embedding)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            _bounds("--input-shape", "1,28,28", model="nowhere_module:f"),
            "cannot import module 'nowhere_module'",
        ),
        (
            _bounds("--input-shape", "1,28,28", model="cli_models:missing"),
            "has no attribute 'missing'",
        ),
        (
            _bounds("--input-shape", "1,28,28", model="cli_models"),
            "expected MODULE:FACTORY",
        ),
        (
            _bounds("--input-shape", "1,28,28", model="no/such/file.py:f"),
            "no such file",
        ),
        (
            _bounds("--input-shape", "1,28,28", model="cli_models:broken"),
            "the factory raised RuntimeError: checkpoint missing",
        ),
        (
            _bounds("--input-shape", "1,28,28", model="cli_models:not_a_model"),
            "returned a int",
        ),
        (
            _bounds("--input-shape", "1,28,28", model="cli_models:NUMBER"),
            "is a int, not a callable",
        ),
        (_bounds("--input-shape", "1,a,28"), "'1,a,28' is not a shape"),
        (_bounds("--input-shape", "0,28,28"), "is not a shape"),
        (_bounds("--input-shape", "1,27,27"), "expects 784 features"),
        (_bounds("--input-shape", "3,28,28", model="cli_models:cnn"), "cannot take"),
        (
            _bounds("--input-shape", "784", "--batch-size", "0"),
            "expected an integer >= 1, got '0'",
        ),
        (
            _bounds(
                "--input-shape", "784", "--batch-size", "64", "--local-examples", "8"
            ),
            "swapped",
        ),
        (["bounds", "--input-shape", "784"], "--model"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    models: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(argv)

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert message in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bounds", "--help"]) == 0
    assert "MODULE:FACTORY" in capsys.readouterr().out


def test_console_script_runs(models: Path) -> None:
    # Arrange: the installed entry point next to this interpreter.
    script = Path(sys.executable).parent / "fl-audit"
    if not script.exists():
        pytest.skip("fl-audit is not installed (pip install -e .)")

    # Act
    ok = subprocess.run(
        [
            str(script),
            *_bounds("--input-shape", "1,28,28", "--batch-size", "4", "--json"),
        ],
        capture_output=True,
        text=True,
        cwd=models.parent,
        timeout=120,
    )
    bad = subprocess.run(
        [str(script), *_bounds("--input-shape", "1,28", model="cli_models:cnn")],
        capture_output=True,
        text=True,
        cwd=models.parent,
        timeout=120,
    )

    # Assert
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["verdicts"][1]["holds"] is True
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("fl-audit bounds: error: input_shape")
