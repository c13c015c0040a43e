"""Seconds of Fit Audio Projector (from text) at its defaults, on the node's path (ComfyUI's loader
and CLIP, the CLAP text tower, ``fit_from_captions`` with the node's own target functions), on the
random test models and this machine.

    .venv/bin/python tools/time_textfit_node.py [--family sd15|sdxl] [--corpus 1024]

Prints JSON: the seconds of each phase (CLAP text, targets, the solve) and in all. The SDXL test
checkpoint (3.1 GB, full-size CLIP-L + CLIP-G) is built on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--corpus", type=int, default=None, help="captions (default: the node's default)")
    args = parser.parse_args(argv)

    from tools import pack_modules as comfy_pack  # the pack's modules as ComfyUI imports them
    from tools import test_models as tm

    models = tm.build_all()
    checkpoint = models.sd15_checkpoint if args.family == "sd15" else tm.sdxl_checkpoint()
    fit_nodes = comfy_pack.load("nodes.fit_nodes")
    captions_mod = comfy_pack.load("clap2diffusion_core.training.captions")
    textfit = comfy_pack.load("clap2diffusion_core.training.textfit")
    clap_mod = comfy_pack.load("clap2diffusion_core.clap")
    import comfy.model_management as mm
    import comfy.sd  # importable once comfy_pack.load has put ComfyUI on the path

    clip = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=True,
                                                 output_model=False)[1]
    family, _ = fit_nodes.text_encoder_family(clip)
    captions = [c.text for c in captions_mod.build_corpus(args.corpus or captions_mod.DEFAULT_CORPUS_SIZE, 0)]
    start = time.perf_counter()
    # On the text encoder's device, where the node's CLAP_MODEL handle loads it (the CPU here).
    text = clap_mod.load_clap_tower(str(models.clap_folder), "text").to(mm.text_encoder_device())
    loaded = time.perf_counter() - start
    clock: dict[str, list[float]] = {}

    def progress(phase: str, done: int, total: int) -> None:  # the node's bar, as wall times
        clock.setdefault(phase, [time.perf_counter(), 0.0])[1] = time.perf_counter()

    targets = fit_nodes.TARGETS[family]
    textfit.fit_from_captions(captions, text.encode_text, lambda texts: targets(clip, texts),
                              textfit.TextFitConfig(), progress, device=mm.get_torch_device())
    seconds = {phase: round(end - begin, 1) for phase, (begin, end) in clock.items()}
    print(json.dumps({"family": family, "captions": len(captions), "clap_load_s": round(loaded, 1),
                      "seconds": seconds, "total_s": round(time.perf_counter() - start, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
