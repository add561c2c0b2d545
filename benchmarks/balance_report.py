"""Expert balance of training runs, from their metrics.jsonl: how long the collapse phase
lasted and how well balance held after it (the numbers of docs/quality.md).

    python benchmarks/balance_report.py runs/tiny runs/small --from-step 150

Per run: the share of steps from --from-step on whose worst layer has max/mean load <= 1.3
(MaxVio <= 0.3), the largest max/mean there, how many steps reached 3, and the collapse phase:
the first and last step with max/mean > 1.5 and how many there were.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from customllm.metrics import METRICS_NAME, read_metrics


def report(run: Path, from_step: int) -> dict:
    path = run / METRICS_NAME if run.is_dir() else run
    if not path.is_file():
        sys.exit(f"Error: {path} not found: give a run folder (holding {METRICS_NAME}) or the file")
    records = [r for r in read_metrics(path) if "loss" in r]
    ratio = {r["step"]: r["max_vio"] + 1 for r in records if r.get("max_vio") is not None}
    if not ratio:
        sys.exit(f"Error: {path} has no max_vio records (a dense model, or an older run)")
    late = [v for step, v in ratio.items() if step >= from_step]
    high = [step for step, v in ratio.items() if v > 1.5]
    return {
        "run": str(run),
        "steps": max(ratio),
        "balanced_share": sum(v <= 1.3 for v in late) / len(late) if late else None,
        "late_max": max(late) if late else None,
        "late_at_3": sum(v >= 3 for v in late),
        "collapse_first": high[0] if high else None,
        "collapse_last": high[-1] if high else None,
        "collapse_steps": len(high),
        "worst": max(ratio.values()),
        "final_loss": sum(r["loss"] for r in records[-20:]) / len(records[-20:]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="Run folders (or metrics.jsonl files).")
    p.add_argument("--from-step", type=int, default=150)
    p.add_argument("--json", type=Path, default=None)
    opts = p.parse_args()
    rows = [report(run, opts.from_step) for run in opts.runs]
    for r in rows:
        share = "-" if r["balanced_share"] is None else f"{r['balanced_share']:.0%}"
        phase = (
            f"steps {r['collapse_first']}-{r['collapse_last']} ({r['collapse_steps']} steps)"
            if r["collapse_steps"]
            else "none"
        )
        print(
            f"{r['run']}: {r['steps']} steps | from step {opts.from_step}: {share} at max/mean "
            f"<= 1.3, max {r['late_max'] or 0:.2f}, {r['late_at_3']} at >= 3 | max/mean > 1.5: "
            f"{phase}, worst {r['worst']:.2f} | last 20 steps' loss {r['final_loss']:.3f}"
        )
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
