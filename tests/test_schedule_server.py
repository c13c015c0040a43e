"""Meaning over time in a real ComfyUI: per-frame sound -> per-frame tokens -> a batch of frames.

The sounds are built from 0.5 s tiles at 48 kHz, and the frames' windows are 0.5 s on a 0.5 s
grid, so every frame of a tile hears exactly the same samples: frames that hear the same sound
must give the same pixels as a batch fed that sound's single embedding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from graphs import CHECKPOINT, CLAP, CLAP2DIFFUSION, STAGE3, saved_images
from robust_support import MB, PeakRss
from schedule_support import rain_then_thunder

from clap2diffusion_core.tokens_file import load_tokens
from tools.comfy_server import ComfyClient, ComfyServer, Graph

SR = 48_000
TILE = SR // 2  # 0.5 s
FPS = 2.0  # frame i is [i / 2, (i + 1) / 2) s: one tile per frame
FRAMES = 8


def _tiles(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """0.5 s of rain-like hiss and 0.5 s of a thunder-like burst, cut from the core test sound."""
    sound = rain_then_thunder(sample_rate=SR, seconds=20.0, seed=seed)[0, 0].numpy()
    return sound[:TILE], sound[10 * SR : 10 * SR + TILE]


@pytest.fixture(scope="module")
def sounds(comfy_server: ComfyServer) -> dict[str, str]:
    rain, thunder = _tiles()
    files = {
        "rain_tile.wav": rain,
        "rain_4s.wav": np.tile(rain, 8),
        "thunder_4s.wav": np.tile(thunder, 8),
        "rain_then_thunder_4s.wav": np.concatenate([np.tile(rain, 4), np.tile(thunder, 4)]),
    }
    for name, samples in files.items():
        sf.write(comfy_server.input_dir / name, samples, SR, subtype="FLOAT")
    return {name: name for name in files}


def _frames_graph(
    sound: str, scheduled: bool, schedule_words: bool = False, change_threshold: float = 0.05,
    injection: str = "conditioning", save_tokens: str = "",
) -> tuple[Graph, dict]:
    """LoadAudio -> (CLAP Encode Frames | CLAP Encode) -> Decompose -> Project -> Apply Audio to
    Conditioning (stage-1 file) or Apply Audio to Model (stage-3 file) -> an 8-latent batch ->
    SaveImage. 64 px, one step: the pixels are compared, not judged. ``save_tokens``: also write the
    tokens under that prefix."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    audio = g.node("LoadAudio", audio=sound)
    clap = g.node("C2D_ClapLoader", clap_name=CLAP)
    refs: dict = {}
    if scheduled:
        embeds = g.node("C2D_ClapEncodeFrames", clap_model=clap.out, audio=audio.out, fps=FPS, frames=0,
                        window_seconds=0.5, hop_seconds=0.0, smoothing_seconds=0.0, change_threshold=change_threshold)
        refs["encode"] = embeds
        if schedule_words:
            refs["schedule"] = g.node(
                "C2D_AudioToPromptSchedule", clap_model=clap.out, clap_embeds=embeds[0], fps=FPS,
                foreground_count=1, background_count=1, ambience_count=0, threshold=-1.0, margin=0.0,
                min_frames=0, template="a city street, {audio}", audio=audio.out, change_frames=embeds[2])
    else:
        embeds = g.node("C2D_ClapEncode", clap_model=clap.out, audio=audio.out, window_mode="first")
    model = g.node("C2D_Clap2DiffusionLoader", clap2diffusion_name=CLAP2DIFFUSION if injection == "conditioning" else STAGE3)
    levels = g.node("C2D_HierarchicalDecompose", clap2diffusion=model.out, clap_embeds=embeds[0],
                    foreground=1.0, background=1.0, ambience=1.0)
    tokens = g.node("C2D_AudioProject", audio_levels=levels.out, clap2diffusion=model.out)
    if save_tokens:
        g.node("C2D_SaveAudioTokens", audio_tokens=tokens.out, filename_prefix=save_tokens)
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="a city street")
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="")
    unet = ckpt[0]
    if injection == "conditioning":
        positive = g.node("C2D_ApplyAudioToConditioning", conditioning=positive.out, audio_tokens=tokens.out,
                          strength=1.0)
    else:
        unet = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out, clap2diffusion=model.out,
                      strength=1.0, start_percent=0.0, end_percent=1.0).out
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=FRAMES)
    sampled = g.node("KSampler", model=unet, positive=positive.out, negative=negative.out,
                     latent_image=latent.out, seed=7, steps=1, cfg=7.0, sampler_name="euler",
                     scheduler="normal", denoise=1.0)
    decoded = g.node("VAEDecode", samples=sampled.out, vae=ckpt[2])
    g.node("SaveImage", images=decoded.out, filename_prefix="schedule")
    return g, refs


def _images(comfy: ComfyClient, sound: str, scheduled: bool, injection: str = "conditioning",
            save_tokens: str = "") -> list[np.ndarray]:
    g, _ = _frames_graph(sound, scheduled, injection=injection, save_tokens=save_tokens)  # cached loaders: only the sound's branch runs again
    images = saved_images(comfy, comfy.execute(g.prompt(), timeout=300).entry)
    assert len(images) == FRAMES
    return images


def _differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def _same_picture(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Equal but for float rounding: the frames of two sounds are two distinct CLAP windows, encoded
    as a batch of 2 where the single sound is a batch of 1; CPU matmul kernels differ in the last
    bits between those (tokens differ by about 5e-6), which can move a few pixels by one level
    (seen: at most 0.11% of them, through Apply Audio to Model)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, f"{what}: {(diff > 0).sum()} pixels differ, by up to {diff.max()}"


def _identical(a: np.ndarray, b: np.ndarray, what: str) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() == 0, f"{what}: {(diff > 0).sum()} pixels differ, by up to {diff.max()}"


def _saved_tokens(comfy_server: ComfyServer, prefix: str) -> torch.Tensor:
    [path] = sorted(comfy_server.output_dir.glob(f"{prefix}_*.safetensors"))
    return load_tokens(path).tokens


def test_schedule_frames_follow_the_sound_and_a_constant_sound_matches_the_unscheduled_batch(
    comfy: ComfyClient, comfy_server: ComfyServer, sounds: dict[str, str]
) -> None:
    """The constant sound's frames all hear one 0.5 s tile, bitwise: CLAP Encode Frames encodes that
    window once, Decompose and Project run once per distinct row, and ComfyUI repeats a one-row
    conditioning to the batch. So 8 identical rows give the unscheduled batch's pixels exactly."""
    single = _images(comfy, sounds["rain_tile.wav"], scheduled=False, save_tokens="schedule_single")
    rain = _images(comfy, sounds["rain_4s.wav"], scheduled=True, save_tokens="schedule_rows")  # 8 rows, one sound
    thunder = _images(comfy, sounds["thunder_4s.wav"], scheduled=True)
    mixed = _images(comfy, sounds["rain_then_thunder_4s.wav"], scheduled=True)

    rows, one = _saved_tokens(comfy_server, "schedule_rows"), _saved_tokens(comfy_server, "schedule_single")
    assert rows.shape[0] == FRAMES and one.shape[0] == 1
    assert all(torch.equal(row, one[0]) for row in rows), "the 8 token rows are not the single embedding's row"
    # A constant sound: 8 identical token rows give the unscheduled path's 8 images, pixel for pixel.
    for frame in range(FRAMES):
        _identical(rain[frame], single[frame], f"constant sound, frame {frame}")
    # The sound changes halfway: frames 0-3 are the rain frames, 4-7 the thunder frames...
    for frame in range(FRAMES):
        expected, other = (rain, thunder) if frame < 4 else (thunder, rain)
        _same_picture(mixed[frame], expected[frame], f"rain then thunder, frame {frame}")
        # ...and the sound matters: the same latent with the other sound is another picture.
        assert _differ(mixed[frame], other[frame]) > 0.5, f"frame {frame} does not depend on the sound"


def test_schedule_model_injection_gives_frame_i_the_sound_of_frame_i(comfy: ComfyClient, sounds: dict[str, str]) -> None:
    """The same through Apply Audio to Model (stage-3 file): ComfyUI runs cond and uncond as one UNet
    batch of 16 rows; latent i hears token row i in the cond half, silence in the other."""
    single = _images(comfy, sounds["rain_tile.wav"], scheduled=False, injection="model")
    rain = _images(comfy, sounds["rain_4s.wav"], scheduled=True, injection="model")
    thunder = _images(comfy, sounds["thunder_4s.wav"], scheduled=True, injection="model")
    mixed = _images(comfy, sounds["rain_then_thunder_4s.wav"], scheduled=True, injection="model")
    for frame in range(FRAMES):
        _identical(rain[frame], single[frame], f"constant sound, frame {frame}")
        expected, other = (rain, thunder) if frame < 4 else (thunder, rain)
        _same_picture(mixed[frame], expected[frame], f"rain then thunder, frame {frame}")
        assert _differ(mixed[frame], other[frame]) > 0.5, f"frame {frame} does not depend on the sound"


def test_schedule_nodes_name_the_change_and_give_a_prompt_per_frame(comfy: ComfyClient, sounds: dict[str, str]) -> None:
    # The random test CLAP hears any two sounds as nearly alike (cosine distance far below a real
    # CLAP's), so the change threshold is tiny; frames that hear the same samples differ by 0.
    g, refs = _frames_graph(sounds["rain_then_thunder_4s.wav"], scheduled=True, schedule_words=True,
                            change_threshold=1e-5)
    # Loudness drives the per-frame strength of the tokens; PreviewAny shows the list it made.
    audio = g.node("LoadAudio", audio=sounds["rain_then_thunder_4s.wav"])
    curves = g.node("C2D_AudioEnergyCurves", audio=audio.out, fps=FPS, frames=0, range_db=60.0)
    shown = g.node("PreviewAny", source=curves[0])
    run = comfy.execute(g.prompt(), timeout=600)
    outputs = run.entry["outputs"]
    [summary] = outputs[refs["encode"].id]["text"]
    assert summary.startswith(f"{FRAMES} frames") and summary.endswith("changes at: 4"), summary
    [keyframes] = outputs[refs["schedule"].id]["text"]
    parsed = json.loads("{" + keyframes + "}")
    # Frames 0-3 hear the same samples, 4-7 too: the words can change at frame 4 only.
    assert set(parsed) <= {"0", "4"} and "0" in parsed
    assert all(text.startswith("a city street") for text in parsed.values())
    assert len(outputs[refs["schedule"].id]["images"]) == 1  # the timeline picture on the node
    loudness = json.loads(outputs[shown.id]["text"][0])
    assert len(loudness) == FRAMES and max(loudness) == 1.0 and min(loudness) >= 0.0


def _write_long(path: Path, seconds: int, sample_rate: int = 16_000) -> None:
    """Hiss, then rumble, written a minute at a time (16-bit): the test process stays small too."""
    gen = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=sample_rate, channels=1, subtype="PCM_16") as f:
        for minute in range(seconds // 60):
            noise = gen.standard_normal(60 * sample_rate).astype(np.float32) * 0.1
            if minute >= seconds // 120:
                noise = np.convolve(noise, np.ones(64, np.float32) / 8, mode="same")
            f.write(noise)


def _encode_graph(name: str, fps: float, hop_seconds: float) -> tuple[Graph, object]:
    g = Graph()
    audio = g.node("LoadAudio", audio=name)
    clap = g.node("C2D_ClapLoader", clap_name=CLAP)
    encode = g.node("C2D_ClapEncodeFrames", clap_model=clap.out, audio=audio.out, fps=fps, frames=0,
                    window_seconds=10.0, hop_seconds=hop_seconds, smoothing_seconds=0.0, change_threshold=0.05)
    curves = g.node("C2D_AudioEnergyCurves", audio=audio.out, fps=fps, frames=0, range_db=60.0)
    g.node("PreviewAny", source=encode[2])  # output nodes, so both run
    g.node("PreviewAny", source=curves[2])
    return g, encode


def test_schedule_ten_minutes_at_24_fps_in_bounded_memory(comfy: ComfyClient, comfy_server: ComfyServer) -> None:
    # The server has run CLAP on a batch before (as any server that encoded a sound has): the
    # growth measured is what the long file adds, not CLAP's first working set.
    warm = comfy_server.input_dir / "schedule_20s.wav"
    sf.write(warm, rain_then_thunder(16_000)[0, 0].numpy(), 16_000)
    comfy.execute(_encode_graph(warm.name, fps=0.5, hop_seconds=0.0)[0].prompt(), timeout=300)
    name = "schedule_10min.wav"
    path = comfy_server.input_dir / name
    _write_long(path, 600)
    try:
        g, encode = _encode_graph(name, fps=24.0, hop_seconds=60.0)  # 11 windows: the test CLAP is slow on CPU
        with PeakRss(comfy_server) as peak:
            start = time.monotonic()
            run = comfy.execute(g.prompt(), timeout=600)
            seconds = time.monotonic() - start
        [summary] = run.entry["outputs"][encode.id]["text"]
        assert summary.startswith(f"{600 * 24} frames"), summary
        print(f"\n10 min at 24 fps ({600 * 24} frames, a window every 60 s): {seconds:.1f} s, "
              f"server RSS +{peak.growth / MB:.0f} MB (the file decoded: {600 * 16_000 * 4 / MB:.0f} MB as float32)")
        assert peak.growth < 200 * MB, f"server RSS grew by {peak.growth // MB} MB"
    finally:
        path.unlink(missing_ok=True)
        warm.unlink(missing_ok=True)
