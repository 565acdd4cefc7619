"""The one ``fl_audit`` logger every module logs through."""

from __future__ import annotations

import logging

logger = logging.getLogger("fl_audit")
logger.addHandler(logging.NullHandler())
