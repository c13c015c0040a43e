"""The random-weight test models behave like the real files they stand for: ComfyUI and
transformers load them as those kinds, and each does its job (a LoRA changes the image, a
ControlNet steers it, CLAP tells sounds and texts apart), the same way on every build."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile
import torch
import torch.nn.functional as F

from tools import test_models as tm

SIZE, STEPS = 64, 2


def test_sounds_have_their_declared_rate_channels_and_length(test_models: tm.TestModels) -> None:
    assert set(test_models.sounds) == set(tm.SOUND_SPECS)
    for name, path in test_models.sounds.items():
        rate, channels, seconds = tm.SOUND_SPECS[name]
        info = soundfile.info(str(path))
        assert (info.samplerate, info.channels) == (rate, channels), name
        assert abs(info.duration - seconds) < 1e-3, name
    assert {r for r, _, _ in tm.SOUND_SPECS.values()} == {48_000, 44_100}


def test_the_tiny_unet_has_what_comfyuis_sd15_detector_keys_on() -> None:
    tm.import_comfy()
    import comfy.supported_models

    from clap2diffusion_core.unet_configs import SD15_UNET_CONFIG

    for key, value in {**comfy.supported_models.SD15.unet_config, **comfy.supported_models.SD15.unet_extra_config}.items():
        if key in SD15_UNET_CONFIG:
            assert SD15_UNET_CONFIG[key] == value, key
            assert tm.TINY_UNET_CONFIG[key] == value, key


def test_tiny_checkpoint_is_sd15_samples_and_the_lora_changes_it(test_models: tm.TestModels) -> None:
    plain = tm.verify_sd15(test_models.sd15_checkpoint, steps=STEPS, size=SIZE)  # raises unless detected as SD15
    with_lora = tm.verify_sd15(test_models.sd15_checkpoint, lora=test_models.lora, steps=STEPS, size=SIZE)
    assert (plain - with_lora).abs().mean() > 0.01  # verify_sd15 also checks ComfyUI used every LoRA key


def test_controlnet_loads_every_weight_and_steers_sampling(test_models: tm.TestModels) -> None:
    tm.import_comfy()
    import comfy.controlnet
    import comfy.sample
    import comfy.sd
    import comfy.utils

    tm.verify_controlnet(test_models.controlnet)  # ComfyUI's loader takes it for a ControlNet
    control = comfy.controlnet.load_controlnet(str(test_models.controlnet))
    stored = comfy.utils.load_torch_file(str(test_models.controlnet), safe_load=True)
    loaded = control.control_model.state_dict()
    assert {f"control_model.{k}" for k in loaded} == set(stored)
    assert all(torch.equal(loaded[k].to(stored[f"control_model.{k}"].dtype), stored[f"control_model.{k}"])
               for k in loaded)

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(test_models.sd15_checkpoint), output_vae=False)
    text = clip.encode_from_tokens_scheduled(clip.tokenize("a beach"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    noise = comfy.sample.prepare_noise(latent, seed=0)

    def sample(hint: torch.Tensor | None) -> torch.Tensor:
        positive = [[c, dict(extra)] for c, extra in text]
        if hint is not None:
            for _, extra in positive:
                extra["control"] = control.copy().set_cond_hint(hint.movedim(-1, 1), 1.0)
                extra["control_apply_to_uncond"] = False
        return comfy.sample.sample(model, noise, STEPS, 7.0, "euler", "normal", positive, negative, latent,
                                   seed=0, disable_pbar=True)

    gen = torch.Generator().manual_seed(0)
    edges, other = (torch.rand(1, SIZE, SIZE, 3, generator=gen) for _ in range(2))
    plain, steered, steered_again, other_hint = sample(None), sample(edges), sample(edges), sample(other)
    assert torch.equal(steered, steered_again)
    assert (steered - plain).abs().mean() > 1e-3 * plain.abs().mean()  # the ControlNet acts
    assert not torch.equal(steered, other_hint)  # ... and follows its hint


def test_clap_folder_loads_offline_and_tells_sounds_and_texts_apart(test_models: tm.TestModels) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import ClapModel, ClapProcessor

    tm.verify_clap(test_models.clap_folder)  # loads offline, 512-d audio and text embeddings
    processor = ClapProcessor.from_pretrained(str(test_models.clap_folder))
    model = ClapModel.from_pretrained(str(test_models.clap_folder)).eval()

    def embed_audio(name: str) -> torch.Tensor:
        audio, _ = tm.synth_sound(name)
        inputs = processor(audio=[audio[:, 0]], sampling_rate=48_000, return_tensors="pt")
        with torch.no_grad():
            out = model.get_audio_features(**inputs)
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)[0]

    def embed_text(text: str) -> torch.Tensor:
        with torch.no_grad():
            out = model.get_text_features(**processor.tokenizer([text], return_tensors="pt"))
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)[0]

    thunder, chirp = embed_audio("thunder.wav"), embed_audio("chirp_stereo.wav")
    assert torch.allclose(thunder, embed_audio("thunder.wav"))  # deterministic
    assert float(thunder @ chirp) < 0.999, "two different sounds got the same embedding"
    # The random text tower puts all texts close together, but not on one point.
    assert not torch.allclose(embed_text("thunder over the sea"), embed_text("a bird chirping"), atol=1e-4)


def test_builds_are_deterministic_and_follow_the_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    for i in (1, 2):
        tm.build_lora(tmp_path / str(i) / "lora.safetensors")
        tm.build_sound(tmp_path / str(i) / "chirp_stereo.wav")
    tm.build_lora(tmp_path / "seed3" / "lora.safetensors", seed=3)
    # Tensors, not bytes: safetensors writes the metadata map in no fixed order.
    first, second, seed3 = (load_file(tmp_path / d / "lora.safetensors") for d in ("1", "2", "seed3"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    matrices = [k for k in first if first[k].dim() == 2]  # (alphas are the same constant in every build)
    assert first.keys() == seed3.keys() and matrices and not any(torch.equal(first[k], seed3[k]) for k in matrices)
    assert (tmp_path / "1" / "chirp_stereo.wav").read_bytes() == (tmp_path / "2" / "chirp_stereo.wav").read_bytes()
    first, second, other = (tm.tiny_unet(seed=s).state_dict() for s in (5, 5, 6))
    assert all(torch.equal(first[k], second[k]) for k in first)
    weights = [k for k in first if k.endswith(".weight") and first[k].numel() > 1]
    assert not any(torch.equal(first[k], other[k]) for k in weights)



@pytest.mark.slow  # builds (once, ~40 s) and loads the 3.1 GB checkpoint: about 8 GB of RAM
def test_sdxl_checkpoint_is_detected_as_segmind_vega_and_samples() -> None:
    """The SDXL-family test checkpoint (built on demand, 3.1 GB): ComfyUI's own loader takes it for
    Segmind Vega with an SDXL CLIP (tokens [1, 77, 2048], pooled [1, 1280]), places every weight
    (CLIP-G's text projection included) and samples it to a finite, non-flat image."""
    family, image = tm.verify_sdxl(tm.sdxl_checkpoint(), steps=1, size=SIZE)
    assert family == "Segmind_Vega"
    assert image.shape == (1, SIZE, SIZE, 3)
