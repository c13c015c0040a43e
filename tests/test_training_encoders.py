"""The feature cache's frozen encoders read the single-file SD1.5 checkpoint the way ComfyUI does:
the caption features are the conditioning ComfyUI's CLIPTextEncode makes, and the image latents
are what ComfyUI's VAEEncode hands the model (after ``process_latent_in``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clap2diffusion_core.checkpoint import CheckpointError
from clap2diffusion_core.training.encoders import (
    SD15_LATENT_SCALE,
    load_image,
    load_latent_encoder,
    load_text_encoder,
)
from tools import test_models as tm


@pytest.fixture(scope="module")
def comfy_checkpoint(test_models):
    tm.import_comfy()
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(test_models.sd15_checkpoint), output_vae=True, output_clip=True)
    return clip, vae


@torch.no_grad()
def test_caption_features_are_comfyuis_text_conditioning(test_models, comfy_checkpoint):
    clip, _ = comfy_checkpoint
    captions = ["thunder rumbling far away during a storm", ""]
    hidden, pooled = load_text_encoder(test_models.sd15_checkpoint)(captions)
    assert hidden.shape == (2, 77, 768) and pooled.shape == (2, 768)
    for row, caption in enumerate(captions):
        expected = clip.encode_from_tokens(clip.tokenize(caption)).float()[0]
        torch.testing.assert_close(hidden[row], expected, rtol=2e-3, atol=2e-3)


@torch.no_grad()
def test_taesd_latents_are_what_comfyui_feeds_its_model(test_models, comfy_checkpoint, tmp_path):
    _, vae = comfy_checkpoint
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "frame.png")
    image = load_image(tmp_path / "frame.png", 64)  # [3, 64, 64] in [-1, 1], centre crop
    assert image.shape == (3, 64, 64)
    assert torch.equal(((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0),
                       torch.from_numpy(rgb[:, 16:80]))
    ours = load_latent_encoder(test_models.sd15_checkpoint)(image[None])
    comfy_raw = vae.encode(((image + 1) / 2).permute(1, 2, 0)[None]).float()
    torch.testing.assert_close(ours, comfy_raw * SD15_LATENT_SCALE, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_a_full_sd_vae_in_a_single_file_loads_with_every_weight_placed(tmp_path):
    """ComfyUI's own diffusers -> LDM converter writes the file; we read it back into diffusers."""
    tm.import_comfy()
    from comfy.diffusers_convert import convert_vae_state_dict
    from diffusers import AutoencoderKL

    from clap2diffusion_core.training.encoders import CONFIG_DIR

    torch.manual_seed(0)
    reference = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIG_DIR / "vae_sd15.json"))).eval()
    ldm = convert_vae_state_dict(reference.state_dict())
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in ldm.items()}, str(tmp_path / "sd.safetensors"))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    ours = load_latent_encoder(tmp_path / "sd.safetensors")(images)
    torch.testing.assert_close(ours, reference.encode(images).latent_dist.mean * SD15_LATENT_SCALE)


def test_a_checkpoint_without_the_parts_says_so(tmp_path):
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "unet_only.safetensors"))
    with pytest.raises(CheckpointError, match="VAE"):
        load_latent_encoder(tmp_path / "unet_only.safetensors")
    with pytest.raises(CheckpointError, match="CLIP-L"):
        load_text_encoder(tmp_path / "unet_only.safetensors")
