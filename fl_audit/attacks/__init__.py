"""Gradient-inversion attacks: the plugin interface, the registry and the
attacks fl-audit ships. Nothing here imports Flower."""

from fl_audit.attacks.analytic_fc import AnalyticFCInversion
from fl_audit.attacks.base import Applicability, Attack
from fl_audit.attacks.conv_inversion import (
    ConvInversion,
    ConvInversionResult,
    LayerSolve,
)
from fl_audit.attacks.dlg import DLGBaseline
from fl_audit.attacks.prior_guided import PriorGuidedReconstruction
from fl_audit.attacks.registry import (
    available_attacks,
    create_attack,
    get_attack,
    register_attack,
)
from fl_audit.core import AttackResult, AttackTarget

__all__ = [
    "AnalyticFCInversion",
    "Applicability",
    "Attack",
    "AttackResult",
    "AttackTarget",
    "DLGBaseline",
    "PriorGuidedReconstruction",
    "ConvInversion",
    "ConvInversionResult",
    "LayerSolve",
    "available_attacks",
    "create_attack",
    "get_attack",
    "register_attack",
]
