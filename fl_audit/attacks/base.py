"""The attack plugin interface.

An attack is a subclass of :class:`Attack` with one required method,
:meth:`Attack.run`, and a cheap :meth:`Attack.applicability` check the audit
calls first. Register it with :func:`fl_audit.attacks.register_attack` or
through the ``fl_audit.attacks`` entry-point group; see docs/attacks.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from fl_audit.core import AttackResult, AttackTarget


@dataclass(frozen=True)
class Applicability:
    """Whether an attack applies to a target, and why (not)."""

    applies: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.applies


class Attack(ABC):
    """Base class of every gradient-inversion attack.

    Subclasses set ``name`` (the registry key), take their options as
    keyword arguments of ``__init__`` and implement :meth:`run`. ``run`` may
    raise :class:`~fl_audit.errors.UnsupportedModelError` for targets that
    :meth:`applicability` rejects; the audit never calls it on those.
    """

    name: ClassVar[str] = ""

    def applicability(self, target: AttackTarget) -> Applicability:
        """Cheap check, without running the attack. Default: always applies."""
        return Applicability(True)

    @abstractmethod
    def run(self, target: AttackTarget) -> AttackResult:
        """Attack ``target`` and report what was recovered."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
