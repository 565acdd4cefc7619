"""The Flower wrappers: :class:`AuditStrategy` for the Message API and
:class:`LegacyAuditStrategy` for ``flwr.server.strategy`` (and secure
aggregation)."""

from fl_audit.strategies.legacy import LegacyAuditStrategy
from fl_audit.strategies.message import AuditStrategy

__all__ = ["AuditStrategy", "LegacyAuditStrategy"]
