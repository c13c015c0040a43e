"""The smoke run: generated data -> feature cache -> stages 1, 2, 3 -> one JSON line of figures.

Runs in one process or under ``accelerate launch`` (every process prepares its share of the
features and trains; the main process evaluates and prints). Checks that training *learns*:

- ``stage1_top1``: a sound retrieves its own caption among the distinct captions of the training
  set, far above ``chance`` (and above ``stage1_top1_init``, the untrained model's);
- ``stage2_loss_first`` > ``stage2_loss_last``: the epsilon loss on a fixed batch (same examples,
  noise and timesteps) falls;
- ``gate_abs_mean``: the adapter's tanh gates, zero at initialisation, have opened;
- ``clap_1nn``: the (random) CLAP separates the generated sounds at all.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import load_checkpoint
from ..clap import load_clap
from .config import CONFIG_DIR, load_config, merge_trees
from .encoders import AudioEmbedder, load_latent_encoder, load_text_encoder
from .features import CacheSpec, FeatureDataset, prepare_features
from .manifest import read_manifest
from .metrics import caption_retrieval
from .stages import build_model
from .synthetic import clap_separability, make_synthetic_dataset
from .trainer import train_stage

RESOLUTION = 64


def run_smoke(
    out_dir: str | os.PathLike,
    sd15: str,
    clap: str,
    *,
    per_kind: int = 4,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Run the smoke training in ``out_dir`` (``data/``, ``cache/``, ``run/stage{1,2,3}/``).

    Returns the figures on the main process (None elsewhere). ``overrides``: per-stage config
    overrides merged over ``configs/smoke.yaml`` (keys ``common``, ``stage1``...).
    """
    from .trainer import process_state

    state = process_state()
    start = time.perf_counter()
    out = Path(out_dir)
    data, cache, run = out / "data", out / "cache", out / "run"

    # ---- data and features (each process encodes its share)
    if state.is_main_process:
        shutil.rmtree(run, ignore_errors=True)
        make_synthetic_dataset(data, per_kind=per_kind, image_size=RESOLUTION)
    state.wait_for_everyone()
    audio = AudioEmbedder(load_clap(clap), mode="first")
    spec = CacheSpec(CacheSpec.describe(clap), CacheSpec.describe(sd15), RESOLUTION, audio.mode)
    report = prepare_features(read_manifest(data / "manifest.jsonl"), cache, spec, audio, load_text_encoder(sd15),
                              load_latent_encoder(sd15), batch_size=8, shard_size=16,
                              rank=state.process_index, world_size=state.num_processes, progress=progress)
    del audio
    state.print(report.summary())
    state.wait_for_everyone()

    # ---- the three stages
    smoke = merge_trees(yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text()), overrides or {})
    results, configs = {}, {}
    for stage in (1, 2, 3):
        extra = merge_trees(smoke.get("common", {}), smoke.get(f"stage{stage}", {}))
        extra = merge_trees(extra, {"output_dir": str(run), "data": {"cache": str(cache)}, "sd15": sd15 if stage > 1 else None})
        configs[stage] = load_config(f"stage{stage}", extra=extra)
        results[stage] = train_stage(configs[stage], progress=progress)
    if not state.is_main_process:
        return None

    # ---- figures
    dataset = FeatureDataset(cache, "train", ("clap", "text_pooled"))
    with torch.random.fork_rng():
        torch.manual_seed(configs[1].seed)  # the initial weights stage 1 started from
        untrained = build_model(configs[1], None)
    stage1 = load_checkpoint(results[1].file)
    retrieval, baseline = caption_retrieval(stage1, dataset), caption_retrieval(untrained, dataset)
    gates = {s: float(load_checkpoint(results[s].file).adapter.gates().abs().mean()) for s in (2, 3)}
    figures: dict[str, Any] = {
        "stage1_top1": round(retrieval["top1"], 4),
        "chance": round(retrieval["chance"], 4),
        "stage1_top1_init": round(baseline["top1"], 4),
        "stage1_top5": round(retrieval["top5"], 4),
        "clap_1nn": round(clap_separability(dataset.stacked("clap"), dataset.caption_index), 4),
        "stage2_loss_first": round(results[2].fixed_losses[0][1]["loss"], 5),
        "stage2_loss_last": round(results[2].fixed_losses[-1][1]["loss"], 5),
        "stage2_epsilon_first": round(results[2].fixed_losses[0][1]["epsilon"], 5),
        "stage2_epsilon_last": round(results[2].fixed_losses[-1][1]["epsilon"], 5),
        "gate_abs_mean": round(gates[2], 5),
        "stage3_loss_first": round(results[3].fixed_losses[0][1]["loss"], 5),
        "stage3_loss_last": round(results[3].fixed_losses[-1][1]["loss"], 5),
        "stage3_gate_abs_mean": round(gates[3], 5),
        "examples": retrieval["examples"],
        "processes": state.num_processes,
        "files": {f"stage{s}": str(results[s].file) for s in (1, 2, 3)},
        "seconds": round(time.perf_counter() - start, 1),
    }
    figures["checks"] = {
        "stage1_learns": figures["stage1_top1"] >= max(0.5, 3 * figures["chance"]),
        "stage2_loss_falls": figures["stage2_loss_last"] < figures["stage2_loss_first"],
        "stage2_epsilon_falls": figures["stage2_epsilon_last"] < figures["stage2_epsilon_first"],
        "gates_open": figures["gate_abs_mean"] > 1e-4,
        "clap_separates": figures["clap_1nn"] >= 0.75,
    }
    figures["ok"] = all(figures["checks"].values())
    (out / "smoke.json").write_text(json.dumps(figures, indent=2))
    return figures
