"""Time one distillation step on a full-size SD1.5 UNet (random weights, built once, not kept).

The step of ``training/distil.py`` as the trainer runs it: the teacher's DDIM walk (no grad), the
teacher's target, the student's forward and backward through the frozen UNet into the adapter,
and the AdamW update, at 512 px (64x64 latents). Prints one JSON line: seconds per step and per
part. The captions' CLIP states and CLAP embeddings are random: they cost nothing in the step.

    .venv/bin/python tools/time_distil_step.py [--batch 1] [--teacher-steps 6] [--steps 2] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--teacher-steps", type=int, default=6, help="every row walks this many (the worst case)")
    parser.add_argument("--steps", type=int, default=2, help="steps to time (no warm-up: the first is timed too)")
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--config", default="sd15", help="shipped diffusers UNet config (sd15, tiny)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from clap2diffusion_core.diffusers_processor import attach_audio_adapter
    from clap2diffusion_core.model import CLAP2DiffusionModel, ModelConfig
    from clap2diffusion_core.sd15 import build_unet
    from clap2diffusion_core.training.config import load_config
    from clap2diffusion_core.training.distil import DistilModule
    from clap2diffusion_core.training.distil_diffusers import DiffusersDistilUNet
    from clap2diffusion_core.training.stages import FrozenUNet, adapter_config_for

    start = time.perf_counter()
    unet = build_unet(args.config).eval().requires_grad_(False)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(json.loads(
        (REPO_ROOT / "clap2diffusion_core/training/configs/scheduler_sd15.json").read_text()))
    frozen = FrozenUNet(unet, scheduler, torch.float32)
    model = CLAP2DiffusionModel(ModelConfig(stage=3, adapter=adapter_config_for(unet))).train()
    frozen.hook = attach_audio_adapter(unet, model.adapter)
    config = load_config("distil", ["sd15=unused", "distil.clap=unused", f"distil.latent_size={args.size}",
                                    f"distil.teacher_steps={args.teacher_steps}", "distil.sampler_steps=10"])
    context = unet.config.cross_attention_dim
    module = DistilModule(model, config, DiffusersDistilUNet(frozen), torch.randn(1, 77, context))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    built = time.perf_counter() - start
    b = args.batch
    batch = {"clap": torch.nn.functional.normalize(torch.randn(b, 512), dim=-1), "text": torch.randn(b, 77, context)}
    times = []
    for step in range(args.steps):
        batch.update(module.draw(batch, torch.Generator().manual_seed(step)))
        batch["steps"].fill_(args.teacher_steps)  # the worst case: every row walks all teacher steps
        batch["drop_audio"].zero_()
        t0 = time.perf_counter()
        with torch.no_grad():
            module.states(batch)
        t1 = time.perf_counter()
        loss, _, _ = module(batch, 0.5)  # recomputes the states (the trainer's step does it once)
        t2 = time.perf_counter()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        times.append({"teacher_s": t1 - t0, "forward_s": t2 - t1, "backward_update_s": t3 - t2})
    last = times[-1]
    # A trainer step = the forward (teacher walk + target + student) + backward and update.
    per_step = last["forward_s"] + last["backward_update_s"]
    print(json.dumps({
        "unet": args.config, "latent": args.size, "batch": b, "teacher_steps": args.teacher_steps,
        "threads": torch.get_num_threads(), "build_s": round(built, 1),
        "step_s": round(per_step, 1), "teacher_walk_and_target_s": round(last["teacher_s"], 1),
        "student_backward_update_s": round(last["backward_update_s"], 1),
        "teacher_forwards_per_step": args.teacher_steps + 1,
        "per_step": [{k: round(v, 1) for k, v in t.items()} for t in times],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
