"""Helpers of the robustness tests (tests/test_robust_*.py): tiny graphs, the reference image,
dropping files into the server's folders, and the server's resident memory.

Every robustness test runs on the session's real ComfyUI server. After a graph fails, the test
checks that the server still serves: the good graph, with every node from Load Audio on run
again, must give exactly the reference image made at the start of the module.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from graphs import CHECKPOINT, CLAP, CLAP2DIFFUSION, saved_images

from tools.comfy_server import ComfyClient, ComfyServer, ExecutionFailed, Graph, PromptRejected

SIZE = 64  # px: the image itself is not the point, the server's behaviour is
STEPS = 1
GOOD_SOUND = "thunder.wav"

# Nodes whose outputs ComfyUI may keep between graphs: loading them again proves nothing here.
LOADERS = {"CheckpointLoaderSimple", "CLIPTextEncode", "C2D_ClapLoader", "C2D_Clap2DiffusionLoader",
           "EmptyLatentImage"}  # fmt: skip


def graph(
    sound: str = GOOD_SOUND,
    strength: float = 1.0,
    *,
    window_mode: str = "first",
    max_seconds: float | None = None,
    clap: str = CLAP,
    clap2diffusion: str = CLAP2DIFFUSION,
    model_strength: float | None = None,
    conditioning: bool = True,
    steps: int = STEPS,
    size: int = SIZE,
    save_audio: bool = False,
    seed: int = 42,
) -> Graph:
    """Checkpoint + "a beach" + sound -> Apply Audio to Conditioning (unless ``conditioning`` is
    False) and Apply Audio to Model (when ``model_strength`` is set) -> KSampler -> SaveImage;
    ``save_audio`` adds core Save Audio on the Load Audio output. Node ids are stable, so graphs
    replace each other's cache entries."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", _id="1", ckpt_name=CHECKPOINT)
    positive = g.node("CLIPTextEncode", _id="2", clip=ckpt[1], text="a beach").out
    negative = g.node("CLIPTextEncode", _id="3", clip=ckpt[1], text="blurry, low quality").out
    audio_inputs: dict[str, Any] = {"audio": sound}
    if max_seconds is not None:
        audio_inputs["max_seconds"] = max_seconds
    audio = g.node("C2D_LoadAudio", _id="4", **audio_inputs)
    clap_model = g.node("C2D_ClapLoader", _id="5", clap_name=clap)
    embeds = g.node("C2D_ClapEncode", _id="6", clap_model=clap_model.out, audio=audio.out, window_mode=window_mode)
    c2d = g.node("C2D_Clap2DiffusionLoader", _id="7", clap2diffusion_name=clap2diffusion)
    levels = g.node("C2D_HierarchicalDecompose", _id="8", clap2diffusion=c2d.out, clap_embeds=embeds.out,
                    foreground=1.0, background=1.0, ambience=1.0)
    tokens = g.node("C2D_AudioProject", _id="9", audio_levels=levels.out, clap2diffusion=c2d.out)
    if conditioning:
        positive = g.node("C2D_ApplyAudioToConditioning", _id="10", conditioning=positive,
                          audio_tokens=tokens.out, strength=strength).out
    model = ckpt[0]
    if model_strength is not None:
        model = g.node("C2D_ApplyAudioToModel", _id="16", model=model, audio_tokens=tokens.out,
                       clap2diffusion=c2d.out, strength=model_strength, start_percent=0.0, end_percent=1.0).out
    latent = g.node("EmptyLatentImage", _id="11", width=size, height=size, batch_size=1)
    sampled = g.node("KSampler", _id="12", model=model, positive=positive, negative=negative,
                     latent_image=latent.out, seed=seed, steps=steps, cfg=7.0, sampler_name="euler",
                     scheduler="normal", denoise=1.0)
    image = g.node("VAEDecode", _id="13", samples=sampled.out, vae=ckpt[2])
    g.node("SaveImage", _id="14", images=image.out, filename_prefix="c2d_robust")
    if save_audio:
        g.node("SaveAudio", _id="15", audio=audio.out, filename_prefix="c2d_robust_audio")
    return g  # fmt: skip


NODE = {"load_audio": "4", "clap_loader": "5", "clap_encode": "6", "c2d_loader": "7", "ksampler": "12",
        "apply_model": "16"}  # fmt: skip


def fresh(prompt: dict[str, Any]) -> dict[str, Any]:
    """``prompt`` with every node but the loaders forced to run again (an undeclared input)."""
    nonce = uuid.uuid4().hex
    for node in prompt.values():
        if node["class_type"] not in LOADERS:
            node["inputs"]["_robust_nonce"] = nonce
    return prompt


def image_of(comfy: ComfyClient, prompt: dict[str, Any], timeout: float = 600) -> np.ndarray:
    images = saved_images(comfy, comfy.wait(comfy.queue(prompt), timeout))
    assert len(images) == 1
    return images[0].astype(np.int16)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference (0-255 scale)."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def run_failing(comfy: ComfyClient, prompt: dict[str, Any], timeout: float = 600) -> ExecutionFailed:
    """Queue a graph that must fail while executing; return ComfyUI's execution_error."""
    with pytest.raises(ExecutionFailed) as err:
        comfy.wait(comfy.queue(prompt), timeout)
    assert not err.value.interrupted, "expected an execution error, got an interrupt"
    return err.value


def rejected(comfy: ComfyClient, prompt: dict[str, Any]) -> PromptRejected:
    """Queue a graph that must fail validation (HTTP 400); return the rejection with node_errors."""
    with pytest.raises(PromptRejected) as err:
        comfy.queue(prompt)
    return err.value


def assert_message(text: str, *expected: str) -> None:
    lowered = " ".join(text.lower().split())
    missing = [e for e in expected if e.lower() not in lowered]
    assert not missing, f"message lacks {missing}:\n{text}"


def node_error_text(err: PromptRejected, node_id: str) -> str:
    info = err.node_errors.get(node_id, {})
    return " ".join(f"{e.get('message', '')}: {e.get('details', '')}" for e in info.get("errors", []))


class Reference:
    """The good graph's image, made once per module, and the check that the server still makes it."""

    def __init__(self, comfy: ComfyClient):
        self.comfy = comfy
        self.image = image_of(comfy, fresh(graph().prompt()))

    def assert_still_serving(self) -> None:
        """The good graph, run again from Load Audio on, gives exactly the reference image."""
        again = image_of(self.comfy, fresh(graph().prompt()))
        assert np.array_equal(again, self.image), (
            f"the good graph changed after a failure (distance {distance(again, self.image):.3f})"
        )


@contextlib.contextmanager
def dropped(path: Path, write) -> Iterator[Path]:
    """Write a file into a server folder for the duration of a test (``write(path)``), then remove it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --------------------------------------------------------------------------------------------
# resident memory of the server process


def rss(server: ComfyServer) -> int:
    import psutil

    return psutil.Process(server.process.pid).memory_info().rss


class PeakRss:
    """Samples the server's RSS every ``interval`` s in a thread: ``peak`` and ``start`` in bytes."""

    def __init__(self, server: ComfyServer, interval: float = 0.02):
        self.server = server
        self.interval = interval
        self.start = rss(server)
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.server))
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.server))

    @property
    def growth(self) -> int:
        return self.peak - self.start


MB = 1024 * 1024
