"""Seconds per step of the node's distillation (Distil Audio Adapter's path: ComfyUI's loader, CLIP
and UNet, ``training/distil_local.run_local``) on the random tiny test models, on this machine.

    .venv/bin/python tools/time_distil_node.py [--batch 8] [--resolution 64] [--steps 10] [--unet sd15]

``--unet sd15`` trains against the full SD1.5 UNet architecture (random weights; for a GPU, with
``--resolution 512``, the node's defaults); the captions' states still come from the tiny
checkpoint's CLIP, which is a full-size CLIP-L.

Prints JSON: the mean seconds of the steps after the first (the first also warms up), and the
caption encoding's seconds.
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
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--corpus", type=int, default=64)
    parser.add_argument("--unet", choices=("tiny", "sd15"), default="tiny", help="the UNet to distil into")
    args = parser.parse_args(argv)

    from tools import pack_modules as comfy_pack  # the pack's modules as ComfyUI imports them
    from tools import test_models as tm

    models = tm.build_all()
    distil, local = comfy_pack.load("clap2diffusion_core.training.distil"), comfy_pack.load(
        "clap2diffusion_core.training.distil_local")
    settings, captions_mod = comfy_pack.load("clap2diffusion_core.training.settings"), comfy_pack.load(
        "clap2diffusion_core.training.captions")
    fit_nodes, distil_unet = comfy_pack.load("nodes.fit_nodes"), comfy_pack.load("nodes.distil_unet")
    checkpoint, clap_mod = comfy_pack.load("clap2diffusion_core.checkpoint"), comfy_pack.load("clap2diffusion_core.clap")
    nodes = comfy_pack.load("nodes.distil_nodes")
    import comfy.model_management
    import comfy.sd  # importable once comfy_pack.load has put ComfyUI on the path

    model, clip = comfy.sd.load_checkpoint_guess_config(str(models.sd15_checkpoint), output_vae=False,
                                                        output_clip=True)[:2]
    if args.unet == "sd15":
        model = tm.sd15_unet_model(full=True, seed=0)
    captions = [c.text for c in captions_mod.build_corpus(args.corpus, 0)]
    config = settings.distil_config({"steps": args.steps, "seed": 0, "mixed_precision": "no", "sd15": "comfyui",
                                     "data": {"batch_size": args.batch},
                                     "distil": {"clap": "comfyui", "corpus_size": args.corpus,
                                                "heldout": nodes.heldout_count(args.corpus),
                                                "latent_size": args.resolution // 8}})
    t0 = time.perf_counter()
    text = clap_mod.load_clap_tower(str(models.clap_folder), "text").to(comfy.model_management.text_encoder_device())
    caption_set = distil.build_caption_set(captions, text.encode_text,
                                           lambda texts: (fit_nodes.sd15_states(clip, texts)[0], None),
                                           nodes.heldout_count(args.corpus), 0)
    encode_s = time.perf_counter() - t0
    start = local.start_model(checkpoint.load_checkpoint(models.clap2diffusion), distil_unet.adapter_config_of(model),
                              distil_unet.text_kv_of(model))
    stamps: list[float] = [time.perf_counter()]
    unet = distil_unet.ComfyDistilUNet(model, start.adapter)
    local.run_local(unet, caption_set, start, config, unet.device,  # the node's device, as the node passes it
                    on_step=lambda step, total, loss: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"unet": args.unet, "device": str(comfy.model_management.get_torch_device()),
                      "batch": args.batch, "resolution": args.resolution, "steps": args.steps,
                      "seconds_per_step": round(sum(steps[1:]) / max(1, len(steps) - 1), 3),
                      "first_step_s": round(steps[0], 3), "caption_encoding_s": round(encode_s, 2),
                      "captions": args.corpus,
                      "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
