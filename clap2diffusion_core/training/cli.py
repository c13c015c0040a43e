"""``python -m clap2diffusion_core.training <command>``; ``--help`` on each command for its options.

    audiocaps-manifest  AudioCaps CSV (+ downloaded audio and frames) -> manifest.jsonl
    synthetic           write the generated smoke data set (audio, images, manifest)
    prepare             fill the feature cache from a manifest (resumable; any number of processes)
    train               run one or more stages from YAML configs (under `accelerate launch` for many GPUs)
    eval                caption retrieval of a CLAP2Diffusion file on a cached split
    smoke               everything above on generated data (`make train-smoke`: the random test models); prints JSON
    fit-text            stage 1 from text alone: captions from the sound vocabulary, a CLAP, an SD1.5
                        or SDXL checkpoint -> a stage-1 file (no audio, no images, no data set)
    distil              the adapter distilled from the base UNet on captions alone -> a stage-3 file
                        for Apply Audio to Model (no audio, no images, no data set)
    distil-smoke        text fit + distillation on the tiny test models (`make distil-smoke`); prints JSON

Run under ``accelerate launch [--num_processes N] [--cpu] -m clap2diffusion_core.training ...`` for
several processes; plain ``python -m`` is one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .manifest import SPLITS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clap2diffusion_core.training",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("audiocaps-manifest", help="AudioCaps CSV -> manifest rows")
    p.add_argument("--csv", required=True, help="AudioCaps train.csv / val.csv / test.csv")
    p.add_argument("--audio-dir", required=True, help="folder of <youtube_id>.wav")
    p.add_argument("--image-dir", required=True, help="folder of <youtube_id>.jpg (one video frame each)")
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--audio-ext", default=".wav")
    p.add_argument("--image-ext", default=".jpg")
    p.add_argument("--out", required=True, help="manifest.jsonl to write (or extend with --append)")
    p.add_argument("--append", action="store_true", help="add to an existing manifest (one per split -> one file)")

    p = sub.add_parser("synthetic", help="write the generated smoke data set")
    p.add_argument("--out", required=True)
    p.add_argument("--per-kind", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)

    p = sub.add_parser("prepare", help="fill the feature cache (skips what is done)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--cache", required=True, help="feature cache folder")
    p.add_argument("--clap", required=True, help="CLAP model: transformers folder or laion-clap .pt")
    p.add_argument("--sd15", required=True, help="single-file SD1.5 checkpoint (CLIP-L and VAE are read from it)")
    p.add_argument("--tokenizer", help="CLIP-L tokenizer folder (default: ComfyUI's comfy/sd1_tokenizer)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--clap-mode", choices=("first", "mean"), default="first",
                   help="first 10 s window, or the mean over all windows (AudioCaps clips are 10 s)")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=1024)

    p = sub.add_parser("train", help="train stages from YAML configs, in order")
    p.add_argument("configs", nargs="+", help="stage1 / stage2 / stage3 (shipped) or YAML files")
    p.add_argument("--cache", help="= data.cache")
    p.add_argument("--sd15", help="= sd15 (stages 2 and 3)")
    p.add_argument("--output-dir", help="= output_dir (the run folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--resume", help="'latest' (this stage's newest checkpoint, if any) or a checkpoint folder")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="caption retrieval of a CLAP2Diffusion file")
    p.add_argument("--checkpoint", required=True, help="audio_projector_stage*.safetensors")
    p.add_argument("--cache", required=True)
    p.add_argument("--split", default="val", choices=SPLITS)

    p = sub.add_parser("fit-text", help="stage 1 from text alone (no data set): prints the file written")
    p.add_argument("--clap", required=True, help="CLAP model with its text tower: transformers folder or laion-clap .pt")
    p.add_argument("--checkpoint", required=True,
                   help="single-file SD1.5 or SDXL-family checkpoint; the targets come from its CLIP-L "
                   "(SD1.5) or CLIP-L + CLIP-G (SDXL: the file also gets a pooled head)")
    p.add_argument("--tokenizer", help="CLIP-L tokenizer folder (default: ComfyUI's comfy/sd1_tokenizer)")
    p.add_argument("--out", required=True,
                   help="a .safetensors file, or a folder (e.g. ComfyUI/models/clap2diffusion) for the derived name")
    p.add_argument("--captions", help="extra captions: a text file, one per line (they come first)")
    p.add_argument("--corpus-size", type=int, default=None, help="captions in all (default 1024)")
    p.add_argument("--steps", type=int, default=None, help="gradient steps after the closed-form fit (default 0: none)")
    p.add_argument("--seed", type=int, default=0, help="corpus and fit seed")
    p.add_argument("--noise", type=float, default=None, help="gap-bridging noise norm (0: none; default 2.0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("distil", help="distil the audio adapter from the base UNet (no data set)")
    p.add_argument("--config", default="distil", help="distil (shipped) or a YAML file")
    p.add_argument("--checkpoint", "--sd15", dest="sd15",
                   help="= sd15: single-file SD1.5 or SDXL-family checkpoint (teacher, student, the grid's VAE)")
    p.add_argument("--clap", help="= distil.clap: CLAP model with its text tower")
    p.add_argument("--init-from", help="= init_from: a text-fitted stage-1 file (fit-text) to start from")
    p.add_argument("--output-dir", help="= output_dir (writes <output_dir>/distil/)")
    p.add_argument("--captions", help="= distil.captions: extra captions, one per line")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distil.guidance_scale=3 (repeatable)")
    p.add_argument("--resume", help="'latest' (the newest distil checkpoint, if any) or a checkpoint folder")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("distil-smoke", help="the distillation smoke run; prints one JSON line last")
    p.add_argument("--out", default="out/distil-smoke")
    p.add_argument("--sd15", required=True, help="single-file SD1.5 checkpoint (the tiny test one will do)")
    p.add_argument("--clap", required=True, help="CLAP model with its text tower")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("smoke", help="the smoke run; prints one JSON line last")
    p.add_argument("--out", default="out/train-smoke")
    # `make train-smoke` passes the random tiny models of tools/test_models.py: the core never imports tools.
    p.add_argument("--sd15", required=True, help="single-file SD1.5 checkpoint (the tiny test one will do)")
    p.add_argument("--clap", required=True, help="CLAP model: transformers folder or laion-clap .pt")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process: the models are tiny, so more threads mostly add overhead")
    p.add_argument("--no-progress", action="store_true")
    return parser


def _prepare(args: argparse.Namespace) -> int:
    import torch

    from ..clap import load_clap
    from .encoders import AudioEmbedder, load_latent_encoder, load_text_encoder
    from .features import CacheSpec, prepare_features
    from .manifest import read_manifest
    from .trainer import process_state

    state = process_state()
    half = torch.float16 if state.device.type == "cuda" else torch.float32
    entries = read_manifest(args.manifest, args.splits)
    audio = AudioEmbedder(load_clap(args.clap).to(state.device, half), mode=args.clap_mode)
    text = load_text_encoder(args.sd15, args.tokenizer).to(state.device, half)
    images = load_latent_encoder(args.sd15).to(state.device)  # fp32: the VAE encoder is cheap next to CLAP
    spec = CacheSpec(CacheSpec.describe(args.clap), CacheSpec.describe(args.sd15), args.resolution, args.clap_mode)
    report = prepare_features(entries, args.cache, spec, audio, text, images, batch_size=args.batch_size,
                              shard_size=args.shard_size, rank=state.process_index, world_size=state.num_processes)
    print(f"[process {state.process_index}] {report.summary()}")
    state.wait_for_everyone()
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import train_stage

    flags = {"data.cache": args.cache, "sd15": args.sd15, "output_dir": args.output_dir}
    overrides = [f"{k}={v}" for k, v in flags.items() if v] + args.overrides
    for name in args.configs:
        config = load_config(name, overrides)
        train_stage(config, resume=args.resume, progress=not args.no_progress)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint
    from .features import FeatureDataset
    from .metrics import caption_retrieval

    result = caption_retrieval(load_checkpoint(args.checkpoint), FeatureDataset(args.cache, args.split))
    print(json.dumps(result))
    return 0


def _smoke(args: argparse.Namespace) -> int:
    import torch

    from .smoke import run_smoke

    torch.set_num_threads(max(1, args.threads))
    figures = run_smoke(args.out, args.sd15, args.clap, progress=not args.no_progress)
    if figures is None:  # not the main process
        return 0
    sys.stdout.flush()
    print(json.dumps(figures), flush=True)
    return 0 if figures["ok"] else 1


def _distil(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import train_stage

    flags = {"sd15": args.sd15, "distil.clap": args.clap, "init_from": args.init_from,
             "output_dir": args.output_dir, "distil.captions": args.captions}
    overrides = [f"{k}={v}" for k, v in flags.items() if v] + args.overrides
    config = load_config(args.config, overrides)
    if config.objective != "distil":
        raise SystemExit(f"{args.config}: objective is {config.objective!r}; the distil command runs "
                         "objective: distil configs (use `train` for the others)")
    result = train_stage(config, resume=args.resume, progress=not args.no_progress)
    from .distil import heldout_gain, heldout_specific_gain

    if result.heldout_losses:
        print(json.dumps({"file": str(result.file), "steps": result.steps,
                          "heldout_gain": round(heldout_gain(result.heldout_losses), 4),
                          "heldout_specific_gain": None if (g := heldout_specific_gain(result.heldout_losses)) is None
                          else round(g, 4),
                          "grids": [str(p) for _, p in result.grids]}), flush=True)
    return 0


def _distil_smoke(args: argparse.Namespace) -> int:
    import torch

    from .distil_smoke import run_distil_smoke

    torch.set_num_threads(max(1, args.threads))
    figures = run_distil_smoke(args.out, args.sd15, args.clap, progress=not args.no_progress)
    if figures is None:
        return 0
    sys.stdout.flush()
    print(json.dumps(figures), flush=True)
    return 0 if figures["ok"] else 1


def _fit_text(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    import torch
    from tqdm.auto import tqdm

    from ..clap import load_clap
    from .captions import DEFAULT_CORPUS_SIZE, build_corpus, corpus_hash, read_caption_file
    from .encoders import load_text_encoder
    from .sdxl_text import checkpoint_text_family, load_sdxl_text_encoder
    from .textfit import Provenance, TextFitConfig, fingerprint, fit_from_captions, save_text_fit

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TextFitConfig(seed=args.seed)
    overrides = {"steps": args.steps, "noise": args.noise}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    extra = read_caption_file(args.captions) if args.captions else []
    captions = [c.text for c in build_corpus(args.corpus_size or DEFAULT_CORPUS_SIZE, args.seed, extra)]
    clap = load_clap(args.clap)
    family = checkpoint_text_family(args.checkpoint)
    if family == "sdxl":
        sdxl = load_sdxl_text_encoder(args.checkpoint, args.tokenizer)
        targets, weights, what = sdxl, sdxl.state_dict().items(), "sdxl CLIP-L + CLIP-G (single-file checkpoint)"
    else:
        clip = load_text_encoder(args.checkpoint, args.tokenizer)
        targets, weights, what = clip.pooled, clip.model.state_dict().items(), "sd15 CLIP-L (single-file checkpoint)"
    provenance = Provenance(
        corpus_sha256=corpus_hash(captions), corpus_size=len(captions),
        clap_fingerprint=fingerprint(clap.text.state_dict().items()),  # the tower the fit reads, as the node
        text_encoder_fingerprint=fingerprint(weights), text_encoder=what, text_fit=config,
    )
    out = Path(args.out)
    if out.suffix != ".safetensors":
        out = out / f"{provenance.file_stem(family)}.safetensors"
    bars: dict[str, tqdm] = {}
    times: dict[str, float] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            times[phase] = time.perf_counter()
            bars[phase] = tqdm(total=total, desc=f"fit-text {phase}", disable=args.no_progress)
        bars[phase].update(done - bars[phase].n)
        if done == total:
            bars[phase].close()
            times[phase] = time.perf_counter() - times[phase]

    model = fit_from_captions(captions, clap.encode_text, targets, config, progress)
    save_text_fit(model, out, provenance)
    rates = {f"{k}_per_s": round(len(captions) / v, 2) for k, v in times.items() if k != "fit"}
    print(json.dumps({"file": str(out), "base_family": family, "captions": len(captions), "steps": config.steps,
                      "seconds": {k: round(v, 1) for k, v in times.items()}, **rates}))
    return 0


def _respawn_cpu_processes(argv: list[str]) -> None:
    """Make ``accelerate launch --cpu --num_processes N -m clap2diffusion_core.training ...`` run N
    processes without MPI: accelerate starts one process and leaves the others to ``mpirun``
    (:func:`.trainer.lonely_cpu_launch`), so that process replaces itself with
    ``torch.distributed.run --nproc_per_node N`` (gloo on the CPU). N is read from the ``accelerate
    launch`` command line that started it."""
    import psutil

    from .trainer import lonely_cpu_launch

    if not lonely_cpu_launch():
        return
    parent = psutil.Process(os.getppid()).cmdline()
    requested = None
    for i, arg in enumerate(parent):
        name, _, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            requested = value or (parent[i + 1] if i + 1 < len(parent) else None)
    if not requested or not requested.isdigit() or int(requested) < 2:
        return  # not recognisable: process_state() explains what to run instead
    logging.getLogger(__name__).warning(
        "accelerate launch --cpu started 1 of %s processes (it leaves the rest to mpirun); "
        "starting %s CPU processes with torch.distributed.run", requested, requested)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={requested}",
               "-m", "clap2diffusion_core.training", *argv]
    sys.stdout.flush()
    os.execvpe(sys.executable, command, env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _respawn_cpu_processes(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per saved file otherwise
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "audiocaps-manifest":
        from .manifest import audiocaps_manifest, read_manifest, write_manifest

        entries = read_manifest(args.out) if args.append and Path(args.out).is_file() else []
        entries += audiocaps_manifest(args.csv, args.audio_dir, args.image_dir, args.split,
                                      args.audio_ext, args.image_ext)
        print(f"{write_manifest(entries, args.out)}: {len(entries)} rows")
        return 0
    if args.command == "synthetic":
        from .synthetic import make_synthetic_dataset

        print(make_synthetic_dataset(args.out, args.per_kind, image_size=args.image_size))
        return 0
    try:
        return {"prepare": _prepare, "train": _train, "eval": _eval, "smoke": _smoke,
                "fit-text": _fit_text, "distil": _distil, "distil-smoke": _distil_smoke}[args.command](args)
    finally:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
