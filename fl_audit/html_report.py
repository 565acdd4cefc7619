"""The compliance report of a run: verdicts as JSON, and one HTML page.

:func:`load_run` reads a run folder (``round-*.json``, written by the
audit) and judges every round with a policy: the one given, else the
run's own ``policy.json``, else the default policy. :func:`render_html`
writes one self-contained page from the Jinja2 templates in
``fl_audit/templates``: a table of rounds x clients coloured by verdict,
the policy's rules, plots of leakage over rounds and of measured recovery
against the h-vs-B bound (matplotlib, embedded as base64 PNG), and per
round the bound verdicts next to what the attacks achieved, with the rules
that fired and their evidence.

Reconstructions are patient data. The page embeds reconstruction images
(beside the true inputs when the run kept them) only when
:meth:`~fl_audit.policy.Policy.shows_reconstructions` allows it: by default
for runs marked as a simulation only. Otherwise no reconstruction or
ground-truth file is even read, and the page says what was redacted. A
page that embeds images is written readable by its owner only.

Notes
-----
The page holds no script and refers to nothing outside itself (no font,
style sheet or image URL), so it renders offline and prints as it shows.
At most :data:`MAX_THUMBNAILS` inputs per client-round are drawn.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
import numpy as np
from PIL import Image

from fl_audit import __version__
from fl_audit.errors import InvalidInputError
from fl_audit.metrics import match_inputs
from fl_audit.policy import Policy, apply_policy, governing_bound, load_policy, worst
from fl_audit.report import ClientAudit, RoundReport, VerdictStatus

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = [
    "MAX_THUMBNAILS",
    "RunReport",
    "load_run",
    "render_html",
    "verdicts_json",
]

MAX_THUMBNAILS = 8
"""Inputs drawn per client-round (truth and reconstruction side by side)."""

_COLOURS = {"pass": "#2e7d32", "warn": "#e69500", "fail": "#c62828"}
_PNG_META = {"Software": None}  # no tool name or URL inside the images


@dataclass
class RunReport:
    """A run folder judged by one policy.

    Attributes
    ----------
    run_dir:
        The folder read.
    rounds:
        Every readable round, in order, with the policy's verdicts.
    policy:
        The policy the verdicts come from.
    policy_source:
        Where it came from: the path given, the run's ``policy.json`` or
        the default policy.
    notes:
        Files that could not be read, verdicts that differ from the ones
        stored by the audit.
    """

    run_dir: Path
    rounds: list[RoundReport]
    policy: Policy
    policy_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> VerdictStatus:
        """The run's verdict: the worst of its rounds."""
        return worst([r.verdict.status for r in self.rounds if r.verdict])

    @property
    def simulation(self) -> bool:
        return bool(self.rounds) and all(r.settings.simulation for r in self.rounds)


def load_run(run_dir: str | Path, policy: str | Path | None = None) -> RunReport:
    """Read the rounds of ``run_dir`` and judge them with a policy.

    Parameters
    ----------
    run_dir:
        A folder written by the audit (``round-0001.json``, ...).
    policy:
        A policy file; default: the run's ``policy.json`` when it has one,
        else the default policy.

    Raises
    ------
    InvalidInputError
        If the folder does not exist or holds no readable round report.
    ConfigError
        If the policy file is unreadable or invalid.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise InvalidInputError(
            "run folder",
            [f"{str(folder)!r} is not a folder; give the audit's output_dir"],
        )
    stored = folder / "policy.json"
    if policy is not None:
        chosen, source = load_policy(policy), str(policy)
    elif stored.is_file():
        chosen, source = load_policy(stored), f"{stored.name} (the run's own policy)"
    else:
        chosen, source = load_policy(None), "the default policy"

    rounds: list[RoundReport] = []
    notes: list[str] = []
    files = sorted(folder.glob("round-[0-9]*.json"))
    for file in files:
        try:
            report = RoundReport.model_validate_json(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            notes.append(f"{file.name} skipped: not a readable round report ({first})")
            continue
        judged = apply_policy(chosen, report)
        stored_verdict, new = report.verdict, judged.verdict
        if (
            stored_verdict is not None
            and new is not None
            and stored_verdict.policy_sha256 != chosen.sha256
        ):
            notes.append(
                f"round {report.round}: the audit stored a verdict of policy "
                f"{stored_verdict.policy!r} ({stored_verdict.status}); this "
                f"report applies {chosen.name!r} ({new.status})"
            )
        rounds.append(judged)
    if not rounds:
        why = f"{len(files)} unreadable" if files else "none"
        raise InvalidInputError(
            "run folder",
            [
                f"{str(folder)!r} holds no readable round report (round-*.json: "
                f"{why}); point to the folder the audit wrote"
            ],
        )
    rounds.sort(key=lambda r: r.round)
    return RunReport(folder, rounds, chosen, source, notes)


def verdicts_json(run: RunReport) -> dict[str, Any]:
    """The verdicts of a run as plain JSON data (``fl-audit report --json``)."""
    return {
        "run_dir": str(run.run_dir),
        "status": run.status,
        "policy": {
            "name": run.policy.name,
            "sha256": run.policy.sha256,
            "source": run.policy_source,
        },
        "rounds": [
            {
                "round": r.round,
                "status": r.verdict.status if r.verdict else None,
                "clients": [
                    {
                        "client": c.client,
                        "status": c.verdict.status if c.verdict else None,
                        "fired": [
                            f.model_dump(mode="json")
                            for f in (c.verdict.fired if c.verdict else [])
                        ],
                        "not_evaluated": [
                            s.model_dump(mode="json")
                            for s in (c.verdict.not_evaluated if c.verdict else [])
                        ],
                    }
                    for c in r.clients
                ],
            }
            for r in run.rounds
        ],
        "notes": run.notes,
    }


# --------------------------------------------------------------------------
# The page


def render_html(run: RunReport, out: str | Path | None = None) -> Path:
    """Write the HTML report of ``run``; return its path.

    ``out`` defaults to ``report.html`` in the run folder. The page is
    written atomically; with reconstruction images in it, readable by the
    owner only (mode 0600).

    Raises
    ------
    InvalidInputError
        If ``out`` cannot be written.
    """
    path = Path(out) if out is not None else run.run_dir / "report.html"
    show = run.policy.shows_reconstructions(run.simulation)
    context = _context(run, show)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fl_audit", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    html = env.get_template("report.html.j2").render(**context)
    mode = 0o600 if context["images_embedded"] else 0o644
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, html, mode)
    except OSError as exc:
        raise InvalidInputError(
            "report output",
            [f"{str(path)!r} cannot be written ({exc.strerror or exc})"],
        ) from None
    return path


def _atomic_write(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _natural(name: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _context(run: RunReport, show: bool) -> dict[str, Any]:
    clients = sorted({c.client for r in run.rounds for c in r.clients}, key=_natural)
    last = run.rounds[-1].settings
    grid = []
    for r in run.rounds:
        by_client = {c.client: c for c in r.clients}
        cells: list[dict[str, str] | None] = []
        for name in clients:
            c = by_client.get(name)
            if c is None:
                cells.append(None)
                continue
            rules = [f.rule for f in c.verdict.fired] if c.verdict else []
            cells.append(
                {
                    "status": c.verdict.status if c.verdict else "none",
                    "risk": c.risk or "unknown",
                    "title": f"{name}, round {r.round}: "
                    + (", ".join(dict.fromkeys(rules)) or "no rule fired"),
                }
            )
        grid.append({"round": r.round, "status": _status(r), "cells": cells})

    recon_files = sum(
        a.reconstruction_file is not None
        for r in run.rounds
        for c in r.clients
        for a in c.attacks
    )
    truth_files = sum(
        c.ground_truth_file is not None for r in run.rounds for c in r.clients
    )
    rounds = [_round_context(run, r, show) for r in run.rounds]
    embedded = any(c["thumbs"] for r in rounds for c in r["clients"])
    return {
        "title": f"fl-audit report: {run.run_dir.name}",
        "run": run,
        "status": run.status,
        "settings": last,
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "clients": clients,
        "grid": grid,
        "rules": _rules_context(run),
        "figures": _figures(run),
        "rounds": rounds,
        "redaction": _redaction(run, show, recon_files, truth_files),
        "images_embedded": embedded,
        "counts": {
            "rounds": len(run.rounds),
            "client_rounds": sum(len(r.clients) for r in run.rounds),
            "by_status": _count(
                c.verdict.status for r in run.rounds for c in r.clients if c.verdict
            ),
        },
    }


def _status(r: RoundReport) -> str:
    return r.verdict.status if r.verdict else "none"


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _rules_context(run: RunReport) -> list[dict[str, Any]]:
    fired: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for r in run.rounds:
        for c in r.clients:
            if c.verdict is None:
                continue
            for rule in dict.fromkeys(f.rule for f in c.verdict.fired):
                fired[rule] = fired.get(rule, 0) + 1
            for s in c.verdict.not_evaluated:
                skipped[s.rule] = skipped.get(s.rule, 0) + 1
    rows = []
    for policy_rule in run.policy.rules:
        params = policy_rule.model_dump(
            mode="json", exclude={"id", "kind", "severity", "description"}
        )
        rows.append(
            {
                "id": policy_rule.id,
                "kind": policy_rule.kind,
                "severity": policy_rule.severity,
                "params": ", ".join(
                    f"{k}={v}" for k, v in params.items() if v is not None
                ),
                "description": policy_rule.description or type(policy_rule).summary,
                "fired": fired.get(policy_rule.id, 0),
                "not_evaluated": skipped.get(policy_rule.id, 0),
            }
        )
    return rows


def _redaction(run: RunReport, show: bool, recon: int, truth: int) -> dict[str, Any]:
    mode = run.policy.show_reconstructions
    if show:
        why = (
            "the run is marked as a simulation"
            if mode == "simulation"
            else "the policy sets show_reconstructions: always"
        )
        return {"redacted": False, "text": f"Reconstruction images are shown: {why}."}
    if mode == "never":
        why = "the policy sets show_reconstructions: never"
    else:
        why = (
            "the run is not marked as a simulation (settings.simulation is false) "
            "and the policy shows reconstructions of simulations only"
        )
    return {
        "redacted": True,
        "text": (
            f"Reconstruction images are redacted: {why}. {recon} reconstruction "
            f"file(s) and {truth} ground-truth file(s) of the run folder were not "
            "read; numbers (PSNR, counts, bounds) are shown."
        ),
    }


# --------------------------------------------------------------------------
# Per round


def _round_context(run: RunReport, r: RoundReport, show: bool) -> dict[str, Any]:
    return {
        "round": r.round,
        "status": _status(r),
        "report": r,
        "duration_s": (r.finished_at - r.started_at).total_seconds(),
        "clients": [
            _client_context(run, r, c, show)
            for c in sorted(r.clients, key=lambda c: _natural(c.client))
        ],
    }


def _client_context(
    run: RunReport, r: RoundReport, c: ClientAudit, show: bool
) -> dict[str, Any]:
    bounds = []
    if c.capacity is not None:
        key = governing_bound(c.capacity)
        for v in c.capacity.verdicts:
            bounds.append(
                {
                    "name": v.name,
                    "formula": v.formula,
                    "required": v.required,
                    "actual": v.actual,
                    "holds": {True: "holds", False: "fails", None: "n/a"}[v.holds],
                    "governing": key is not None and v.name == key.name,
                }
            )
    attacks = []
    for a in c.attacks:
        gt = a.ground_truth
        attacks.append(
            {
                "name": a.attack,
                "status": a.status.replace("_", " "),
                "reason": a.reason,
                "recovered": a.recovered,
                "certified": a.certified,
                "batch_size_estimate": a.batch_size_estimate,
                "residual": None if a.residual is None else f"{a.residual:.2e}",
                "max_psnr": None if gt is None else f"{gt.max_psnr:.1f}",
                "above_30": None
                if gt is None
                else f"{gt.recovered_30db}/{gt.num_true}",
                "elapsed_s": f"{a.elapsed_s:.2f}",
            }
        )
    thumbs = _thumbnails(run, r, c) if show else []
    return {
        "audit": c,
        "status": c.verdict.status if c.verdict else "none",
        "bounds": bounds,
        "attacks": attacks,
        "fired": c.verdict.fired if c.verdict else [],
        "not_evaluated": c.verdict.not_evaluated if c.verdict else [],
        "thumbs": thumbs,
    }


# --------------------------------------------------------------------------
# Thumbnails


def _load_npz(run: RunReport, relative: str | None) -> dict[str, np.ndarray] | None:
    if relative is None:
        return None
    path = run.run_dir / relative
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError):
        run.notes.append(f"{relative} could not be read; its thumbnails are missing")
        return None


def _thumbnails(run: RunReport, r: RoundReport, c: ClientAudit) -> list[dict[str, Any]]:
    """Truth beside reconstruction, one pair per true input (at most a few)."""
    truth = _load_npz(run, c.ground_truth_file)
    shape = tuple(c.metadata.input_shape or r.settings.input_shape)
    lo_hi = c.metadata.input_range
    out = []
    for a in c.attacks:
        rec = _load_npz(run, a.reconstruction_file)
        if rec is None or "inputs" not in rec:
            continue
        recon = rec["inputs"]  # (k, *input_shape)
        if truth is not None and "inputs" in truth:
            true = truth["inputs"].reshape(truth["inputs"].shape[0], *recon.shape[1:])
            rng = lo_hi or (float(true.min()), float(true.max()))
            span = (rng[1] - rng[0]) or 1.0
            scores = match_inputs(recon, true, data_range=span).scores
            pairs: list[tuple[np.ndarray | None, np.ndarray | None, float | None]]
            pairs = [
                (
                    true[s.truth_index],
                    None if s.recon_index is None else recon[s.recon_index],
                    s.psnr,
                )
                for s in scores[:MAX_THUMBNAILS]
            ]
        else:
            rng = lo_hi or (float(recon.min()), float(recon.max()))
            pairs = [(None, r, None) for r in recon[:MAX_THUMBNAILS]]
        for t, x, p in pairs:
            out.append(
                {
                    "attack": a.attack,
                    "truth": None if t is None else _thumb(t, shape, rng),
                    "recon": None if x is None else _thumb(x, shape, rng),
                    "psnr": None if p is None else f"{min(p, 400.0):.1f} dB",
                    "trace": _kind(shape) == "trace",
                }
            )
    return out


def _kind(shape: Sequence[int]) -> str:
    if len(shape) >= 3:
        return "image"
    return "trace"


def _thumb(x: np.ndarray, shape: Sequence[int], rng: tuple[float, float]) -> str:
    """A base64 PNG of one input: an image, a slice or a trace."""
    x = np.asarray(x, dtype=np.float64).reshape(shape)
    buf = io.BytesIO()
    if _kind(shape) == "image":
        if x.ndim > 3:  # (C, D, H, W): the middle slice of a volume
            x = x[:, x.shape[1] // 2]
        scaled = np.clip((x - rng[0]) / ((rng[1] - rng[0]) or 1.0), 0.0, 1.0)
        pixels = np.round(scaled * 255).astype(np.uint8)  # (C, H, W)
        if pixels.shape[0] in (3, 4):
            image = Image.fromarray(np.ascontiguousarray(pixels[:3].transpose(1, 2, 0)))
        else:
            image = Image.fromarray(pixels[0])  # channel 0, grey
        image.save(buf, format="PNG", optimize=True)
    else:
        trace = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x[None]  # (C, L)
        fig = Figure(figsize=(2.4, 0.9), dpi=80)
        ax = fig.add_axes((0.02, 0.05, 0.96, 0.9))
        for row in trace:
            ax.plot(row, linewidth=0.8, color="#1f4e79")
        ax.set_ylim(
            rng[0] - 0.05 * (rng[1] - rng[0]), rng[1] + 0.05 * (rng[1] - rng[0])
        )
        ax.set_axis_off()
        fig.savefig(buf, format="png", metadata=_PNG_META)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------
# Figures


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata=_PNG_META)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(run: RunReport) -> dict[str, str]:
    return {"leakage": _leakage_figure(run), "bound": _bound_figure(run)}


def _leakage_figure(run: RunReport) -> str:
    """PSNR, certified count and residual over rounds."""
    rounds = [r.round for r in run.rounds]
    psnr_pts: list[tuple[int, float]] = []
    best: list[float] = []
    certified: list[int] = []
    recovered: list[int] = []
    res_med: list[float] = []
    res_max: list[float] = []
    for r in run.rounds:
        outcomes = [a for c in r.clients for a in c.attacks]
        scores = [a.ground_truth.max_psnr for a in outcomes if a.ground_truth]
        psnr_pts += [(r.round, p) for p in scores]
        best.append(max(scores) if scores else math.nan)
        certified.append(sum(a.certified for a in outcomes))
        recovered.append(sum(a.recovered for a in outcomes))
        residuals = [a.residual for a in outcomes if a.residual is not None]
        res_med.append(float(np.median(residuals)) if residuals else math.nan)
        res_max.append(max(residuals) if residuals else math.nan)

    fig = Figure(figsize=(10, 2.8))
    axes = fig.subplots(1, 3)
    ax = axes[0]
    if psnr_pts:
        xs, ys = zip(*psnr_pts, strict=True)
        ax.scatter(xs, ys, s=10, color="#9e9e9e", label="client-rounds")
        ax.plot(rounds, best, "o-", color="#c62828", markersize=3, label="best")
        for rule in run.policy.rules:
            if rule.kind == "max_psnr":
                ax.axhline(rule.threshold_db, color="#555", ls="--", lw=1)
                ax.annotate(
                    f"{rule.id}: {rule.threshold_db:g} dB",
                    (rounds[0], rule.threshold_db),
                    fontsize=7,
                    va="bottom",
                )
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no ground truth in this run", ha="center", va="center")
    ax.set_title("PSNR against ground truth (dB)", fontsize=9)
    ax = axes[1]
    ax.plot(rounds, recovered, "s-", color="#1f77b4", markersize=3, label="recovered")
    ax.plot(rounds, certified, "o-", color="#c62828", markersize=3, label="certified")
    ax.set_title("inputs recovered per round", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    if any(math.isfinite(v) and v > 0 for v in res_max):
        ax.semilogy(rounds, _positive(res_med), "o-", markersize=3, label="median")
        ax.semilogy(rounds, _positive(res_max), "^-", markersize=3, label="max")
        ax.legend(fontsize=7)
    elif any(math.isfinite(v) for v in res_max):
        ax.plot(rounds, res_max, "o-", markersize=3, label="max")
        ax.set_ylim(-0.05, 1.0)
        ax.text(0.5, 0.6, "every residual is 0 (exact fits)", ha="center",
                transform=ax.transAxes, fontsize=8)  # fmt: skip
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no residual reported", ha="center", va="center")
    ax.set_title("attack residual (0 = exact fit)", fontsize=9)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _positive(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) and v > 0 else math.nan for v in values]


def _bound_figure(run: RunReport) -> str:
    """Measured recovery against the bound's ratio required/actual (B/h)."""
    pts: dict[str, list[tuple[float, float]]] = {"pass": [], "warn": [], "fail": []}
    gt_pts: list[tuple[float, float]] = []
    for r in run.rounds:
        for c in r.clients:
            if c.capacity is None:
                continue
            bound = governing_bound(c.capacity)
            if bound is None or not bound.required or not bound.actual:
                continue
            ratio = bound.required / bound.actual
            count = max(bound.required, 1) if bound.name.startswith("fc_") else None
            if count is None:
                count = c.capacity.local_examples or c.capacity.batch_size or 1
            done = [a for a in c.attacks if a.status == "completed"]
            best = max((a.certified for a in done), default=0)
            key: str = c.verdict.status if c.verdict else "pass"
            pts[key].append((ratio, min(best / count, 1.0)))
            for a in done:
                if a.ground_truth is not None and a.ground_truth.num_true:
                    gt = a.ground_truth
                    gt_pts.append((ratio, gt.recovered_30db / gt.num_true))

    fig = Figure(figsize=(6.5, 3.2))
    ax = fig.subplots()
    if not any(pts.values()):
        ax.text(
            0.5,
            0.5,
            "no client-round with an evaluated bound",
            ha="center",
            va="center",
        )
    jitter = np.random.default_rng(0)
    for status, values in pts.items():
        if values:
            arr = np.array(values)  # (n, 2): ratio, fraction
            ys = arr[:, 1] + jitter.uniform(-0.015, 0.015, size=len(arr))
            ax.scatter(
                arr[:, 0], ys, s=14, color=_COLOURS[status], alpha=0.7,
                label=f"certified fraction ({status})",
            )  # fmt: skip
    if gt_pts:
        gt_arr = np.array(gt_pts)  # (n, 2)
        ax.scatter(
            gt_arr[:, 0], gt_arr[:, 1], s=30, facecolors="none", edgecolors="#333",
            label="fraction above 30 dB (ground truth)",
        )  # fmt: skip
    ax.axvline(1.0, color="#555", ls="--", lw=1)
    ax.axvspan(1.0, max([1.0] + [x for v in pts.values() for x, _ in v]) * 3,
               color="#eee", zorder=0)  # fmt: skip
    ax.annotate(
        "bound: required = actual\n(h = B for an FC layer)",
        (1.0, 0.5),
        fontsize=7,
        xytext=(4, 0),
        textcoords="offset points",
    )
    ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.08)
    ax.set_xlabel("bound ratio required / actual  (B/h, N/h; conv: rank terms)")
    ax.set_ylabel("fraction of inputs recovered")
    ax.set_title("measured recovery against the capacity bound", fontsize=9)
    ax.grid(alpha=0.3)
    if any(pts.values()) or gt_pts:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _png(fig)
