"""Pieces both Flower wrappers share: the audit session, config loading,
ground truth, secure-aggregation detection, DP settings."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fl_audit._logging import logger
from fl_audit.attacks.base import Attack
from fl_audit.audit import (
    QUICK_DIGEST_BYTES,
    Auditor,
    ClientUpdate,
    GroundTruth,
    LazyArrays,
    fingerprint_of,
)
from fl_audit.config import AuditConfig
from fl_audit.errors import ConfigError
from fl_audit.replay import CaptureWriter
from fl_audit.report import ClientMetadata, FailedReply, PrivacySettings, RoundReport


def load_config(
    config: AuditConfig | Mapping[str, Any] | str | Path | None,
    attacks: Sequence[str | Mapping[str, Any] | Attack] | None,
) -> tuple[AuditConfig, list[Attack] | None]:
    """The audit config, with ``attacks`` (names, specs or instances) applied."""
    if config is None:
        cfg = AuditConfig()
    elif isinstance(config, AuditConfig):
        cfg = config
    elif isinstance(config, str | Path):
        cfg = AuditConfig.from_yaml(config)
    elif isinstance(config, Mapping):
        cfg = AuditConfig.from_mapping(config)
    else:
        raise ConfigError(
            "config",
            [
                "expected an AuditConfig, a mapping or a YAML path, got "
                f"{type(config).__name__}"
            ],
        )
    if attacks is None:
        return cfg, None
    if isinstance(attacks, str):
        attacks = [attacks]
    if all(isinstance(a, Attack) for a in attacks):
        return cfg, list(attacks)  # type: ignore[arg-type]
    if any(isinstance(a, Attack) for a in attacks):
        raise ConfigError(
            "attacks", ["give either Attack instances or registry names, not both"]
        )
    merged = AuditConfig.from_mapping(
        {**cfg.model_dump(exclude={"attacks"}), "attacks": list(attacks)},
        source="attacks",
    )
    return merged, None


def truth_from_arrays(
    arrays: Mapping[str, np.ndarray],
) -> tuple[GroundTruth | None, list[str]]:
    """Ground truth from the client's ``inputs``/``labels`` arrays."""
    if "inputs" not in arrays:
        return None, ["ground truth record without 'inputs' ignored"]
    inputs = torch.from_numpy(np.array(arrays["inputs"], dtype=np.float64))
    labels = None
    if "labels" in arrays:
        labels = torch.from_numpy(np.asarray(arrays["labels"]).astype(np.int64))
        if labels.numel() != inputs.shape[0]:
            return GroundTruth(inputs), [
                f"{labels.numel()} ground-truth labels for {inputs.shape[0]} inputs: "
                "labels ignored"
            ]
    return GroundTruth(inputs, labels), []


def aggregate_update(
    updates: list[ClientUpdate],
) -> tuple[list[ClientUpdate], bool, list[str]]:
    """Detect secure aggregation: every client carrying the same arrays.

    Under SecAgg(+) each result holds the aggregate, not the client's own
    model. The clients are then audited once, as one aggregate whose
    distinct examples are the sum of theirs.
    """
    if len(updates) < 2 or not all(u.client_state for u in updates):
        return updates, False, []
    quick = {_fingerprint(u.client_state, quick=True) for u in updates}
    if len(quick) != 1:
        return updates, False, []  # told apart by their first bytes
    prints = {_fingerprint(u.client_state) for u in updates}
    if len(prints) != 1:
        return updates, False, []
    first = updates[0].client_state

    examples = [u.metadata.num_examples for u in updates]
    total = sum(e for e in examples if e) if all(examples) else None
    merged = ClientUpdate(
        client="aggregate",
        node_id=None,
        client_state=first,
        metadata=ClientMetadata(num_examples=total),
        metadata_from_client=all(u.metadata_from_client for u in updates),
        kind="aggregate",
        notes=[
            f"secure aggregation: all {len(updates)} results carry the same "
            "arrays; only their aggregate is visible and it is audited once"
        ],
    )
    note = (
        f"secure aggregation detected: {len(updates)} clients "
        f"({', '.join(u.client for u in updates)}) audited as one aggregate"
    )
    return [merged], True, [note]


def _fingerprint(state: Mapping[str, np.ndarray], quick: bool = False) -> str:
    """The state's digest; ``quick`` reads only each array's first bytes."""
    if isinstance(state, LazyArrays):
        if quick and state.quick is not None:
            return state.quick
        return state.fingerprint
    return fingerprint_of(
        (k.encode() + np.ascontiguousarray(v).tobytes() for k, v in state.items()),
        QUICK_DIGEST_BYTES if quick else None,
    )


class BackgroundAudits:
    """Rounds audited on one background thread, in the order they came.

    ``submit`` returns at once; ``wait`` blocks (bounded) until every round
    submitted so far is reported. A round whose audit raises is logged; the
    thread goes on with the next.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fl-audit-round")
        self._futures: dict[int, Future[None]] = {}
        self._lock = threading.Lock()

    def submit(self, server_round: int, fn: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                fn()
            except Exception:
                logger.exception(
                    "fl-audit: the audit of round %d failed; training goes on",
                    server_round,
                )

        with self._lock:
            self._futures[server_round] = self._pool.submit(guarded)

    def pending(self) -> list[int]:
        """Rounds whose audit has not finished."""
        with self._lock:
            return sorted(r for r, f in self._futures.items() if not f.done())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every submitted round; False if some are still running."""
        with self._lock:
            futures = list(self._futures.values())
        _, not_done = futures_wait(futures, timeout=timeout)
        if not_done:
            logger.warning(
                "fl-audit: %d round(s) still being audited after %s s: %s",
                len(not_done),
                timeout,
                self.pending(),
            )
        return not not_done

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def privacy_of(strategy: object) -> PrivacySettings | None:
    """DP settings of Flower's DP wrappers anywhere in the strategy chain.

    Flower's fixed- and adaptive-clipping wrappers (server- or client-side
    clipping) hold ``noise_multiplier`` and ``clipping_norm`` (the adaptive
    ones the initial norm) and add the noise to the aggregate.
    """
    seen = 0
    while strategy is not None and seen < 16:
        noise = getattr(strategy, "noise_multiplier", None)
        clip = getattr(strategy, "clipping_norm", None)
        if clip is None:
            clip = getattr(strategy, "initial_clipping_norm", None)
        if (
            isinstance(noise, int | float)
            and isinstance(clip, int | float)
            and clip > 0
        ):
            sampled = getattr(strategy, "num_sampled_clients", None)
            return PrivacySettings(
                mechanism=type(strategy).__name__,
                noise_multiplier=float(noise),
                clipping_norm=float(clip),
                num_sampled_clients=sampled if isinstance(sampled, int) else None,
                noise_on="aggregate",
            )
        strategy = getattr(strategy, "strategy", None)
        seen += 1
    return None


class AuditSession:
    """What both Flower wrappers share: the auditor, where rounds run, captures.

    A wrapper turns its replies into :class:`ClientUpdate` objects and calls
    :meth:`submit`; the session detects secure aggregation, captures the
    round when asked to, and audits it inline or on the background thread.
    """

    def __init__(
        self,
        strategy: object,
        model: nn.Module,
        input_shape: Sequence[int],
        config: AuditConfig | Mapping[str, Any] | str | Path | None,
        attacks: Sequence[str | Mapping[str, Any] | Attack] | None,
    ) -> None:
        cfg, instances = load_config(config, attacks)
        self.config = cfg
        self.auditor = Auditor(
            model,
            input_shape,
            cfg,
            attacks=instances,
            strategy_name=type(strategy).__name__,
        )
        detected = privacy_of(strategy)
        if detected is not None and cfg.privacy is None:
            self.auditor.privacy = detected
        self.reports: dict[int, RoundReport] = {}
        self._background = BackgroundAudits() if cfg.runs_in_background else None
        self._capture = (
            None
            if cfg.capture_dir is None
            else CaptureWriter(cfg.capture_dir, input_shape, type(model).__name__)
        )

    def defer(self, server_round: int, work: Callable[[], None]) -> None:
        """Run a round's audit work now, or queue it on the background thread.

        A wrapper hands over everything after the inner strategy's aggregate
        (reading the replies, fingerprints, capture, attacks), so that with a
        background audit ``aggregate_train`` costs the training loop nothing
        per client. ``work`` must not read state that the next round changes.
        """
        if self._background is None:
            work()
        else:
            self._background.submit(server_round, work)

    def submit(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        updates: list[ClientUpdate],
        *,
        train_config: Mapping[str, Any],
        failed: Sequence[FailedReply],
        started: datetime,
    ) -> None:
        """Audit one round's updates on the calling thread (see :meth:`defer`)."""
        updates, aggregate_only, notes = aggregate_update(updates)
        if self._capture is not None:
            try:
                self._capture.write_round(
                    server_round,
                    global_state,
                    updates,
                    train_config=train_config,
                    failed=failed,
                    aggregate_only=aggregate_only,
                    notes=notes,
                    keep_ground_truth=self.config.allow_ground_truth,
                )
            except OSError as exc:
                logger.warning("fl-audit: round %d not captured: %s", server_round, exc)

        self.reports[server_round] = self.auditor.audit_round(
            server_round,
            global_state,
            updates,
            train_config=train_config,
            failed=failed,
            aggregate_only=aggregate_only,
            started_at=started,
            notes=notes,
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every round submitted so far is reported (bounded)."""
        return True if self._background is None else self._background.wait(timeout)
