"""Open the HTML report in a real browser: headless Chromium renders it to PNG.

Runs the federated-hospitals example (3 hospitals, 2 rounds, ~30 s) into a
temporary folder, or takes a run folder that exists, writes its report with
``fl-audit report`` and has Debian's ``chromium`` render the page with the
network cut off (every host name resolves to nothing). Prints the PNG's
path and every console message of the page; the page has no script, so any
console message is an error. Exit status 1 on a console message.

    python bench/report_browser.py [--run-dir DIR] [--png out.png]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = re.compile(r":CONSOLE(?:\(\d+\))?:?\d*\]\s*(.*)")


@dataclass
class BrowserRun:
    """What Chromium did with a page."""

    png: Path
    console: list[str]
    returncode: int


def find_chromium() -> str | None:
    """The Chromium executable, or ``None`` when none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(
    html: Path, png: Path, *, width: int = 1280, height: int = 3000
) -> BrowserRun:
    """Render ``html`` to ``png`` headless, offline; collect console messages."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium on PATH: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="fl-audit-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            html.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [m.group(1) for m in map(CONSOLE.search, proc.stderr.splitlines()) if m]
    return BrowserRun(png=png, console=console, returncode=proc.returncode)


def _run_example(folder: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "federated-hospitals" / "run.py"),
            "--output",
            str(folder),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a run folder (default: run it)")
    parser.add_argument("--png", type=Path, default=Path("report.png"))
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("chromium is not installed (apt-get install -y chromium)")
        return 2

    sys.path.insert(0, str(ROOT))  # this checkout's fl_audit
    from fl_audit.cli import main as cli

    with tempfile.TemporaryDirectory(prefix="fl-audit-report-") as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        if args.run_dir is None:
            _run_example(run_dir)
        html = Path(tmp) / "report.html"
        status = cli(["report", str(run_dir), "--out", str(html)])
        print(f"fl-audit report exit status {status}; {html.stat().st_size} bytes")
        result = screenshot(html, args.png.resolve(), height=args.height)
    print(f"chromium exit status {result.returncode}; screenshot {result.png}")
    print(f"console messages: {len(result.console)}")
    for line in result.console:
        print(f"  {line}")
    return 1 if result.console or result.returncode else 0


if __name__ == "__main__":
    raise SystemExit(main())
