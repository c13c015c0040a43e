"""Sound + text -> image through the real ComfyUI server: the pack's main path (issue 3)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from graphs import CLAP, CLAP2DIFFUSION, STAGE3, audio_to_image, pixels, round_trip_graphs, saved_images

from tools.comfy_server import ComfyClient, ExecutionFailed, uncached

#: The wiring contract: each node's sockets (name -> type), in order, and its outputs. Data sockets
#: carry data; the CLAP2Diffusion model travels on its own wire to the nodes that need it.
WIRING = {
    "C2D_LoadAudio": ({}, ["AUDIO"]),
    "C2D_ClapLoader": ({}, ["CLAP_MODEL"]),
    "C2D_ClapEncode": ({"clap_model": "CLAP_MODEL", "audio": "AUDIO"}, ["CLAP_EMBEDS"]),
    "C2D_Clap2DiffusionLoader": ({}, ["CLAP2DIFFUSION"]),
    "C2D_HierarchicalDecompose": ({"clap2diffusion": "CLAP2DIFFUSION", "clap_embeds": "CLAP_EMBEDS"},
                                  ["AUDIO_LEVELS"]),
    "C2D_AudioProject": ({"audio_levels": "AUDIO_LEVELS", "clap2diffusion": "CLAP2DIFFUSION"}, ["AUDIO_TOKENS"]),
    "C2D_ApplyAudioToConditioning": ({"conditioning": "CONDITIONING", "audio_tokens": "AUDIO_TOKENS"},
                                     ["CONDITIONING"]),
    "C2D_ApplyAudioToModel": ({"model": "MODEL", "audio_tokens": "AUDIO_TOKENS", "clap2diffusion": "CLAP2DIFFUSION"},
                              ["MODEL"]),
    "C2D_SaveAudioTokens": ({"audio_tokens": "AUDIO_TOKENS"}, []),
    "C2D_LoadAudioTokens": ({}, ["AUDIO_TOKENS"]),
}  # fmt: skip
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def run_image(comfy: ComfyClient, prompt: dict) -> np.ndarray:
    images = saved_images(comfy, comfy.execute(prompt, timeout=300).entry)
    assert len(images) == 1
    return images[0]


def sockets(spec: dict) -> dict[str, str]:
    """The link-only inputs of an object_info entry, in order: name -> socket type."""
    order = spec.get("input_order", {})
    found = {}
    for section in ("required", "optional"):
        inputs = spec["input"].get(section, {})
        for name in order.get(section, list(inputs)):
            kind = inputs[name][0]
            if isinstance(kind, str) and kind not in WIDGET_TYPES:
                found[name] = kind
    return found


def options(spec: dict, name: str) -> list[str]:
    """The choices of a combo input (V3 lists them under ``options``)."""
    kind, extra = spec["input"]["required"][name][:2]
    return kind if isinstance(kind, list) else extra["options"]


def test_server_lists_every_node_of_the_pack_with_its_wiring_and_tooltips(comfy: ComfyClient, comfy_server) -> None:
    info = comfy.object_info()
    assert "IMPORT FAILED" not in comfy_server.log()
    for name, (inputs, outputs) in WIRING.items():
        assert sockets(info[name]) == inputs, name
        assert info[name]["output"] == outputs, name
    for name in (n for n in info if n.startswith("C2D_")):
        assert info[name]["category"] == "audio/clap2diffusion"
        for section in ("required", "optional"):
            for input_name, spec in info[name]["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert all(info[name]["output_tooltips"]), f"{name} has an output without a tooltip"
    assert CLAP in options(info["C2D_ClapLoader"], "clap_name")
    assert CLAP2DIFFUSION in options(info["C2D_Clap2DiffusionLoader"], "clap2diffusion_name")
    assert STAGE3 in options(info["C2D_Clap2DiffusionLoader"], "clap2diffusion_name")


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


def test_saved_then_loaded_audio_tokens_give_the_same_image_as_the_direct_graph(comfy: ComfyClient) -> None:
    """Both injections, a stage-3 file, non-default level weights: all of it travels in the file."""
    direct, save_id = round_trip_graphs(None)
    entry = comfy.execute(direct.prompt(), timeout=300).entry
    [direct_image] = saved_images(comfy, entry)
    [message] = entry["outputs"][save_id]["text"]
    saved = re.search(r"saved (\S+\.safetensors)", message).group(1)
    subfolder, filename = saved.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "c2d_roundtrip.safetensors"
        copy.write_bytes(comfy.view(filename, subfolder, "output"))
        uploaded = comfy.upload_file(copy, subfolder="c2d_tokens")
    loaded, _ = round_trip_graphs(uploaded)
    # The direct image carries the sound (test_sound_and_text_give_an_image_that_depends_on_the_sound
    # and the model-injection tests show each injection changes the image), so equality means the
    # loaded tokens, their level weights and their source all arrived.
    assert np.array_equal(run_image(comfy, loaded.prompt()), direct_image)


@pytest.mark.parametrize("node", ["C2D_AudioProject", "C2D_ApplyAudioToModel"])
def test_a_graph_with_the_old_wiring_fails_naming_the_input_to_connect(comfy: ComfyClient, node: str) -> None:
    """Before the model got its own wire, Audio Project and Apply Audio to Model took only data."""
    graph, _ = round_trip_graphs(None)
    old = graph.prompt()
    for spec in old.values():
        if spec["class_type"] == node:
            spec["inputs"].pop("clap2diffusion")
        if spec["class_type"] == "C2D_ApplyAudioToModel":  # the old node's level widgets
            spec["inputs"].update(foreground=1.0, background=1.0, ambience=1.0)
    old = {k: v for k, v in old.items() if v["class_type"] != "C2D_SaveAudioTokens"}
    with pytest.raises(ExecutionFailed) as err:
        comfy.run(old, timeout=300)
    assert err.value.node_type == node
    assert "'clap2diffusion' input is not connected" in err.value.exception_message
    assert "connect the output of the CLAP2Diffusion Loader" in err.value.exception_message


def test_tokens_from_another_file_are_refused_before_sampling(comfy: ComfyClient) -> None:
    """The sound is decomposed and projected by the stage-1 file, the adapter is the stage-3 file's."""
    graph, _ = round_trip_graphs(None)
    prompt = {k: v for k, v in graph.prompt().items() if v["class_type"] != "C2D_SaveAudioTokens"}
    prompt["other"] = {"class_type": "C2D_Clap2DiffusionLoader", "inputs": {"clap2diffusion_name": CLAP2DIFFUSION}}
    for spec in prompt.values():
        if spec["class_type"] in ("C2D_HierarchicalDecompose", "C2D_AudioProject"):
            spec["inputs"]["clap2diffusion"] = ["other", 0]
    apply = next(k for k, v in prompt.items() if v["class_type"] == "C2D_ApplyAudioToModel")
    with pytest.raises(ExecutionFailed) as err:
        comfy.run(prompt, timeout=300)
    assert err.value.node_id == apply
    assert "made by the CLAP2Diffusion file" in err.value.exception_message
    assert "wire the same CLAP2Diffusion Loader" in err.value.exception_message
