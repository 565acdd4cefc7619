"""Capture client updates during a run, and audit them again later.

With ``capture_dir`` set, the audit writes what it saw each round::

    capture/
        manifest.json                  input shape, model, fl-audit version
        round-0001/
            round.json                 train config, failed replies, notes
            global.npz                 the global arrays sent to clients
            partition-3.npz            a client's arrays (+ ground truth, if
            partition-3.json           allowed) and what it said about itself

Every file is owner-readable only (mode 0600): updates and ground truth are
the clients' data. :func:`replay` (and ``fl-audit replay``) audits a capture
with any audit config, producing the same reports as a live audit.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fl_audit import __version__
from fl_audit._logging import logger
from fl_audit.audit import Auditor, ClientUpdate, GroundTruth, parse_metadata
from fl_audit.config import AuditConfig
from fl_audit.errors import InvalidInputError
from fl_audit.report import FailedReply, RoundReport

__all__ = ["CaptureWriter", "CapturedRound", "load_capture", "replay"]

_PRIVATE = 0o600


@dataclass
class CapturedRound:
    """One round read back from a capture."""

    server_round: int
    global_state: dict[str, np.ndarray]
    updates: list[ClientUpdate]
    train_config: dict[str, Any] = field(default_factory=dict)
    failed: list[FailedReply] = field(default_factory=list)
    aggregate_only: bool = False
    notes: list[str] = field(default_factory=list)


class CaptureWriter:
    """Writes each round's updates into a capture folder (owner-only files).

    Raises
    ------
    InvalidInputError
        If the folder cannot be created or written (at construction).
    """

    def __init__(
        self, folder: str | Path, input_shape: Sequence[int], model: str
    ) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            os.chmod(self.folder, 0o700)
            manifest = {
                "fl_audit_version": __version__,
                "input_shape": [int(s) for s in input_shape],
                "model": model,
            }
            _write_private(self.folder / "manifest.json", json.dumps(manifest).encode())
        except OSError as exc:
            raise InvalidInputError(
                "capture_dir",
                [
                    f"{str(self.folder)!r} cannot be written ({exc.strerror or exc}); "
                    "choose a folder you can write to"
                ],
            ) from None

    def write_round(
        self,
        server_round: int,
        global_state: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        *,
        train_config: Mapping[str, Any],
        failed: Sequence[FailedReply],
        aggregate_only: bool,
        notes: Sequence[str],
        keep_ground_truth: bool,
    ) -> Path:
        """Write one round; returns its folder."""
        folder = self.folder / f"round-{server_round:04d}"
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o700)
        _write_npz(
            folder / "global.npz", {k: np.asarray(v) for k, v in global_state.items()}
        )
        for update in updates:
            arrays = {
                f"state/{k}": np.asarray(v) for k, v in update.client_state.items()
            }
            truth = update.ground_truth
            if keep_ground_truth and truth is not None:
                arrays["truth/inputs"] = truth.inputs.numpy()
                if truth.labels is not None:
                    arrays["truth/labels"] = truth.labels.numpy()
            _write_npz(folder / f"{update.client}.npz", arrays)
            description = {
                "client": update.client,
                "node_id": update.node_id,
                "kind": update.kind,
                "metadata": update.metadata.model_dump(mode="json"),
                "metadata_from_client": update.metadata_from_client,
                "notes": update.notes,
            }
            _write_private(
                folder / f"{update.client}.json", json.dumps(description).encode()
            )
        round_info = {
            "round": server_round,
            "train_config": _jsonable(train_config),
            "failed": [f.model_dump(mode="json") for f in failed],
            "aggregate_only": aggregate_only,
            "notes": list(notes),
            "clients": [u.client for u in updates],
        }
        # Written last: a round folder without round.json is incomplete.
        _write_private(folder / "round.json", json.dumps(round_info).encode())
        return folder


def load_capture(folder: str | Path) -> tuple[dict[str, Any], Iterator[CapturedRound]]:
    """The manifest and the complete rounds of a capture, in order.

    Raises
    ------
    InvalidInputError
        If ``folder`` is not a capture (no ``manifest.json``).
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            "capture folder",
            [
                f"{str(folder)!r} has no readable manifest.json ({exc}); pass the "
                "folder given as capture_dir"
            ],
        ) from None

    def rounds() -> Iterator[CapturedRound]:
        for round_dir in sorted(folder.glob("round-*")):
            info_file = round_dir / "round.json"
            if not info_file.exists():
                logger.warning("fl-audit replay: %s is incomplete, skipped", round_dir)
                continue
            yield _read_round(round_dir, json.loads(info_file.read_text()))

    return manifest, rounds()


def _read_round(folder: Path, info: dict[str, Any]) -> CapturedRound:
    with np.load(folder / "global.npz", allow_pickle=False) as data:
        global_state = {k: data[k] for k in data.files}
    updates = []
    for client in info["clients"]:
        description = json.loads((folder / f"{client}.json").read_text())
        with np.load(folder / f"{client}.npz", allow_pickle=False) as data:
            state = {k[6:]: data[k] for k in data.files if k.startswith("state/")}
            truth = None
            if "truth/inputs" in data.files:
                labels = data["truth/labels"] if "truth/labels" in data.files else None
                truth = GroundTruth(
                    torch.from_numpy(data["truth/inputs"]),
                    None if labels is None else torch.from_numpy(labels),
                )
        metadata, _ = parse_metadata(description["metadata"])
        updates.append(
            ClientUpdate(
                client=description["client"],
                node_id=description["node_id"],
                client_state=state,
                metadata=metadata,
                metadata_from_client=description["metadata_from_client"],
                ground_truth=truth,
                kind=description["kind"],
                notes=list(description["notes"]),
            )
        )
    return CapturedRound(
        server_round=int(info["round"]),
        global_state=global_state,
        updates=updates,
        train_config=dict(info["train_config"]),
        failed=[FailedReply.model_validate(f) for f in info["failed"]],
        aggregate_only=bool(info["aggregate_only"]),
        notes=list(info["notes"]),
    )


def replay(
    capture: str | Path,
    model: nn.Module,
    config: AuditConfig,
    *,
    input_shape: Sequence[int] | None = None,
) -> list[RoundReport]:
    """Audit a capture as the live audit would; reports go to ``config.output_dir``."""
    manifest, rounds = load_capture(capture)
    shape = input_shape or manifest["input_shape"]
    auditor = Auditor(
        model,
        shape,
        config.model_copy(update={"capture_dir": None}),
        strategy_name="replay",
    )
    reports = []
    for captured in rounds:
        reports.append(
            auditor.audit_round(
                captured.server_round,
                captured.global_state,
                captured.updates,
                train_config=captured.train_config,
                failed=captured.failed,
                aggregate_only=captured.aggregate_only,
                notes=[*captured.notes, f"replayed from {capture}"],
            )
        )
    auditor.runner.close()
    return reports


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    from fl_audit.report import dumps_scalar_config

    return dumps_scalar_config(dict(config))


def _write_private(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _PRIVATE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    _write_private(path, buffer.getvalue())
