"""FLOPs of one distillation step through ComfyUI's own UNet (SD1.5, SDXL), counted, not timed, and a
GPU time estimate from them (docs/DISTILLATION.md).

The UNets are built on the meta device (no weights, no memory) from ComfyUI's own configs and run
under ``torch.utils.flop_counter.FlopCounterMode``: one forward at batch ``B``, and one forward +
backward to the input (the student's pass: the UNet is frozen, the gradient only passes through it to
the adapter, whose own FLOPs are negligible). A step is then

    E[max teacher steps over the batch] + 1 (target) + P(some row dropped) (neutral) forwards
    + 1 student forward + backward

with the distillation's defaults (1..6 teacher steps, a quarter pure noise, 10 % dropped audio).

    .venv/bin/python tools/distil_flops.py [--batch 8] [--mfu 0.35]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

#: Dense bf16 peak (TFLOP/s) of GPUs a user may have, from the vendors' data sheets.
PEAK_TFLOPS = {"RTX 4090": 165.0, "A100": 312.0, "H100 SXM": 989.0}


def expected_teacher_forwards(batch: int, teacher_steps: int = 6, pure: float = 0.25, dropout: float = 0.1) -> float:
    """E[max j] over the batch (j uniform in 1..teacher_steps, 0 for pure-noise rows) + 1 target
    forward + P(any row's audio dropped) neutral forward."""
    def cdf(k: int) -> float:  # P(one row's j <= k)
        return pure + (1 - pure) * min(k, teacher_steps) / teacher_steps
    e_max = sum(1 - cdf(k) ** batch for k in range(teacher_steps))
    return e_max + 1 + (1 - (1 - dropout) ** batch)


def count(family: str, batch: int, side: int) -> tuple[float, float]:
    """(forward FLOPs, forward + backward-to-input FLOPs) of the family's UNet at ``side`` px."""
    from torch.utils.flop_counter import FlopCounterMode

    from clap2diffusion_core.unet_configs import SD15_UNET_CONFIG, SDXL_UNET_CONFIG, unet_kwargs
    from tools import test_models as tm

    tm.import_comfy()
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    # What a GPU ComfyUI runs (PyTorch SDPA), not the CPU's sub-quadratic kernel, which asks the
    # device for free memory (the meta device has none to tell).
    attention.optimized_attention = attention.attention_pytorch
    config = unet_kwargs(SD15_UNET_CONFIG if family == "sd15" else SDXL_UNET_CONFIG)
    with torch.device("meta"):
        unet = UNetModel(**config, operations=comfy.ops.disable_weight_init).requires_grad_(False)
        s = side // 8
        x = torch.randn(batch, 4, s, s, requires_grad=True)
        t = torch.full((batch,), 500.0)
        context = torch.randn(batch, 77, config["context_dim"])
        y = torch.randn(batch, 2816) if family == "sdxl" else None
        with FlopCounterMode(display=False) as forward:
            unet(x, t, context, y=y)
        with FlopCounterMode(display=False) as both:
            unet(x, t, context, y=y).sum().backward()
    return float(forward.get_total_flops()), float(both.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed share of the GPU's peak the step reaches")
    args = parser.parse_args(argv)
    teacher = expected_teacher_forwards(args.batch)
    out = {"batch": args.batch, "teacher_forwards_per_step": round(teacher, 3), "mfu_assumed": args.mfu, "families": {}}
    for family, side in (("sd15", 512), ("sdxl", 1024)):
        fwd, both = count(family, args.batch, side)
        step = teacher * fwd + both
        row = {"side": side, "forward_tflop": round(fwd / 1e12, 2), "student_fwd_bwd_tflop": round(both / 1e12, 2),
               "step_tflop": round(step / 1e12, 1)}
        for gpu, peak in PEAK_TFLOPS.items():
            seconds = step / (peak * 1e12 * args.mfu)
            row[f"{gpu}: s/step (estimate)"] = round(seconds, 2)
            row[f"{gpu}: h for 4000 steps (estimate)"] = round(4000 * seconds / 3600, 2)
        out["families"][family] = row
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
