"""Time sampling with Apply Audio to Model against the plain model, in one process.

Same ComfyUI model, seed and conditioning; the two variants interleaved over several repetitions
(after one warm-up each); prints the median seconds per sampling step and the ratio. CPU: the tiny
SD1.5 test UNet at 256 px. ``--full``: the full SD1.5 architecture (random weights) at 512 px, for
a GPU. The full benchmark suite (``make bench``) covers more; this is the adapter's own figure.

    .venv/bin/python tools/time_model_injection.py [--steps 10] [--reps 5] [--threads 1] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from tools import test_models as tm  # noqa: E402
from tools.pack_modules import load as pack_module  # noqa: E402 (the pack's modules as ComfyUI imports them)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full-size SD1.5 at 512 px (for a GPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--forwards", type=int, default=30,
                        help="UNet forwards per variant for the forward-only figure (0: skip)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 gives steadier CPU-time figures on a busy machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tm.import_comfy()
    import comfy.sample

    testing = pack_module("clap2diffusion_core.testing")
    patch = pack_module("nodes.model_patch")
    layout, size = ("sd15", 512) if args.full else ("tiny", 256)
    model = tm.sd15_unet_model(full=args.full, seed=0)
    c2d = testing.random_model(stage=2, layout=layout, seed=1)
    gen = torch.Generator().manual_seed(0)
    audio = c2d.project(c2d.encode(torch.nn.functional.normalize(torch.randn(1, 512, generator=gen), dim=-1)))
    start = time.perf_counter()
    patched = patch.apply_audio_to_model(model, c2d, audio)
    apply_ms = (time.perf_counter() - start) * 1000

    positive = [[torch.randn(1, 77, 768, generator=gen), {}]]
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(args.batch, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed=0)

    cuda = torch.cuda.is_available()

    def run(m) -> tuple[float, float]:
        """(wall, process CPU) seconds per step; CPU time is the steadier figure on a shared CPU."""
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        comfy.sample.sample(m, noise, args.steps, 7.0, "euler", "normal", positive, negative, latent,
                            seed=0, disable_pbar=True)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps

    variants = {"plain": model, "audio": patched}
    for m in variants.values():  # warm-up: model loading, first-step assembly
        run(m)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.reps):  # interleaved, so drifts in machine load hit both alike
        for name, m in variants.items():
            times[name].append(run(m))

    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{'full SD1.5' if args.full else 'tiny SD1.5'} UNet, {size} px, batch {args.batch}, cfg 7, "
          f"euler {args.steps} steps x {args.reps} reps, {device}, dtype {patch.compute_dtype(model)}")
    print(f"  Apply Audio to Model node: {apply_ms:.0f} ms (keys/values of {len(c2d.adapter)} layers, once)")
    columns = (("wall", 0), ("process CPU", 1)) if not cuda else (("wall", 0),)
    for label, i in columns:
        plain = statistics.median(t[i] for t in times["plain"])
        audio_t = statistics.median(t[i] for t in times["audio"])
        print(f"  {label:>11}: plain {plain * 1000:8.2f} ms/step, audio {audio_t * 1000:8.2f} ms/step, "
              f"ratio {audio_t / plain:.3f} (+{(audio_t - plain) * 1000:.2f} ms/step; medians)")
    if args.forwards:
        forward_only(model, patched, latent, positive, negative, args.forwards, cuda)
    return 0


@torch.inference_mode()
def forward_only(model, patched, latent, positive, negative, n: int, cuda: bool) -> None:
    """One CFG step's UNet forward (uncond + cond rows), interleaved; the minimum is the figure
    least disturbed by other processes on a shared machine."""
    device, dtype = model.load_device, patched.model.get_dtype()
    import comfy.model_management

    comfy.model_management.load_models_gpu([patched])
    unet = patched.model.diffusion_model
    b = latent.shape[0]
    x = torch.randn(2 * b, *latent.shape[1:]).to(device, dtype)
    context = torch.cat([negative[0][0].expand(b, -1, -1), positive[0][0].expand(b, -1, -1)]).to(device, dtype)
    t = torch.full((2 * b,), 500.0, device=device)
    base = {"cond_or_uncond": [1, 0], "sigmas": torch.full((b,), 1.0, device=device)}
    options = {"plain": dict(base), "audio": {**patched.model_options["transformer_options"], **base}}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for name, to in options.items():
        # the math backend runs SDPA as matmuls, which the counter sees (fused kernels it may not)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            unet(x, timesteps=t, context=context, transformer_options=dict(to))
        flops[name] = counter.get_total_flops()
    print(f"  UNet forward FLOPs: plain {flops['plain'] / 1e9:.2f} G, audio {flops['audio'] / 1e9:.2f} G, "
          f"ratio {flops['audio'] / flops['plain']:.4f}")

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in options}
    for i in range(n + 2):
        for name, to in options.items():
            if cuda:
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            unet(x, timesteps=t, context=context, transformer_options=dict(to))
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:  # two warm-ups each
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    for label, i in (("wall", 0), ("process CPU", 1)) if not cuda else (("wall", 0),):
        for stat in (min, statistics.median):
            plain = stat(t[i] for t in times["plain"])
            audio_t = stat(t[i] for t in times["audio"])
            print(f"  UNet forward, {label} {stat.__name__} of {n}: plain {plain * 1000:8.2f} ms, "
                  f"audio {audio_t * 1000:8.2f} ms, ratio {audio_t / plain:.3f} (+{(audio_t - plain) * 1000:.2f} ms)")


if __name__ == "__main__":
    sys.exit(main())
