"""AuditConfig: Python, YAML and Flower run config."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_audit import AuditConfig, ConfigError
from fl_audit.config import ClientSelection


def test_defaults_run_the_analytic_attack():
    cfg = AuditConfig()
    assert [a.name for a in cfg.attacks] == ["analytic_fc"]
    assert not cfg.allow_ground_truth and not cfg.simulation


def test_yaml_with_names_and_options(tmp_path: Path):
    path = tmp_path / "audit.yaml"
    path.write_text(
        "output_dir: out\n"
        "attacks:\n"
        "  - analytic_fc\n"
        "  - name: analytic_fc\n"
        "    options: {max_peel_rounds: 3}\n"
        "clients: {partitions: [0, 2]}\n"
        "input_range: [0, 1]\n"
    )
    cfg = AuditConfig.from_yaml(path)
    assert cfg.output_dir == Path("out")
    assert cfg.attacks[1].options == {"max_peel_rounds": 3}
    assert cfg.clients.partitions == [0, 2]
    assert cfg.input_range == (0.0, 1.0)


def test_bad_yaml_reports_every_problem_with_its_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "attacks:\n"
        "  - nope\n"
        "  - name: analytic_fc\n"
        "    options: {colour: red}\n"
        "clients: {count: 0}\n"
        "output_dri: x\n"
    )
    with pytest.raises(ConfigError) as info:
        AuditConfig.from_yaml(path)
    problems = info.value.problems
    assert len(problems) == 4
    text = "\n".join(problems)
    assert "attacks.0.name (line 2)" in text and "no attack named 'nope'" in text
    assert "attacks.1 (line 3)" in text and "colour" in text
    assert "clients.count (line 5)" in text
    assert "output_dri (line 6)" in text and "unknown key" in text


@pytest.mark.parametrize("text", ["[1, 2]\n", "a: [unclosed\n"])
def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path: Path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        AuditConfig.from_yaml(path)


def test_missing_file_names_the_path(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        AuditConfig.from_yaml(tmp_path / "absent.yaml")


def test_run_config_keys_under_audit(tmp_path: Path):
    run_config = {
        "lr": 0.1,
        "audit.output-dir": str(tmp_path),
        "audit.attacks": "analytic_fc",
        "audit.allow-ground-truth": True,
        "audit.clients.count": 2,
        "audit.input-range": "0,1",
        "audit.send-ground-truth": True,  # a client key, ignored here
    }
    cfg = AuditConfig.from_run_config(run_config)
    assert cfg.output_dir == tmp_path and cfg.allow_ground_truth
    assert cfg.clients.count == 2 and cfg.input_range == (0.0, 1.0)


def test_run_config_file_is_read_then_overridden(tmp_path: Path):
    path = tmp_path / "audit.yaml"
    path.write_text("simulation: true\nnum_classes: 4\n")
    cfg = AuditConfig.from_run_config(
        {"audit.config-file": str(path), "audit.num-classes": 7}
    )
    assert cfg.simulation and cfg.num_classes == 7


def test_bad_run_config_names_the_key():
    with pytest.raises(ConfigError, match="allow_ground_truth"):
        AuditConfig.from_run_config({"audit.allow-ground-truth": "perhaps"})


def test_client_selection_is_reproducible_and_explains_skips():
    clients = [(f"partition-{i}", i) for i in range(10)] + [("node-7", None)]
    sel = ClientSelection(partitions=[1, 2, 3, 4], count=2, seed=3)
    kept, skipped = sel.select(5, clients)
    again, _ = sel.select(5, clients)
    assert kept == again and len(kept) == 2
    assert set(kept) <= {f"partition-{i}" for i in (1, 2, 3, 4)}
    assert "no partition id" in skipped["node-7"]
    assert sum("not sampled" in r for r in skipped.values()) == 2
    with pytest.raises(ValueError):
        ClientSelection(count=2, fraction=0.5)


def test_a_probe_is_read_from_the_run_config_and_from_yaml(tmp_path):
    # Arrange
    yaml_file = tmp_path / "audit.yaml"
    yaml_file.write_text("probe:\n  kind: fashion_mnist\n  count: 4\n")

    # Act
    from_run = AuditConfig.from_run_config(
        {"audit.probe.kind": "ecg", "audit.probe.seed": 3}
    )
    from_yaml = AuditConfig.from_yaml(yaml_file)

    # Assert
    assert from_run.probe is not None
    assert (from_run.probe.kind, from_run.probe.count, from_run.probe.seed) == (
        "ecg",
        8,
        3,
    )
    assert from_yaml.probe is not None and from_yaml.probe.count == 4
