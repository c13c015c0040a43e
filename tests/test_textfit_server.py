"""Fit Audio Projector (from text) through a real ComfyUI server (issue 12), on the tiny SD1.5.

The fit uses 8 captions and a handful of steps (the point is the plumbing, not the fit); images
are 64 px, one step.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from comfy_pack import load
from graphs import CHECKPOINT, CLAP, pixels, sample

from tools.comfy_server import ExecutionFailed, Graph, PromptRejected, uncached

FIT = "C2D_FitAudioProjectorFromText"


def _fitted(comfy_server) -> list[Path]:  # noqa: ANN001
    return sorted((comfy_server.base_dir / "models" / "clap2diffusion").glob("*textfit-*"))


def fit_to_image(seed: int, strength: float = 1.0, steps: int = 5, corpus_size: int = 8, sound: bool = True,
                 checkpoint: str = CHECKPOINT) -> Graph:
    """Checkpoint + CLAP -> Fit -> (thunder -> CLAP Encode -> Decompose -> Project) -> Apply Audio to
    Conditioning -> KSampler -> image (the example workflow's shape)."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=checkpoint)
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    if sound:
        clap = g.node("C2D_ClapLoader", clap_name=CLAP)
        fit = g.node(FIT, clip=ckpt[1], clap_model=clap.out, corpus_size=corpus_size, steps=steps, seed=seed,
                     extra_captions="thunder over the sea")
        audio = g.node("C2D_LoadAudio", audio="thunder.wav")
        embeds = g.node("C2D_ClapEncode", clap_model=clap.out, audio=audio.out, window_mode="first")
        levels = g.node("C2D_HierarchicalDecompose", clap2diffusion=fit.out, clap_embeds=embeds.out,
                        foreground=1.0, background=1.0, ambience=1.0)
        tokens = g.node("C2D_AudioProject", audio_levels=levels.out, clap2diffusion=fit.out)
        positive = g.node("C2D_ApplyAudioToConditioning", conditioning=positive, audio_tokens=tokens.out,
                          strength=strength).out
    sample(g, ckpt[0], ckpt, positive, negative, steps=1, size=64)
    return g


@pytest.fixture
def clean_fits(comfy_server):  # noqa: ANN001
    """No text-fitted file before or after a test (the session server's folder is shared)."""
    for path in _fitted(comfy_server):
        path.unlink()
    yield
    for path in _fitted(comfy_server):
        path.unlink()


def test_textfit_workflow_fits_once_then_reuses_the_file(comfy, comfy_server, clean_fits):
    graph = fit_to_image(seed=101)
    first = comfy.execute(uncached(graph.prompt()))
    files = _fitted(comfy_server)
    assert len(files) == 1 and files[0].name.startswith("textfit-sd15-"), files
    image = pixels(first.images[-1])
    assert image.shape == (64, 64, 3) and image.std() > 0
    fit_id = next(k for k, v in graph.nodes.items() if v["class_type"] == FIT)

    written = files[0].stat().st_mtime_ns
    with comfy_server.log_since() as lines:
        again = comfy.execute(uncached(graph.prompt()))  # the node runs again, with the same inputs
    # Reused: no new file, the file untouched.
    assert _fitted(comfy_server) == files and files[0].stat().st_mtime_ns == written
    # The node's own time (its log line) where the log has it, else the websocket gaps (which a
    # loaded machine stretches).
    reused = [m for line in lines if (m := re.search(r"reused (textfit-\S+) \(([\d.]+) s\)", line))]
    reuse_seconds = float(reused[0].group(2)) if reused else again.node_times[fit_id]
    print(f"\nfit node: {first.node_times[fit_id]:.2f}s fitting, {reuse_seconds:.2f}s reusing "
          f"({again.node_times[fit_id]:.2f}s between websocket messages)")
    assert reuse_seconds < 1.0
    np.testing.assert_array_equal(pixels(again.images[-1]), image)

    # Strength 0: exactly the text-only image (the same graph without any audio node).
    silent = comfy.execute(uncached(fit_to_image(seed=101, strength=0.0).prompt()))
    text_only = comfy.execute(uncached(fit_to_image(seed=101, sound=False).prompt()))
    np.testing.assert_array_equal(pixels(silent.images[-1]), pixels(text_only.images[-1]))
    assert not np.array_equal(image, pixels(text_only.images[-1]))  # and the sound did change it


def test_textfit_refuses_a_single_caption_before_running(comfy, comfy_server, clean_fits):
    with pytest.raises(PromptRejected, match="corpus_size"):
        comfy.queue(fit_to_image(seed=102, corpus_size=1).prompt())
    assert _fitted(comfy_server) == []


def test_textfit_cancel_during_the_fit_leaves_no_file(comfy, comfy_server, clean_fits):
    graph = fit_to_image(seed=103, steps=20000)
    done = threading.Event()

    def interrupt_when_fitting() -> None:
        deadline = time.monotonic() + 240
        while not done.is_set() and time.monotonic() < deadline:
            running = comfy.running()
            if running:
                time.sleep(8.0)  # past the captions' encoding, inside the 20,000 steps
                comfy.interrupt()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=interrupt_when_fitting, daemon=True)
    thread.start()
    try:
        with pytest.raises(ExecutionFailed) as err:
            comfy.execute(uncached(graph.prompt()), timeout=600)
    finally:
        done.set()
        thread.join(5)
    assert err.value.interrupted or "Interrupt" in err.value.exception_type
    leftovers = list((comfy_server.base_dir / "models" / "clap2diffusion").glob("*textfit*"))
    assert leftovers == []  # neither the file nor a temporary


def test_textfit_names_a_text_encoder_family_it_cannot_serve():
    fit_nodes = load("nodes.fit_nodes")
    errors = load("clap2diffusion_core.errors")

    def clip_of(encoder: str, tokenizer: str):  # noqa: ANN202 (what ComfyUI's CLIP object holds)
        return type("CLIP", (), {"cond_stage_model": type(encoder, (), {})(), "tokenizer": type(tokenizer, (), {})()})()

    # Each known family with the reason it is refused; an unknown one by its class name alone.
    for encoder, tokenizer, why in (("SD3ClipModel", "SD3Tokenizer", "T5-XXL, 4096-wide tokens"),
                                    ("FluxClipModel", "FluxTokenizer", "a transformer, not a UNet"),
                                    ("SDXLRefinerClipModel", "SDXLTokenizer", "CLIP-G alone"),
                                    ("SD2ClipModel", "SD2Tokenizer", "OpenCLIP-H"),
                                    ("SomeNewClipModel", "SomeTokenizer", "")):
        with pytest.raises(errors.TextEncoderError, match=encoder) as err:
            fit_nodes.text_encoder_family(clip_of(encoder, tokenizer))
        assert why in str(err.value) and "SD1.5" in str(err.value) and "SDXL" in str(err.value)
    # The two families it serves.
    assert fit_nodes.text_encoder_family(clip_of("SD1ClipModel", "SD1Tokenizer"))[0] == "sd15"
    assert fit_nodes.text_encoder_family(clip_of("SDXLClipModel", "SDXLTokenizer"))[0] == "sdxl"
