"""``make bench`` runs and its figures are what they claim to be.

The bench runs as under make, in its own process, in the smallest configuration: the tiny SD1.5
UNet at 64 px, one step, two repetitions. Timings cannot be asserted, so what is asserted is
what they are made of: every ratio is the one recomputed from the raw times the bench records,
the FLOP ratios say each injection adds work but little, the CPU memory figure is the bytes of
the very modules named (weighed here independently), and a re-queued graph runs none of our
nodes. What sampling with the sound must not do is asserted by tests/test_sampling_costs.py.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
REQUIRED = (
    "conditioning_overhead_ratio",
    "model_overhead_ratio",
    "clap_clips_per_s",
    "audio_modules_peak_mem_mb",
    "requeue_our_nodes_ms",
    "conditioning_flops_ratio",
    "model_flops_ratio",
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


def weight_bytes(module: torch.nn.Module) -> int:
    """Parameter and buffer bytes, each tensor once."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_bench(
        tmp_path_factory.mktemp("bench") / "results.json",
        "--sections", "abcd", "--size", "64", "--steps", "1", "--reps", "2", "--warmup", "0",
        "--forwards", "1", "--clap-batches", "1,2", "--clap-reps", "2",
    )  # fmt: skip


def test_every_figure_and_the_machine_are_recorded(results: dict) -> None:
    assert [key for key in REQUIRED if results.get(key) is None] == ["requeue_our_nodes_ms"]  # section e not asked
    assert [key for key in MACHINE if key not in results["machine"]] == []
    assert results["config"]["device"] == "cpu"
    assert set(results["clap_clips_per_s"]) == {"batch_1", "batch_2"}


def test_overhead_ratios_are_the_medians_of_the_recorded_times(results: dict) -> None:
    raw = results["sampling"]["raw_seconds_per_step"]
    for variant in ("plain", "conditioning", "model"):
        assert len(raw[variant]["wall"]) == 2  # --reps 2, nothing else mixed in
    for key, variant in (("conditioning_overhead_ratio", "conditioning"), ("model_overhead_ratio", "model")):
        expected = statistics.median(raw[variant]["wall"]) / statistics.median(raw["plain"]["wall"])
        assert results[key] == pytest.approx(expected, rel=1e-12), key


def test_each_injection_adds_unet_work_but_little(results: dict) -> None:
    # 77 audio tokens (conditioning) or one audio attention per layer (model) on top of the
    # text: more FLOPs than plain, and far from double at 64 px.
    for key in ("conditioning_flops_ratio", "model_flops_ratio"):
        assert 1.0 < results[key] < 1.5, (key, results[key])
    gflops = results["unet_forward"]["gflops"]
    assert results["model_flops_ratio"] == pytest.approx(gflops["model"] / gflops["plain"], rel=1e-9)


def test_clap_throughput_is_clips_over_the_median_call_time(results: dict) -> None:
    raw = results["clap"]["raw_seconds_per_call"]
    for batch in (1, 2):
        assert len(raw[f"batch_{batch}"]) == 2
        expected = batch / statistics.median(raw[f"batch_{batch}"])
        assert results["clap_clips_per_s"][f"batch_{batch}"] == pytest.approx(expected, rel=1e-12)


def test_cpu_memory_figure_is_the_bytes_of_clap_audio_tower_the_clap2diffusion_model_and_the_keys_values(
        results: dict, test_models) -> None:
    from clap2diffusion_core import testing
    from clap2diffusion_core.clap import load_clap_tower

    resident = results["memory"]["resident_bytes"]
    clap = load_clap_tower(test_models.clap_folder, "audio")  # what CLAP Encode loads
    c2d = testing.random_model(stage=2, layout="tiny", seed=1)  # the bench's model
    assert resident["clap_audio_tower_mb"] == pytest.approx(weight_bytes(clap) / MB, rel=1e-6)  # (storages vs views: bytes apart)
    assert resident["clap2diffusion_model_mb"] == pytest.approx(weight_bytes(c2d) / MB, rel=1e-6)
    assert 0 < resident["audio_kv_mb"] < resident["clap2diffusion_model_mb"]
    expected = resident["clap_audio_tower_mb"] + resident["clap2diffusion_model_mb"] + resident["audio_kv_mb"]
    assert results["audio_modules_peak_mem_mb"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_bench_requeue_runs_none_of_our_nodes_again(tmp_path: Path) -> None:
    results = run_bench(tmp_path / "results.json", "--sections", "e", "--server-size", "64", "--server-steps", "1")
    requeue = results["requeue"]
    workflow = json.loads((REPO_ROOT / "example_workflows" / "audio_adapter.json").read_text())
    ours = sorted(n["type"] for n in workflow["nodes"] if n["type"].startswith("C2D_"))
    assert requeue["our_nodes"] == ours
    assert requeue["first_run_our_nodes_ms"] > 0  # the first run did execute them, so the zero below is cache
    assert requeue["requeue_our_nodes_executed"] == []  # ComfyUI's cache answers for all of them
    assert requeue["requeue_our_nodes_cached"] == ours
    assert results["requeue_our_nodes_ms"] == 0
    executed = requeue["new_seed_nodes_executed"]
    assert "KSampler" in executed and not set(ours) & set(executed)  # a new seed samples again, our nodes cached
