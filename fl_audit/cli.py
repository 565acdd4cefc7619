"""The ``fl-audit`` command line.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares
its arguments and ``_run_<name>(args)`` runs it and returns the exit status.
Adding a subcommand means writing that pair and listing it in
:data:`_SUBCOMMANDS`.

Exit status: 0 on success, 2 for bad input (an unreadable model path, a bad
shape, a model that fails on the shape); the reason is one line on stderr.
``fl-audit report`` exits with the run's verdict: 0 pass, 1 warn, 2 fail
(and 2 for bad input, so a CI gate fails closed).

Usage::

    fl-audit bounds --model mypkg.models:make_cnn --input-shape 1,28,28 \\
        --batch-size 32 [--local-examples 500] [--probe-data fashion_mnist] [--json]
    fl-audit replay CAPTURE_DIR --model mypkg.models:make_cnn \\
        [--config audit.yaml] [--output DIR]
    fl-audit report RUN_DIR [--policy policy.yaml] [--out report.html] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import torch
from torch import nn

from fl_audit import __version__
from fl_audit.bounds import DEFAULT_EXACT_RANK_LIMIT, CapacityReport, analyze
from fl_audit.data import probe_inputs, sample_kinds
from fl_audit.errors import FLAuditError, InvalidInputError

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_VERDICT = {"pass": 0, "warn": 1, "fail": 2}
"""Exit status of ``fl-audit report`` per verdict."""


class CommandError(Exception):
    """A user error the CLI reports as one line on stderr, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fl-audit`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success, 2 on bad input.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    try:
        return int(args.run(args))
    except InvalidInputError as exc:  # every problem, on one line
        message = f"{exc.what}: {'; '.join(exc.problems)}"
    except (CommandError, FLAuditError) as exc:
        message = str(exc)
    message = " ".join(message.split())  # one line, whatever the cause
    print(f"fl-audit {args.command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fl-audit",
        description="Privacy audit for Flower federated learning.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


# --------------------------------------------------------------------------
# fl-audit bounds


def _add_bounds(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "bounds",
        help="what a model's first layer lets a gradient leak (h versus B)",
        description=(
            "Check the first layer of a model against the capacity bounds "
            "(seed theorems, per-sample count, exact rank) and print a risk "
            "level. See docs/theory.md."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="import path of a callable returning the torch model, e.g. "
        "mypkg.models:make_cnn (or path/to/file.py:make_cnn)",
    )
    p.add_argument(
        "--input-shape",
        required=True,
        type=_shape,
        metavar="C,H,W",
        help="shape of one input without the batch dimension, e.g. 1,28,28",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="B",
        help="inputs per local step",
    )
    p.add_argument(
        "--local-examples",
        type=_positive_int,
        metavar="N",
        help="distinct examples a client trains on per round (FedAvg updates)",
    )
    p.add_argument(
        "--exact-rank-limit",
        type=_positive_int,
        default=DEFAULT_EXACT_RANK_LIMIT,
        metavar="N",
        help="compute a convolution's exact rank only up to this many unknowns "
        "(default %(default)s)",
    )
    p.add_argument(
        "--probe-data",
        choices=sample_kinds(),
        metavar="KIND",
        help="real samples of this kind (fl_audit.data.load_samples: "
        f"{', '.join(sample_kinds())}) as representative inputs: for a "
        "convolution behind a ReLU, adds the exact rank on the outputs the "
        "ReLU keeps (conv_exact_rank_relu)",
    )
    p.add_argument(
        "--probe-count",
        type=_positive_int,
        default=8,
        metavar="P",
        help="how many probe samples to load (default %(default)s)",
    )
    p.add_argument(
        "--probe-seed",
        type=_non_negative_int,
        default=0,
        metavar="S",
        help="seed of the probe draw (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_run_bounds)


def _run_bounds(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    probe = (
        None
        if args.probe_data is None
        else _load_probe(args.probe_data, args.probe_count, args.probe_seed, args)
    )
    report = analyze(
        model,
        args.input_shape,
        batch_size=args.batch_size,
        local_examples=args.local_examples,
        exact_rank_limit=args.exact_rank_limit,
        probe=probe,
    )
    print(report.to_json() if args.json else format_report(report))
    return EXIT_OK


def _load_probe(
    kind: str, count: int, seed: int, args: argparse.Namespace
) -> torch.Tensor:
    """``count`` samples of ``kind`` at the spatial size of ``--input-shape``."""
    try:
        return probe_inputs(kind, count, args.input_shape, seed=seed)
    except (ImportError, OSError) as exc:
        raise CommandError(
            f"--probe-data {kind}: the data could not be loaded ({exc}); "
            "install the data extra (pip install fl-audit[data]) or pick another "
            "kind"
        ) from exc


def format_report(report: CapacityReport) -> str:
    """The report as a readable table."""
    first = report.first_layer
    where = first.path or "<model>"
    lines = [
        f"model        {report.architecture}",
        f"input shape  {tuple(report.input_shape)}",
        f"batch size   {_or_dash(report.batch_size)}",
        f"local exs.   {_or_dash(report.local_examples)}",
        f"first layer  {where} ({first.module_type or '-'}, {first.kind}) "
        f"in {tuple(first.in_shape)} out "
        f"{'-' if first.out_shape is None else tuple(first.out_shape)}",
        "",
    ]

    header = ("verdict", "source", "formula", "required", "actual", "holds")
    rows = [
        (
            v.name,
            v.source,
            v.formula,
            _or_dash(v.required),
            _or_dash(v.actual),
            {True: "yes", False: "no", None: "n/a"}[v.holds],
        )
        for v in report.verdicts
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = (c.ljust(w) for c, w in zip(row, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
    lines.append("")

    for v in report.verdicts:
        lines.append(f"{v.name}: {v.outcome}")
        if v.note:
            lines.append(f"  note: {v.note}")
    lines += ["", f"risk: {report.risk.upper()} - {report.risk_reason}"]
    return "\n".join(lines)


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


# --------------------------------------------------------------------------
# fl-audit replay


def _add_replay(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "replay",
        help="audit client updates captured during a run (capture_dir)",
        description=(
            "Audit a capture folder written by a run with capture_dir set, as the "
            "live audit would, and write the same reports. See docs/audit.md."
        ),
    )
    p.add_argument("capture", metavar="CAPTURE_DIR", type=Path)
    p.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="import path of a callable returning the torch model",
    )
    p.add_argument(
        "--config", type=Path, metavar="AUDIT_YAML", help="audit config (YAML)"
    )
    p.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="report folder (overrides output_dir)",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help="shape of one input (default: the one in the capture's manifest)",
    )
    p.set_defaults(run=_run_replay)


def _run_replay(args: argparse.Namespace) -> int:
    from fl_audit.config import AuditConfig
    from fl_audit.replay import replay

    config = AuditConfig.from_yaml(args.config) if args.config else AuditConfig()
    if args.output is not None:
        config = config.model_copy(update={"output_dir": args.output})
    model = load_model(args.model)
    reports = replay(args.capture, model, config, input_shape=args.input_shape)
    clients = sum(len(r.clients) for r in reports)
    print(
        f"replayed {len(reports)} round(s), {clients} client update(s); "
        f"reports in {config.output_dir}"
    )
    return EXIT_OK


# --------------------------------------------------------------------------
# fl-audit report


def _add_report(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "report",
        help="judge a run against a policy and write its HTML report",
        description=(
            "Read the round reports of a run folder, judge every client-round "
            "with an audit policy and write one self-contained HTML page. "
            "Exit status 0 pass, 1 warn, 2 fail. See docs/reports.md."
        ),
    )
    p.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="the audit's output_dir"
    )
    p.add_argument(
        "--policy",
        type=Path,
        metavar="POLICY.yaml",
        help="the policy to judge by (default: the run's policy.json, else the "
        "default policy)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="REPORT.html",
        help="where to write the page (default: RUN_DIR/report.html)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the verdicts as JSON on stdout"
    )
    p.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from fl_audit.html_report import load_run, render_html, verdicts_json

    run = load_run(args.run_dir, args.policy)
    path = render_html(run, args.out)
    if args.json:
        data = verdicts_json(run)
        data["report"] = str(path)
        print(json.dumps(data, indent=2))
    else:
        for r in run.rounds:
            status = r.verdict.status if r.verdict else "none"
            fired = r.verdict.rules_fired if r.verdict else {}
            rules = ", ".join(f"{k} x{v}" for k, v in fired.items()) or "no rule fired"
            count = len(r.clients)
            print(f"round {r.round}: {status.upper()} ({count} client(s); {rules})")
        for note in run.notes:
            print(f"note: {note}")
        print(f"verdict: {run.status.upper()} (policy {run.policy.name!r})")
        print(f"report: {path}")
    return EXIT_VERDICT[run.status]


# --------------------------------------------------------------------------
# Argument helpers


def _shape(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape: give positive integers separated by "
            "commas, without the batch dimension, e.g. 1,28,28"
        )
    return shape


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def load_model(spec: str) -> nn.Module:
    """Import ``MODULE:FACTORY`` and call the factory to build the model.

    ``MODULE`` is a dotted module name importable from the current directory
    or a path to a ``.py`` file; ``FACTORY`` is a (dotted) attribute of it: a
    callable returning an ``nn.Module``, or a module instance.

    Raises
    ------
    CommandError
        With one line naming what failed and how to fix it.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CommandError(
            f"--model {spec!r}: expected MODULE:FACTORY, e.g. mypkg.models:make_cnn"
        )
    module = _import(module_name)

    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CommandError(
                f"--model {spec!r}: {module_name!r} has no attribute {attr!r}"
            )
        obj = getattr(obj, part)

    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise CommandError(
                f"--model {spec!r}: {attr!r} is a {type(obj).__name__}, not a "
                "callable returning a torch.nn.Module"
            )
        obj = _call_factory(spec, obj)
    if not isinstance(obj, nn.Module):
        raise CommandError(
            f"--model {spec!r}: the factory returned a {type(obj).__name__}, "
            "not a torch.nn.Module"
        )
    return obj


def _import(name: str) -> ModuleType:
    if name.endswith(".py") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise CommandError(f"--model: no such file {name!r}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise CommandError(f"--model: cannot load {name!r} as a Python file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise CommandError(
                f"--model: importing {name!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        return module

    # Like uvicorn: modules of the current directory are importable.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise CommandError(
            f"--model: cannot import module {name!r} ({exc}); check the spelling "
            "and run from the directory that contains it"
        ) from exc
    except Exception as exc:
        raise CommandError(
            f"--model: importing {name!r} raised {type(exc).__name__}: {exc}"
        ) from exc


def _call_factory(spec: str, factory: Callable[[], object]) -> object:
    try:
        return factory()
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise CommandError(
            f"--model {spec!r}: the factory raised {type(exc).__name__}: {message}"
        ) from exc


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [  # type: ignore[type-arg]
    _add_bounds,
    _add_replay,
    _add_report,
]


if __name__ == "__main__":
    raise SystemExit(main())
