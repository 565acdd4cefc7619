"""Where and how attacks run: inline, in isolated processes, or on Ray.

An attack on one client's update is an :class:`AttackJob` (with the process
and Ray backends the audit sends a whole client's audit as one job instead,
:class:`fl_audit.audit.ClientJob`). A
:class:`JobRunner` runs a round's jobs and returns one :class:`JobOutcome`
per job, in order; nothing it runs can raise into the audit:

``InlineRunner`` (backend ``"inline"``, the default)
    One job after another in this process. With a time or memory cap set
    (``attack_timeout_s``, ``attack_memory_mb``) each job runs in a child
    process instead, killed when it passes its cap.
``ProcessRunner`` (backend ``"process"``)
    Up to ``workers`` jobs at once, in as many long-lived child processes
    (started by a fork server, so the parent's threads are never forked),
    with the same caps; a process that hangs, crashes or exhausts its memory
    is replaced. These child processes and Ray tasks run at idle CPU priority
    (:func:`lower_priority`), so training has the cores first.
``RayRunner`` (backend ``"ray"``, extra ``fl-audit[simulation]``)
    Jobs as Ray tasks, on the cluster Flower's simulation already started,
    on one at ``ray_address``, or on a local one. A task past its cap is
    cancelled.

An attack that raises, returns NaN, runs past its cap, exhausts its memory
cap or kills its process gives a :class:`JobOutcome` whose ``error`` says
which; the other jobs go on.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, Protocol

from fl_audit._logging import logger
from fl_audit.attacks.base import Attack
from fl_audit.core import AttackResult, AttackTarget

__all__ = [
    "AttackJob",
    "InlineRunner",
    "JobOutcome",
    "JobRunner",
    "IsolatedWorker",
    "Job",
    "ProcessRunner",
    "RayRunner",
    "make_runner",
    "limited_threads",
    "run_in_process",
    "run_isolated",
]

_LOW_NICENESS = 19


def lower_priority() -> str:
    """Let training have the CPU first: run the calling thread at idle priority.

    On Linux ``SCHED_IDLE`` runs the thread only when a core would otherwise
    idle; elsewhere (or where it is refused) the niceness is raised to 19.
    Scheduling is per thread on Linux, so only the audit's own thread is
    affected, not a Ray worker's other threads. Returns the policy applied.

    Notes
    -----
    Neither change can be undone without privileges: a process or Ray task
    worker that ran an audit keeps the low priority for its life.
    """
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is not None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
            return "idle"
        except OSError:
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOW_NICENESS)
        return "nice"
    except (OSError, AttributeError):
        return "normal"


class Job(Protocol):
    """Work a runner can run: one attack, or a whole client's audit."""

    timeout_s: float | None
    memory_mb: int | None
    label: str
    threads: int | None

    def execute(self) -> Any:
        """Do the work here, in whatever process the runner chose."""


@dataclass
class AttackJob:
    """One attack on one client's update."""

    attack: Attack
    target: AttackTarget
    timeout_s: float | None = None
    memory_mb: int | None = None
    label: str = ""
    threads: int | None = 1

    def execute(self) -> AttackResult:
        return self.attack.run(self.target)


@dataclass
class JobOutcome:
    """What became of a job: a result, or the reason there is none."""

    result: Any
    error: str | None
    elapsed_s: float
    status: str = "completed"  # completed | failed | timeout | skipped

    @classmethod
    def failed(cls, error: str, elapsed: float, status: str = "failed") -> JobOutcome:
        return cls(None, error, elapsed, status)


@contextlib.contextmanager
def limited_threads(threads: int | None) -> Iterator[None]:
    """Cap torch's and the BLAS libraries' threads while an attack runs.

    Attacks solve many small problems; with the default thread pools their
    BLAS threads spin against Flower's ClientApp processes for the same
    cores (measured: a one-input FC attack took 0.6-0.9 s beside a Flower
    simulation on two cores, 5 ms with one thread). ``None`` leaves the
    pools as they are.
    """
    if threads is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


def run_in_process(job: Job) -> JobOutcome:
    """Run the job here; exceptions become outcomes. Caps are not enforced."""
    start = time.perf_counter()
    try:
        with limited_threads(job.threads):
            result = job.execute()
    except MemoryError:
        return JobOutcome.failed("ran out of memory (MemoryError)", _since(start))
    except Exception as exc:
        return JobOutcome.failed(f"{type(exc).__name__}: {exc}", _since(start))
    elapsed = _since(start)
    if job.timeout_s is not None and elapsed > job.timeout_s:
        logger.warning(
            "fl-audit: %s took %.1f s, past its %.1f s cap (inline, not interrupted)",
            job.label,
            elapsed,
            job.timeout_s,
        )
    return JobOutcome(result, None, elapsed)


def _serve(conn: Connection, memory_mb: int | None, low_priority: bool) -> None:
    """Body of an isolated worker process: run jobs until the pipe closes.

    Jobs and outcomes travel as plain pickles: torch's multiprocessing
    reducers would share tensors through file descriptors that vanish with
    the process that made them.
    """
    if low_priority:
        lower_priority()
    import torch

    torch.set_num_threads(1)
    if memory_mb is not None:
        import resource

        limit = int(memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            outcome = run_in_process(pickle.loads(payload))
        except BaseException as exc:  # even a failing unpickle is reported
            outcome = JobOutcome.failed(
                f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}", 0.0
            )
        try:
            conn.send_bytes(pickle.dumps(outcome))
        except Exception as exc:  # e.g. an unpicklable result
            failed = JobOutcome.failed(f"result could not be sent back: {exc}", 0.0)
            conn.send_bytes(pickle.dumps(failed))


_CONTEXT_LOCK = threading.Lock()
_CONTEXT: Any = None


def _context() -> Any:
    """A fork-server context: children fork from a clean server process."""
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            method = (
                "forkserver"
                if "forkserver" in multiprocessing.get_all_start_methods()
                else "spawn"
            )
            ctx = multiprocessing.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload(["torch", "fl_audit.attacks"])
            _CONTEXT = ctx
        return _CONTEXT


class IsolatedWorker:
    """A child process that runs jobs one at a time, replaced when it fails.

    The process is started on first use and kept between jobs, so a job
    costs a pickle, not a process start. A job past its time cap, one that
    runs out of memory or kills the process gets its outcome, and the next
    job gets a fresh process.
    """

    def __init__(
        self, memory_mb: int | None = None, low_priority: bool = False
    ) -> None:
        self.memory_mb = memory_mb
        self.low_priority = low_priority
        self._proc: Any = None
        self._conn: Connection | None = None

    def run(self, job: Job) -> JobOutcome:
        start = time.perf_counter()
        try:
            payload = pickle.dumps(job)
        except Exception as exc:
            return JobOutcome.failed(
                f"the attack or its target cannot be sent to a process: {exc}",
                _since(start),
            )
        if job.memory_mb != self.memory_mb:
            self.close()
            self.memory_mb = job.memory_mb
        try:
            conn = self._connection()
            conn.send_bytes(payload)
        except Exception as exc:
            self.close()
            return JobOutcome.failed(f"could not start a process: {exc}", _since(start))

        if not conn.poll(job.timeout_s):
            self.close()
            return JobOutcome.failed(
                f"stopped after {job.timeout_s:g} s (attack_timeout_s)",
                _since(start),
                status="timeout",
            )
        try:
            outcome: JobOutcome = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return self._crashed(start)
        if outcome.error and "memory" in outcome.error.lower():
            self.close()  # a heap that hit its cap is not reused
        return outcome

    @property
    def pid(self) -> int | None:
        """The worker process's id, ``None`` before its first job."""
        return None if self._proc is None else int(self._proc.pid)

    def _connection(self) -> Connection:
        if self._proc is None or not self._proc.is_alive() or self._conn is None:
            self.close()
            ctx = _context()
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_serve,
                args=(child, self.memory_mb, self.low_priority),
                daemon=True,
            )
            proc.start()
            child.close()
            self._proc, self._conn = proc, parent
        return self._conn

    def _crashed(self, start: float) -> JobOutcome:
        proc = self._proc
        proc.join(5.0)
        code = proc.exitcode
        self.close()
        reason = (
            f"the attack's process was killed by signal {-code}"
            if code is not None and code < 0
            else f"the attack's process exited with code {code}"
        )
        return JobOutcome.failed(reason + " (out of memory?)", _since(start))

    def close(self) -> None:
        """Stop the process (a new one starts with the next job)."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)
        self._proc = self._conn = None


def run_isolated(job: Job) -> JobOutcome:
    """Run one job in a child process of its own, killed past its time cap."""
    worker = IsolatedWorker(job.memory_mb)
    try:
        return worker.run(job)
    finally:
        worker.close()


def _since(start: float) -> float:
    return time.perf_counter() - start


class JobRunner(ABC):
    """Runs a round's attack jobs; one outcome per job, in order."""

    name = ""

    @abstractmethod
    def run(
        self, jobs: Sequence[Job], deadline: float | None = None
    ) -> list[JobOutcome]:
        """Run ``jobs``; those not started by ``deadline`` are skipped.

        ``deadline`` is a ``time.perf_counter()`` value.
        """

    def close(self) -> None:  # noqa: B027  (optional hook, a no-op by default)
        """Release workers (nothing by default)."""


def _skipped(deadline_note: str = "") -> JobOutcome:
    return JobOutcome.failed(
        "not run: the round's audit budget (round_budget_s) was spent" + deadline_note,
        0.0,
        status="skipped",
    )


def _cap(job: Job, deadline: float | None) -> Job:
    """The job with its time cap cut to what is left of the round's budget."""
    if deadline is None:
        return job
    left = max(0.0, deadline - time.perf_counter())
    cap = left if job.timeout_s is None else min(job.timeout_s, left)
    return replace(job, timeout_s=cap)  # type: ignore[type-var]


class InlineRunner(JobRunner):
    """One job after another; isolated in a child process when capped."""

    name = "inline"

    def __init__(self, isolate: bool = False) -> None:
        self.isolate = isolate
        self._worker = IsolatedWorker()

    def run(
        self, jobs: Sequence[Job], deadline: float | None = None
    ) -> list[JobOutcome]:
        outcomes = []
        for job in jobs:
            if deadline is not None and time.perf_counter() >= deadline:
                outcomes.append(_skipped())
                continue
            capped = _cap(job, deadline)
            isolated = self.isolate or capped.timeout_s is not None or job.memory_mb
            outcomes.append(
                self._worker.run(capped) if isolated else run_in_process(job)
            )
        return outcomes

    def close(self) -> None:
        self._worker.close()


class ProcessRunner(JobRunner):
    """Up to ``workers`` isolated child processes at once."""

    name = "process"

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fl-audit")
        self._idle: queue.SimpleQueue[IsolatedWorker] = queue.SimpleQueue()
        for _ in range(self.workers):
            # Background workers yield to training; an inline worker is
            # waited for, so it keeps the server's priority.
            self._idle.put(IsolatedWorker(low_priority=True))

    def run(
        self, jobs: Sequence[Job], deadline: float | None = None
    ) -> list[JobOutcome]:
        def one(job: Job) -> JobOutcome:
            if deadline is not None and time.perf_counter() >= deadline:
                return _skipped()
            worker = self._idle.get()
            try:
                return worker.run(_cap(job, deadline))
            finally:
                self._idle.put(worker)

        return list(self._pool.map(one, jobs))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        while not self._idle.empty():
            self._idle.get().close()


def _ray_task(job: Job) -> JobOutcome:
    lower_priority()
    if job.memory_mb is not None:
        import resource

        limit = int(job.memory_mb) * 2**20
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        try:
            return run_in_process(job)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return run_in_process(job)


def _ray_chunk(jobs: list[Job]) -> list[JobOutcome]:
    """Several uncapped jobs in one Ray task, one after another."""
    return [_ray_task(job) for job in jobs]


class RayRunner(JobRunner):
    """Jobs as Ray tasks, at most ``workers`` in flight.

    Jobs without a time or memory cap travel up to ``chunk`` to a task:
    every task costs Ray's scheduler (lease, raylet, messages) CPU beside
    training, and a chunk carries its jobs' shared bytes once. A task that
    dies fails all jobs of its chunk. Capped jobs get a task each, so a cap
    stops one job only.
    """

    name = "ray"

    def __init__(
        self,
        workers: int,
        address: str | None = None,
        num_cpus: float = 0.0,
        chunk: int = 16,
    ) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        self._ray = ray
        # Flower's simulation holds every CPU of its cluster for ClientApp
        # actors; tasks asking for none run beside them instead of waiting.
        self._task = ray.remote(max_retries=0, num_cpus=num_cpus)(_ray_task)
        self._chunk_task = ray.remote(max_retries=0, num_cpus=num_cpus)(_ray_chunk)
        self.workers = max(1, int(workers))
        self.chunk = max(1, int(chunk))

    def _units(self, jobs: Sequence[Job], deadline: float | None) -> list[list[int]]:
        """Job indices per task, in job order."""
        free = [
            i
            for i, job in enumerate(jobs)
            if _cap(job, deadline).timeout_s is None and job.memory_mb is None
        ]
        size = max(1, min(self.chunk, -(-len(free) // self.workers)))
        units = [free[k : k + size] for k in range(0, len(free), size)]
        taken = set(free)
        units += [[i] for i in range(len(jobs)) if i not in taken]
        return sorted(units, key=lambda unit: unit[0])

    def run(
        self, jobs: Sequence[Job], deadline: float | None = None
    ) -> list[JobOutcome]:
        ray = self._ray
        outcomes: list[JobOutcome | None] = [None] * len(jobs)
        units = self._units(jobs, deadline)
        for first in range(0, len(units), self.workers):
            started = time.perf_counter()
            refs: dict[tuple[int, ...], tuple[Any, float | None]] = {}
            for unit in units[first : first + self.workers]:
                if deadline is not None and started >= deadline:
                    for i in unit:
                        outcomes[i] = _skipped()
                elif len(unit) == 1:
                    job = jobs[unit[0]]
                    one = self._task.remote(_cap(job, None))
                    refs[tuple(unit)] = (one, _cap(job, deadline).timeout_s)
                else:
                    many = self._chunk_task.remote([jobs[i] for i in unit])
                    refs[tuple(unit)] = (many, None)
            for members, (ref, timeout_s) in refs.items():
                wait = None
                if timeout_s is not None:
                    wait = max(0.0, timeout_s - (time.perf_counter() - started))
                try:
                    got = ray.get(ref, timeout=wait)
                    for i, outcome in zip(
                        members, got if len(members) > 1 else [got], strict=True
                    ):
                        outcomes[i] = outcome
                except ray.exceptions.GetTimeoutError:
                    ray.cancel(ref, force=True)
                    outcomes[members[0]] = JobOutcome.failed(
                        f"stopped after {timeout_s:g} s (attack_timeout_s)",
                        _since(started),
                        status="timeout",
                    )
                except Exception as exc:  # worker died, OOM-killed, ...
                    for i in members:
                        outcomes[i] = JobOutcome.failed(
                            f"the Ray task failed: {type(exc).__name__}: {exc}",
                            _since(started),
                        )
        return [o if o is not None else _skipped() for o in outcomes]


def make_runner(
    backend: str,
    *,
    workers: int = 2,
    ray_address: str | None = None,
    ray_num_cpus: float = 0.0,
    isolate: bool = False,
) -> JobRunner:
    """The runner for a config's ``backend``."""
    if backend == "process":
        return ProcessRunner(workers)
    if backend == "ray":
        return RayRunner(workers, ray_address, ray_num_cpus)
    return InlineRunner(isolate=isolate)
