"""``make bench`` runs and writes bench/results.json with its keys (no timing is asserted).

The bench runs as it does under make, in its own process, in the smallest configuration: the
tiny SD1.5 UNet at 64 px, one step, one repetition. What is asserted is what the figures rest on:
every key is there, and one sampling run with the model injection neither projects the audio
again nor reads tensors back to the host (keys/values are computed once per sound).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED = (
    "conditioning_overhead_ratio",
    "model_overhead_ratio",
    "clap_clips_per_s",
    "audio_modules_peak_mem_mb",
    "requeue_our_nodes_ms",
    "machine",
)
MACHINE = ("cpu", "cpu_cores", "torch", "device", "load_average_start", "load_average_end", "date")


def run_bench(out: Path, *args: str) -> dict:
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "bench.py"), "--out", str(out), "--threads", "1", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert str(out) in proc.stdout  # the table is printed, then where the results went
    return json.loads(out.read_text())


def test_bench_tiny_configuration(tmp_path: Path) -> None:
    results = run_bench(
        tmp_path / "results.json",
        "--sections", "abcd", "--size", "64", "--steps", "1", "--reps", "1", "--warmup", "0",
        "--forwards", "1", "--clap-batches", "1,2", "--clap-reps", "1",
    )  # fmt: skip
    for key in REQUIRED:
        assert key in results, key
    for key in MACHINE:
        assert key in results["machine"], key
    assert results["config"]["device"] == "cpu"
    assert results["conditioning_overhead_ratio"] > 0
    assert results["model_overhead_ratio"] > 0
    assert set(results["clap_clips_per_s"]) == {"batch_1", "batch_2"}
    assert results["audio_modules_peak_mem_mb"] > 0
    assert results["requeue_our_nodes_ms"] is None  # section e not asked for
    for variant in ("plain", "conditioning", "model"):
        assert len(results["sampling"]["raw_seconds_per_step"][variant]["wall"]) == 1

    checks = results["checks"]
    assert checks["open_layers"] == 4  # the tiny UNet's cross-attention layers, gates open
    assert checks["adapter_layer_kv_calls_while_sampling"] == 0
    assert checks["silence_tokens_calls_while_sampling"] == 0
    assert checks["kv_batch_assemblies_per_run"] == checks["open_layers"]  # once per layer, not per step
    assert checks["patch_calls_per_run"] == checks["open_layers"] * checks["unet_calls_per_run"]
    assert checks["audio_kv_dtype"] == checks["unet_compute_dtype"]
    assert checks["kv_patcher_loaded_with_unet"]
    assert checks["events_added_per_run"]["model"], "the profiler counted nothing"
    for kind, added in checks["events_added_per_run"]["model"].items():
        assert added == 0, f"the model injection adds {added} {kind} per sampling run"


@pytest.mark.slow
def test_bench_requeue_through_the_server(tmp_path: Path) -> None:
    results = run_bench(tmp_path / "results.json", "--sections", "e", "--server-size", "64", "--server-steps", "1")
    requeue = results["requeue"]
    assert len(requeue["our_nodes"]) == 8
    assert requeue["requeue_our_nodes_executed"] == []  # ComfyUI's cache answers for all of them
    assert sorted(requeue["requeue_our_nodes_cached"]) == requeue["our_nodes"]
    assert results["requeue_our_nodes_ms"] == 0
    assert "KSampler" in requeue["new_seed_nodes_executed"]
