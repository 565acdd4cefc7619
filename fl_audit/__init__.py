"""fl-audit: a privacy audit of Flower federated learning.

It runs gradient-inversion attacks on every client update and holds what
they recover against what the model's architecture lets leak.
"""

from fl_audit.core import AttackResult, AttackTarget
from fl_audit.errors import (
    AttackFailedError,
    ConfigError,
    FLAuditError,
    GradientError,
    InvalidInputError,
    ShapeError,
    UnknownAttackError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

from fl_audit.config import AuditConfig  # noqa: E402  (its validators need the registry)

__all__ = [
    "AttackFailedError",
    "AttackResult",
    "AttackTarget",
    "AuditConfig",
    "ConfigError",
    "FLAuditError",
    "GradientError",
    "InvalidInputError",
    "ShapeError",
    "UnknownAttackError",
    "UnsupportedModelError",
    "__version__",
]
