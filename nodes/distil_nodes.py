"""Distil Audio Adapter: the stage-3 file Apply Audio to Model needs, made inside ComfyUI from the
user's own checkpoint and a text-fitted file, with no data set (see
clap2diffusion_core/training/distil.py and docs/DISTILLATION.md). The loop and the step are the
command line's (``training/loop.py``, ``training/distil.py``); the UNet is ComfyUI's own
(``distil_unet.py``)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from PIL import Image

from ..clap2diffusion_core.checkpoint import save_checkpoint
from ..clap2diffusion_core.errors import CheckpointError, ModelMismatchError
from ..clap2diffusion_core.model import CLAP2DiffusionModel
from ..clap2diffusion_core.training.captions import (
    DEFAULT_CORPUS_SIZE,
    build_corpus,
    corpus_hash,
    parse_captions,
)
from ..clap2diffusion_core.training.distil import build_caption_set, heldout_specific_gain
from ..clap2diffusion_core.training.distil_local import run_local, start_model
from ..clap2diffusion_core.training.settings import distil_config
from ..clap2diffusion_core.training.textfit import fingerprint, tensors_in
from . import types
from .api import io, ui
from .clap_nodes import ClapModelHandle
from .distil_unet import ComfyDistilUNet, adapter_config_of, model_family, text_kv_of
from .fit_nodes import clip_fingerprint, sd15_states, sdxl_states, text_encoder_family
from .managed import load_managed

log = logging.getLogger(__name__)

#: Steps between resume checkpoints (Cancel also writes one, at the step it stopped after).
CHECKPOINT_EVERY = 100
#: Held-out captions: a sixteenth of the corpus, 2 (a derangement needs two) to 64 (the command line's).
HELDOUT_SHARE, HELDOUT_MIN, HELDOUT_MAX = 16, 2, 64


def heldout_count(corpus_size: int) -> int:
    return max(HELDOUT_MIN, min(HELDOUT_MAX, corpus_size // HELDOUT_SHARE))


def model_fingerprint(model) -> str:  # noqa: ANN001 (comfy ModelPatcher)
    """The UNet's weights and its weight patches (LoRA) with their strengths: what changes the teacher."""
    unet = model.get_model_object("diffusion_model")
    patches = getattr(model, "patches", {})
    strengths = [(key, p[0], p[2]) for key in sorted(patches) for p in patches[key]]
    return fingerprint([*unet.state_dict().items(), *tensors_in(patches, "patches")], extra=str(strengths))


def check_families(model, clip, clap2diffusion: CLAP2DiffusionModel) -> str:  # noqa: ANN001
    """The family the three inputs share, or an error naming which input is of another family."""
    family, what_model = model_family(model)
    clip_family, what_clip = text_encoder_family(clip)
    file_family = clap2diffusion.config.base_family
    if clip_family != family:
        raise ModelMismatchError(
            f"Distil Audio Adapter: the MODEL is {family} ({what_model}) but the CLIP is {clip_family} ({what_clip}). "
            "Wire the MODEL and CLIP outputs of the same Load Checkpoint.")
    if file_family != family:
        raise CheckpointError(
            f"Distil Audio Adapter: the CLAP2Diffusion file is made for {file_family} (context_dim "
            f"{clap2diffusion.config.context_dim}), but the MODEL is {family} ({what_model}). Fit one for this "
            "checkpoint with Fit Audio Projector (from text), wired to this checkpoint's CLIP.")
    return family


def latent_decoder(model, vae):  # noqa: ANN001, ANN201
    """Latents ``[n, 4, s, s]`` -> pixels ``[n, 3, H, W]`` in [-1, 1]: the VAE when one is wired, else
    the model's latent-to-RGB preview factors (what ComfyUI's own latent previews use)."""
    latent_format = model.model.latent_format
    if vae is not None:
        def decode(latents: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(False), torch.no_grad():
                images = vae.decode(latent_format.process_out(latents.float()))  # [n, H, W, 3] in [0, 1]
            return images.float().cpu().permute(0, 3, 1, 2) * 2 - 1
        return decode
    factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32)  # [4, 3]
    bias = torch.tensor(getattr(latent_format, "latent_rgb_factors_bias", None) or [0.0, 0.0, 0.0])

    def approximate(latents: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("nchw,cr->nrhw", latents.float().cpu(), factors) + bias[None, :, None, None]
        return torch.nn.functional.interpolate(rgb.clamp(-1, 1), scale_factor=8, mode="nearest")
    return approximate


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] -> a PIL image."""
    return Image.fromarray((image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8"))


class DistilAudioAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_DistilAudioAdapter",
            display_name="Distil Audio Adapter",
            category=types.CATEGORY,
            description="Makes the stage-3 file Apply Audio to Model needs, with no data set: the audio adapter "
            "learns from your checkpoint itself (teacher: the UNet on a sound caption's text; student: the UNet on "
            "an empty prompt plus the adapter fed that caption's CLAP embedding). Starts from a text-fitted file "
            "(Fit Audio Projector (from text)). Saved in models/clap2diffusion; the same inputs later load that file. "
            "Cancel keeps the progress: queue again to resume. Meant for a GPU (see docs/DISTILLATION.md).",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5- or SDXL-family MODEL you will sample with (Load Checkpoint; "
                               "LoRAs applied before this node are distilled in)."),
                io.Clip.Input("clip", tooltip="The same checkpoint's CLIP: it encodes the captions the teacher sees."),
                types.ClapModel.Input("clap_model", tooltip="From CLAP Loader: the CLAP whose audio you will encode "
                                      "(its text tower embeds the captions)."),
                types.Clap2DiffusionModel.Input(
                    "clap2diffusion", tooltip="A text-fitted file for this checkpoint (Fit Audio Projector (from "
                    "text)): its projector is the start; the adapter starts closed."),
                io.Int.Input("steps", default=4000, min=1, max=100000,
                             tooltip="Optimizer steps. About 4,000 at batch 8 for a usable adapter (an estimate); "
                             "on a GPU about 1-2 h for SD1.5 at 512 px (see docs/DISTILLATION.md), far too slow on a CPU."),
                io.Int.Input("batch_size", default=8, min=1, max=256, tooltip="Captions per step."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-5,
                               tooltip="AdamW's peak rate (100 warm-up steps, then cosine to 0)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Image side the states are made at (SD1.5: 512, SDXL: 1024 is what the "
                             "checkpoint knows; smaller is faster)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the captions' order and every step's noise: same seed, same file."),
                io.Int.Input("corpus_size", default=DEFAULT_CORPUS_SIZE, min=4, max=20000,
                             tooltip="Captions to distil on (a sixteenth, 2 to 64, held out for the figures)."),
                io.Int.Input("preview_every", default=500, min=0, max=100000,
                             tooltip="Steps between previews (teacher / student / empty prompt for three held-out "
                             "captions, 20 DDIM steps each); 0: only at the end."),
                io.String.Input("extra_captions", default="", multiline=True, optional=True,
                                tooltip="Your own sound captions, one per line ('#' starts a comment); they come "
                                "first and count towards corpus_size."),
                io.Vae.Input("vae", optional=True, tooltip="The checkpoint's VAE, for the previews (without it "
                             "they are a rough latent-to-RGB picture)."),
            ],
            outputs=[
                types.Clap2DiffusionModel.Output(
                    display_name="clap2diffusion",
                    tooltip="A stage-3 file (adapters): Hierarchical Decompose, Audio Project, Apply Audio to Model "
                    "(and Apply Audio to Conditioning)."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, clip, clap_model: ClapModelHandle, clap2diffusion: CLAP2DiffusionModel, steps: int,  # noqa: ANN001, PLR0913
                batch_size: int, learning_rate: float, resolution: int, seed: int, corpus_size: int,
                preview_every: int, extra_captions: str = "", vae=None) -> io.NodeOutput:  # noqa: ANN001
        start = time.perf_counter()
        # Every check before the first step: families, the file's stage.
        family = check_families(model, clip, clap2diffusion)
        if resolution % 8:
            raise ValueError(f"Distil Audio Adapter: resolution {resolution} is not a multiple of 8")
        captions = [c.text for c in build_corpus(corpus_size, seed, parse_captions(extra_captions or ""))]
        heldout = heldout_count(len(captions))
        config = distil_config({
            "steps": steps, "seed": seed, "mixed_precision": "no", "sd15": "comfyui",
            "eval_batch_size": 16, "data": {"batch_size": batch_size},
            "optim": {"lr": learning_rate, "warmup_steps": min(100, steps // 10)},
            "distil": {"clap": "comfyui", "corpus_size": len(captions), "corpus_seed": seed, "heldout": heldout,
                       "latent_size": resolution // 8},
        })
        key = {
            "family": family, "model": model_fingerprint(model), "clip": clip_fingerprint(clip),
            "clap": fingerprint(clap_model.text_patcher().model.state_dict().items()),
            "init": clap2diffusion.fingerprint, "corpus": corpus_hash(captions),
            "settings": {"steps": steps, "batch_size": batch_size, "lr": learning_rate, "resolution": resolution,
                         "seed": seed},
        }
        stem = f"distil-{family}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"
        name = f"{stem}.safetensors"
        existing = folder_paths.get_full_path("clap2diffusion", name)
        if existing is not None:
            log.info("Distil Audio Adapter: reused %s (%.2f s)", name, time.perf_counter() - start)
            return io.NodeOutput(load_managed(existing))
        folder = Path(folder_paths.get_folder_paths("clap2diffusion")[0])
        folder.mkdir(parents=True, exist_ok=True)
        resume = folder / f"{stem}.resume"

        bar = comfy.utils.ProgressBar(steps)

        def states(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            mm.throw_exception_if_processing_interrupted()
            if family == "sdxl":
                cond, _, pooled = sdxl_states(clip, texts)
                return cond, pooled
            return sd15_states(clip, texts)[0], None

        text = clap_model.load_text()
        caption_set = build_caption_set(captions, text.encode_text, states, heldout, seed)
        model_start = start_model(clap2diffusion, adapter_config_of(model), text_kv_of(model))
        unet = ComfyDistilUNet(model, model_start.adapter)  # loads the UNet last: the text encoders are done
        last_loss = [float("nan")]

        def before_step(step: int) -> None:
            mm.throw_exception_if_processing_interrupted()  # Cancel: the state of this step is kept

        def on_step(step: int, total: int, loss: float) -> None:
            last_loss[0] = loss
            bar.update_absolute(step, total)
            if step % 10 == 0 or step == total:
                log.info("Distil Audio Adapter: step %d/%d loss %.5f", step, total, loss)

        previews: list[torch.Tensor] = []

        def on_preview(step: int, image: torch.Tensor) -> None:
            previews.append(image)
            bar.update_absolute(bar.current, steps, ("JPEG", to_pil(image), 768))

        result = run_local(unet, caption_set, model_start, config, unet.device, resume_file=resume,
                           checkpoint_every=CHECKPOINT_EVERY, before_step=before_step, on_step=on_step,
                           preview_every=preview_every, decoder=latent_decoder(model, vae), on_preview=on_preview)
        path = folder / name
        save_checkpoint(result.model, path)
        resume.unlink(missing_ok=True)
        first, last = result.heldout[0][1], result.heldout[-1][1]
        gain = 1 - last["distil"] / first["distil"] if first["distil"] > 0 else 0.0
        log.info("Distil Audio Adapter: %d steps (from step %d) -> %s in %.1f s; last loss %.5f; held-out (%d "
                 "captions) loss %.5f -> %.5f, heldout_gain %.4f, heldout_specific_gain %.4f",
                 steps, result.resumed_from, path, time.perf_counter() - start, last_loss[0], heldout,
                 first["distil"], last["distil"], gain, heldout_specific_gain(result.heldout) or 0.0)
        out = load_managed(path)
        if previews:
            return io.NodeOutput(out, ui=ui.PreviewImage(previews[-1].permute(1, 2, 0)[None], cls=cls))
        return io.NodeOutput(out)


NODES: list[type[io.ComfyNode]] = [DistilAudioAdapter]

__all__ = ["NODES", "DistilAudioAdapter", "check_families", "heldout_count", "model_fingerprint"]
