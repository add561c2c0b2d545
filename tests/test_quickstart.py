"""scripts/quickstart.sh, the README's first command, run as a user runs it again and again."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]


def quickstart(out: Path, steps: int) -> str:
    env = {**os.environ, "OUT": str(out), "STEPS": str(steps)}
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh"],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_quickstart_trains_then_continues_then_only_generates(tmp_path):
    """First run: a new run and a sample. With more steps: it resumes from its checkpoint, not
    "already holds a run". Again at the same steps: no training, the sample from the model."""
    out = tmp_path / "qs"
    first = quickstart(out, 4)
    assert "new run" in first and "Generation:" in first
    second = quickstart(out, 8)
    assert f"resuming from {out}/checkpoint-4 (step 4)" in second and "Generation:" in second
    third = quickstart(out, 8)
    assert "already trained" in third and "new run" not in third and "resuming" not in third
    assert "Generation:" in third
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
