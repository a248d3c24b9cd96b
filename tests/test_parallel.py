"""Parallel modes on this CPU: 2 gloo processes against 1, in fp32 (tests/distributed/*.py run under torchrun)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKERS = Path(__file__).parent / "distributed"


def torchrun(script: str, *args: str, nproc: int = 2) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(WORKERS / script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("mode", ["ulysses", "ring", "fsdp"])
def test_forward_and_backward_match_one_process(mode):
    reports = torchrun("equivalence.py", mode)
    assert len(reports) == 2
    for r in reports:
        assert r["output"] < 1e-5 and r["grad"] < 1e-5, r
        # The gradients are not trivially small, so 1e-5 is a real bound.
        assert r["grad_scale"] > 1e-3, r
        # Sequence parallelism really split the 48 video tokens; FSDP kept them whole.
        assert r["tokens"] == (48 if mode == "fsdp" else 24), r


def test_ulysses_and_ring_combined_match_one_process():
    reports = torchrun("equivalence.py", "hybrid", nproc=4)
    assert len(reports) == 4
    assert all(r["output"] < 1e-5 and r["grad"] < 1e-5 and r["tokens"] == 12 for r in reports), reports
