"""The audit's configuration: which attacks, which clients, where reports go.

:class:`AuditConfig` is a pydantic model. It is built in Python, read from a
YAML file (:meth:`AuditConfig.from_yaml`) or from Flower's run config
(:meth:`AuditConfig.from_run_config`, the ``[tool.flwr.app.config]`` table of
an app's pyproject, keys under ``audit.``). Every problem of a bad
configuration is reported at once in one
:class:`~fl_audit.errors.ConfigError`, each with its key (and its line, for
YAML).

Example YAML::

    output_dir: runs/hospitals
    attacks:
      - analytic_fc
      - name: analytic_fc
        options: {max_peel_rounds: 4}
    clients:
      partitions: [0, 2]
    allow_ground_truth: true
    simulation: true
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fl_audit.errors import ConfigError
from fl_audit.report import PrivacySettings

__all__ = [
    "CLIENT_RUN_CONFIG_KEYS",
    "RUN_CONFIG_PREFIX",
    "AttackSpec",
    "AuditConfig",
    "ClientSelection",
    "ProbeSpec",
]

RUN_CONFIG_PREFIX = "audit."
"""Prefix of the audit's keys in Flower's run config."""

CLIENT_RUN_CONFIG_KEYS = frozenset({"audit.send-ground-truth"})
"""Run-config keys read by the clients' mod, not by the server's audit."""


class AttackSpec(BaseModel):
    """One attack to run: a registry name and the options of its constructor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0.0)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from fl_audit.attacks.registry import available_attacks

        known = available_attacks()
        if name not in known:
            raise ValueError(
                f"no attack named {name!r}; registered: {', '.join(known)}"
            )
        return name

    @model_validator(mode="after")
    def _options_accepted(self) -> AttackSpec:
        import inspect

        from fl_audit.attacks.registry import get_attack

        params = inspect.signature(get_attack(self.name).__init__).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return self
        unknown = sorted(set(self.options) - set(params) - {"self"})
        if unknown:
            known = sorted(k for k in params if k != "self")
            raise ValueError(
                f"attack {self.name!r} takes no option(s) {unknown}; it takes {known}"
            )
        return self


class ClientSelection(BaseModel):
    """Which clients of a round are audited.

    With nothing set every client is. ``partitions`` keeps the clients that
    report one of these partition ids (clients without the audit mod report
    none and are skipped). ``count`` or ``fraction`` then keep that many of
    the remaining clients, drawn with ``seed`` and the round number, so a
    rerun audits the same clients.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    partitions: list[int] | None = None
    count: int | None = Field(default=None, ge=1)
    fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> ClientSelection:
        if self.count is not None and self.fraction is not None:
            raise ValueError("set count or fraction, not both")
        return self

    def select(
        self, server_round: int, clients: Sequence[tuple[str, int | None]]
    ) -> tuple[list[str], dict[str, str]]:
        """Split ``(client key, partition id)`` pairs into audited and skipped.

        Returns the audited keys, in the given order, and a reason per skipped
        key.
        """
        skipped: dict[str, str] = {}
        kept: list[str] = []
        for key, partition in clients:
            if self.partitions is not None and partition not in self.partitions:
                skipped[key] = (
                    f"partition {partition} is not in clients.partitions "
                    f"{self.partitions}"
                    if partition is not None
                    else "no partition id reported (audit mod missing?) and "
                    "clients.partitions is set"
                )
            else:
                kept.append(key)

        size = len(kept)
        if self.count is not None:
            size = min(self.count, len(kept))
        elif self.fraction is not None:
            size = max(1, math.ceil(self.fraction * len(kept))) if kept else 0
        if size < len(kept):
            rng = random.Random(f"{self.seed}:{server_round}")
            chosen = set(rng.sample(kept, size))
            for key in kept:
                if key not in chosen:
                    skipped[key] = f"not sampled ({size} of {len(kept)} audited)"
            kept = [k for k in kept if k in chosen]
        return kept, skipped


class ProbeSpec(BaseModel):
    """Real inputs that stand for the clients' data in the capacity bounds.

    Behind a ReLU, whether a convolution's input is determined depends on
    which outputs the ReLU keeps, i.e. on the input. With a probe, every
    round's bounds add the exact rank on the outputs kept for these inputs
    (``conv_exact_rank_relu``, docs/theory.md §3), and a convolution's risk
    level follows it. ``kind`` names a data set
    :func:`fl_audit.data.load_samples` knows, resized to the model's input
    (``count`` samples drawn with ``seed``); ``path`` a ``.npy``/``.npz``
    file of inputs shaped ``(P, *input_shape)``, scaled as the clients feed
    the model (its first ``count``). Public data of the same modality is
    what a curious server has too; the clients' own data never leaves them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str | None = None
    path: Path | None = None
    count: int = Field(default=8, ge=1, le=256)
    seed: int = Field(default=0, ge=0)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str | None) -> str | None:
        from fl_audit.data import sample_kinds

        if kind is not None and kind not in sample_kinds():
            raise ValueError(
                f"no sample kind {kind!r}; known: {', '.join(sample_kinds())}"
            )
        return kind

    @model_validator(mode="after")
    def _one_source(self) -> ProbeSpec:
        if (self.kind is None) == (self.path is None):
            raise ValueError(
                "set kind (a data set of fl_audit.data.load_samples) or path (a "
                ".npy/.npz file of inputs), exactly one"
            )
        return self


class AuditConfig(BaseModel):
    """How the audit runs.

    Attributes
    ----------
    attacks:
        Registry names, or ``{name, options}`` entries; run in this order
        on every audited client.
    output_dir:
        Folder of the run's reports (``round-0001.json``, ``summary.json``
        and reconstructions as ``.npz``).
    clients:
        Which clients of a round are audited (:class:`ClientSelection`).
    allow_ground_truth:
        Score reconstructions against the inputs clients send when their
        run config asks them to. Simulation only; the report states it.
    simulation:
        Marks the run as a simulation (reports may then show
        reconstructions of the synthetic hospitals' data).
    save_reconstructions:
        Write each attack's recovered inputs next to the round report
        (owner-readable only).
    input_range:
        Value range of the inputs, e.g. ``[0, 1]``; a client's metadata takes
        precedence. Needed by attacks that use a box constraint.
    num_classes:
        Number of classes of the task, when the model's output does not say.
    backend:
        Where attacks run: ``"inline"`` (in the server process, one after
        another), ``"process"`` (``workers`` isolated child processes) or
        ``"ray"`` (Ray tasks; extra ``fl-audit[simulation]``). See
        :mod:`fl_audit.runtime`.
    workers:
        Attacks run at once by the process and Ray backends.
    ray_address:
        A running Ray cluster to use; default: the one Flower's simulation
        started in this process, or a new local one.
    ray_num_cpus:
        CPUs each Ray attack task asks for. The default, 0, lets tasks run
        beside Flower's ClientApp actors, which hold every CPU of a
        simulation's cluster; on a cluster of its own set 1.
    background:
        Audit rounds in a background thread so that ``aggregate_train``
        returns without waiting (default: on for the process and Ray
        backends, off inline). The run waits up to ``final_wait_s`` for
        unfinished rounds when the strategy's ``start`` returns.
    attack_timeout_s:
        Cap on one attack's seconds (per attack: ``attacks[i].timeout_s``).
        Inline, a capped attack runs in a child process, killed at the cap;
        on the process and Ray backends a client's whole audit is one job,
        capped at the sum of its attacks' caps.
    attack_memory_mb:
        Cap on one attack's address space (``RLIMIT_AS``) in MiB; it
        includes the 1-2 GiB torch maps at start, so set it well above.
    attack_threads:
        Threads torch and BLAS may use while the audit of a round runs
        (default 1: many small solves, and the cores belong to training);
        ``None`` leaves the thread pools as they are.
    round_budget_s:
        Seconds the audit of one round may take; attacks not started when it
        is spent are reported as not run.
    capture_dir:
        Also write every client update (with its metadata) here, owner-only,
        for ``fl-audit replay``.
    update_noise_std:
        Std of noise on every entry of the updates the audit sees, when the
        run adds some: SecAgg+ quantises each update to a step of
        ``2 * clipping_range / quantization_range`` (3.8e-6 with Flower's
        defaults; std about step / sqrt(12) per client); local DP adds
        Gaussian noise (taken from ``privacy`` when ``noise_on`` is
        ``update``). The attacks treat it as their noise floor.
    privacy:
        Differential privacy of the run when it is not a Flower DP wrapper
        around the inner strategy (those are read off it), e.g. local DP on
        the clients: ``{noise_multiplier, clipping_norm, noise_on: update}``.
    policy:
        The audit policy (YAML, see docs/reports.md) whose verdicts are
        stored in every round report; ``None`` for the default policy
        shipped with fl-audit.
    probe:
        Real inputs for the capacity bounds of a convolution behind a ReLU
        (:class:`ProbeSpec`), e.g. ``{kind: fashion_mnist}``. Their ranks
        cost 0.3-3 s a round (1x28x28 to 3x32x32, one core), once per
        round, on the audit's thread.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    attacks: list[AttackSpec] = Field(
        default_factory=lambda: [AttackSpec(name="analytic_fc")]
    )
    output_dir: Path = Path("fl-audit-reports")
    clients: ClientSelection = Field(default_factory=ClientSelection)
    allow_ground_truth: bool = False
    simulation: bool = False
    save_reconstructions: bool = True
    input_range: tuple[float, float] | None = None
    num_classes: int | None = Field(default=None, ge=2)
    backend: Literal["inline", "process", "ray"] = "inline"
    workers: int = Field(default=2, ge=1)
    ray_address: str | None = None
    ray_num_cpus: float = Field(default=0.0, ge=0.0)
    background: bool | None = None
    final_wait_s: float = Field(default=600.0, ge=0.0)
    attack_timeout_s: float | None = Field(default=None, gt=0.0)
    attack_memory_mb: int | None = Field(default=None, ge=64)
    attack_threads: int | None = Field(default=1, ge=1)
    round_budget_s: float | None = Field(default=None, gt=0.0)
    capture_dir: Path | None = None
    privacy: PrivacySettings | None = None
    update_noise_std: float | None = Field(default=None, ge=0.0)
    policy: Path | None = None
    probe: ProbeSpec | None = None

    @property
    def runs_in_background(self) -> bool:
        """Whether rounds are audited off the training thread."""
        if self.background is None:
            return self.backend != "inline"
        return self.background

    @field_validator("attacks", mode="before")
    @classmethod
    def _names_to_specs(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("input_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> object:
        if value is not None and not (
            math.isfinite(value[0]) and math.isfinite(value[1]) and value[0] < value[1]
        ):
            raise ValueError(f"must be [low, high] with low < high, got {list(value)}")
        return value

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "") -> AuditConfig:
        """Validate a plain mapping; every problem is reported at once."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(source or "audit config", _problems(exc)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> AuditConfig:
        """Read a YAML file; problems name their key and line."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                str(path), [f"cannot read the file: {exc.strerror or exc}"]
            ) from None
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                str(path),
                [f"the top level must be a mapping of keys, got {type(data).__name__}"],
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = _key_lines(node)
            raise ConfigError(str(path), _problems(exc, lines)) from None

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], *, base: AuditConfig | None = None
    ) -> AuditConfig:
        """Settings from Flower's run config, keys under ``audit.``.

        ``audit.config-file`` names a YAML file read first; the other keys
        override it (and ``base``). Dashes in keys stand for underscores;
        nested settings use dots: ``audit.clients.count = 2``,
        ``audit.attacks = "analytic_fc"``, ``audit.input-range = "0,1"``.
        """
        data: dict[str, Any] = base.model_dump(mode="json") if base else {}
        file_key = f"{RUN_CONFIG_PREFIX}config-file"
        if file_key in run_config:
            from_file = cls.from_yaml(str(run_config[file_key]))
            data = {**data, **from_file.model_dump(mode="json", exclude_unset=True)}
        for key, value in run_config.items():
            if (
                not key.startswith(RUN_CONFIG_PREFIX)
                or key == file_key
                or key in CLIENT_RUN_CONFIG_KEYS
            ):
                continue
            path = key[len(RUN_CONFIG_PREFIX) :].replace("-", "_").split(".")
            if path == ["input_range"] and isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            slot = data
            for part in path[:-1]:
                slot = slot.setdefault(part, {})
                if not isinstance(slot, dict):
                    raise ConfigError(
                        "run config", [f"{key}: {part!r} is not a table of settings"]
                    )
            slot[path[-1]] = value
        return cls.from_mapping(data, source="run config (audit.* keys)")


def _problems(
    exc: ValidationError,
    lines: Mapping[tuple[str, ...], int] | None = None,
    known_keys: Callable[[tuple[str, ...]], Sequence[str]] | None = None,
) -> list[str]:
    """One line per validation error: key, line, message and the value got.

    ``known_keys(loc)`` lists the keys accepted where an unknown key was
    found (default: the audit config's fields).
    """
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "<top level>"
        line = ""
        if lines:
            for n in range(len(loc), 0, -1):
                if loc[:n] in lines:
                    line = f" (line {lines[loc[:n]]})"
                    break
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            fields = known_keys(loc) if known_keys else list(AuditConfig.model_fields)
            known = ", ".join(fields)
            if known_keys:
                message = f"unknown key; allowed here: {known}"
            else:
                message = f"unknown key; the audit config has: {known}"
        problems.append(f"{key}{line}: {message} (got {err.get('input')!r})")
    return problems


def _key_lines(node: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Line (1-based) of every key path in a composed YAML document."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                path = (*prefix, str(k.value))
                lines[path] = k.start_mark.line + 1
                walk(v, path)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                path = (*prefix, str(i))
                lines[path] = v.start_mark.line + 1
                walk(v, path)

    if node is not None:
        walk(node, ())
    return lines
