"""Apply Audio to Model in a real ComfyUI server: LoRA, ControlNet, stacking, and exact no-ops.

Graphs go checkpoint -> LoRA -> Apply Audio to Model -> KSampler, with ControlNetApplyAdvanced on
the conditioning, at 128 px / 4 euler steps on the tiny SD1.5 test checkpoint. The stage-2 files
are random (``clap2diffusion_core.testing``) for the tiny UNet's four cross-attention layers, with
gates open so the sound visibly changes the image, or closed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clap2diffusion_core.testing import random_checkpoint, random_model
from tools import test_models as tm
from tools.comfy_server import ComfyClient, ComfyServer, Graph, NodeRef, uncached

pytestmark = pytest.mark.slow

STAGE2 = "tiny-clap2diffusion-stage2.safetensors"
STAGE2_CLOSED = "tiny-clap2diffusion-stage2-closed.safetensors"
CHECKPOINT = Path(tm.SD15_CHECKPOINT).name


@pytest.fixture(scope="module")
def stage2_files(comfy_server: ComfyServer) -> None:
    """Stage-2 files for the tiny UNet in the server's models/clap2diffusion (ComfyUI rescans it)."""
    folder = comfy_server.base_dir / "models" / "clap2diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    random_checkpoint(folder / STAGE2, stage=2, seed=11, layout="tiny")
    from clap2diffusion_core.checkpoint import save_checkpoint

    save_checkpoint(random_model(stage=2, seed=11, layout="tiny", gates=None), folder / STAGE2_CLOSED)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def audio_tokens(g: Graph, sound: str = "thunder.wav", file: str = STAGE2) -> NodeRef:
    audio = g.node("C2D_LoadAudio", audio=sound, max_seconds=0.0)
    clap = g.node("C2D_ClapLoader", clap_name=Path(tm.CLAP_FOLDER).name)
    embeds = g.node("C2D_ClapEncode", clap_model=clap.out, audio=audio.out, window_mode="first")
    c2d = g.node("C2D_Clap2DiffusionLoader", clap2diffusion_name=file)
    levels = g.node("C2D_HierarchicalDecompose", clap2diffusion=c2d.out, clap_embeds=embeds.out,
                    foreground=1.0, background=1.0, ambience=1.0)
    return g.node("C2D_AudioProject", audio_levels=levels.out, clap2diffusion=c2d.out)


def apply_audio(g: Graph, model, tokens: NodeRef, strength: float = 1.0, start: float = 0.0, end: float = 1.0) -> NodeRef:
    return g.node("C2D_ApplyAudioToModel", model=model, audio_tokens=tokens.out,
                  clap2diffusion=g.nodes[tokens.id]["inputs"]["clap2diffusion"], strength=strength,
                  start_percent=start, end_percent=end)


def graph(sounds: list[dict] | None = None, lora: bool = True, controlnet: bool = True,
          plain_branch: bool = False) -> Graph:
    """Checkpoint (+ LoRA) (+ one Apply Audio to Model per entry of ``sounds``) -> KSampler.

    Each entry: ``{"sound", "strength", "file", "start", "end"}`` (defaults: thunder, 1, open
    gates, 0, 1). ``plain_branch`` adds a second KSampler on the model *before* the audio nodes.
    """
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    model, clip = ckpt[0], ckpt[1]
    if lora:
        lora_node = g.node("LoraLoader", model=model, clip=clip, lora_name=Path(tm.LORA).name,
                           strength_model=1.0, strength_clip=1.0)
        model, clip = lora_node[0], lora_node[1]
    unpatched = model
    for entry in sounds or []:
        tokens = audio_tokens(g, entry.get("sound", "thunder.wav"), entry.get("file", STAGE2))
        model = apply_audio(g, model, tokens, entry.get("strength", 1.0), entry.get("start", 0.0),
                            entry.get("end", 1.0)).out
    positive = g.node("CLIPTextEncode", clip=clip, text="a beach at dusk").out
    negative = g.node("CLIPTextEncode", clip=clip, text="blurry").out
    if controlnet:
        cnet = g.node("ControlNetLoader", control_net_name=Path(tm.CONTROLNET).name)
        hint = g.node("EmptyImage", width=128, height=128, batch_size=1, color=0x80C0FF)
        applied = g.node("ControlNetApplyAdvanced", positive=positive, negative=negative, control_net=cnet.out,
                         image=hint.out, strength=0.8, start_percent=0.0, end_percent=1.0)
        positive, negative = applied[0], applied[1]
    latent = g.node("EmptyLatentImage", width=128, height=128, batch_size=1)

    def sample(m, prefix: str) -> None:
        sampled = g.node("KSampler", model=m, positive=positive, negative=negative, latent_image=latent.out,
                         seed=5, steps=4, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        image = g.node("VAEDecode", samples=sampled.out, vae=ckpt[2])
        g.node("SaveImage", images=image.out, filename_prefix=prefix)

    sample(model, "audio")
    if plain_branch:
        sample(unpatched, "plain")
    return g


def run(comfy: ComfyClient, g: Graph, fresh: bool = False) -> dict[str, np.ndarray]:
    """Images by SaveImage prefix; ``fresh``: execute every node again (no cached outputs)."""
    prompt = uncached(g.prompt()) if fresh else g.prompt()
    entry = comfy.wait(comfy.queue(prompt), timeout=400)
    return {node["inputs"]["filename_prefix"]: pixels(comfy.images(entry, node_id)[0])
            for node_id, node in prompt.items() if node["class_type"] == "SaveImage"}


@pytest.fixture(scope="module")
def plain(comfy_server: ComfyServer) -> np.ndarray:
    """LoRA + ControlNet, no audio nodes at all."""
    return run(comfy_server.client, graph())["audio"]


def test_node_is_listed_with_tooltips(comfy: ComfyClient) -> None:
    info = comfy.object_info("C2D_ApplyAudioToModel")
    inputs = info["input"]["required"]
    assert list(inputs) == ["model", "audio_tokens", "strength", "start_percent", "end_percent"]
    assert list(info["input"]["optional"]) == ["clap2diffusion"]  # optional only to explain old graphs
    assert all(spec[1].get("tooltip") for spec in [*inputs.values(), *info["input"]["optional"].values()])
    assert info["output"] == ["MODEL"] and info["output_tooltips"][0]


def test_lora_controlnet_and_audio_to_model_run_to_an_image(comfy: ComfyClient, stage2_files, plain) -> None:
    image = run(comfy, graph([{"strength": 1.0}]))["audio"]
    assert image.shape == (128, 128, 3) and image.std() > 1.0
    assert np.abs(image.astype(int) - plain.astype(int)).mean() > 1.0, "the sound did not change the image"


def test_strength_0_or_closed_gates_give_the_plain_image_exactly(comfy: ComfyClient, stage2_files, plain) -> None:
    assert np.array_equal(run(comfy, graph([{"strength": 0.0}]))["audio"], plain)
    assert np.array_equal(run(comfy, graph([{"file": STAGE2_CLOSED}]))["audio"], plain)
    # a window that never opens: every step runs the patched layers' text-only path
    assert np.array_equal(run(comfy, graph([{"start": 0.0, "end": 0.0}]))["audio"], plain)


def test_a_parallel_branch_on_the_unpatched_model_is_the_plain_image(comfy: ComfyClient, stage2_files,
                                                                      plain) -> None:
    images = run(comfy, graph([{"strength": 1.0}], plain_branch=True), fresh=True)
    assert np.array_equal(images["plain"], plain)
    assert not np.array_equal(images["audio"], plain)


def test_two_stacked_sounds_both_act(comfy: ComfyClient, stage2_files, plain) -> None:
    thunder = run(comfy, graph([{"sound": "thunder.wav", "strength": 1.0}]))["audio"]
    chirp = run(comfy, graph([{"sound": "chirp_stereo.wav", "strength": 1.0}]))["audio"]
    both = run(comfy, graph([{"sound": "thunder.wav", "strength": 1.0},
                             {"sound": "chirp_stereo.wav", "strength": 1.0}]))["audio"]
    assert both.std() > 1.0
    for single in (thunder, chirp, plain):
        assert not np.array_equal(both, single)


def test_a_stage_1_file_is_refused_with_a_message_that_says_what_to_do(comfy: ComfyClient, test_models) -> None:
    from tools.comfy_server import ExecutionFailed

    stage1 = Path(tm.CLAP2DIFFUSION).name
    with pytest.raises(ExecutionFailed, match="stage 1.*Apply Audio to Conditioning"):
        run(comfy, graph([{"file": stage1}], lora=False, controlnet=False))
