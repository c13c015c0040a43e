"""The real ComfyUI server with the tiny SD1.5 test checkpoint: core nodes only."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from comfy_server import ComfyClient, Graph, uncached
from PIL import Image

from tools import test_models as tm


def text_to_image(seed: int = 42, text: str = "a beach, thunder in the distance") -> Graph:
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=Path(tm.SD15_CHECKPOINT).name)
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text=text)
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="blurry")
    latent = g.node("EmptyLatentImage", width=256, height=256, batch_size=1)
    sampled = g.node("KSampler", model=ckpt[0], positive=positive.out, negative=negative.out,
                     latent_image=latent.out, seed=seed, steps=4, cfg=7.0, sampler_name="euler",
                     scheduler="normal", denoise=1.0)
    image = g.node("VAEDecode", samples=sampled.out, vae=ckpt[2])
    g.node("SaveImage", images=image.out, filename_prefix="smoke")
    return g


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_server_lists_core_nodes_and_our_model_folders(comfy: ComfyClient) -> None:
    info = comfy.object_info()
    assert {"CheckpointLoaderSimple", "KSampler", "LoadAudio"} <= info.keys()
    checkpoints = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "tiny-sd15.safetensors" in checkpoints


def test_text_to_image_is_deterministic(comfy: ComfyClient) -> None:
    prompt = text_to_image(seed=42).prompt()
    first = comfy.execute(prompt, timeout=240)
    assert len(first.images) == 1
    image = pixels(first.images[0])
    assert image.shape == (256, 256, 3)
    assert image.std() > 1.0, "a flat image: the model did not run"
    assert {"KSampler", "VAEDecode"} <= {prompt[n]["class_type"] for n in first.node_times}

    # Same graph, caches defeated: every node runs again and gives the same pixels.
    second = comfy.execute(uncached(prompt), timeout=240)
    assert second.cached_nodes == []
    assert np.array_equal(pixels(second.images[0]), image)

    other = comfy.run(text_to_image(seed=43).prompt(), timeout=240)
    assert not np.array_equal(pixels(other[0]), image)
