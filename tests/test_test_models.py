"""The random-weight test models load in the real libraries the way real files do."""

from __future__ import annotations

from pathlib import Path

import soundfile
import torch

from tools import test_models as tm


def test_sounds_have_their_declared_rate_channels_and_length(test_models: tm.TestModels) -> None:
    assert set(test_models.sounds) == set(tm.SOUND_SPECS)
    for name, path in test_models.sounds.items():
        rate, channels, seconds = tm.SOUND_SPECS[name]
        info = soundfile.info(str(path))
        assert (info.samplerate, info.channels) == (rate, channels), name
        assert abs(info.duration - seconds) < 1e-3, name
    assert {r for r, _, _ in tm.SOUND_SPECS.values()} == {48_000, 44_100}


def test_tiny_checkpoint_is_sd15_samples_and_the_lora_changes_it(test_models: tm.TestModels) -> None:
    plain = tm.verify_sd15(test_models.sd15_checkpoint, steps=2)
    with_lora = tm.verify_sd15(test_models.sd15_checkpoint, lora=test_models.lora, steps=2)  # all keys used
    assert (plain - with_lora).abs().mean() > 0.01


def test_controlnet_loads_with_comfy_loader(test_models: tm.TestModels) -> None:
    tm.verify_controlnet(test_models.controlnet)


def test_clap_folder_loads_offline_and_embeds(test_models: tm.TestModels) -> None:
    embedding = tm.verify_clap(test_models.clap_folder)
    assert torch.isfinite(embedding).all()


def test_builds_are_deterministic(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    for i in (1, 2):
        tm.build_lora(tmp_path / str(i) / "lora.safetensors")
        tm.build_sound(tmp_path / str(i) / "chirp_stereo.wav")
    # Tensors, not bytes: safetensors writes the metadata map in no fixed order.
    first, second = (load_file(tmp_path / str(i) / "lora.safetensors") for i in (1, 2))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "1" / "chirp_stereo.wav").read_bytes() == (tmp_path / "2" / "chirp_stereo.wav").read_bytes()
    first, second = tm.tiny_unet(seed=5).state_dict(), tm.tiny_unet(seed=5).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
