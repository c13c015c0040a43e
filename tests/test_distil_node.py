"""Distil Audio Adapter (issue 24): the distillation as a ComfyUI node, through the real server.

Tiny SD1.5 and CLAP test models, 64 px (8x8 latents), 16 captions (2 held out), batch 2, a dozen
steps: an empty folder gives a file, the file an image through Apply Audio to Model; the same
inputs reuse it; Cancel keeps the state and a new queue resumes to the uninterrupted weights;
another family is refused before the first step; strength 0 is exactly the plain image. The
in-process test holds the node's path (ComfyUI's UNet, the core loop without accelerate) to the
command line's (diffusers' UNet, accelerate) after 3 steps.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from graphs import CHECKPOINT, CLAP, CLAP2DIFFUSION, audio_tokens, saved_images

from clap2diffusion_core.checkpoint import load_checkpoint
from clap2diffusion_core.testing import random_checkpoint
from tools.comfy_server import ComfyClient, EventStream, ExecutionFailed, Graph, uncached

STEPS = 12
SETTINGS = {"steps": STEPS, "batch_size": 2, "learning_rate": 1e-3, "resolution": 64, "seed": 3, "corpus_size": 16,
            "preview_every": 6, "extra_captions": ""}
DISTIL = "distil"  # the node's id in the graphs below


def distil_graph(strength: float | None = 1.0, init: str = CLAP2DIFFUSION, prefix: str = "distil-node",
                 **settings: object) -> Graph:
    """Checkpoint + CLAP + a stage-1 file -> Distil Audio Adapter -> (thunder.wav's tokens) -> Apply Audio
    to Model -> KSampler (64 px, 1 step). ``strength=None``: the plain image (no audio node runs)."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    clap = g.node("C2D_ClapLoader", clap_name=CLAP)
    start = g.node("C2D_Clap2DiffusionLoader", clap2diffusion_name=init)
    distilled = g.node("C2D_DistilAudioAdapter", _id=DISTIL, model=ckpt[0], clip=ckpt[1], clap_model=clap.out,
                       clap2diffusion=start.out, vae=ckpt[2], **(SETTINGS | settings))
    tokens = audio_tokens(g, "thunder.wav")
    g.set(tokens, clap2diffusion=distilled.out)
    decompose = g.nodes[tokens.id]["inputs"]["audio_levels"][0]
    g.set(decompose, clap2diffusion=distilled.out)
    model = ckpt[0]
    if strength is not None:
        model = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out, clap2diffusion=distilled.out,
                       strength=strength, start_percent=0.0, end_percent=1.0).out
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = g.node("KSampler", model=model, positive=positive, negative=negative, latent_image=latent.out, seed=1,
                     steps=1, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    image = g.node("VAEDecode", samples=sampled.out, vae=ckpt[2])
    g.node("SaveImage", images=image.out, filename_prefix=prefix)
    return g


def distilled_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("distil-sd15-*.safetensors"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict()


@pytest.fixture(scope="module")
def folder(comfy_server) -> Path:
    folder = comfy_server.base_dir / "models" / "clap2diffusion"
    for old in [*distilled_files(folder), *folder.glob("distil-sd15-*.resume")]:
        old.unlink()
    return folder


@pytest.fixture(scope="module")
def first_run(folder: Path, comfy_server) -> dict:  # noqa: ANN001
    """The uninterrupted run: its file's weights, the image, and the seconds it took."""
    comfy = comfy_server.client
    assert distilled_files(folder) == []
    t0 = time.monotonic()
    image, = saved_images(comfy, comfy.wait(comfy.queue(uncached(distil_graph().prompt())), timeout=600))
    files = distilled_files(folder)
    assert len(files) == 1, files
    return {"file": files[0], "weights": weights(files[0]), "image": image, "seconds": time.monotonic() - t0,
            "mtime": files[0].stat().st_mtime_ns}


def test_distil_node_empty_folder_gives_a_file_and_an_image(first_run: dict, folder: Path) -> None:
    model = load_checkpoint(first_run["file"])
    assert model.config.stage == 3 and model.config.base_family == "sd15"
    assert float(model.adapter.gates().abs().min()) > 0  # every gate opened (they start at exactly 0)
    start = load_checkpoint(folder / CLAP2DIFFUSION)
    assert not torch.equal(model.projector.queries, start.projector.queries)  # the projector trained too
    assert first_run["image"].shape == (64, 64, 3)
    assert not list(folder.glob("*.resume")), "a finished run leaves no resume file"


def test_distil_node_second_queue_reuses_the_file(first_run: dict, folder: Path, comfy: ComfyClient) -> None:
    with EventStream(comfy.ws_url) as events:
        prompt_id = comfy.queue(uncached(distil_graph().prompt()))
        image, = saved_images(comfy, comfy.wait(prompt_id, timeout=300))
        progress = [e for e in events.for_prompt(prompt_id) if e.type == "progress" and e.data.get("node") == DISTIL]
        seconds = events.node_times(prompt_id)[DISTIL]
    assert distilled_files(folder) == [first_run["file"]]
    assert first_run["file"].stat().st_mtime_ns == first_run["mtime"]  # read, not written again
    assert not progress, "a reused file runs no step"
    assert seconds < 10, seconds
    assert np.array_equal(image, first_run["image"])


def test_distil_node_strength_zero_gives_exactly_the_plain_image(first_run: dict, comfy: ComfyClient) -> None:
    silent, = saved_images(comfy, comfy.wait(comfy.queue(distil_graph(0.0, prefix="distil-node-0").prompt())))
    plain, = saved_images(comfy, comfy.wait(comfy.queue(distil_graph(None, prefix="distil-node-plain").prompt())))
    assert np.array_equal(silent, plain)
    assert np.abs(first_run["image"].astype(int) - plain.astype(int)).max() > 0  # the distilled audio acts


def test_distil_node_cancel_then_requeue_resumes_to_the_uninterrupted_weights(
        first_run: dict, folder: Path, comfy: ComfyClient) -> None:
    first_run["file"].unlink()  # the same inputs again: no file, so the node distils
    prompt = uncached(distil_graph().prompt())
    with EventStream(comfy.ws_url) as events:
        prompt_id = comfy.queue(prompt)
        deadline = time.monotonic() + 300
        while True:
            progress = [e.data["value"] for e in events.for_prompt(prompt_id)
                        if e.type == "progress" and e.data.get("node") == DISTIL]
            if progress and max(progress) >= 3:
                break
            assert comfy.history(prompt_id) is None, "finished before the interrupt"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        comfy.interrupt(prompt_id)
        with pytest.raises(ExecutionFailed) as err:
            comfy.wait(prompt_id, 300)
    assert err.value.interrupted, err.value
    resume, = folder.glob("distil-sd15-*.resume")
    stopped_at = torch.load(resume, weights_only=True)["step"]
    assert 3 <= stopped_at < STEPS, stopped_at
    assert distilled_files(folder) == []
    comfy.wait(comfy.queue(uncached(prompt)), timeout=600)
    resumed, = distilled_files(folder)
    assert resumed.name == first_run["file"].name
    assert not resume.exists()
    again = weights(resumed)
    worst = max(float((again[k] - first_run["weights"][k]).abs().max()) for k in again)
    assert worst <= 1e-6, f"resumed at step {stopped_at}: largest difference {worst:.2e} from the uninterrupted run"


def test_distil_node_wrong_family_is_named_before_the_first_step(folder: Path, comfy: ComfyClient) -> None:
    name = "distil-node-sdxl-textfit.safetensors"
    random_checkpoint(folder / name, context_dim=2048, stage=1)
    with EventStream(comfy.ws_url) as events:
        prompt_id = comfy.queue(uncached(distil_graph(init=name).prompt()))
        with pytest.raises(ExecutionFailed, match=r"made for sdxl .*but the MODEL is sd15") as err:
            comfy.wait(prompt_id, 300)
        progress = [e for e in events.for_prompt(prompt_id) if e.type == "progress" and e.data.get("node") == DISTIL]
    assert err.value.node_id == DISTIL
    assert not progress, "the error must come before the first step"
