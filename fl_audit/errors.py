"""The exceptions fl-audit raises, grouped by what the user has to do.

::

    FLAuditError                     every error raised on purpose by fl-audit
    ├── InvalidInputError (ValueError)   fix the data handed in
    │   ├── GradientError                gradients/updates: names, shapes, NaN/Inf
    │   ├── ShapeError                   input shape does not fit the model
    │   └── ConfigError                  an audit config (YAML, run config) is bad
    ├── UnsupportedModelError            the model is outside what an attack or
    │                                    bound covers: choose another attack
    ├── UnknownAttackError (KeyError)    a registry name that is not registered
    └── AttackFailedError                an attack ran and could not finish

Messages name the thing that is wrong, the value received and the fix.
``InvalidInputError`` collects every problem it found before raising, so a
user fixes a bad gradient dict in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable


class FLAuditError(Exception):
    """Base class of every error fl-audit raises on purpose."""


class InvalidInputError(FLAuditError, ValueError):
    """Data handed to fl-audit is malformed; ``problems`` lists every issue."""

    def __init__(self, what: str, problems: Iterable[str]) -> None:
        self.what = what
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s)\n{lines}")


class GradientError(InvalidInputError):
    """Gradients or model updates do not match the model, or are not finite."""


class ShapeError(InvalidInputError):
    """An input shape that the model cannot take."""


class ConfigError(InvalidInputError):
    """An audit configuration with problems; each names its key (and line)."""


class UnsupportedModelError(FLAuditError):
    """The model's structure is outside what this attack or bound handles."""


class UnknownAttackError(FLAuditError, KeyError):
    """No attack is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class AttackFailedError(FLAuditError):
    """An attack could not complete on a valid target."""
