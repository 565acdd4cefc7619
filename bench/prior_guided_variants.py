"""Prior-guided variants side by side on the same targets (no DLG).

For each input of a bench/iterative.py case (batch 1), runs
PriorGuidedReconstruction once per variant, interleaved so that every
variant sees the same load, and prints per input the final and best PSNR,
the first second at 30 dB and the residual; then per variant the number
of inputs that reached 30 dB within the limit, the number whose returned
answer is >= 30 dB, the median time to 30 dB, the median final PSNR and
the seconds the attack ran in all (its compute, which restarts and the
polish spend after 30 dB).

Run: python bench/prior_guided_variants.py MODALITY MODEL COUNT LIMIT_S
[VARIANTS], VARIANTS a Python dict literal {name: constructor options};
default {"old": {"tv_weight": 3.0, "patience": 100}, "new": {}} (the
ReLU-model defaults before and after the per-trial TV weights).
"""

from __future__ import annotations

import ast
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import iterative as bench  # noqa: E402
import torch  # noqa: E402

from fl_audit.attacks import PriorGuidedReconstruction  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    kind, model = sys.argv[1], sys.argv[2]
    count, limit = int(sys.argv[3]), float(sys.argv[4])
    variants: dict[str, dict] = (
        ast.literal_eval(sys.argv[5])
        if len(sys.argv) > 5
        else {"old": {"tv_weight": 3.0, "patience": 100}, "new": {}}
    )
    rows: dict[str, list[tuple[float, float | None]]] = {k: [] for k in variants}
    spent: dict[str, float] = dict.fromkeys(variants, 0.0)
    for i, (target, x) in enumerate(bench.targets(kind, model, 1, count)):
        for name, options in variants.items():
            times: list[tuple[float, float]] = []

            def watch(
                inputs: torch.Tensor,
                _v: float,
                elapsed: float,
                x: torch.Tensor = x,
                times: list[tuple[float, float]] = times,
            ) -> None:
                psnr = bench.match_inputs(inputs, x, data_range=1.0).median_psnr
                times.append((elapsed, psnr))

            attack = PriorGuidedReconstruction(
                progress=False, callback=watch, time_budget_s=limit, **options
            )
            result = attack.run(target)
            final = bench.match_inputs(result.inputs, x, data_range=1.0).median_psnr
            best = max([final] + [p for _, p in times])
            t30 = next((t for t, p in times if p >= 30.0), None)
            rows[name].append((final, t30))
            spent[name] += result.elapsed_s
            print(
                f"{name} input {i}: final {final:.1f} dB, best {best:.1f} dB, "
                f"30 dB at {'-' if t30 is None else f'{t30:.2f} s'}, "
                f"residual {result.residual:.2e}, ran {result.elapsed_s:.1f} s",
                flush=True,
            )
    print(f"limit {limit:g} s per run, {kind}, {model}, batch 1")
    for name, rs in rows.items():
        reached = [t for _, t in rs if t is not None]
        med = f"{statistics.median(reached):.2f} s" if reached else "-"
        print(
            f"{name}: reached 30 dB {len(reached)}/{len(rs)}, "
            f"returned >= 30 dB {sum(f >= 30.0 for f, _ in rs)}/{len(rs)}, "
            f"median s to 30 dB {med}, "
            f"median final {statistics.median(f for f, _ in rs):.1f} dB, "
            f"ran {spent[name]:.1f} s in all"
        )


if __name__ == "__main__":
    main()
