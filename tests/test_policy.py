"""The audit policy: parsing, every rule at its boundary, verdicts in the audit."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from report_fakes import (
    client,
    conv_capacity,
    mlp_capacity,
    outcome,
    round_report,
    score,
)
from torch import nn

from fl_audit.audit import Auditor, ClientUpdate, GroundTruth
from fl_audit.config import AuditConfig
from fl_audit.errors import ConfigError
from fl_audit.policy import (
    RULE_KINDS,
    Policy,
    apply_policy,
    default_policy,
    evaluate_client,
    load_policy,
)
from fl_audit.report import ClientMetadata, RoundReport

ROOT = Path(__file__).resolve().parent.parent


def _policy(*rules: dict) -> Policy:
    return Policy.model_validate({"name": "t", "rules": list(rules)})


def _fired(policy: Policy, audit) -> list[str]:
    return [f.rule for f in evaluate_client(policy, audit).fired]


# --------------------------------------------------------------- parsing


def test_default_policy_ships_every_rule_kind_and_is_documented():
    # Arrange
    docs = (ROOT / "docs" / "reports.md").read_text()
    shipped = (ROOT / "fl_audit" / "policies" / "default.yaml").read_text()

    # Act
    policy = default_policy()

    # Assert
    assert {r.kind for r in policy.rules} == set(RULE_KINDS)
    assert policy.show_reconstructions == "simulation"
    assert shipped.strip() in docs  # docs/reports.md quotes the file as it is
    assert load_policy(None) == policy


def test_a_good_file_parses_with_every_kind_and_round_trips_as_json(tmp_path):
    # Arrange
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: board\n"
        "show_reconstructions: never\n"
        "rules:\n"
        "  - {id: exposed, kind: capacity_risk, severity: fail,"
        " levels: [exposed, partially_exposed], first_layer: [linear]}\n"
        "  - {id: psnr, kind: max_psnr, severity: warn, threshold_db: 25.5,"
        " attacks: [analytic_fc]}\n"
        "  - {id: cert, kind: certified_reconstruction, severity: fail,"
        " max_certified: 2}\n"
        "  - {id: bs, kind: batch_size_revealed, severity: warn}\n"
        "  - {id: minb, kind: min_batch_size, severity: fail, min_batch_size: 4,"
        " if_unknown: ignore}\n"
        "  - {id: failed, kind: attack_failed, severity: warn}\n"
    )

    # Act
    policy = Policy.from_yaml(path)
    (tmp_path / "p.json").write_text(policy.model_dump_json())
    again = load_policy(tmp_path / "p.json")

    # Assert
    assert [r.id for r in policy.rules] == [
        "exposed", "psnr", "cert", "bs", "minb", "failed",
    ]  # fmt: skip
    assert policy.rules[1].threshold_db == 25.5
    assert again == policy and again.sha256 == policy.sha256


def test_every_problem_of_a_bad_file_is_reported_at_once_with_its_line(tmp_path):
    # Arrange: five problems on five lines
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\n"  # 1
        "colour: red\n"  # 2 unknown top-level key
        "rules:\n"  # 3
        "  - id: a\n"  # 4
        "    kind: max_psnr\n"  # 5
        "    severity: fail\n"  # 6
        "    threshold_db: -3\n"  # 7 out of range
        "  - id: b\n"  # 8
        "    kind: no_such_rule\n"  # 9 unknown kind
        "    severity: fail\n"  # 10
        "  - id: c\n"  # 11
        "    kind: min_batch_size\n"  # 12 missing min_batch_size
        "    severity: fatal\n"  # 13 bad severity
        "    typo: 1\n"  # 14 unknown key in a rule
    )

    # Act
    with pytest.raises(ConfigError) as info:
        Policy.from_yaml(path)

    # Assert
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 6, text
    assert "colour (line 2): unknown key; allowed here: name, version" in text
    assert "threshold_db (line 7)" in text and "greater than 0" in text
    assert "rules.1 (line 8)" in text and "no_such_rule" in text
    assert "min_batch_size.min_batch_size (line 11): Field required" in text
    assert "severity (line 13)" in text and "'warn' or 'fail'" in text
    assert "typo (line 14): unknown key; allowed here: id, severity" in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "got an empty file"),
        ("- a\n- b\n", "got list"),
        ("name: [unclosed\n", "not valid YAML"),
        (
            "name: x\nrules:\n  - {id: a, kind: attack_failed, severity: warn}\n"
            "  - {id: a, kind: attack_failed, severity: fail}\n",
            "rule ids must be unique; repeated: ['a']",
        ),
        ("rules: []\n", "name: Field required"),
        ("name: x\nversion: 2\n", "version (line 2)"),
    ],
)
def test_each_kind_of_bad_file_is_a_config_error(tmp_path, text, expected):
    # Arrange
    path = tmp_path / "p.yaml"
    path.write_text(text)

    # Act
    with pytest.raises(ConfigError) as info:
        Policy.from_yaml(path)

    # Assert
    assert expected in str(info.value)


def test_an_unreadable_policy_path_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_policy(tmp_path / "missing.yaml")


# ------------------------------------------------------- rules at their boundary


def test_capacity_risk_fires_at_h_equal_b_and_not_above():
    # Arrange: h = 64 keeps a batch of 64, not one of 65
    policy = _policy(
        {"id": "fc", "kind": "capacity_risk", "severity": "fail",
         "first_layer": ["linear"]},
    )  # fmt: skip

    # Act
    at = evaluate_client(policy, client(capacity=mlp_capacity(64, 64)))
    above = evaluate_client(policy, client(capacity=mlp_capacity(64, 65)))
    conv = evaluate_client(policy, client(capacity=conv_capacity()))

    # Assert
    assert at.status == "fail"
    (finding,) = at.fired
    assert finding.bound == "fc_batch"
    assert finding.evidence["required"] == 64 and finding.evidence["actual"] == 64
    assert above.status == "pass"
    assert conv.status == "pass"  # exposed, but not a linear first layer


def test_capacity_risk_without_a_capacity_report_is_not_evaluated():
    policy = _policy({"id": "fc", "kind": "capacity_risk", "severity": "fail"})
    audit = client().model_copy(update={"capacity": None, "risk": None})

    verdict = evaluate_client(policy, audit)

    assert verdict.status == "pass"
    assert [s.rule for s in verdict.not_evaluated] == ["fc"]


def test_max_psnr_passes_at_the_threshold_and_fires_just_above():
    # Arrange
    policy = _policy(
        {"id": "p", "kind": "max_psnr", "severity": "fail", "threshold_db": 30}
    )
    at = client(attacks=[outcome(ground_truth=score(30.0))])
    above = client(attacks=[outcome(ground_truth=score(30.001, n=3))])
    no_truth = client(attacks=[outcome()])

    # Act
    v_at, v_above, v_none = (evaluate_client(policy, c) for c in (at, above, no_truth))

    # Assert
    assert v_at.status == "pass"
    assert v_above.status == "fail"
    assert v_above.fired[0].evidence["inputs_above"] == 1
    assert v_above.fired[0].evidence["num_true"] == 3
    assert v_none.status == "pass" and v_none.not_evaluated[0].rule == "p"


def test_max_psnr_only_counts_the_attacks_it_names():
    policy = _policy(
        {"id": "p", "kind": "max_psnr", "severity": "warn", "threshold_db": 30,
         "attacks": ["other"]},
    )  # fmt: skip
    audit = client(attacks=[outcome(ground_truth=score(90.0))])

    assert evaluate_client(policy, audit).not_evaluated[0].rule == "p"


def test_certified_reconstruction_fires_above_its_allowance():
    policy = _policy(
        {"id": "c", "kind": "certified_reconstruction", "severity": "fail",
         "max_certified": 2},
    )  # fmt: skip

    assert _fired(policy, client(attacks=[outcome(certified=2)])) == []
    assert _fired(policy, client(attacks=[outcome(certified=3)])) == ["c"]
    failed = client(attacks=[outcome(status="failed", certified=5)])
    assert evaluate_client(policy, failed).not_evaluated[0].rule == "c"


def test_batch_size_revealed_with_and_without_only_if_correct():
    # Arrange
    any_estimate = _policy(
        {"id": "b", "kind": "batch_size_revealed", "severity": "warn"}
    )
    correct_only = _policy(
        {"id": "b", "kind": "batch_size_revealed", "severity": "warn",
         "only_if_correct": True},
    )  # fmt: skip
    right = client(batch_size=8, attacks=[outcome(batch_size_estimate=8)])
    wrong = client(batch_size=8, attacks=[outcome(batch_size_estimate=7)])
    none = client(batch_size=8, attacks=[outcome(batch_size_estimate=None)])
    undeclared = client(batch_size=None, attacks=[outcome(batch_size_estimate=8)])

    # Act / Assert
    assert _fired(any_estimate, wrong) == ["b"]
    assert _fired(any_estimate, none) == []
    assert _fired(correct_only, right) == ["b"]
    assert evaluate_client(correct_only, right).fired[0].evidence["declared"] == 8
    assert _fired(correct_only, wrong) == []
    assert evaluate_client(correct_only, undeclared).not_evaluated[0].rule == "b"


def test_batch_size_revealed_compares_a_multi_step_update_with_its_examples():
    policy = _policy(
        {"id": "b", "kind": "batch_size_revealed", "severity": "warn",
         "only_if_correct": True},
    )  # fmt: skip
    audit = client(
        batch_size=4, local_steps=3, num_examples=12,
        attacks=[outcome(batch_size_estimate=12)],
    )  # fmt: skip

    assert _fired(policy, audit) == ["b"]


def test_min_batch_size_boundary_unknown_and_aggregates():
    # Arrange
    fire = _policy(
        {"id": "m", "kind": "min_batch_size", "severity": "fail", "min_batch_size": 8}
    )
    ignore = _policy(
        {"id": "m", "kind": "min_batch_size", "severity": "fail", "min_batch_size": 8,
         "if_unknown": "ignore"},
    )  # fmt: skip

    # Act / Assert
    assert _fired(fire, client(batch_size=8)) == []
    assert _fired(fire, client(batch_size=7)) == ["m"]
    assert _fired(fire, client(batch_size=None)) == ["m"]
    assert _fired(ignore, client(batch_size=None)) == []
    assert evaluate_client(ignore, client(batch_size=None)).not_evaluated[0].rule == "m"
    aggregate = client(batch_size=None, kind="aggregate")
    assert evaluate_client(fire, aggregate).not_evaluated[0].rule == "m"


def test_attack_failed_fires_on_a_failed_attack_and_an_unaudited_update():
    policy = _policy({"id": "f", "kind": "attack_failed", "severity": "warn"})
    failed = client(attacks=[outcome(status="failed", reason="RuntimeError: x")])
    unaudited = client(attacks=[], notes=["the update cannot be audited: bad"])
    unaudited = unaudited.model_copy(update={"capacity": None, "risk": None})

    assert _fired(policy, client()) == []
    assert evaluate_client(policy, failed).fired[0].evidence["reason"] == (
        "RuntimeError: x"
    )
    assert "cannot be audited" in evaluate_client(policy, unaudited).fired[0].message


def test_severities_combine_to_pass_warn_fail_and_the_round_takes_the_worst():
    # Arrange: warn on batch < 8, fail on more than 0 certified
    policy = _policy(
        {"id": "w", "kind": "min_batch_size", "severity": "warn", "min_batch_size": 8},
        {"id": "f", "kind": "certified_reconstruction", "severity": "fail"},
    )
    clean = client("partition-0", batch_size=8, capacity=mlp_capacity(4, 8))
    warned = client("partition-1", batch_size=2, capacity=mlp_capacity(1, 2))
    failed = client("partition-2", batch_size=8, attacks=[outcome(certified=1)])

    # Act
    judged = apply_policy(policy, round_report(1, [clean, warned, failed]))
    only_warn = apply_policy(policy, round_report(2, [clean, warned]))
    empty = apply_policy(policy, round_report(3, []))

    # Assert
    assert [c.verdict.status for c in judged.clients] == ["pass", "warn", "fail"]
    assert judged.verdict.status == "fail"
    assert judged.verdict.clients == {"pass": 1, "warn": 1, "fail": 1}
    assert judged.verdict.rules_fired == {"w": 1, "f": 1}
    assert judged.verdict.policy_sha256 == policy.sha256
    assert only_warn.verdict.status == "warn"
    assert empty.verdict.status == "pass"


# --------------------------------------------------------------- in the audit


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float):
    """One SGD step of ``model`` on (x, y): the client's new state."""
    client_model = _mlp()
    client_model.load_state_dict(model.state_dict())
    loss = nn.functional.cross_entropy(client_model(x), y)
    loss.backward()
    with torch.no_grad():
        for p in client_model.parameters():
            p -= lr * p.grad
    return {k: v.detach().numpy().copy() for k, v in client_model.state_dict().items()}


def test_the_audit_stores_verdicts_truth_and_its_policy_in_the_run_folder(
    tmp_path, digits
):
    # Arrange: one real digit, batch 1; a policy that fails above 30 dB
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "name: strict\nrules:\n"
        "  - {id: psnr, kind: max_psnr, severity: fail, threshold_db: 30}\n"
    )
    out = tmp_path / "run"
    config = AuditConfig(
        output_dir=out, allow_ground_truth=True, simulation=True, policy=policy_file
    )
    model = _mlp()
    auditor = Auditor(model, (1, 8, 8), config)
    x, y = digits.inputs[:1], digits.labels[:1]
    update = ClientUpdate(
        client="partition-0",
        node_id=7,
        client_state=_update(model, x, y, lr=0.1),
        metadata=ClientMetadata(partition_id=0, batch_size=1, local_steps=1, lr=0.1),
        metadata_from_client=True,
        ground_truth=GroundTruth(inputs=x, labels=y),
    )
    global_state = {k: v.numpy().copy() for k, v in model.state_dict().items()}

    # Act
    auditor.audit_round(1, global_state, [update])

    # Assert
    stored = RoundReport.model_validate_json((out / "round-0001.json").read_text())
    (c,) = stored.clients
    assert stored.verdict.status == "fail" and stored.verdict.policy == "strict"
    assert c.verdict.fired[0].evidence["max_psnr"] > 30
    truth = out / c.ground_truth_file
    assert stat.S_IMODE(truth.stat().st_mode) == 0o600
    with np.load(truth) as data:
        np.testing.assert_array_equal(data["inputs"], x.numpy())
    assert json.loads((out / "policy.json").read_text())["name"] == "strict"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][0]["verdict"] == "fail"


def test_the_audit_keeps_no_truth_when_ground_truth_is_not_allowed(tmp_path, digits):
    out = tmp_path / "run"
    model = _mlp()
    auditor = Auditor(model, (1, 8, 8), AuditConfig(output_dir=out))
    x, y = digits.inputs[:1], digits.labels[:1]
    update = ClientUpdate(
        client="partition-0",
        node_id=7,
        client_state=_update(model, x, y, lr=0.1),
        metadata=ClientMetadata(partition_id=0, batch_size=1, local_steps=1, lr=0.1),
        metadata_from_client=True,
        ground_truth=GroundTruth(inputs=x, labels=y),
    )
    global_state = {k: v.numpy().copy() for k, v in model.state_dict().items()}

    report = auditor.audit_round(1, global_state, [update])

    assert report.clients[0].ground_truth_file is None
    assert not list(out.glob("round-0001/*.truth.npz"))
    assert report.verdict.policy == default_policy().name


def test_a_bad_policy_path_fails_when_the_auditor_is_built(tmp_path):
    config = AuditConfig(output_dir=tmp_path, policy=tmp_path / "nope.yaml")

    with pytest.raises(ConfigError, match="nope.yaml"):
        Auditor(_mlp(), (1, 8, 8), config)
