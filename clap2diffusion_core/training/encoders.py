"""Frozen encoders of the feature cache: CLAP for audio, and SD1.5's CLIP-L text encoder and VAE
loaded offline from the single-file checkpoint a ComfyUI user has.

The UNet comes from :mod:`clap2diffusion_core.sd15`; this module adds the other two parts of the
same file. Both go through shipped configs (``configs/clip_l_text.json``, ``configs/vae_sd15.json``)
and must place every weight. Latents are produced in the space the UNet denoises (what ComfyUI
feeds its model after ``process_latent_in``): ``AutoencoderKL`` mean x 0.18215, or for a TAESD
VAE (the tests' tiny checkpoint) ``(encoder(x / 2 + 1/2) / vae_scale + vae_shift) x 0.18215``,
ComfyUI's own formula.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..audio import prepare_windows, read_sound
from ..checkpoint import CheckpointError
from ..clap import ClapEncoder

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."
#: SD1.x latent scale (``scaling_factor`` of its VAE; ComfyUI's SD15 latent format).
SD15_LATENT_SCALE = 0.18215
TEXT_LENGTH = 77
#: Image and video files ``load_image`` reads (a video gives its middle frame).
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


# ------------------------------------------------------------------------------------------------
# audio


@dataclass
class AudioEmbedder:
    """Audio files -> CLAP embeddings ``[N, 512]`` (L2-normalised), the way the ComfyUI node does it.

    ``mode`` ``first`` embeds the first 10 s window, ``mean`` the normalised mean over all windows
    (``ClapEncoder.embed``'s modes). Windows of a whole batch of files go through CLAP together.
    """

    clap: ClapEncoder
    mode: str = "mean"
    max_seconds: float | None = 60.0
    batch_size: int = 16

    def load(self, path: str) -> torch.Tensor:
        """One file -> its CLAP windows ``[n, 480000]``; raises ``AudioError`` for unusable audio."""
        limit = 10.0 if self.mode == "first" else self.max_seconds
        waveform, sample_rate, warnings = read_sound(path, max_seconds=limit)  # the nodes' checks and reader
        for warning in warnings:
            log.warning("%s", warning)
        windows = prepare_windows(waveform.unsqueeze(0), sample_rate)[0]
        return windows[:1] if self.mode == "first" else windows

    def embed_windows(self, per_file: list[torch.Tensor]) -> torch.Tensor:
        """Windows of several files (``load``'s outputs) -> ``[len(per_file), 512]``."""
        counts = [w.shape[0] for w in per_file]
        emb = self.clap.encode_windows(torch.cat(per_file), batch_size=self.batch_size)
        pooled = [chunk.mean(0) for chunk in emb.split(counts)]
        return F.normalize(torch.stack(pooled), dim=-1)


# ------------------------------------------------------------------------------------------------
# single-file checkpoint access


def _read_prefixed(path: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under ``prefix`` in a single-file checkpoint (safetensors, or a pickle read with
    ``weights_only=True``), prefix kept."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], what: str, ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` (built on the meta device); every weight must land."""
    expected = set(module.state_dict())
    state = {k: v for k, v in state.items() if not k.endswith(ignore) or k in expected}
    missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or extra:
        raise CheckpointError(
            f"{what}: the checkpoint does not fit the shipped config; missing {missing[:5]} "
            f"({len(missing)}), unexpected {extra[:5]} ({len(extra)})"
        )
    module.load_state_dict(state, strict=True, assign=True)


# ------------------------------------------------------------------------------------------------
# text


def find_clip_tokenizer(explicit: str | os.PathLike | None = None) -> str:
    """Where CLIP-L's tokenizer files are. A single-file checkpoint has none, but every ComfyUI has
    them at ``comfy/sd1_tokenizer``: an explicit path, ``$CLAP2DIFFUSION_CLIP_TOKENIZER``, the
    ComfyUI this pack is installed in, ``$COMFYUI_PATH``, the pack's ``.comfyui``; else the hub
    name ``openai/clip-vit-large-patch14`` (needs the network or the hub cache)."""
    if explicit:
        return os.fspath(explicit)
    pack = Path(__file__).resolve().parents[2]
    candidates = [os.environ.get("CLAP2DIFFUSION_CLIP_TOKENIZER")]
    candidates += [str(Path(root) / "comfy" / "sd1_tokenizer")
                   for root in (pack.parents[1], os.environ.get("COMFYUI_PATH"), pack / ".comfyui") if root]
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "vocab.json")):
            return candidate
    return "openai/clip-vit-large-patch14"


def load_clip_tokenizer(explicit: str | os.PathLike | None = None):  # noqa: ANN201 (transformers.CLIPTokenizer)
    """CLIP's tokenizer (CLIP-L's; SDXL's CLIP-G shares its vocabulary) from
    :func:`find_clip_tokenizer`, or an error that says which flag gives it."""
    from transformers import CLIPTokenizer

    source = find_clip_tokenizer(explicit)
    try:
        return CLIPTokenizer.from_pretrained(source)
    except OSError as err:
        raise FileNotFoundError(
            f"CLIP tokenizer not found at {source!r}: pass --tokenizer <ComfyUI>/comfy/sd1_tokenizer "
            "(or set COMFYUI_PATH)"
        ) from err


class ClipTextEncoder(nn.Module):
    """Captions -> SD1.5's text conditioning: CLIP-L's last hidden state ``[B, 77, 768]`` (after the
    final layer norm, padded with the end token, as ComfyUI and diffusers feed the UNet), and a pooled
    ``[B, 768]``: the mean over the caption's tokens and its end token (not the start token, whose
    state is the same for every caption, nor the padding)."""

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=TEXT_LENGTH,
                                truncation=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.model.device)
        hidden = self.model(input_ids=ids).last_hidden_state.float()  # [B, 77, 768]
        eos = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1)  # first end token
        position = torch.arange(ids.shape[1], device=ids.device)
        mask = ((position[None] >= 1) & (position[None] <= eos[:, None])).float()  # [B, 77]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return hidden, pooled

    @torch.no_grad()
    def pooled(self, captions: list[str]) -> torch.Tensor:
        """``[B, 768]``: :meth:`forward`'s pooled alone, run only as far as the longest caption.

        CLIP's text attention is causal, so the states up to each caption's end token do not depend
        on the padding after it: the same values for a fraction of the 77-token cost.
        """
        tokens = self.tokenizer(list(captions), padding="longest", max_length=TEXT_LENGTH,
                                truncation=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.model.device)
        hidden = self.model(input_ids=ids).last_hidden_state.float()
        eos = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1)
        position = torch.arange(ids.shape[1], device=ids.device)
        mask = ((position[None] >= 1) & (position[None] <= eos[:, None])).float()
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def load_text_encoder(
    checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None
) -> ClipTextEncoder:
    """CLIP-L of an SD1.5 single-file checkpoint as a transformers ``CLIPTextModel`` (fp32, CPU)."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**json.loads((CONFIG_DIR / "clip_l_text.json").read_text()))
    with init_empty_weights():
        model = CLIPTextModel(config)
    raw = _read_prefixed(checkpoint, CLIP_PREFIX)
    if not raw:
        raise CheckpointError(f"{checkpoint}: no {CLIP_PREFIX}* weights (SD1.5's CLIP-L text encoder)")
    # transformers 4.x nests CLIPTextModel's weights under ``text_model.``, 5.x does not.
    nested = any(k.startswith("text_model.") for k in model.state_dict())
    state = {}
    for key, value in raw.items():
        key = key[len(CLIP_PREFIX):]
        state[key if nested else key.removeprefix("text_model.")] = value.float()
    _load_exact(model, state, "CLIP-L text encoder", ignore=("position_ids",))
    tok = load_clip_tokenizer(tokenizer)
    return ClipTextEncoder(model, tok)


# ------------------------------------------------------------------------------------------------
# images


def _taesd_scale_shift(raw: dict[str, torch.Tensor]) -> tuple[float, float]:
    """TAESD's ``vae_scale`` / ``vae_shift`` as ComfyUI stores them beside its weights (1 and 0 if absent)."""
    scale = float(raw.get(VAE_PREFIX + "vae_scale", torch.tensor(1.0)))
    shift = float(raw.get(VAE_PREFIX + "vae_shift", torch.tensor(0.0)))
    return scale, shift


def _load_kl_vae(raw: dict[str, torch.Tensor]) -> nn.Module:
    """The full ``AutoencoderKL`` (SD1.5's config, fp32, CPU) from a single file's ``first_stage_model.*``
    weights, every weight placed."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = json.loads((CONFIG_DIR / "vae_sd15.json").read_text())
    state = {k: v.float() for k, v in convert_ldm_vae_checkpoint(raw, config).items()}
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    _load_exact(vae, state, "SD1.5 VAE")
    return vae


class LatentEncoder(nn.Module):
    """Images ``[B, 3, H, W]`` in [-1, 1] -> latents ``[B, 4, H/8, W/8]`` in the UNet's space."""

    def __init__(self, vae: nn.Module, kind: str, vae_scale: float = 1.0, vae_shift: float = 0.0) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.kind = kind
        self.vae_scale, self.vae_shift = vae_scale, vae_shift

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(next(self.vae.parameters()))
        if self.kind == "taesd":
            raw = self.vae(images) / self.vae_scale + self.vae_shift  # EncoderTiny maps [-1, 1] to [0, 1]
        else:
            # The mean, not a sample: the cache holds one latent per image, so keep it the likeliest.
            raw = self.vae.encode(images).latent_dist.mean
        return raw.float() * SD15_LATENT_SCALE


def load_latent_encoder(checkpoint: str | os.PathLike) -> LatentEncoder:
    """The VAE encoder of an SD1.5 single-file checkpoint (fp32, CPU): the full ``AutoencoderKL``,
    or TAESD (``first_stage_model.taesd_encoder.*``, as ComfyUI stores it)."""
    from accelerate import init_empty_weights

    raw = _read_prefixed(checkpoint, VAE_PREFIX)
    if any(k.startswith(VAE_PREFIX + "taesd_encoder.") for k in raw):
        from diffusers.models.autoencoders.vae import EncoderTiny

        with init_empty_weights():
            encoder = EncoderTiny(3, 4, num_blocks=(1, 3, 3, 3), block_out_channels=(64, 64, 64, 64), act_fn="relu")
        prefix = VAE_PREFIX + "taesd_encoder."
        state = {"layers." + k[len(prefix):]: v.float() for k, v in raw.items() if k.startswith(prefix)}
        _load_exact(encoder, state, "TAESD encoder")
        scale, shift = _taesd_scale_shift(raw)
        return LatentEncoder(encoder, "taesd", scale, shift)
    if VAE_PREFIX + "encoder.conv_in.weight" not in raw:
        raise CheckpointError(f"{checkpoint}: no {VAE_PREFIX}* VAE weights (neither AutoencoderKL nor TAESD)")
    return LatentEncoder(_load_kl_vae(raw), "kl")


class LatentDecoder(nn.Module):
    """Latents ``[B, 4, h, w]`` in the UNet's space -> images ``[B, 3, 8h, 8w]`` in [-1, 1]."""

    def __init__(self, vae: nn.Module, kind: str, vae_scale: float = 1.0, vae_shift: float = 0.0,
                 latent_scale: float = SD15_LATENT_SCALE) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.kind = kind
        self.vae_scale, self.vae_shift, self.latent_scale = vae_scale, vae_shift, latent_scale

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        raw = latents.to(next(self.vae.parameters())) / self.latent_scale
        if self.kind == "taesd":
            # ComfyUI: taesd_decoder((x - shift) * scale) in [0, 1]; DecoderTiny returns 2 y - 1.
            return self.vae((raw - self.vae_shift) * self.vae_scale).float().clamp(-1, 1)
        return self.vae.decode(raw).sample.float().clamp(-1, 1)


def load_latent_decoder(checkpoint: str | os.PathLike, latent_scale: float = SD15_LATENT_SCALE) -> LatentDecoder:
    """The VAE decoder of a single-file checkpoint (fp32, CPU): the full ``AutoencoderKL`` (SD1.5's
    config), or TAESD (``first_stage_model.taesd_decoder.*``, as ComfyUI stores it; SDXL's too, with
    ``latent_scale`` 0.13025)."""
    from accelerate import init_empty_weights

    raw = _read_prefixed(checkpoint, VAE_PREFIX)
    if any(k.startswith(VAE_PREFIX + "taesd_decoder.") for k in raw):
        from diffusers.models.autoencoders.vae import DecoderTiny

        with init_empty_weights():
            decoder = DecoderTiny(4, 3, num_blocks=(3, 3, 3, 1), block_out_channels=(64, 64, 64, 64),
                                  upsampling_scaling_factor=2, act_fn="relu", upsample_fn="nearest")
        prefix = VAE_PREFIX + "taesd_decoder."
        # ComfyUI's decoder starts with a parameterless Clamp (index 0); DecoderTiny's layers do not.
        state = {}
        for key, value in raw.items():
            if key.startswith(prefix):
                index, _, rest = key[len(prefix):].partition(".")
                state[f"layers.{int(index) - 1}.{rest}"] = value.float()
        _load_exact(decoder, state, "TAESD decoder")
        scale, shift = _taesd_scale_shift(raw)
        return LatentDecoder(decoder, "taesd", scale, shift, latent_scale)
    if VAE_PREFIX + "decoder.conv_in.weight" not in raw:
        raise CheckpointError(f"{checkpoint}: no {VAE_PREFIX}* VAE decoder weights (neither AutoencoderKL nor TAESD)")
    return LatentDecoder(_load_kl_vae(raw), "kl", latent_scale=latent_scale)


def load_image(path: str | os.PathLike, resolution: int) -> torch.Tensor:
    """An image (or a video's middle frame) -> ``[3, R, R]`` in [-1, 1]: shorter side resized to
    ``resolution`` (bicubic), centre crop. Raises ``OSError``/``ValueError`` if unreadable."""
    import numpy as np
    from PIL import Image

    path = os.fspath(path)
    if path.lower().endswith(VIDEO_EXTENSIONS):
        image = _middle_frame(path)
    else:
        with Image.open(path) as img:
            image = img.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return array.permute(2, 0, 1) / 127.5 - 1.0


def _middle_frame(path: str):
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        if stream.duration:  # seek near the middle instead of decoding the whole clip
            container.seek((stream.start_time or 0) + stream.duration // 2, stream=stream)
        for frame in container.decode(stream):
            return frame.to_image().convert("RGB")
    raise ValueError(f"{path}: no decodable frames")
