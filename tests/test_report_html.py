"""``fl-audit report``: verdict exit codes, the HTML page, redaction, the browser."""

from __future__ import annotations

import importlib.util
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from report_fakes import client, outcome, round_report, score, write_run

from fl_audit.cli import main
from fl_audit.data import load_samples
from fl_audit.html_report import load_run, render_html
from fl_audit.report import ReportWriter

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("overview", "redaction", "summary", "policy", "plots", "bound", "rounds")

_spec = importlib.util.spec_from_file_location(
    "report_browser", ROOT / "bench" / "report_browser.py"
)
assert _spec is not None and _spec.loader is not None
browser = importlib.util.module_from_spec(_spec)
sys.modules["report_browser"] = browser  # dataclasses look their module up
_spec.loader.exec_module(browser)
NO_CHROMIUM = "chromium is not installed (apt-get install -y chromium)"


def _policy_file(tmp_path: Path, *rules: str, show: str = "simulation") -> Path:
    path = tmp_path / "policy.yaml"
    body = "".join(f"  - {r}\n" for r in rules) if rules else "  []\n"
    path.write_text(f"name: t\nshow_reconstructions: {show}\nrules:\n{body}")
    return path


def _mixed_run(folder: Path) -> Path:
    """Round 1 passes, round 2 warns (batch 4), round 3 fails (45 dB)."""
    return write_run(
        folder,
        [
            round_report(1, [client("partition-0", batch_size=16)]),
            round_report(2, [client("partition-0", batch_size=4)]),
            round_report(
                3,
                [
                    client("partition-0", batch_size=16),
                    client(
                        "partition-1",
                        batch_size=16,
                        attacks=[outcome(ground_truth=score(45.0))],
                    ),
                ],
            ),
        ],
    )


MIN_BATCH = "{id: small, kind: min_batch_size, severity: warn, min_batch_size: 8}"
PSNR = "{id: psnr, kind: max_psnr, severity: fail, threshold_db: 30}"


@pytest.mark.parametrize(
    ("rounds", "expected"), [([1], 0), ([1, 2], 1), ([1, 2, 3], 2), ([3], 2)]
)
def test_exit_status_is_the_verdict(tmp_path, capsys, rounds, expected):
    # Arrange: a run holding only the given rounds of the mixed run
    _mixed_run(tmp_path / "all")
    run = tmp_path / "run"
    run.mkdir()
    for r in rounds:
        name = f"round-{r:04d}.json"
        (run / name).write_text((tmp_path / "all" / name).read_text())
    policy = _policy_file(tmp_path, MIN_BATCH, PSNR)

    # Act
    status = main(["report", str(run), "--policy", str(policy)])

    # Assert
    out = capsys.readouterr().out
    assert status == expected
    assert f"verdict: {['PASS', 'WARN', 'FAIL'][expected]}" in out
    assert (run / "report.html").is_file()


def test_json_prints_the_verdicts_with_their_evidence(tmp_path, capsys):
    run = _mixed_run(tmp_path / "run")
    policy = _policy_file(tmp_path, MIN_BATCH, PSNR)
    out_html = tmp_path / "elsewhere" / "page.html"

    status = main(
        ["report", str(run), "--policy", str(policy), "--out", str(out_html), "--json"]
    )

    data = json.loads(capsys.readouterr().out)
    assert status == 2 and data["status"] == "fail"
    assert [r["status"] for r in data["rounds"]] == ["pass", "warn", "fail"]
    fired = data["rounds"][2]["clients"][1]["fired"]
    assert fired[0]["rule"] == "psnr" and fired[0]["evidence"]["max_psnr"] == 45.0
    assert data["rounds"][0]["clients"][0]["not_evaluated"][0]["rule"] == "psnr"
    assert data["report"] == str(out_html) and out_html.is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing-folder"], "is not a folder"),
        (["EMPTY"], "holds no readable round report"),
        (["RUN", "--policy", "nope.yaml"], "cannot read the file"),
    ],
)
def test_bad_input_exits_2_with_one_line_on_stderr(tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "round-0001.json").write_text("{not json")
    _mixed_run(tmp_path / "RUN")
    argv = ["report", *(str(tmp_path / a) if a.isupper() else a for a in args)]

    status = main(argv)

    err = capsys.readouterr().err
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_without_policy_the_runs_own_policy_judges_and_a_different_one_is_noted(
    tmp_path,
):
    # Arrange: the audit judged with the default policy; the run keeps it
    run = _mixed_run(tmp_path / "run")
    writer = ReportWriter(run)
    strict = _policy_file(tmp_path, MIN_BATCH)
    from fl_audit.policy import apply_policy, default_policy, load_policy

    writer.write_policy(load_policy(strict).model_dump_json())
    judged = apply_policy(default_policy(), load_run(run).rounds[0])
    writer.write_round(judged)

    # Act
    own = load_run(run)
    other = load_run(run, None)
    default = load_run(run, ROOT / "fl_audit" / "policies" / "default.yaml")

    # Assert
    assert own.policy.name == "t" and "policy.json" in own.policy_source
    assert any("round 1: the audit stored a verdict" in n for n in other.notes)
    assert default.policy.name == "fl-audit default"
    assert not any("round 1" in n for n in default.notes)


def _page(tmp_path: Path, **kw) -> str:
    run = load_run(
        _mixed_run(tmp_path / "run"), _policy_file(tmp_path, MIN_BATCH, PSNR)
    )
    return render_html(run, tmp_path / "page.html", **kw).read_text()


def test_the_page_has_every_section_and_refers_to_nothing_outside_itself(tmp_path):
    html = _page(tmp_path)

    for section in SECTIONS:
        assert f'id="{section}"' in html, section
    for r in (1, 2, 3):
        assert f'id="round-{r}"' in html and f'href="#round-{r}"' in html
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "DATA", html)
    assert re.search(r"https?:|ftp:|//[a-z]|url\(", text, re.IGNORECASE) is None
    assert "<script" not in html and "<link" not in html and "@import" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 2  # the two figures
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "@media print" in html
    # the grid: one lettered cell per client-round, coloured by verdict
    assert html.count('class="v-fail" title="partition-1, round 3: psnr"') == 1
    assert "45.0 dB (1/1)" in html


def test_the_overview_names_the_bounds_probe(tmp_path):
    # Arrange: the mixed run has no probe; a second run has one
    plain = _page(tmp_path)
    rounds = [round_report(1, [client("partition-0")])]
    rounds[0].settings.probe = {"kind": "fashion_mnist", "count": 8, "seed": 0}
    run = load_run(write_run(tmp_path / "probed", rounds), None)

    # Act
    probed = render_html(run, tmp_path / "probed.html").read_text()

    # Assert
    assert "none: a convolution behind a ReLU is judged on its whole output" in plain
    assert "fashion_mnist, up to 8 input(s) (seed 0)" in probed


def _thumbnail_run(folder: Path, kind: str, simulation: bool) -> Path:
    """One round, one client, two real inputs and slightly wrong reconstructions."""
    samples = load_samples(kind, 2, seed=0)
    x = samples.inputs.numpy()  # (2, *input_shape)
    shape = list(x.shape[1:])
    writer = ReportWriter(folder)
    truth_file = writer.save_ground_truth(1, "partition-0", x)
    recon = folder / "round-0001" / "partition-0.analytic_fc.npz"
    noisy = x[::-1] + 0.01  # swapped order: the page must match them back
    np.savez_compressed(recon, inputs=noisy, certified=np.ones(2, bool))
    audit = client(
        "partition-0",
        batch_size=2,
        attacks=[
            outcome(
                recovered=2,
                reconstruction_file="round-0001/partition-0.analytic_fc.npz",
                ground_truth=score(40.0, n=2),
            )
        ],
        ground_truth_file=truth_file,
    )
    audit.metadata.input_shape = shape
    audit.metadata.input_range = (0.0, 1.0)
    writer.write_round(round_report(1, [audit], simulation=simulation, shape=shape))
    return folder


@pytest.mark.parametrize(("kind", "css"), [("mri", "pair"), ("ecg", "pair trace")])
def test_a_simulation_shows_truth_beside_reconstruction(tmp_path, kind, css):
    # Arrange: real MRI slices (images) and ECG beats (1-D signals)
    run = _thumbnail_run(tmp_path / "run", kind, simulation=True)

    # Act
    path = render_html(load_run(run, None))

    # Assert
    html = path.read_text()
    assert html.count(f'<div class="{css}">') == 2
    assert html.count('alt="true input"') == 2
    assert html.count('alt="reconstruction"') == 2
    assert "Reconstruction images are shown: the run is marked as a simulation" in html
    # matched back despite the swapped order: a 0.01 offset is 40 dB
    assert html.count("40.0 dB") >= 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("simulation", "show", "why"),
    [
        (False, "simulation", "the run is not marked as a simulation"),
        (True, "never", "the policy sets show_reconstructions: never"),
    ],
)
def test_redaction_shows_no_image_reads_no_file_and_says_so(
    tmp_path, simulation, show, why
):
    # Arrange: the reconstruction file is corrupt, so reading it would be noted
    run = _thumbnail_run(tmp_path / "run", "mri", simulation=simulation)
    (run / "round-0001" / "partition-0.analytic_fc.npz").write_bytes(b"garbage")
    policy = _policy_file(tmp_path, PSNR, show=show)

    # Act
    report = load_run(run, policy)
    path = render_html(report)

    # Assert
    html = path.read_text()
    assert 'alt="reconstruction"' not in html and 'alt="true input"' not in html
    assert "Reconstruction images are redacted: " + why in html
    assert "1 reconstruction file(s) and 1 ground-truth file(s)" in html
    assert not any("could not be read" in n for n in report.notes)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_policy_always_shows_reconstructions_of_a_real_run(tmp_path):
    run = _thumbnail_run(tmp_path / "run", "mri", simulation=False)
    policy = _policy_file(tmp_path, PSNR, show="always")

    html = render_html(load_run(run, policy)).read_text()

    assert html.count('alt="reconstruction"') == 2
    assert "show_reconstructions: always" in html


def test_the_generated_docs_are_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "report_docs.py"), "--check"],
        capture_output=True,
        text=True,
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(browser.find_chromium() is None, reason=NO_CHROMIUM)
def test_chromium_renders_the_page_without_console_errors(tmp_path):
    # Arrange: the page, and a page with a script error to show the check bites
    run = _thumbnail_run(tmp_path / "run", "mri", simulation=True)
    page = render_html(load_run(run, None))
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFn();</script></body></html>")

    # Act
    good = browser.screenshot(page, tmp_path / "page.png", height=1200)
    bad = browser.screenshot(broken, tmp_path / "broken.png", height=200)

    # Assert
    assert good.returncode == 0 and good.console == []
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert any("undefinedFn is not defined" in line for line in bad.console)
