"""Isolation, caps, budgets and background rounds (fl_audit.runtime)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from fl_audit import AuditConfig
from fl_audit.attacks import AnalyticFCInversion
from fl_audit.data import load_samples
from fl_audit.runtime import (
    AttackJob,
    InlineRunner,
    IsolatedWorker,
    ProcessRunner,
    run_isolated,
)
from tests.attack_fakes import Hog, NaNs, Raises, Sleepy
from tests.flower_fakes import (
    audited_strategy,
    mlp,
    sgd_step,
    train_reply,
)


def _target():
    from fl_audit.core import AttackTarget

    model = mlp()
    grads = {
        n: np.zeros(tuple(p.shape), np.float32) for n, p in model.named_parameters()
    }
    return AttackTarget.from_gradients(model, grads, (1, 8, 8))


def test_an_attack_past_its_cap_is_stopped_and_reported():
    start = time.perf_counter()
    outcome = run_isolated(AttackJob(Sleepy(30.0), _target(), timeout_s=1.0))
    assert outcome.status == "timeout" and "stopped after 1 s" in outcome.error
    assert time.perf_counter() - start < 15.0


def test_an_attack_that_raises_is_an_outcome_in_both_modes():
    job = AttackJob(Raises(), _target())
    for outcome in (InlineRunner().run([job])[0], run_isolated(job)):
        assert outcome.status == "failed" and "blew up" in outcome.error


def test_an_attack_over_its_memory_cap_fails_alone():
    runner = InlineRunner()
    outcomes = runner.run(
        [AttackJob(Hog(), _target(), memory_mb=4096), AttackJob(NaNs(), _target())]
    )
    assert outcomes[0].status == "failed"
    assert "memory" in outcomes[0].error.lower()
    assert outcomes[1].result is not None  # the next attack still ran


def test_round_budget_skips_attacks_not_started_in_time(tmp_path):
    model = mlp()
    cfg = AuditConfig(output_dir=tmp_path, round_budget_s=1.5, attack_timeout_s=1.0)
    audit = audited_strategy(
        model=model, input_shape=(1, 8, 8), attacks=[Sleepy(5.0)], config=cfg
    )
    state = model.state_dict()
    replies = [
        train_reply(n, {k: v + n for k, v in state.items()}, 1) for n in (1, 2, 3)
    ]

    audit.aggregate_train(1, replies)

    reasons = [c.attacks[0].reason for c in audit.reports[1].clients]
    assert sum("stopped after" in r for r in reasons) >= 1
    assert sum("budget" in r for r in reasons) >= 1


def test_nan_results_are_flagged(tmp_path):
    model = mlp()
    audit = audited_strategy(
        model=model,
        input_shape=(1, 8, 8),
        attacks=[NaNs()],
        config={"output_dir": tmp_path},
    )
    audit.aggregate_train(1, [train_reply(1, model.state_dict(), 1)])
    (client,) = audit.reports[1].clients
    assert "NaN/Inf" in " ".join(client.attacks[0].notes)


def test_process_backend_returns_before_the_audit_and_reports_later(tmp_path):
    # Arrange: a real digit per client and a slow attack beside the real one
    samples = load_samples("digits", 2, seed=0)
    model = mlp(64, 16, 10)
    cfg = AuditConfig(output_dir=tmp_path, backend="process", workers=2)
    audit = audited_strategy(
        model=model,
        input_shape=(1, 8, 8),
        attacks=[AnalyticFCInversion(), Sleepy(3.0)],
        config=cfg,
        train_config={"lr": 0.1},
    )
    replies = [
        train_reply(
            i + 1,
            sgd_step(model, samples.inputs[i : i + 1], samples.labels[i : i + 1], 0.1),
            1,
            meta={"partition-id": i, "batch-size": 1, "local-steps": 1},
        )
        for i in range(2)
    ]

    threads: list[str] = []
    reading = audit._audit

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return reading(*args, **kwargs)

    audit._audit = recorded

    # Act
    start = time.perf_counter()
    aggregate, _ = audit.aggregate_train(1, replies)
    returned = time.perf_counter() - start
    finished = audit.wait(60.0)

    # Assert: the round did not wait for the 3 s attack, nor read the replies
    # for the audit on its own thread; the report came after
    assert aggregate is not None and returned < 2.0
    assert threads and all(name.startswith("fl-audit-round") for name in threads)
    assert finished and (tmp_path / "round-0001.json").exists()
    for client in audit.reports[1].clients:
        fc, sleepy = client.attacks
        assert fc.certified == 1 and sleepy.status == "completed"


def test_process_runner_keeps_order_and_isolates_failures():
    runner = ProcessRunner(2)
    try:
        outcomes = runner.run(
            [
                AttackJob(Raises(), _target()),
                AttackJob(NaNs(), _target()),
                AttackJob(Sleepy(0.1), _target()),
            ]
        )
    finally:
        runner.close()
    assert [o.status for o in outcomes] == ["failed", "completed", "completed"]


@pytest.mark.slow
def test_ray_backend_runs_attacks_as_tasks(tmp_path):
    ray = pytest.importorskip("ray")
    from fl_audit.runtime import RayRunner

    runner = RayRunner(2, chunk=2)
    jobs = [
        AttackJob(NaNs(), _target()),
        AttackJob(Sleepy(30.0), _target(), timeout_s=2.0),
        AttackJob(Raises(), _target()),
        AttackJob(NaNs(), _target()),
        AttackJob(NaNs(), _target()),
    ]
    try:
        # Uncapped jobs share tasks (chunks of 2), the capped one has its own
        assert runner._units(jobs, None) == [[0, 2], [1], [3, 4]]
        outcomes = runner.run(jobs)
    finally:
        ray.shutdown()
    assert outcomes[0].result is not None
    assert outcomes[1].status == "timeout"
    assert outcomes[2].status == "failed"  # alone: its chunk-mate completed
    assert [o.status for o in outcomes[3:]] == ["completed", "completed"]


def test_a_worker_is_reused_until_a_job_kills_it():
    worker = IsolatedWorker()
    try:
        assert worker.run(AttackJob(NaNs(), _target())).result is not None
        first = worker.pid
        assert worker.run(AttackJob(Raises(), _target())).status == "failed"
        assert worker.pid == first  # an exception does not cost the process
        assert (
            worker.run(AttackJob(Sleepy(30), _target(), timeout_s=0.5)).status
            == "timeout"
        )
        assert worker.run(AttackJob(NaNs(), _target())).result is not None
        assert worker.pid != first  # the hung process was replaced
    finally:
        worker.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux SCHED_IDLE")
def test_background_workers_yield_the_cpu_to_training():
    background, inline = IsolatedWorker(low_priority=True), IsolatedWorker()
    try:
        for worker in (background, inline):
            assert worker.run(AttackJob(NaNs(), _target())).result is not None
        # The process backend's workers run only on otherwise idle cores; the
        # inline backend's worker is waited for, so it keeps normal priority.
        assert os.sched_getscheduler(background.pid) == os.SCHED_IDLE
        assert os.sched_getscheduler(inline.pid) == os.SCHED_OTHER
    finally:
        background.close()
        inline.close()


def test_process_backend_audits_whole_clients_in_workers(tmp_path):
    # Arrange: ground truth scored and files written by the workers; one
    # client's attack hangs past its cap
    samples = load_samples("digits", 2, seed=2)
    model = mlp(64, 16, 10)
    cfg = AuditConfig(
        output_dir=tmp_path,
        backend="process",
        workers=2,
        background=False,
        allow_ground_truth=True,
        attack_timeout_s=20.0,
    )
    audit = audited_strategy(
        model=model, input_shape=(1, 8, 8), config=cfg, train_config={"lr": 0.1}
    )
    x, y = samples.inputs, samples.labels
    replies = [
        train_reply(
            i + 1,
            sgd_step(model, x[i : i + 1], y[i : i + 1], 0.1),
            1,
            meta={"partition-id": i, "batch-size": 1, "local-steps": 1},
            truth={"inputs": x[i : i + 1].numpy(), "labels": y[i : i + 1].numpy()},
        )
        for i in range(2)
    ]

    # Act
    audit.aggregate_train(1, replies)

    # Assert
    for client in audit.reports[1].clients:
        (fc,) = client.attacks
        assert fc.certified == 1 and fc.ground_truth.min_certified_psnr >= 60.0
        assert (tmp_path / fc.reconstruction_file).exists()
        assert (tmp_path / client.ground_truth_file).exists()

    # ... and a client whose audit hangs is reported, the round goes on
    hang = audited_strategy(
        model=model,
        input_shape=(1, 8, 8),
        attacks=[Sleepy(60.0)],
        config=cfg.model_copy(
            update={"output_dir": tmp_path / "hang", "attack_timeout_s": 1.0}
        ),
    )
    hang.aggregate_train(1, replies)
    (failed, _) = (c.attacks[0] for c in hang.reports[1].clients)
    assert failed.status == "failed" and "stopped after 1 s" in failed.reason
