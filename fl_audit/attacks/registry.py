"""Registry of attacks by name, filled by a decorator and by entry points.

Third-party packages add attacks by declaring them in the
``fl_audit.attacks`` entry-point group::

    [project.entry-points."fl_audit.attacks"]
    my_attack = "my_pkg.attacks:MyAttack"

Entry points are loaded on the first lookup of a name that is not yet
registered, so importing fl-audit stays cheap.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from fl_audit._logging import logger
from fl_audit.attacks.base import Attack
from fl_audit.errors import FLAuditError, InvalidInputError, UnknownAttackError

ENTRY_POINT_GROUP = "fl_audit.attacks"
_REGISTRY: dict[str, type[Attack]] = {}
_entry_points_loaded = False

A = TypeVar("A", bound=type[Attack])


def register_attack(name: str) -> Callable[[A], A]:
    """Class decorator: register an :class:`Attack` subclass under ``name``.

    Registering a different class under a taken name raises
    :class:`~fl_audit.errors.FLAuditError`; registering the same class twice
    is a no-op.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidInputError(
            "attack name",
            [f"must be a Python identifier such as 'analytic_fc', got {name!r}"],
        )

    def decorate(cls: A) -> A:
        if not (inspect.isclass(cls) and issubclass(cls, Attack)):
            raise FLAuditError(
                f"register_attack({name!r}) decorates {cls!r}, "
                "which is not a subclass of fl_audit.attacks.Attack"
            )
        known = _REGISTRY.get(name)
        if known is not None and known is not cls:
            raise FLAuditError(
                f"attack name {name!r} is taken by "
                f"{known.__module__}.{known.__qualname__}; "
                f"register {cls.__qualname__} under another name"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break the audit
            logger.warning(
                "attack entry point %r (%s) failed to load: %s", ep.name, ep.value, exc
            )
            continue
        if ep.name not in _REGISTRY:
            try:
                register_attack(ep.name)(cls)
            except FLAuditError as exc:
                logger.warning("attack entry point %r skipped: %s", ep.name, exc)


def available_attacks() -> list[str]:
    """Names of every registered attack, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_attack(name: str) -> type[Attack]:
    """The attack class registered under ``name``."""
    if name not in _REGISTRY:
        _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownAttackError(
            f"no attack named {name!r}; registered: {', '.join(available_attacks())}"
        ) from None


def create_attack(name: str, **options: Any) -> Attack:
    """Instantiate the attack ``name`` with its options.

    Raises :class:`~fl_audit.errors.InvalidInputError` naming the options the
    attack does not take.
    """
    cls = get_attack(name)
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(options) - set(accepted) - {"self"})
    if unknown and not takes_any:
        known = sorted(k for k in accepted if k != "self")
        raise InvalidInputError(
            f"options of attack {name!r}",
            [f"unknown option(s) {unknown}; {cls.__name__} takes {known}"],
        )
    return cls(**options)
