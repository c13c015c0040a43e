"""Dtype lanes (issue 25): every injection path on servers that store weights as a CUDA user's do.

A CUDA user gets float16 or bfloat16 weights; the rest of the suite runs float32. Here one real
server per dtype (``main.py --cpu --fp16-unet --fp16-text-enc --fp16-vae``, and the bf16 flags),
started once for this module, runs each path of :data:`PATHS` at CI size (64 px, one step) in one
prompt with a plain twin (same seed, no sound), and checks that it finishes, that the image is a
picture (not NaN-black), that the sound changed it, and that the CLAP2Diffusion file was stored in
the server's dtype (half the bytes of float32).

:data:`PATHS` is a table: a new path is one more row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from graphs import CHECKPOINT, CLAP, STAGE3, audio_tokens, model_of, pixels, sample
from robust_support import MB
from safetensors import safe_open

from tools import test_models as tm
from tools.comfy_server import ComfyServer, Graph, NodeRef, make_base_dir

pytestmark = pytest.mark.slow

#: Server flags per dtype: the UNet, the text encoder and the VAE all stored in that dtype.
DTYPE_FLAGS = {
    "fp16": ["--fp16-unet", "--fp16-text-enc", "--fp16-vae"],
    "bf16": ["--bf16-unet", "--bf16-text-enc", "--bf16-vae"],
}
TORCH_DTYPE = {"fp16": "torch.float16", "bf16": "torch.bfloat16"}
FRAMES = 4  # CLAP Encode Frames at 2 fps over the first 2 s: one latent per frame


# ------------------------------------------------------------------------------------------------
# the paths: each adds the sound to (model, positive) and says how many latents it needs


Path = Callable[[Graph, NodeRef, list], tuple[list, list, int]]


def conditioning(g: Graph, ckpt: NodeRef, positive: list) -> tuple[list, list, int]:
    """Apply Audio to Conditioning, stage-1 file."""
    tokens = audio_tokens(g, "thunder.wav")
    applied = g.node("C2D_ApplyAudioToConditioning", conditioning=positive, audio_tokens=tokens.out, strength=1.0)
    return ckpt[0], applied.out, 1


def model(g: Graph, ckpt: NodeRef, positive: list) -> tuple[list, list, int]:
    """Apply Audio to Model, stage-3 file (gated audio cross-attention in the fp16/bf16 UNet)."""
    tokens = audio_tokens(g, "thunder.wav", clap2diffusion=STAGE3)
    patched = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out,
                     clap2diffusion=model_of(g, tokens), strength=1.0, start_percent=0.0, end_percent=1.0)
    return patched.out, positive, 1


def frames(g: Graph, ckpt: NodeRef, positive: list) -> tuple[list, list, int]:
    """CLAP Encode Frames -> per-frame tokens -> Apply Audio to Model: latent i hears frame i."""
    audio = g.node("C2D_LoadAudio", audio="thunder.wav")
    clap = g.node("C2D_ClapLoader", clap_name=CLAP)
    embeds = g.node("C2D_ClapEncodeFrames", clap_model=clap.out, audio=audio.out, fps=2.0, frames=FRAMES,
                    window_seconds=0.5, hop_seconds=0.0, smoothing_seconds=0.0, change_threshold=0.05)
    c2d = g.node("C2D_Clap2DiffusionLoader", clap2diffusion_name=STAGE3)
    levels = g.node("C2D_HierarchicalDecompose", clap2diffusion=c2d.out, clap_embeds=embeds[0],
                    foreground=1.0, background=1.0, ambience=1.0)
    tokens = g.node("C2D_AudioProject", audio_levels=levels.out, clap2diffusion=c2d.out)
    patched = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out, clap2diffusion=c2d.out,
                     strength=1.0, start_percent=0.0, end_percent=1.0)
    return patched.out, positive, FRAMES


def textfit(g: Graph, ckpt: NodeRef, positive: list) -> tuple[list, list, int]:
    """Fit Audio Projector (from text) on the server's fp16/bf16 CLIP, 4 captions, 2 steps; its file
    into Apply Audio to Conditioning."""
    clap = g.node("C2D_ClapLoader", clap_name=CLAP)
    fit = g.node("C2D_FitAudioProjectorFromText", clip=ckpt[1], clap_model=clap.out, corpus_size=4, steps=2,
                 seed=0, extra_captions="thunder over the sea")
    audio = g.node("C2D_LoadAudio", audio="thunder.wav")
    embeds = g.node("C2D_ClapEncode", clap_model=clap.out, audio=audio.out, window_mode="first")
    levels = g.node("C2D_HierarchicalDecompose", clap2diffusion=fit.out, clap_embeds=embeds.out,
                    foreground=1.0, background=1.0, ambience=1.0)
    tokens = g.node("C2D_AudioProject", audio_levels=levels.out, clap2diffusion=fit.out)
    applied = g.node("C2D_ApplyAudioToConditioning", conditioning=positive, audio_tokens=tokens.out, strength=1.0)
    return ckpt[0], applied.out, 1


def distillation(g: Graph, ckpt: NodeRef, positive: list) -> tuple[list, list, int]:
    """Fit Audio Projector (from text) -> Distil Audio Adapter (2 steps on the server's fp16/bf16 UNet,
    64 px) -> Apply Audio to Model with the distilled file."""
    clap = g.node("C2D_ClapLoader", clap_name=CLAP)
    fit = g.node("C2D_FitAudioProjectorFromText", clip=ckpt[1], clap_model=clap.out, corpus_size=4, steps=2,
                 seed=0, extra_captions="thunder over the sea")
    distilled = g.node("C2D_DistilAudioAdapter", model=ckpt[0], clip=ckpt[1], clap_model=clap.out,
                       clap2diffusion=fit.out, steps=2, batch_size=2, learning_rate=1e-4, resolution=64, seed=0,
                       corpus_size=16, preview_every=0, extra_captions="")
    audio = g.node("C2D_LoadAudio", audio="thunder.wav")
    embeds = g.node("C2D_ClapEncode", clap_model=clap.out, audio=audio.out, window_mode="first")
    levels = g.node("C2D_HierarchicalDecompose", clap2diffusion=distilled.out, clap_embeds=embeds.out,
                    foreground=1.0, background=1.0, ambience=1.0)
    tokens = g.node("C2D_AudioProject", audio_levels=levels.out, clap2diffusion=distilled.out)
    patched = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out, clap2diffusion=distilled.out,
                     strength=1.0, start_percent=0.0, end_percent=1.0)
    return patched.out, positive, 1


#: The dtype lanes' table (path name -> graph).
PATHS: dict[str, Path] = {
    "conditioning": conditioning,
    "model": model,
    "frames": frames,
    "textfit": textfit,
    "distillation": distillation,
}


# ------------------------------------------------------------------------------------------------
# one server per dtype


@pytest.fixture(scope="module", params=list(DTYPE_FLAGS), ids=lambda d: f"dtype-{d}")
def dtype_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 test_models: tm.TestModels) -> Iterator[tuple[str, ComfyServer]]:
    """A real ComfyUI storing the UNet, text encoder and VAE in ``fp16`` or ``bf16`` (module scope:
    tests are grouped by dtype, so one such server runs at a time)."""
    dtype = request.param
    models = {
        "checkpoints": [test_models.sd15_checkpoint],
        "clap": [test_models.clap_folder],
        "clap2diffusion": [test_models.clap2diffusion, test_models.clap2diffusion_adapter],
    }
    base = make_base_dir(tmp_path_factory.mktemp(f"comfyui-{dtype}"), models,
                         inputs=list(test_models.sounds.values()))
    server = ComfyServer(base, extra_args=DTYPE_FLAGS[dtype])
    server.start()
    try:
        yield dtype, server
    finally:
        server.stop()


def _output_pictures(server: ComfyServer, entry: dict, save: NodeRef) -> list[np.ndarray]:
    records = [r for r in server.client.files(entry, node_id=save.id) if r.get("type") == "output"]
    return [pixels(server.client.view(r["filename"], r.get("subfolder", ""), "output")) for r in records]


@pytest.mark.parametrize("path", list(PATHS))
def test_dtype_lane_runs_each_injection_path(path: str, dtype_server: tuple[str, ComfyServer]) -> None:
    dtype, server = dtype_server
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    unet, conditioned, batch = PATHS[path](g, ckpt, positive)
    heard = sample(g, unet, ckpt, conditioned, negative, steps=1, size=64, prefix=f"dtype_{path}", batch_size=batch)
    plain = sample(g, ckpt[0], ckpt, positive, negative, steps=1, size=64, prefix=f"dtype_{path}_plain",
                   batch_size=batch)
    entry = server.client.execute(g.prompt(), timeout=600).entry
    with_sound, without = _output_pictures(server, entry, heard), _output_pictures(server, entry, plain)
    assert len(with_sound) == len(without) == batch
    for image in with_sound:
        assert image.std() > 1.0, f"{path} on {dtype}: a flat image (NaN or inf in the {dtype} path?)"
    changed = [float(np.abs(a.astype(int) - b.astype(int)).mean()) for a, b in zip(with_sound, without, strict=True)]
    assert min(changed) > 0.0, f"{path} on {dtype}: the sound did not change the image ({changed})"
    # Every CLAP2Diffusion file this server loaded (a loader's output is cached across prompts).
    loaded = re.findall(r"CLAP2Diffusion (\S+): weights (\S+) \(computing in (\S+)\), ([\d.]+) MB", server.log())
    assert loaded and all(weights == TORCH_DTYPE[dtype] for _, weights, _, _ in loaded), loaded
    print(f"\ndtype lane {path} x {dtype}: ok; sound changed the image by {min(changed):.2f} levels (mean abs); "
          + "; ".join(f"{name} {weights} (compute {compute}) {mb} MB" for name, weights, compute, mb in loaded))


def test_dtype_clap2diffusion_file_takes_half_the_memory_of_float32(
    dtype_server: tuple[str, ComfyServer], test_models: tm.TestModels
) -> None:
    """The stage-3 file as the loaded server holds it (the bytes of its weights, logged by the
    loader in the server) against the same tensors in float32 (the file's own dtype, which the
    float32 server of the rest of the suite keeps)."""
    dtype, server = dtype_server
    g = Graph()
    c2d = g.node("C2D_Clap2DiffusionLoader", clap2diffusion_name=STAGE3)
    clap = g.node("C2D_ClapLoader", clap_name=CLAP)
    audio = g.node("C2D_LoadAudio", audio="thunder.wav")
    embeds = g.node("C2D_ClapEncode", clap_model=clap.out, audio=audio.out, window_mode="first")
    levels = g.node("C2D_HierarchicalDecompose", clap2diffusion=c2d.out, clap_embeds=embeds.out,
                    foreground=1.0, background=1.0, ambience=1.0)
    tokens = g.node("C2D_AudioProject", audio_levels=levels.out, clap2diffusion=c2d.out)
    g.node("PreviewAny", source=tokens.out)  # an output node downstream, so the loader runs
    server.client.execute(g.prompt(), timeout=300)
    found = dict(re.findall(r"CLAP2Diffusion (\S+): weights \S+ \(computing in \S+\), ([\d.]+) MB", server.log()))
    stored = float(found[STAGE3])
    with safe_open(str(test_models.clap2diffusion_adapter), framework="pt") as f:
        float32 = sum(4 * int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()) / MB  # noqa: SIM118
    print(f"\nCLAP2Diffusion stage-3 test file in a loaded {dtype} server: {stored:.2f} MB; in float32: {float32:.2f} MB")
    assert stored == pytest.approx(float32 / 2, rel=0.01)
