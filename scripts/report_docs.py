"""Regenerate (or check) the generated parts of docs/reports.md.

docs/reports.md quotes the default policy as shipped and the JSON schemas
of the round report and of the policy, generated from the pydantic models.
Each generated part sits between ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->``.

    python scripts/report_docs.py          # rewrite the generated parts
    python scripts/report_docs.py --check  # exit 1 if they are out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_audit.policy import Policy  # noqa: E402
from fl_audit.report import RoundReport  # noqa: E402

DOC = ROOT / "docs" / "reports.md"


def parts() -> dict[str, str]:
    """The generated text of every part, by name."""
    policy = (ROOT / "fl_audit" / "policies" / "default.yaml").read_text()
    return {
        "default-policy": f"```yaml\n{policy.strip()}\n```",
        "round-schema": "```json\n"
        + json.dumps(RoundReport.model_json_schema(), indent=2)
        + "\n```",
        "policy-schema": "```json\n"
        + json.dumps(Policy.model_json_schema(), indent=2)
        + "\n```",
    }


def render(text: str) -> str:
    for name, body in parts().items():
        begin, end = (
            f"<!-- BEGIN GENERATED: {name} -->",
            f"<!-- END GENERATED: {name} -->",
        )
        pattern = re.compile(rf"({begin}\n)(?:.*?\n)?({end})", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"{DOC}: no generated part {name!r}")
        text = pattern.sub(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    old = DOC.read_text(encoding="utf-8")
    new = render(old)
    if args.check:
        if new != old:
            print(f"{DOC} is out of date: run python scripts/report_docs.py")
            return 1
        print(f"{DOC} is up to date")
        return 0
    DOC.write_text(new, encoding="utf-8")
    print(f"{DOC} rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
