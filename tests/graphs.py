"""API-format graphs the end-to-end tests share: the pack's nodes between core nodes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tools import test_models as tm
from tools.comfy_server import ComfyClient, Graph, NodeRef

CHECKPOINT = Path(tm.SD15_CHECKPOINT).name
CLAP = Path(tm.CLAP_FOLDER).name
CLAP2DIFFUSION = Path(tm.CLAP2DIFFUSION).name
STAGE3 = Path(tm.CLAP2DIFFUSION_ADAPTER).name


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def saved_images(comfy: ComfyClient, entry: dict) -> list[np.ndarray]:
    """Pixels of the images SaveImage wrote (not the nodes' temp previews), in order."""
    records = [r for r in comfy.files(entry) if r.get("type") == "output"]
    return [pixels(comfy.view(r["filename"], r.get("subfolder", ""), "output")) for r in records]


def audio_tokens(
    g: Graph,
    sound: str,
    window_mode: str = "first",
    levels=(1.0, 1.0, 1.0),
    clap2diffusion: str = CLAP2DIFFUSION,
) -> NodeRef:
    """Load Audio -> CLAP Encode -> Hierarchical Decompose -> Audio Project."""
    audio = g.node("C2D_LoadAudio", audio=sound)
    clap = g.node("C2D_ClapLoader", clap_name=CLAP)
    embeds = g.node("C2D_ClapEncode", clap_model=clap.out, audio=audio.out, window_mode=window_mode)
    model = g.node("C2D_Clap2DiffusionLoader", clap2diffusion_name=clap2diffusion)
    foreground, background, ambience = levels
    decomposed = g.node(
        "C2D_HierarchicalDecompose",
        clap2diffusion=model.out,
        clap_embeds=embeds.out,
        foreground=foreground,
        background=background,
        ambience=ambience,
    )
    return g.node("C2D_AudioProject", audio_levels=decomposed.out, clap2diffusion=model.out)


def model_of(g: Graph, tokens: NodeRef) -> list:
    """The link to the CLAP2Diffusion Loader that an Audio Project node was wired to (for Apply Audio to Model)."""
    return g.nodes[tokens.id]["inputs"]["clap2diffusion"]


def sample(
    g: Graph,
    model,
    clip_vae: NodeRef,
    positive,
    negative,
    seed: int = 42,
    steps: int = 4,
    size: int = 256,
    prefix: str = "c2d",
    batch_size: int = 1,
) -> NodeRef:
    """EmptyLatentImage -> KSampler (euler) -> VAEDecode -> SaveImage."""
    latent = g.node("EmptyLatentImage", width=size, height=size, batch_size=batch_size)
    sampled = g.node(
        "KSampler",
        model=model,
        positive=positive,
        negative=negative,
        latent_image=latent.out,
        seed=seed,
        steps=steps,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    image = g.node("VAEDecode", samples=sampled.out, vae=clip_vae[2])
    return g.node("SaveImage", images=image.out, filename_prefix=prefix)


def audio_to_image(
    sound: str | None = "thunder.wav",
    text: str = "a beach",
    strength: float = 1.0,
    seed: int = 42,
    window_mode: str = "first",
    batch_size: int = 1,
) -> Graph:
    """The README's graph: checkpoint + prompt + sound -> Apply Audio to Conditioning -> KSampler.

    ``sound=None`` gives the same graph with no audio nodes at all (the text-only image).
    """
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text=text).out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="blurry, low quality").out
    if sound is not None:
        tokens = audio_tokens(g, sound, window_mode)
        positive = g.node(
            "C2D_ApplyAudioToConditioning", conditioning=positive, audio_tokens=tokens.out, strength=strength
        ).out
    sample(g, ckpt[0], ckpt, positive, negative, seed=seed, batch_size=batch_size)
    return g


def round_trip_graphs(tokens_file: str | None) -> tuple[Graph, str]:
    """A stage-3 file's tokens into both injections -> a 128 px image, 2 steps.

    ``tokens_file=None``: the tokens come from the sound (levels 1.5 / 1 / 0.5) and Save Audio
    Tokens writes them (its node id is returned); else Load Audio Tokens reads them.
    """
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="blurry, low quality").out
    save_id = ""
    if tokens_file is None:
        tokens = audio_tokens(g, "thunder.wav", levels=(1.5, 1.0, 0.5), clap2diffusion=STAGE3)
        c2d = model_of(g, tokens)
        save_id = g.node("C2D_SaveAudioTokens", audio_tokens=tokens.out, filename_prefix="c2d_tokens/test").id
    else:
        tokens = g.node("C2D_LoadAudioTokens", tokens_file=tokens_file)
        c2d = g.node("C2D_Clap2DiffusionLoader", clap2diffusion_name=STAGE3).out
    positive = g.node("C2D_ApplyAudioToConditioning", conditioning=positive, audio_tokens=tokens.out,
                      strength=1.0).out
    model = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out, clap2diffusion=c2d,
                   strength=1.0, start_percent=0.0, end_percent=1.0).out
    sample(g, model, ckpt, positive, negative, steps=2, size=128, prefix="c2d_roundtrip")
    return g, save_id
