"""What changes on a GPU: the pack's paths on CUDA against the CPU and fp16 against fp32.

    python bench/gpu_checks.py [--family sd15|sdxl] [--steps 8] [--out gpu_checks.json]

1. CLAP's audio tower (what CLAP Encode loads, float32) on the compute device against the CPU,
   on every test sound: the largest embedding difference and the lowest cosine.
2. The test checkpoint (tiny SD1.5, or the SDXL test checkpoint: Segmind Vega with full-size CLIP-L
   and CLIP-G) through ComfyUI's loader, sampled twice (in the dtype ComfyUI picks, fp16 on a GPU,
   and in fp32) plain, with Apply Audio to Conditioning and with Apply Audio to Model (a random
   stage-2 file): every latent must be finite; printed are how far the sound moves the latent and
   how far fp16 lands from fp32 with the sound and without it.

Exits 1 when a latent is not finite. On a machine without a GPU both sides of check 1 are the CPU,
and both runs of check 2 are fp32: the script then only shows that it runs. docs/BENCHMARKS.md
("On a GPU") has its figures from an H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from tools import test_models as tm  # noqa: E402
from tools.pack_modules import load as pack_module  # noqa: E402 (the pack's modules as ComfyUI imports them)

VARIANTS = ("plain", "conditioning", "model")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms)."""
    return float((a - b).norm() / b.norm())


def clap_on_device(device: torch.device) -> tuple[dict[str, dict[str, float]], torch.Tensor]:
    """Check 1; also returns thunder.wav's embedding ``[1, 512]`` for check 2."""
    clap = pack_module("clap2diffusion_core.clap")
    audio = pack_module("clap2diffusion_core.audio")
    models = tm.build_all()
    tower = clap.load_clap_tower(models.clap_folder, "audio").float()
    sounds = {name: audio.load_audio_file(path) for name, path in models.sounds.items()}  # (wave [C, T], rate)
    with torch.no_grad():
        cpu = {name: tower.embed(wave.unsqueeze(0), rate, "first") for name, (wave, rate) in sounds.items()}
        tower.to(device)
        dev = {name: tower.embed(wave.unsqueeze(0).to(device), rate, "first").cpu()
               for name, (wave, rate) in sounds.items()}
    tower.to("cpu")
    rows = {name: {"max_abs": float((cpu[name] - dev[name]).abs().max()),
                   "min_cosine": float(torch.nn.functional.cosine_similarity(cpu[name], dev[name]).min())}
            for name in sounds}
    return rows, dev["thunder.wav"]


def sample_variants(checkpoint: Path, c2d, embeds: torch.Tensor, steps: int,  # noqa: ANN001
                    model_options: dict[str, Any]) -> dict[str, Any]:
    """Check 2 in one dtype: the final latent ``[1, 4, 32, 32]`` of each variant, and its seconds."""
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd

    patch = pack_module("nodes.model_patch")
    cond_nodes = pack_module("nodes.conditioning_nodes")
    tokens = c2d.project(c2d.encode(embeds))
    model, clip = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=True,
                                                        model_options=model_options)[:2]
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a beach"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    runs = {
        "plain": (model, positive),
        "conditioning": (model, cond_nodes.ApplyAudioToConditioning.execute(positive, tokens, 1.0).result[0]),
        "model": (patch.apply_audio_to_model(model, c2d, tokens), positive),
    }
    latent = torch.zeros(1, 4, 32, 32)
    noise = comfy.sample.prepare_noise(latent, seed=0)
    out: dict[str, Any] = {"compute_dtype": str(patch.compute_dtype(model)), "latents": {}, "seconds": {}}
    for name, (m, pos) in runs.items():
        start = time.perf_counter()
        x = comfy.sample.sample(m, noise, steps, 7.0, "euler", "normal", pos, negative, latent, seed=0,
                                disable_pbar=True)
        out["seconds"][name] = round(time.perf_counter() - start, 3)
        out["latents"][name] = x.float().cpu()
    del model, clip, runs
    mm.unload_all_models()
    mm.soft_empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--steps", type=int, default=8, help="euler steps per sampling run")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    tm.import_comfy()
    import comfy.model_management as mm

    testing = pack_module("clap2diffusion_core.testing")
    device = mm.get_torch_device()
    results: dict[str, Any] = {
        "torch": torch.__version__, "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "family": args.family,
    }
    results["clap_cpu_vs_device"], embeds = clap_on_device(device)

    if args.family == "sdxl":
        adapters, configs = pack_module("clap2diffusion_core.adapters"), pack_module("clap2diffusion_core.unet_configs")
        checkpoint = tm.sdxl_checkpoint()
        layout = adapters.ldm_unet_layout(**configs.layout_args(configs.SEGMIND_VEGA_UNET_CONFIG))
        c2d = testing.random_model(context_dim=2048, stage=2, seed=1, layout=layout)
    else:
        checkpoint = tm.build_all().sd15_checkpoint
        c2d = testing.random_model(stage=2, layout="tiny", seed=1)
    runs = {label: sample_variants(checkpoint, c2d, embeds, args.steps, options)
            for label, options in (("auto", {}), ("fp32", {"dtype": torch.float32}))}

    sampling: dict[str, Any] = {}
    for label, run in runs.items():
        latents = run["latents"]
        sampling[label] = {
            "compute_dtype": run["compute_dtype"], "seconds": run["seconds"],
            "finite": {name: bool(torch.isfinite(latents[name]).all()) for name in VARIANTS},
            "sound_moves_latent": {name: relative(latents[name], latents["plain"]) for name in VARIANTS[1:]},
        }
    sampling["auto_vs_fp32"] = {name: relative(runs["auto"]["latents"][name], runs["fp32"]["latents"][name])
                                for name in VARIANTS}
    results["sampling"] = sampling
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    finite = all(all(sampling[label]["finite"].values()) for label in runs)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
