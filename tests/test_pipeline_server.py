"""Sound + text -> image through the real ComfyUI server: the pack's main path (issue 3)."""

from __future__ import annotations

import numpy as np
from graphs import CLAP, CLAP2DIFFUSION, audio_to_image, pixels, saved_images

from tools.comfy_server import ComfyClient, uncached

PACK_NODES = {
    "C2D_LoadAudio",
    "C2D_ClapLoader",
    "C2D_ClapEncode",
    "C2D_Clap2DiffusionLoader",
    "C2D_HierarchicalDecompose",
    "C2D_AudioProject",
    "C2D_ApplyAudioToConditioning",
    "C2D_ApplyAudioToModel",
    "C2D_AudioToPrompt",
}


def run_image(comfy: ComfyClient, prompt: dict) -> np.ndarray:
    images = saved_images(comfy, comfy.execute(prompt, timeout=300).entry)
    assert len(images) == 1
    return images[0]


def test_server_lists_every_node_of_the_pack_with_tooltips(comfy: ComfyClient, comfy_server) -> None:
    info = comfy.object_info()
    ours = {name for name in info if name.startswith("C2D_")}
    assert PACK_NODES <= ours
    assert "IMPORT FAILED" not in comfy_server.log()
    for name in ours:
        assert info[name]["category"] == "audio/clap2diffusion"
        for section in ("required", "optional"):
            for input_name, (_, options) in info[name]["input"].get(section, {}).items():
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert all(info[name]["output_tooltips"]), f"{name} has an output without a tooltip"
    assert CLAP in info["C2D_ClapLoader"]["input"]["required"]["clap_name"][1]["options"] or CLAP in str(
        info["C2D_ClapLoader"]["input"]["required"]["clap_name"]
    )
    assert CLAP2DIFFUSION in str(info["C2D_Clap2DiffusionLoader"]["input"]["required"]["clap2diffusion_name"])


def test_sound_and_text_give_an_image_that_depends_on_the_sound(comfy: ComfyClient) -> None:
    thunder = run_image(comfy, audio_to_image("thunder.wav").prompt())
    assert thunder.shape == (256, 256, 3) and thunder.std() > 1.0

    # Same graph and seed, every node run again: the same pixels.
    again = run_image(comfy, uncached(audio_to_image("thunder.wav").prompt()))
    assert np.array_equal(again, thunder)

    chirp = run_image(comfy, audio_to_image("chirp_stereo.wav").prompt())
    assert not np.array_equal(chirp, thunder)

    text_only = run_image(comfy, audio_to_image(None).prompt())
    assert not np.array_equal(text_only, thunder), "the sound did not reach the sampler"


def test_strength_zero_gives_exactly_the_text_only_image(comfy: ComfyClient) -> None:
    text_only = run_image(comfy, audio_to_image(None, seed=7).prompt())
    muted = run_image(comfy, audio_to_image("thunder.wav", strength=0.0, seed=7).prompt())
    assert np.array_equal(muted, text_only)


def test_a_long_sound_per_window_gives_one_image_per_window(comfy: ComfyClient) -> None:
    """12 s of stereo at 44.1 kHz = two 10 s windows: a batch of two, one image each (a storyboard)."""
    prompt = audio_to_image("thunder_44k_stereo.wav", window_mode="per_window", batch_size=2).prompt()
    window_0, window_1 = (
        image.astype(int) for image in saved_images(comfy, comfy.execute(prompt, timeout=300).entry)
    )
    # Batch row 0 gets the same noise as a batch of one, so it matches the first-window image
    # (up to batched arithmetic); row 1 carries the second window.
    first = run_image(comfy, audio_to_image("thunder_44k_stereo.wav", window_mode="first").prompt()).astype(
        int
    )
    assert np.abs(window_0 - first).mean() < 0.25 * np.abs(window_1 - first).mean()


def test_a_long_sound_averaged_over_windows_differs_from_its_first_window(comfy: ComfyClient) -> None:
    mean = run_image(comfy, audio_to_image("thunder_44k_stereo.wav", window_mode="mean").prompt())
    first = run_image(comfy, audio_to_image("thunder_44k_stereo.wav", window_mode="first").prompt())
    assert not np.array_equal(mean, first)


def test_the_decomposition_node_shows_its_level_preview(comfy: ComfyClient) -> None:
    prompt = audio_to_image("tone_440hz.wav").prompt()
    entry = comfy.execute(prompt, timeout=300).entry
    decompose = next(k for k, v in prompt.items() if v["class_type"] == "C2D_HierarchicalDecompose")
    previews = entry["outputs"][decompose]["images"]
    assert previews and previews[0]["type"] == "temp"
    assert pixels(comfy.view(**previews[0])).shape[2] == 3
