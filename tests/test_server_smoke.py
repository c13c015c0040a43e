"""The real ComfyUI server with the tiny SD1.5 test checkpoint: core nodes only."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools import test_models as tm
from tools.comfy_server import ComfyClient, ComfyServer, ExecutionFailed, Graph, PromptRejected, uncached


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


def test_invalid_graphs_are_rejected_with_node_errors(comfy: ComfyClient) -> None:
    g = Graph()
    g.node("PreviewImage", images=g.node("LoadImage", image="no-such-image.png").out)
    with pytest.raises(PromptRejected) as err:
        comfy.queue(g.prompt())
    assert "1" in err.value.node_errors and "no-such-image.png" in str(err.value)

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=Path(tm.SD15_CHECKPOINT).name)
    g.node("SaveImage", images=ckpt[2], filename_prefix="x")  # a VAE where an IMAGE goes
    with pytest.raises(PromptRejected) as err:
        comfy.queue(g.prompt())
    assert err.value.node_errors["2"]["class_type"] == "SaveImage" and "VAE" in str(err.value)


def test_node_failure_names_the_node_and_the_exception(comfy_server: ComfyServer) -> None:
    (comfy_server.input_dir / "broken.png").write_bytes(b"not a png")
    g = Graph()
    image = g.node("LoadImage", image="broken.png")
    g.node("PreviewImage", images=image.out)
    with pytest.raises(ExecutionFailed) as err:
        comfy_server.client.run(uncached(g.prompt()), timeout=60)
    assert (err.value.node_id, err.value.node_type) == ("1", "LoadImage")
    assert err.value.exception_type and "broken.png" in err.value.traceback + err.value.exception_message


def test_interrupt_stops_a_running_prompt(comfy: ComfyClient) -> None:
    g = text_to_image(seed=7)
    sampler = next(i for i, n in g.nodes.items() if n["class_type"] == "KSampler")
    g.set(sampler, steps=200)  # long enough to be running when interrupted
    prompt_id = comfy.queue(uncached(g.prompt()))
    deadline = time.monotonic() + 60
    while prompt_id not in comfy.running():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    comfy.interrupt(prompt_id)
    with pytest.raises(ExecutionFailed) as err:
        comfy.wait(prompt_id, timeout=120)
    assert err.value.interrupted
