"""benchmarks/train_step.py --estimate-memory: the CPU-side memory estimate of the update step
(fake tensors, torch's MemTracker; private torch API, so a torch upgrade could break it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_update_step_memory_estimate(tmp_path):
    out = tmp_path / "est.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--estimate-memory", "--tiny",
                          "--batch", "4", "--prompt-len", "64", "--response-len", "64",
                          "--variants", "naive,ours+cached,ours+cached+ckpt", "--json-out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines()) if r["kind"] == "memory_estimate"}
    assert set(rows) == {"naive", "ours+cached", "ours+cached+ckpt"}
    naive, ours, ckpt = rows["naive"], rows["ours+cached"], rows["ours+cached+ckpt"]
    # AdamW's two moments in the student's dtype: float32 (ours) vs bf16 (naive), and the weights
    assert ours["optimizer_gib"] == pytest.approx(2 * naive["optimizer_gib"], rel=0.01)
    assert naive["optimizer_gib"] > 0
    assert ours["parameters_gib"] > naive["parameters_gib"] > 0
    # the weights it counts are the models': a bf16 teacher with a bf16 (naive) or float32 student
    N_s, N_t = ours["N_s"], ours["N_t"]
    assert naive["parameters_gib"] == pytest.approx((2 * N_t + 2 * N_s) / 2 ** 30, rel=1e-3)
    assert ours["parameters_gib"] == pytest.approx((2 * N_t + 4 * N_s) / 2 ** 30, rel=1e-3)
    # checkpointing keeps only the blocks' inputs
    assert 0 < ckpt["activations_gib"] < ours["activations_gib"]
    assert ckpt["peak_gib"] < ours["peak_gib"]


def test_each_part_of_the_gpu_check_fits_one_device_call():
    """benchmarks/gpu_check.sh is run one part per device call (at most 600 s each): the time
    limits of a part's commands must leave room under that, and every script it names exists."""
    import re

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    parts = re.findall(r'if \[ "\$PART" = (\d) \].*?\n(.*?)\nfi', text, flags=re.S)
    assert [p for p, _ in parts] == ["1", "2", "3", "4", "5", "6", "7"]
    for part, body in parts:
        limits = [int(n) for n in re.findall(r"^\s*run (\d+) ", body, flags=re.M)]
        assert limits and sum(limits) <= 585, (part, sum(limits))
        for script in re.findall(r"(benchmarks/\w+\.(?:py|sh)|tests/gpu)", body):
            assert (ROOT / script).exists(), script


def test_skinny_matmul_benchmark_checks_its_split_k_kernel_on_the_cpu(tmp_path):
    """benchmarks/skinny_matmul.py --tiny: the split-K Triton matmul (through Triton's interpreter)
    gives x @ W + b in each tiny config, split and not; exit 1 where any is wrong."""
    pytest.importorskip("triton")
    out = tmp_path / "mm.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "skinny_matmul.py"), "--tiny", "--device", "cpu",
                          "--json-out", str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})  # (a GPU machine, too)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    shapes = [json.loads(line) for line in out.read_text().splitlines()]
    shapes = [r for r in shapes if r["kind"] == "shape"]
    assert len(shapes) == 2 and all(len(r["checked"]) == 2 and "wrong" not in r for r in shapes)


def test_iteration_benchmark_runs_both_sides_at_distills_rollout_batch(tmp_path):
    """benchmarks/iteration.py --tiny on the CPU: naive and ours each run a whole iteration, in
    the rollout batch distill would pick (here all 8 rollouts at once), with the switches that
    the GPU check uses to explain the update phase."""
    out = tmp_path / "it.jsonl"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "iteration.py"), "--tiny", "--device", "cpu",
                          "--width-bucket", "1", "--keep-allocator-cache", "--json-out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    machine = next(r for r in rows if r["kind"] == "machine")
    assert machine["rollout_batch"] == 8 and machine["width_bucket"] == 1 and machine["empty_cache_on_release"] is False
    sides = {r["side"]: r for r in rows if r["kind"] == "iteration"}
    assert set(sides) == {"naive", "ours"}
    for r in sides.values():
        assert r["rollout_tokens"] == 8 * 8 and r["optimizer_steps"] == 4 and r["total_s"] > 0
