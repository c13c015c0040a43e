"""What sound costs on top of text: ``make bench`` (issue 8).

One process, one model, one seed; the variants are interleaved (the order rotates every
repetition) after a warm-up, and every figure is a median, so a machine whose load drifts hits
all variants alike. Sections:

  a  sampling with Apply Audio to Conditioning (77 audio tokens appended to the positive) / plain
  b  sampling with Apply Audio to Model (random stage-2 file, gates open) / plain, plus the UNet
     forward alone (time and FLOPs, for both injections)
  c  CLAP encoding throughput, 10 s clips at batch 1 and 8 (clips/s; mel front end included)
  d  memory the audio modules add (cuda: measured peaks; cpu: bytes of what stays resident)
  e  a re-queued identical graph through a real ComfyUI server: milliseconds spent in our nodes
  f  CLAP against transformers' own pipeline, the audio tower's memory, a streamed 1-hour file
     (``bench/clap_bench.py``; minutes on a CPU)

CPU (default): the tiny SD1.5 test UNet at 256 px, 4 euler steps, cfg 7. ``--full``: the full
SD1.5 UNet architecture (random weights) at 512x512, 20 steps, on cuda in the dtype ComfyUI picks
(fp16). Writes ``bench/results.json`` and prints a table.

    .venv/bin/python bench/bench.py [--full] [--reps 5] [--steps N] [--size PX] [--sections abcdef]

Built on ``tools/time_model_injection.py`` (the adapter's own timing), with the same UNet builder
(``tools/test_models.sd15_unet_model``) and module loader (``tools/pack_modules``); its interleaved sampling, process-CPU column, UNet-forward-only times and
FLOP count are section b here, extended to the conditioning injection. The bench measures; what
the injections must not do while sampling (project the sound again, compute silence, add host
reads or copies) is asserted by tests/test_sampling_costs.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from tools import test_models as tm  # noqa: E402
from tools.pack_modules import load as pack_module  # noqa: E402 (the pack's modules as ComfyUI imports them)

DEFAULT_OUT = REPO_ROOT / "bench" / "results.json"
REQUEUE_WORKFLOW = REPO_ROOT / "example_workflows" / "audio_adapter.json"
MB = 1024 * 1024
CLIP_SECONDS = 10.0

# The pack's node classes: every node id that starts with this is ours.
OUR_NODE_PREFIX = "C2D_"


# ------------------------------------------------------------------------------------------------
# helpers


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }
    with contextlib.suppress(Exception):
        import transformers

        info["transformers"] = transformers.__version__
    return info


class Timer:
    """Wall and process-CPU seconds of a block; syncs cuda at both ends."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Timer:
        if self.cuda:
            torch.cuda.synchronize()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def interleaved(
    variants: dict[str, Callable[[], tuple[float, float]]], reps: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Run every variant ``warmup`` times, then ``reps`` rounds in a rotating order.

    Each call returns (wall, cpu) seconds; the result maps variant -> {"wall": [...], "cpu": [...]}.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    out: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            wall, cpu = variants[name]()
            out[name]["wall"].append(wall)
            out[name]["cpu"].append(cpu)
    return out


def ratios(times: dict[str, dict[str, list[float]]], variant: str, base: str = "plain") -> dict[str, float]:
    """Ratio of medians, and the median of per-round ratios (paired: the steadier one under drift)."""
    out: dict[str, float] = {}
    for column in ("wall", "cpu"):
        v, b = times[variant][column], times[base][column]
        out[f"{column}_ratio_of_medians"] = median(v) / median(b)
        out[f"{column}_median_paired_ratio"] = median([x / y for x, y in zip(v, b, strict=True)])
    return out


# ------------------------------------------------------------------------------------------------
# the setup shared by the sections


class Setup:
    """The UNet (a ComfyUI ModelPatcher), the conditionings, the audio tokens and both injections."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        import comfy.sample

        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        self.patch = pack_module("nodes.model_patch")
        self.cond_nodes = pack_module("nodes.conditioning_nodes")
        testing = pack_module("clap2diffusion_core.testing")
        clap = pack_module("clap2diffusion_core.clap")
        audio = pack_module("clap2diffusion_core.audio")

        start = time.perf_counter()
        self.model = tm.sd15_unet_model(full=args.unet == "sd15", seed=0)
        self.build_seconds = time.perf_counter() - start

        # The audio side, as the nodes run it: CLAP Encode of a sound, decompose, project.
        models = tm.build_all()
        # What CLAP Encode loads: the audio tower alone, in float32 (nodes/clap_nodes.py).
        self.clap = clap.load_clap_tower(models.clap_folder, "audio").to(device=device, dtype=torch.float32)
        waveform, rate = audio.load_audio_file(models.sounds["thunder.wav"])
        self.c2d = testing.random_model(stage=2, layout=args.unet, seed=1)
        embeds = self.clap.embed(waveform.unsqueeze(0).to(device), rate, "first")
        self.tokens = self.c2d.project(self.c2d.encode(embeds.cpu()))

        gen = torch.Generator().manual_seed(0)
        text = torch.randn(1, 77, 768, generator=gen)  # stands for CLIP Text Encode's output
        negative = torch.randn(1, 77, 768, generator=gen)
        self.positive = [[text, {}]]
        self.negative = [[negative, {}]]
        self.positive_audio = self.cond_nodes.ApplyAudioToConditioning.execute(
            self.positive, self.tokens, 1.0
        ).result[0]

        start = time.perf_counter()
        self.patched = self.patch.apply_audio_to_model(self.model, self.c2d, self.tokens)
        self.apply_ms = (time.perf_counter() - start) * 1000
        self.injection = self.patch.audio_injections(self.patched)[0]
        self.kv = self.injection.kv

        size = args.size
        self.latent = torch.zeros(args.batch, 4, size // 8, size // 8)
        self.noise = comfy.sample.prepare_noise(self.latent, seed=0)
        self.dtype = self.patch.compute_dtype(self.model)

    def sigma_reading(self):  # noqa: ANN201
        """Apply Audio to Model as if start/end percent were set, yet acting in every step.

        A start/end range other than 0..1 makes the patch test sigma once per UNet call (a host
        read: a device sync on cuda). Real ranges also switch the sound off in some steps, which
        would hide the read's cost; here the range is everything, so only the read differs."""
        patched = self.patch.apply_audio_to_model(self.model, self.c2d, self.tokens)
        injection = self.patch.audio_injections(patched)[0]
        injection.full_range = False  # sigma_range stays (inf, 0): every sigma is in range
        return patched

    def sample(self, model, positive) -> torch.Tensor:
        import comfy.sample

        return comfy.sample.sample(
            model, self.noise, self.args.steps, 7.0, "euler", "normal", positive, self.negative,
            self.latent, seed=0, disable_pbar=True,
        )  # fmt: skip

    def timed_sample(self, model, positive) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            with Timer(self.cuda) as t:
                self.sample(model, positive)
            return t.wall / self.args.steps, t.cpu / self.args.steps

        return run


# ------------------------------------------------------------------------------------------------
# a + b: sampling


def section_sampling(s: Setup, sections: str) -> dict[str, Any]:
    variants = {"plain": s.timed_sample(s.model, s.positive)}
    if "a" in sections:
        variants["conditioning"] = s.timed_sample(s.model, s.positive_audio)
    if "b" in sections:
        variants["model"] = s.timed_sample(s.patched, s.positive)
        if s.args.ranged:  # as with start/end percent: one host read of sigma per UNet call
            variants["model_ranged"] = s.timed_sample(s.sigma_reading(), s.positive)
    times = interleaved(variants, s.args.reps, s.args.warmup)
    out: dict[str, Any] = {
        "seconds_per_step": {name: {c: median(t[c]) for c in ("wall", "cpu")} for name, t in times.items()},
        "raw_seconds_per_step": times,
    }
    for name in variants:
        if name != "plain":
            out[f"{name}_vs_plain"] = ratios(times, name)
    return out


@torch.inference_mode()
def section_forward(s: Setup, n: int, sections: str) -> dict[str, Any]:
    """One CFG step's UNet forward (uncond + cond rows) per variant: FLOPs, and times interleaved.

    FLOPs (torch's FlopCounterMode, SDPA on its math backend so that the counter sees it, as in
    tools/time_model_injection.py) do not depend on the machine's load. Of the times, the minimum
    is the figure least disturbed by other processes on a shared machine. The conditioning variant
    has the audio tokens in the cond rows' context and the uncond rows' context repeated to the
    same length, as ComfyUI batches them."""
    import comfy.model_management
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    comfy.model_management.load_models_gpu([s.patched])
    unet = s.patched.model.diffusion_model
    b = s.latent.shape[0]
    dev, dtype = s.patched.load_device, s.patched.model.get_dtype()
    x = torch.randn(2 * b, *s.latent.shape[1:]).to(dev, dtype)
    negative, text = s.negative[0][0], s.positive[0][0]
    with_audio = s.positive_audio[0][0]
    contexts = {
        "plain": torch.cat([negative.expand(b, -1, -1), text.expand(b, -1, -1)]).to(dev, dtype),
        "conditioning": torch.cat([
            negative.repeat(1, with_audio.shape[1] // negative.shape[1], 1).expand(b, -1, -1),
            with_audio.expand(b, -1, -1),
        ]).to(dev, dtype),
    }  # fmt: skip
    contexts["model"] = contexts["plain"]
    t = torch.full((2 * b,), 500.0, device=dev)
    base = {"cond_or_uncond": [1, 0], "sigmas": torch.full((2 * b,), 1.0, device=dev)}
    options = {"plain": dict(base), "conditioning": dict(base),
               "model": {**s.patched.model_options["transformer_options"], **base}}
    names = ["plain"] + [name for name, sec in (("conditioning", "a"), ("model", "b")) if sec in sections]

    def forward(name: str) -> None:
        unet(x, timesteps=t, context=contexts[name], transformer_options=dict(options[name]))

    flops: dict[str, int] = {}
    for name in names:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            forward(name)
        flops[name] = counter.get_total_flops()

    def timed(name: str) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            with Timer(s.cuda) as timer:
                forward(name)
            return timer.wall, timer.cpu

        return run

    out: dict[str, Any] = {"gflops": {name: flops[name] / 1e9 for name in names}, "forwards": n}
    for name in names[1:]:
        out[f"{name}_flops_ratio"] = flops[name] / flops["plain"]
    if n:
        times = interleaved({name: timed(name) for name in names}, n, 2)
        out["seconds"] = {name: {"min": min(tt["wall"]), "median": median(tt["wall"])} for name, tt in times.items()}
        for name in names[1:]:
            out[f"{name}_vs_plain_min"] = min(times[name]["wall"]) / min(times["plain"]["wall"])
            out[f"{name}_vs_plain_median"] = median(times[name]["wall"]) / median(times["plain"]["wall"])
    return out


# ------------------------------------------------------------------------------------------------
# c: CLAP throughput


@torch.inference_mode()
def section_clap(s: Setup, batches: list[int], reps: int) -> dict[str, Any]:
    from clap2diffusion_pack.clap2diffusion_core.audio import WINDOW_SAMPLES

    gen = torch.Generator().manual_seed(3)
    clips = {b: 0.1 * torch.randn(b, WINDOW_SAMPLES, generator=gen) for b in batches}  # 10 s at 48 kHz

    def encode(b: int) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            with Timer(s.cuda) as t:
                s.clap.encode_windows(clips[b], batch_size=b)  # host audio, as CLAP Encode gets it
            return t.wall, t.cpu

        return run

    times = interleaved({f"batch_{b}": encode(b) for b in batches}, reps, 1)
    return {
        "clips_per_s": {f"batch_{b}": b / median(times[f"batch_{b}"]["wall"]) for b in batches},
        "seconds_per_call": {name: median(t["wall"]) for name, t in times.items()},
        "raw_seconds_per_call": {name: t["wall"] for name, t in times.items()},
        "dtype": str(s.clap.dtype),
        "clip_seconds": CLIP_SECONDS,
    }


# ------------------------------------------------------------------------------------------------
# d: memory


def section_memory(s: Setup) -> dict[str, Any]:
    resident = {
        "clap_audio_tower_mb": module_bytes(s.clap) / MB,  # CLAP Encode never loads the text tower
        "clap2diffusion_model_mb": module_bytes(s.c2d) / MB,
        "adapter_mb": module_bytes(s.c2d.adapter) / MB,
        "audio_kv_mb": module_bytes(s.kv) / MB,
        "audio_tokens_mb": s.tokens.tokens.nbytes / MB,
        "unet_mb": module_bytes(s.model.model.diffusion_model) / MB,
    }
    out: dict[str, Any] = {"resident_bytes": resident}
    if not s.cuda:
        out["audio_modules_peak_mem_mb"] = (
            resident["clap_audio_tower_mb"] + resident["clap2diffusion_model_mb"] + resident["audio_kv_mb"]
        )
        out["method"] = (
            "cpu: not a measured peak. Parameter+buffer bytes of what the audio path keeps resident while "
            "sampling (CLAP's audio tower, CLAP2Diffusion model with its adapter, AudioKV tensors); transient "
            "activations (the audio attention's [B, S, C] output per layer, CLAP's activations) excluded"
        )
        return out

    import comfy.model_management as mm

    def peak(run: Callable[[], Any]) -> float:
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache(True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MB

    clap_home = s.clap.compute_device
    s.clap.to("cpu")
    waveform = 0.1 * torch.randn(1, 1, int(48_000 * CLIP_SECONDS))

    def audio_path(model, positive) -> Callable[[], None]:
        def run() -> None:  # CLAP to the GPU, encode, then sample with CLAP still loaded (ComfyUI keeps it)
            s.clap.to(s.device)
            s.clap.embed(waveform.to(s.device), 48_000, "first")
            s.sample(model, positive)
            s.clap.to("cpu")

        return run

    try:
        plain = peak(lambda: s.sample(s.model, s.positive))
        model_only = peak(lambda: s.sample(s.patched, s.positive))
        cond_only = peak(lambda: s.sample(s.model, s.positive_audio))
        model_path = peak(audio_path(s.patched, s.positive))
        cond_path = peak(audio_path(s.model, s.positive_audio))
    finally:
        s.clap.to(clap_home)
    out["cuda_peak_mb"] = {
        "plain_sampling": plain,
        "model_injection_sampling": model_only,
        "conditioning_injection_sampling": cond_only,
        "clap_encode_then_model_injection_sampling": model_path,
        "clap_encode_then_conditioning_injection_sampling": cond_path,
    }
    out["audio_modules_peak_mem_mb"] = max(model_path, cond_path) - plain
    out["sampling_only_added_mb"] = {
        "model_injection": model_only - plain,
        "conditioning_injection": cond_only - plain,
    }
    out["method"] = (
        "cuda: torch.cuda.max_memory_allocated from an empty device: (CLAP's audio tower loaded, 10 s clip encoded, then "
        "sampling with the audio while CLAP stays loaded, as ComfyUI keeps it) minus plain sampling"
    )
    return out


# ------------------------------------------------------------------------------------------------
# e: a re-queued graph through the real server


def section_requeue(args: argparse.Namespace) -> dict[str, Any]:
    """example_workflows/audio_adapter.json (the sound through Apply Audio to Model) queued three
    times: first, identical again, new seed. The shipped workflow, so the bench follows its wiring."""
    from tools.comfy_server import ComfyServer, make_base_dir
    from tools.run_workflow import rewrite_files, shrink_for_random_models, ui_to_api

    testing = pack_module("clap2diffusion_core.testing")
    models = tm.build_all()
    base = Path(tempfile.mkdtemp(prefix="c2d-bench-"))
    stage2 = "bench-tiny-stage2.safetensors"
    folder = base / "models" / "clap2diffusion"
    folder.mkdir(parents=True)
    testing.random_checkpoint(folder / stage2, stage=2, seed=11, layout="tiny")
    make_base_dir(base, {"checkpoints": [models.sd15_checkpoint], "clap": [models.clap_folder]},
                  inputs=list(models.sounds.values()))
    workflow = json.loads(REQUEUE_WORKFLOW.read_text())

    server = ComfyServer(base)
    try:
        server.start()
        client = server.client
        info = client.object_info()
        prompt = ui_to_api(workflow, info)
        rewrite_files(prompt, info, [models.sd15_checkpoint.name, models.clap_folder.name, stage2, "thunder.wav"])
        shrink_for_random_models(prompt, size=args.server_size, steps=args.server_steps)
        ours = {nid for nid, node in prompt.items() if node["class_type"].startswith(OUR_NODE_PREFIX)}
        first = client.execute(prompt)
        second = client.execute(prompt)  # identical: ComfyUI's cache should answer for everything
        new_seed = copy.deepcopy(prompt)
        next(n for n in new_seed.values() if n["class_type"] == "KSampler")["inputs"]["seed"] += 1
        third = client.execute(new_seed)  # new seed: our nodes cached, sampling runs again
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)

    def our_ms(execution) -> float:  # noqa: ANN001
        return 1000 * sum(sec for nid, sec in execution.node_times.items() if nid in ours)

    def kinds(node_ids) -> list[str]:  # noqa: ANN001
        return sorted(prompt[n]["class_type"] for n in node_ids)

    return {
        "our_nodes": kinds(ours),
        "first_run_our_nodes_ms": our_ms(first),
        "first_run_node_ms": {prompt[n]["class_type"]: round(1000 * sec, 1) for n, sec in first.node_times.items()},
        "first_run_seconds": first.seconds,
        "requeue_our_nodes_ms": our_ms(second),
        "requeue_our_nodes_executed": kinds(n for n in second.node_times if n in ours),
        "requeue_our_nodes_cached": kinds(n for n in second.cached_nodes if n in ours),
        "requeue_seconds": second.seconds,
        "new_seed_our_nodes_ms": our_ms(third),
        "new_seed_nodes_executed": kinds(third.node_times),
        "new_seed_seconds": third.seconds,
        "server_startup_seconds": server.startup_seconds,
        "graph": f"{REQUEUE_WORKFLOW.name}, {args.server_size} px, {args.server_steps} steps, tiny SD1.5 test checkpoint",
    }


# ------------------------------------------------------------------------------------------------
# report


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    cfg = results["config"]
    samp = results.get("sampling", {})
    sps = samp.get("seconds_per_step", {})
    if "plain" in sps:
        for name in ("plain", "conditioning", "model", "model_ranged"):
            if name in sps:
                w, c = sps[name]["wall"], sps[name]["cpu"]
                rows.append((f"sampling {name} (median per step)", f"{w * 1000:.1f} ms wall, {c * 1000:.1f} ms process CPU"))
    for key, label in (("conditioning_overhead_ratio", "(a) conditioning injection / plain"),
                       ("model_overhead_ratio", "(b) model injection / plain")):
        if results.get(key) is not None:
            name = "conditioning" if key.startswith("conditioning") else "model"
            r = samp[f"{name}_vs_plain"]
            rows.append((label, f"{results[key]:.3f} (paired {r['wall_median_paired_ratio']:.3f}; "
                                f"process CPU {r['cpu_ratio_of_medians']:.3f})"))
    if "model_ranged_vs_plain" in samp:
        r = samp["model_ranged_vs_plain"]
        rows.append(("    model injection reading sigma / plain",
                     f"{r['wall_ratio_of_medians']:.3f} (paired {r['wall_median_paired_ratio']:.3f}): "
                     "+1 host read of sigma per UNet call"))
    fwd = results.get("unet_forward")
    for name in ("conditioning", "model"):
        if fwd and f"{name}_flops_ratio" in fwd:
            timing = (f"; time {fwd[f'{name}_vs_plain_min']:.3f} (min of {fwd['forwards']}), "
                      f"{fwd[f'{name}_vs_plain_median']:.3f} (median)") if fwd["forwards"] else ""
            rows.append((f"    UNet forward alone, {name} / plain",
                         f"FLOPs {fwd[f'{name}_flops_ratio']:.4f}{timing}"))
    clap = results.get("clap_clips_per_s")
    if clap:
        rows.append(("(c) CLAP 10 s clips/s", ", ".join(f"{k.replace('_', ' ')}: {v:.2f}" for k, v in clap.items())))
    mem = results.get("audio_modules_peak_mem_mb")
    if mem is not None:
        rows.append(("(d) audio modules memory", f"{mem:.0f} MB ({results['memory']['method'].split(':')[0]}: "
                                                 f"{'measured peak' if cfg['device'] == 'cuda' else 'resident bytes'})"))
    rq = results.get("requeue")
    if rq:
        rows.append(("(e) re-queued graph: time in our nodes",
                     f"{rq['requeue_our_nodes_ms']:.1f} ms ({len(rq['requeue_our_nodes_cached'])} of "
                     f"{len(rq['our_nodes'])} cached; first run {rq['first_run_our_nodes_ms']:.0f} ms)"))
    width = max(len(r[0]) for r in rows) if rows else 0
    if cfg["dtype"] is None:  # only the server section ran
        return "\n".join([f"load average {results['machine']['load_average_start']}"] +
                         [f"  {a:<{width}}  {b}" for a, b in rows])
    head = (f"{cfg['unet']} UNet, {cfg['size']} px, batch {cfg['batch']}, euler {cfg['steps']} steps, cfg 7, "
            f"{cfg['reps']} reps (+{cfg['warmup']} warm-up), {cfg['device']} {cfg['dtype']}, "
            f"{results['machine']['torch_threads']} torch threads; "
            f"load average {results['machine']['load_average_start']} -> {results['machine'].get('load_average_end')}")
    return "\n".join([head] + [f"  {a:<{width}}  {b}" for a, b in rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="full-size SD1.5 UNet (random weights), 512 px, 20 steps: for a GPU")
    parser.add_argument("--unet", choices=("tiny", "sd15"), help="override the UNet (default: tiny, sd15 with --full)")
    parser.add_argument("--size", type=int, help="image size in px (default 256, 512 with --full)")
    parser.add_argument("--steps", type=int, help="euler steps (default 4, 20 with --full)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="latent batch size (default 1)")
    parser.add_argument("--ranged", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the model injection testing sigma per UNet call, as it does when start/end "
                        "percent are set: a host read (default: on with cuda, where that is a sync)")
    parser.add_argument("--forwards", type=int, default=12,
                        help="UNet forwards per variant for the forward-only figure (0: skip)")
    parser.add_argument("--clap-batches", default="1,8", help="CLAP batch sizes (default 1,8)")
    parser.add_argument("--clap-long-seconds", type=float, default=3600.0,
                        help="f: length of the generated file streamed per window mode (default 3600)")
    parser.add_argument("--clap-reps", type=int, default=3, help="timed CLAP calls per batch size (default 3)")
    parser.add_argument("--server-size", type=int, default=256, help="image size of the server graph (e)")
    parser.add_argument("--server-steps", type=int, default=4, help="steps of the server graph (e)")
    parser.add_argument("--sections", default="abcdef", help="which of a b c d e f to run (default all)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's own choice, but 1 when the load average is at "
                        "least the core count: oversubscribed OpenMP threads wait on each other at every op)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results file (default bench/results.json)")
    args = parser.parse_args(argv)
    args.unet = args.unet or ("sd15" if args.full else "tiny")
    args.size = args.size or (512 if args.full else 256)
    args.steps = args.steps or (20 if args.full else 4)
    args.sections = "".join(sorted(set(args.sections.lower()) & set("abcdef")))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.ranged is None:
        args.ranged = want_cuda
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch")
    if not want_cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.full and not want_cuda:
        print("note: --full on the CPU: the full SD1.5 UNet in float32; the issue's figures are for a GPU",
              file=sys.stderr)
    threads_note = "given" if args.threads else "torch's default"
    load = load_average()
    if not args.threads and not want_cuda and load and load[0] >= (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        # Every parallel op then waits for a time slice for each of its threads: on 2 busy cores
        # that made steps 2.5x slower and the ratios follow the op count, not the work.
        args.threads = 1
        threads_note = f"1: load average {load[0]} >= {os.cpu_count()} cores (--threads N to choose)"
    if args.threads:
        torch.set_num_threads(args.threads)
    tm.import_comfy()
    if not want_cuda:
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = True
    import comfy.model_management as mm

    device = mm.get_torch_device()
    results: dict[str, Any] = {"machine": machine_info(device)}
    results["machine"]["torch_threads_why"] = threads_note
    started = time.perf_counter()
    in_process = set(args.sections) & set("abcd")
    setup = None
    if in_process:
        setup = Setup(args, device)
    results["config"] = {
        "unet": "full SD1.5 (random weights)" if args.unet == "sd15" else "tiny SD1.5 test",
        "size": args.size, "steps": args.steps, "batch": args.batch, "reps": args.reps, "warmup": args.warmup,
        "sampler": "euler", "scheduler": "normal", "cfg": 7.0, "seed": 0, "device": device.type,
        "dtype": str(setup.dtype) if setup else None, "sections": args.sections,
        "unet_build_seconds": setup.build_seconds if setup else None,
    }  # fmt: skip

    for key in ("conditioning_overhead_ratio", "model_overhead_ratio", "clap_clips_per_s",
                "audio_modules_peak_mem_mb", "requeue_our_nodes_ms", "conditioning_flops_ratio", "model_flops_ratio"):
        results[key] = None
    if setup and set(args.sections) & set("ab"):
        results["sampling"] = section_sampling(setup, args.sections)
        if "a" in args.sections:
            results["conditioning_overhead_ratio"] = results["sampling"]["conditioning_vs_plain"]["wall_ratio_of_medians"]
        if "b" in args.sections:
            results["model_overhead_ratio"] = results["sampling"]["model_vs_plain"]["wall_ratio_of_medians"]
        results["unet_forward"] = section_forward(setup, args.forwards, args.sections)
        for name in ("conditioning", "model"):
            if f"{name}_flops_ratio" in results["unet_forward"]:
                results[f"{name}_flops_ratio"] = results["unet_forward"][f"{name}_flops_ratio"]
    if setup and "c" in args.sections:
        batches = [int(b) for b in args.clap_batches.split(",") if b.strip()]
        results["clap"] = section_clap(setup, batches, args.clap_reps)
        results["clap_clips_per_s"] = results["clap"]["clips_per_s"]
    if setup and "d" in args.sections:
        results["memory"] = section_memory(setup)
        results["audio_modules_peak_mem_mb"] = results["memory"]["audio_modules_peak_mem_mb"]
    del setup
    gc.collect()
    if "f" in args.sections:  # issue 16's CLAP keys: speed vs transformers, audio-only memory, a 1-hour file
        import clap_bench  # bench/clap_bench.py, beside this file

        results.update(clap_bench.run(tm.build_all().clap_folder, args.clap_reps, args.clap_long_seconds))
    if "e" in args.sections:
        results["requeue"] = section_requeue(args)
        results["requeue_our_nodes_ms"] = results["requeue"]["requeue_our_nodes_ms"]
    results["machine"]["load_average_end"] = load_average()
    results["machine"]["bench_seconds"] = round(time.perf_counter() - started, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out} ({results['machine']['bench_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
