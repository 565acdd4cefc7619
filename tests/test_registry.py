"""The attack registry: decorator, entry points, errors that list names."""

from __future__ import annotations

import pytest

from fl_audit.attacks import (
    AnalyticFCInversion,
    Attack,
    available_attacks,
    create_attack,
    get_attack,
    register_attack,
    registry,
)
from fl_audit.errors import FLAuditError, InvalidInputError, UnknownAttackError


def test_analytic_fc_is_registered():
    assert get_attack("analytic_fc") is AnalyticFCInversion
    assert "analytic_fc" in available_attacks()


def test_unknown_name_lists_registered_attacks():
    with pytest.raises(UnknownAttackError, match="registered: .*analytic_fc"):
        get_attack("dlg_typo")


def test_create_attack_rejects_unknown_options():
    with pytest.raises(InvalidInputError, match="unknown option.*'rounds'"):
        create_attack("analytic_fc", rounds=3)
    attack = create_attack("analytic_fc", max_peel_rounds=3)
    assert attack.max_peel_rounds == 3


def test_duplicate_name_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Other(Attack):
        def run(self, target):  # pragma: no cover - never run
            raise NotImplementedError

    with pytest.raises(FLAuditError, match="taken by"):
        register_attack("analytic_fc")(Other)


def test_entry_points_register_plugins(monkeypatch):
    # Arrange: a fake entry point naming a plugin class
    class Plugin(Attack):
        def run(self, target):  # pragma: no cover - never run
            raise NotImplementedError

    class FakeEntryPoint:
        name, value = "my_plugin", "pkg:Plugin"

        def load(self):
            return Plugin

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [FakeEntryPoint()])

    # Act / Assert
    assert get_attack("my_plugin") is Plugin
    assert Plugin.name == "my_plugin"


def test_non_attack_classes_are_refused():
    with pytest.raises(FLAuditError, match="not a subclass"):
        register_attack("thing")(dict)
