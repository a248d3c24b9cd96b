"""Parallel modes on this CPU: 2 gloo processes against 1, in fp32 (tests/distributed/*.py run under torchrun)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

WORKERS = Path(__file__).parent / "distributed"


def torchrun(script: str, *args: str, nproc: int = 2) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
           str(WORKERS / script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0 and "SIGABRT" in done.stderr:
        # Gloo on a loaded CI machine has, rarely, aborted a rank in C++ ("terminate called
        # without an active exception") where no run here reproduced it; a real bug fails twice.
        # A warning, not a print: pytest shows it in its summary even when the second run passes.
        warnings.warn(f"torchrun {script} {' '.join(args)}: a rank aborted, ran once more; its reason: "
                      + (" | ".join(abort_lines(done.stderr)) or done.stderr[-500:]), stacklevel=2)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, "\n".join([*abort_lines(done.stderr), done.stderr[-3000:]])
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def abort_lines(stderr: str) -> list[str]:
    """The C++ lines that say why a rank aborted: torchrun's summary alone only names the signal."""
    return [line for line in stderr.splitlines() if "terminate called" in line or "what()" in line]


@pytest.mark.slow
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


@pytest.mark.slow
def test_ulysses_and_ring_combined_match_one_process():
    reports = torchrun("equivalence.py", "hybrid", nproc=4)
    assert len(reports) == 4
    assert all(r["output"] < 1e-5 and r["grad"] < 1e-5 and r["tokens"] == 12 for r in reports), reports


@pytest.mark.slow
@pytest.mark.parametrize("ulysses, ring", [(2, 1), (1, 2)], ids=["ulysses", "ring"])
def test_sequence_parallel_sampling_equals_one_process(ulysses, ring, tiny_model):
    """Two videos, true classifier-free guidance, 4 steps: the final latents agree to 1e-5."""
    [report] = torchrun("generate_check.py", str(tiny_model), str(ulysses), str(ring))
    assert report["error"] < 1e-5 and report["scale"] > 0.1, report


@pytest.mark.slow
def test_sequence_parallel_generate_writes_once_and_equals_one_process(tiny_model, tmp_path, monkeypatch):
    from conftest import run_cli
    from hvctl.video import read_video

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread on both sides: the same summation order

    args = ["generate", "a red circle moves left on a black background", "--model", tiny_model, "--seed", "3",
            "--steps", "4", "--json"]
    assert run_cli(*args, "-o", tmp_path / "one.mp4").returncode == 0
    result = run_cli(*args, "-o", tmp_path / "sp.mp4", "--ulysses-degree", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)  # rank 0 alone reports and writes
    assert [v["path"] for v in report["videos"]] == [str(tmp_path / "sp.mp4")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.mp4", "sp.json", "sp.mp4"]
    (one, _), (sp, _) = read_video(tmp_path / "one.mp4"), read_video(tmp_path / "sp.mp4")
    assert (one == sp).all()  # Ulysses attends head by head exactly as one process does


def test_balancing_evens_the_shards_compute_with_equal_counts():
    from hvctl.parallel import balance_micro_batches, sequence_cost

    # A step of 4 micro-batches over 2 shards: long videos and images, alternating in the stream.
    costs = [sequence_cost(n, 128) for n in (4096, 16, 4096, 16)]
    owners = balance_micro_batches(costs, shards=2, per_shard=2)
    assert sorted(owners) == [0, 0, 1, 1]
    load = [sum(c for c, o in zip(costs, owners) if o == s) for s in (0, 1)]
    fixed = [sum(costs[s::2]) for s in (0, 1)]  # j = a*D + d: both videos on shard 0
    assert max(load) == min(load) and max(fixed) > 1.9 * max(load)
    assert sequence_cost(2048, 128) > 2 * sequence_cost(1024, 128)  # attention is quadratic


def test_an_srun_task_becomes_a_torch_rank(monkeypatch):
    from hvctl.errors import HvctlError
    from hvctl.parallel import under_torchrun

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so that what under_torchrun sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not under_torchrun()  # one task: one process
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(HvctlError, match="MASTER_ADDR"):
        under_torchrun()
    monkeypatch.setenv("MASTER_ADDR", "node0")
    assert under_torchrun()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["MASTER_PORT"]) == \
        ("9", "16", "1", "29500")


@pytest.mark.slow
def test_cfg_parallel_sampling_equals_one_process(tiny_model):
    """True CFG with the conditional pass on rank 0 and the unconditional on rank 1: each rank
    runs a batch of one, and the latents agree with one process's doubled batch to 1e-5."""
    [report] = torchrun("cfg_parallel_check.py", str(tiny_model))
    assert report["error"] < 1e-5 and report["scale"] > 0.1 and report["batch_per_call"] == [1], report


@pytest.mark.slow
def test_cfg_parallel_without_true_cfg_is_one_line(tiny_model):
    from conftest import run_cli

    result = run_cli("generate", "x", "--model", tiny_model, "--cfg-parallel", "--guidance-scale", "1")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: --cfg-parallel runs the conditional and unconditional passes of true classifier-free guidance "
        "on two processes: it needs --guidance-scale > 1 (got 1)"]


@pytest.fixture(scope="module")
def ring_reports():
    reports = torchrun("ring_check.py")
    assert len(reports) == 2
    return reports


def test_ring_step_mixing_bucket_lengths_matches_one_process(ring_reports):
    """Micro-batches of 48 and 24 video tokens in one step, text lengths differing per sample."""
    for r in ring_reports:
        assert r["tokens"] == [24, 12], r  # each bucket split over the ring
        assert r["output"] < 1e-5 and r["grad"] < 1e-5 and r["grad_scale"] > 1e-3, r


def test_ring_attention_memory_grows_linearly(ring_reports):
    """Fused blocks: a rank's peak at 4x the sequence is about 4x, not the 16x of a score matrix."""
    for r in ring_reports:
        small, large = r["memory"]["2048"], r["memory"]["8192"]
        assert 0 < large <= 5 * small, r


def test_generate_refuses_a_token_count_that_does_not_split_before_starting_ranks(tiny_model, tmp_path):
    from conftest import run_cli

    result = run_cli("generate", "x", "--model", tiny_model, "--ring-degree", "2", "--height", "48", "--width", "48",
                              "--frames", "1", "-o", tmp_path / "x.mp4")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --ulysses-degree/--ring-degree: 1 frames of 48x48 make 9 video tokens, which do not split evenly over "
        "ulysses 1 x ring 2 = 2 ranks; choose sizes whose token count is a multiple of 2"], result.stderr
    assert not list(tmp_path.iterdir())


def test_ring_runs_the_attention_kernel_chosen_and_sage_does_not_train(monkeypatch):
    import torch

    from hvctl import accelerate, parallel
    from hvctl.errors import HvctlError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert isinstance(parallel.ring_kernel("native", cpu), parallel._CpuFlash)
    assert isinstance(parallel.ring_kernel(None, cuda), parallel._CudaSdpa)
    assert isinstance(parallel.ring_kernel(accelerate._BACKENDS["flash"], cuda), parallel._FlashAttn2)
    assert isinstance(parallel.ring_kernel(accelerate._BACKENDS["flash3"], cuda), parallel._FlashAttn3)
    assert not parallel.ring_kernel(accelerate._BACKENDS["sage"], cuda).trains
    monkeypatch.setattr(accelerate, "attention_choice", lambda name, device: "sage")
    with pytest.raises(HvctlError, match="no backward pass"):
        accelerate.training_attention_backend("auto", cuda)


def test_parallel_modes_benchmark_smoke(tmp_path):
    """The GPU check's one command, at toy sizes on this CPU: the 13B model table and the block table."""
    table = tmp_path / "check.md"
    done = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "benchmarks" / "parallel_modes.py"), "--smoke",
                           "--out", str(table)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fsdp+ulysses+ring u2 r4" in done.stdout and "fsdp+ring u1 r8" in done.stdout
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines() if line.startswith("| sdpa")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("fwd+bwd", "off"), ("fwd+bwd", "on")]
    assert all(float(r[3]) >= 0 and float(r[4]) > 0 for r in rows)
