"""The distillation smoke run (``make distil-smoke``): text fit -> distillation -> one JSON of figures.

On the CPU with the random tiny test models (SD1.5 with a 26M-parameter UNet and TAESD, a tiny
CLAP) at 64 px, in a couple of minutes:

1. a short text fit (:mod:`.textfit`) on the training captions gives the stage-1 file the
   distillation starts from (its projector; the adapter starts closed);
2. the distillation (:mod:`.distil`, ``configs/distil.yaml`` with the ``distil`` overrides of
   ``configs/smoke.yaml``) through the trainer: checkpoints, TensorBoard, validation grids.

Figures: ``distil_loss_first`` / ``distil_loss_last`` (the fixed training batch: same captions,
states and timesteps), ``heldout_gain`` (:func:`.distil.heldout_gain`: on captions neither the
text fit nor the distillation saw, the share of the text's effect on the noise prediction the audio
reproduces), ``heldout_specific_gain`` (:func:`.distil.heldout_specific_gain`: how much closer the
student gets to caption i's teacher with caption i's audio than with another held-out caption's),
``gate_abs_mean``, the validation grids' pixel differences, and ``ok`` when the loss falls, both
gains are positive and the gates have opened.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import load_checkpoint, save_checkpoint
from .captions import build_corpus
from .config import CONFIG_DIR, load_config, merge_trees
from .distil import grid_difference, heldout_gain, heldout_specific_gain, split_corpus
from .trainer import train_stage

#: The text fit's settings for the smoke: a small projector, a few dozen steps.
SMOKE_PROJECTOR = {"width": 64, "num_layers": 2, "num_heads": 4}
SMOKE_TEXT_FIT_STEPS = 60


def smoke_config_tree(out: Path, sd15: str, clap: str, init_from: str | None,
                      overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The smoke's overrides of ``distil.yaml`` as a nested dict (``load_config``'s ``extra``)."""
    tree = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())["distil"]
    tree = merge_trees(tree, {"output_dir": str(out), "sd15": sd15, "init_from": init_from, "distil": {"clap": clap}})
    return merge_trees(tree, overrides or {})


def text_fit_for(config_tree: dict[str, Any], sd15: str, clap: str, path: Path) -> Path:
    """A short text fit on the distillation's *training* captions -> a stage-1 file at ``path``."""
    from ..clap import load_clap_tower
    from .encoders import load_text_encoder
    from .textfit import TextFitConfig, fit_from_captions

    config = load_config("distil", extra=config_tree)
    d = config.distil
    captions = [c.text for c in build_corpus(d.corpus_size, d.corpus_seed)]
    train, _ = split_corpus(len(captions), d.heldout, d.corpus_seed)
    fit = TextFitConfig(steps=SMOKE_TEXT_FIT_STEPS, seed=config.seed, batch_size=32, warmup_steps=5,
                        projector=SMOKE_PROJECTOR)
    text = load_clap_tower(clap, "text")
    model = fit_from_captions([captions[i] for i in train], lambda c: text.encode_text(c).clone(),
                              load_text_encoder(sd15).pooled, fit)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path)
    return path


def reading_clap(clap: str, sd15: str, captions: list[str], out: Path, common: float = 1.0, seed: int = 0) -> Path:
    """A copy of the CLAP folder ``clap`` whose text head reads what the checkpoint's CLIP reads.

    The random test CLAP puts every caption within cosine 0.999 of every other: no caption-specific
    signal for a student to carry, so a caption-specific figure could only be noise. So, as for the
    text fit's aligned test CLAP, the last layer of its text projection is solved (least squares,
    float64, minimum norm) so that caption ``i`` lands on ``unit(common * u + unit(P m_i))``: ``u``
    one shared direction (a real CLAP's text cloud is far from isotropic), ``m_i`` the caption's
    centred CLIP token mean, ``P`` a fixed random map. Held-out captions are solved too: their CLAP
    embedding is a function of their words, as in a real CLAP, which is what lets a distilled
    adapter generalise to them. Everything else in the folder is the test CLAP's.
    """
    import shutil

    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from ..clap import load_clap
    from .encoders import load_text_encoder

    encoder = load_clap(clap)
    layer = encoder.model.text_projection.linear2
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, args, _o: captured.append(args[0].detach().double()))
    try:
        encoder.encode_text(captions)
    finally:
        handle.remove()
    features = torch.cat(captured)
    means = load_text_encoder(sd15).pooled(captions).double()
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(means.shape[1], layer.out_features, generator=gen, dtype=torch.float64)
    shared = F.normalize(torch.randn(layer.out_features, generator=gen, dtype=torch.float64), dim=0)
    anchors = F.normalize(common * shared + F.normalize((means - means.mean(0)) @ projection, dim=-1), dim=-1)
    x = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.pinv(x) @ anchors  # [in + 1, out]
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(clap).iterdir():
        if item.is_file() and item.name != "model.safetensors":
            shutil.copy(item, out / item.name)
    weights = load_file(str(Path(clap) / "model.safetensors"))
    weights["text_projection.linear2.weight"] = solution[:-1].T.float().contiguous()
    weights["text_projection.linear2.bias"] = solution[-1].float().contiguous()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def run_distil_smoke(out_dir: str | os.PathLike, sd15: str, clap: str, *, overrides: dict[str, Any] | None = None,
                     resume: str | None = None, progress: bool = True) -> dict[str, Any] | None:
    """Run the smoke in ``out_dir`` (``textfit/``, ``run/distil/``); the figures on the main process
    (None elsewhere), also written to ``out_dir/distil-smoke.json``."""
    from .trainer import process_state

    state = process_state()
    start = time.perf_counter()
    out = Path(out_dir)
    textfit = out / "textfit" / "audio_projector_textfit.safetensors"
    reading = out / "clap-reading-clip"
    tree = smoke_config_tree(out / "run", sd15, str(reading), str(textfit), overrides)
    if state.is_main_process and not (reading / "model.safetensors").exists():
        d = load_config("distil", extra=tree).distil
        reading_clap(clap, sd15, [c.text for c in build_corpus(d.corpus_size, d.corpus_seed)], reading)
    state.wait_for_everyone()
    clap = str(reading)
    if state.is_main_process and not textfit.exists():
        text_fit_for(tree, sd15, clap, textfit)
    state.wait_for_everyone()
    fit_seconds = time.perf_counter() - start
    config = load_config("distil", extra=tree)
    result = train_stage(config, resume=resume, progress=progress)
    if not state.is_main_process:
        return None

    gates = load_checkpoint(result.file).adapter.gates()
    first, last = result.fixed_losses[0][1]["distil"], result.fixed_losses[-1][1]["distil"]
    rows = min(config.distil.grid_captions, config.distil.heldout)
    figures: dict[str, Any] = {
        "distil_loss_first": round(first, 6),
        "distil_loss_last": round(last, 6),
        "heldout_loss_first": round(result.heldout_losses[0][1]["distil"], 6),
        "heldout_loss_last": round(result.heldout_losses[-1][1]["distil"], 6),
        "heldout_gain": round(heldout_gain(result.heldout_losses), 4),
        "heldout_specific_gain": round(heldout_specific_gain(result.heldout_losses), 4),
        "heldout_swapped_loss_last": round(result.heldout_losses[-1][1]["distil_swapped"], 6),
        "heldout_captions": config.distil.heldout,
        "gate_abs_mean": round(float(gates.abs().mean()), 5),
        "steps": config.steps,
        "grids": {str(step): {k: round(v, 2) for k, v in grid_difference(path, rows).items()}
                  for step, path in result.grids},
        "file": str(result.file),
        "init_from": str(textfit),
        "clap": clap,
        "processes": state.num_processes,
        "seconds_text_fit": round(fit_seconds, 1),
        "seconds_distil": round(result.seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }
    figures["checks"] = {
        "loss_falls": last < first,
        "heldout_gain_positive": figures["heldout_gain"] > 0,
        "heldout_specific_gain_positive": figures["heldout_specific_gain"] > 0,
        "gates_open": figures["gate_abs_mean"] > 1e-4,
    }
    figures["ok"] = all(figures["checks"].values())
    (out / "distil-smoke.json").write_text(json.dumps(figures, indent=2))
    return figures


__all__ = ["run_distil_smoke", "smoke_config_tree", "text_fit_for"]
