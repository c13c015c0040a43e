"""A guidance scale of its own for the sound, with core nodes only (example_workflows/audio_guidance.json).

Core DualCFGGuider with cond1 = the prompt with the sound (Apply Audio to Conditioning), cond2 =
the prompt alone, and the negative: in its regular style it predicts
``negative + cfg_cond2_negative * (cond2 - negative) + cfg_conds * (cond1 - cond2)``, so
``cfg_conds`` scales only what the sound adds. On the real server, the tiny SD1.5 at 64 px, 2 steps:
``cfg_conds`` moves the image when the sound is on, and leaves it bit-identical at strength 0
(Apply Audio to Conditioning then returns the prompt itself, so cond1 - cond2 is exactly 0),
while ``cfg_cond2_negative`` still moves it (the guider does guide at this size).
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import CHECKPOINT, STAGE3, audio_tokens, model_of, pixels

from tools.comfy_server import ComfyClient, ExecutionFailed, Graph, NodeRef

SIZE, STEPS = 64, 2
# (name, audio strength, cfg_conds, cfg_cond2_negative)
CASES = [
    ("sound_cfg1", 1.0, 1.0, 7.0),
    ("sound_cfg8", 1.0, 8.0, 7.0),
    ("silent_cfg1", 0.0, 1.0, 7.0),
    ("silent_cfg8", 0.0, 8.0, 7.0),
    ("silent_cfg8_text3", 0.0, 8.0, 3.0),
]


def guidance_graph() -> tuple[Graph, dict[str, str]]:
    """One prompt, one branch per case sharing the loaders, prompts and sound; SaveImage ids by case."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    text = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="blurry, low quality").out
    tokens = audio_tokens(g, "thunder.wav")
    noise = g.node("RandomNoise", noise_seed=42).out
    sampler = g.node("KSamplerSelect", sampler_name="euler").out
    sigmas = g.node("BasicScheduler", model=ckpt[0], scheduler="normal", steps=STEPS, denoise=1.0).out
    latent = g.node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1).out
    saves = {}
    for name, strength, cfg_conds, cfg_text in CASES:
        with_sound = g.node("C2D_ApplyAudioToConditioning", conditioning=text, audio_tokens=tokens.out,
                            strength=strength).out
        guider = g.node("DualCFGGuider", model=ckpt[0], cond1=with_sound, cond2=text, negative=negative,
                        cfg_conds=cfg_conds, cfg_cond2_negative=cfg_text, style="regular").out
        sampled = g.node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                         latent_image=latent)
        decoded = g.node("VAEDecode", samples=sampled[0], vae=ckpt[2]).out
        saves[name] = g.node("SaveImage", images=decoded, filename_prefix=f"c2d_guidance_{name}").id
    return g, saves


@pytest.fixture(scope="module")
def images(comfy_server) -> dict[str, np.ndarray]:
    comfy: ComfyClient = comfy_server.client
    g, saves = guidance_graph()
    entry = comfy.wait(comfy.queue(g.prompt()), timeout=600)
    out = {}
    for name, node_id in saves.items():
        (record,) = comfy.files(entry, node_id=node_id)
        out[name] = pixels(comfy.view(record["filename"], record.get("subfolder", ""), "output")).astype(np.int16)
    return out


def test_audio_guidance_cfg_conds_moves_the_image_when_the_sound_is_on(images: dict[str, np.ndarray]) -> None:
    assert images["sound_cfg1"].shape == (SIZE, SIZE, 3)
    change = np.abs(images["sound_cfg8"] - images["sound_cfg1"])
    assert change.mean() > 1.0, f"cfg_conds 1 -> 8 moved the image by only {change.mean():.3f} levels"


def test_audio_guidance_cfg_conds_leaves_the_image_bit_identical_at_strength_0(
    images: dict[str, np.ndarray],
) -> None:
    assert np.array_equal(images["silent_cfg8"], images["silent_cfg1"])
    # Not because guidance does nothing here: the text's scale still moves the same image...
    assert np.abs(images["silent_cfg8_text3"] - images["silent_cfg8"]).mean() > 1.0
    # ...and the sound, once on, does too.
    assert np.abs(images["sound_cfg8"] - images["silent_cfg8"]).mean() > 1.0



def patched_model(g: Graph) -> tuple[NodeRef, list, list, list]:
    """Checkpoint, prompt, negative and the MODEL through Apply Audio to Model (stage-3 file)."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    text = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    tokens = audio_tokens(g, "thunder.wav", clap2diffusion=STAGE3)
    patched = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out,
                     clap2diffusion=model_of(g, tokens), strength=1.0, start_percent=0.0, end_percent=1.0).out
    return ckpt, text, negative, patched


def test_audio_guidance_apply_audio_to_model_under_dualcfgguider_is_refused_before_sampling(
    comfy: ComfyClient,
) -> None:
    """DualCFGGuider numbers its prompts negative 0, cond2 1, cond1 2; Apply Audio to Model tells rows
    by KSampler's numbering (positive 0, negative 1), so the sound would silently reach the negative
    and cond1. The OUTER_SAMPLE check refuses it before the first step, naming the guider, its prompts
    and the way that works; the same patched MODEL then samples under KSampler on the same server."""
    g = Graph()
    ckpt, text, negative, patched = patched_model(g)
    guider = g.node("DualCFGGuider", model=patched, cond1=text, cond2=text, negative=negative,
                    cfg_conds=8.0, cfg_cond2_negative=7.0, style="regular").out
    sampled = g.node("SamplerCustomAdvanced", noise=g.node("RandomNoise", noise_seed=1).out, guider=guider,
                     sampler=g.node("KSamplerSelect", sampler_name="euler").out,
                     sigmas=g.node("BasicScheduler", model=patched, scheduler="normal", steps=1, denoise=1.0).out,
                     latent_image=g.node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1).out)
    g.node("SaveImage", images=g.node("VAEDecode", samples=sampled[0], vae=ckpt[2]).out, filename_prefix="c2d_dual")
    with pytest.raises(ExecutionFailed,
                       match=r"Guider_DualCFG.*\['middle', 'negative', 'positive'\].*Apply Audio to Conditioning"):
        comfy.run(g.prompt(), timeout=600)

    g = Graph()
    ckpt, text, negative, patched = patched_model(g)
    sampled = g.node("KSampler", model=patched, seed=1, steps=1, cfg=7.0, sampler_name="euler", scheduler="normal",
                     positive=text, negative=negative, denoise=1.0,
                     latent_image=g.node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1).out)
    g.node("SaveImage", images=g.node("VAEDecode", samples=sampled.out, vae=ckpt[2]).out, filename_prefix="c2d_ks")
    assert len(comfy.run(g.prompt(), timeout=600)) == 1
