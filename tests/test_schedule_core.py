"""Meaning over time, in process: frame-aligned windows, change points, energy curves, prompt schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from schedule_support import RAIN, THUNDER, StandInClap, constant_rain, is_thunder, rain_then_thunder

from clap2diffusion_core import energy, schedule, timeline
from clap2diffusion_core.audio import CLAP_SAMPLE_RATE, WINDOW_SAMPLES, resample
from clap2diffusion_core.testing import random_model
from clap2diffusion_core.timeline_preview import render_timeline
from clap2diffusion_core.vocabulary import SoundLabel, Vocabulary

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "schedule"
FPS = 8
FRAMES = 160  # 20 s at 8 fps
SWITCH_FRAME = 80  # the frame whose span starts at 10 s
WINDOW_FRAMES = 80  # one 10 s window at 8 fps: the tolerance
# The stand-in's switch can move with the burst phase inside the boundary window (a 0.2 s
# burst is 2% of a window): half a second either side, far inside the one window.
NEAR = 4


@pytest.fixture(scope="module")
def sound() -> torch.Tensor:
    return rain_then_thunder()


@pytest.fixture(scope="module")
def frame_embeds(sound: torch.Tensor) -> torch.Tensor:
    return timeline.encode_frames(StandInClap().encode_windows, sound, 16_000, FPS)[0]


def _first_thunder(embeds: torch.Tensor) -> int:
    flags = is_thunder(embeds)
    first = int(flags.float().argmax())
    assert flags[first:].all() and not flags[:first].any(), f"the meaning flips back and forth: {flags.tolist()}"
    return first


# --------------------------------------------------------------------------------------------
# Window placement


def test_schedule_windows_are_centred_on_frames_and_slid_inside_the_sound() -> None:
    plan = timeline.plan_frames(num_frames=160, fps=8, total_samples=20 * CLAP_SAMPLE_RATE, window_seconds=2.0)
    half = CLAP_SAMPLE_RATE  # 1 s
    assert plan.anchors == list(range(160))
    # Frame 80 spans 10.0-10.125 s: its window is centred on 10.0625 s.
    assert plan.starts[80] == round(10.0625 * CLAP_SAMPLE_RATE) - half
    # Frames near the ends hear the first / last 2 s, not silence past the ends.
    assert plan.starts[0] == 0 and plan.starts[3] == 0
    assert plan.starts[-1] == 18 * CLAP_SAMPLE_RATE
    assert plan.starts == sorted(plan.starts)


def test_schedule_windows_are_the_sounds_samples(sound: torch.Tensor) -> None:
    """Cut block by block, each window equals the same span of the whole sound resampled at once."""
    whole = resample(sound[0], 16_000, CLAP_SAMPLE_RATE)[0]  # [T'] 48 kHz
    plan = timeline.plan_frames(FRAMES, FPS, whole.shape[-1], window_seconds=3.0, stride=7)
    blocks = timeline.mono_blocks(sound, 16_000, block=CLAP_SAMPLE_RATE)  # 1 s blocks: many joins
    windows = list(timeline.plan_windows(plan, blocks))
    assert len(windows) == len(plan.anchors)
    for start, window in zip(plan.starts, windows):
        expected = whole[start : start + plan.window]
        assert window.shape == (1, WINDOW_SAMPLES)
        torch.testing.assert_close(window[0, : plan.window], expected, atol=1e-5, rtol=0)
        # A 3 s window is repeat-padded to CLAP's 10 s, as CLAP pads short sounds.
        torch.testing.assert_close(window[0, plan.window : 2 * plan.window], expected, atol=1e-5, rtol=0)


def test_schedule_coarse_hop_interpolates_between_encoded_frames(sound: torch.Tensor, frame_embeds: torch.Tensor) -> None:
    clap = StandInClap()
    coarse = timeline.encode_frames(clap.encode_windows, sound, 16_000, FPS, stride=8)[0]
    # Every 8th frame and the last (21 anchors); the 10 s windows of frames before 40 and from 120
    # on slide to the ends of the sound, so those share two encodes: 10 + 2 windows.
    assert clap.windows_seen == 12
    assert coarse.shape == frame_embeds.shape
    # Encoded frames equal the frame-by-frame encode; frames between lie on the chord, renormalised.
    torch.testing.assert_close(coarse[::8], frame_embeds[::8])
    expected_mid = F.normalize(frame_embeds[40] + frame_embeds[48], dim=-1)
    torch.testing.assert_close(coarse[44], expected_mid)
    assert abs(_first_thunder(coarse) - SWITCH_FRAME) <= NEAR


# --------------------------------------------------------------------------------------------
# Where the meaning changes


def test_schedule_frame_embeddings_switch_at_frame_80(frame_embeds: torch.Tensor) -> None:
    assert frame_embeds.shape == (FRAMES, RAIN.shape[0])
    first = _first_thunder(frame_embeds)
    assert abs(first - SWITCH_FRAME) <= NEAR, first
    # Far from the boundary each frame hears one sound only.
    assert float(frame_embeds[0] @ RAIN) > 0.99 and float(frame_embeds[-1] @ THUNDER) > 0.99


def test_schedule_change_point_names_frame_80(frame_embeds: torch.Tensor) -> None:
    found = timeline.change_points(frame_embeds, span=WINDOW_FRAMES // 2)
    assert len(found.frames) == 1, found.frames
    assert abs(found.frames[0] - SWITCH_FRAME) <= NEAR
    assert found.novelty.shape == (FRAMES,)


def test_schedule_constant_sound_has_no_change_point() -> None:
    embeds = timeline.encode_frames(StandInClap().encode_windows, constant_rain(), 16_000, FPS, stride=4)[0]
    assert timeline.change_points(embeds, span=WINDOW_FRAMES // 2).frames == []
    torch.testing.assert_close(embeds, embeds[:1].expand_as(embeds), atol=1e-3, rtol=0)


def test_schedule_smoothing_keeps_the_switch_and_calms_jitter(frame_embeds: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(1)
    noisy = F.normalize(frame_embeds + 0.3 * torch.randn(frame_embeds.shape, generator=gen), dim=-1)
    smooth = timeline.smooth_frames(noisy, sigma_frames=4)

    def jitter(e: torch.Tensor) -> float:
        return float((e[1:] - e[:-1]).norm(dim=-1).mean())

    assert jitter(smooth) < jitter(noisy) / 3
    assert abs(_first_thunder(smooth) - SWITCH_FRAME) <= NEAR
    assert timeline.smooth_frames(noisy, 0) is noisy


def test_schedule_tokens_switch_with_the_frames(frame_embeds: torch.Tensor) -> None:
    """Per-frame embeddings through the trained modules give one token row per frame that follows them."""
    model = random_model()
    clap_dim = model.config.decomposer.clap_dim
    embeds = F.pad(frame_embeds, (0, clap_dim - frame_embeds.shape[1]))  # the stand-in's 16 dims, padded
    tokens = model.project(model.encode(embeds)).tokens  # [160, 77, 768]
    assert tokens.shape[0] == FRAMES
    rain_tokens, thunder_tokens = tokens[0], tokens[-1]
    nearer_thunder = (tokens - thunder_tokens).flatten(1).norm(dim=1) < (tokens - rain_tokens).flatten(1).norm(dim=1)
    first = int(nearer_thunder.float().argmax())
    assert nearer_thunder[first:].all() and not nearer_thunder[:first].any()
    assert abs(first - SWITCH_FRAME) <= NEAR


# --------------------------------------------------------------------------------------------
# Identical frames are bitwise identical, whatever the batch (the pixel-exact constant sound)

TILE = CLAP_SAMPLE_RATE // 2  # 0.5 s: at 2 fps with 0.5 s windows, frame i hears tile i exactly


def _tiled(*tiles: torch.Tensor) -> torch.Tensor:
    """``[1, 1, T]`` at 48 kHz: the 0.5 s tiles in order."""
    return torch.cat(tiles)[None, None]


@pytest.fixture(scope="module")
def tiles() -> tuple[torch.Tensor, torch.Tensor]:
    sound = rain_then_thunder(CLAP_SAMPLE_RATE)[0, 0]
    return sound[:TILE], sound[10 * CLAP_SAMPLE_RATE : 10 * CLAP_SAMPLE_RATE + TILE]


def test_schedule_a_window_heard_by_several_frames_is_encoded_once(tiles) -> None:
    rain, thunder = tiles
    clap = StandInClap()
    sound = _tiled(rain, rain, thunder, rain, thunder, thunder, rain, rain)
    embeds = timeline.encode_frames(clap.encode_windows, sound, CLAP_SAMPLE_RATE, fps=2, window_seconds=0.5)[0]
    assert clap.windows_seen == 2  # two distinct windows for eight frames
    for frame, tile in enumerate("rrtrttrr"):
        assert torch.equal(embeds[frame], embeds[0] if tile == "r" else embeds[2])


def test_schedule_constant_sound_frames_are_bitwise_the_clap_encode_of_its_window(tiles) -> None:
    """A constant sound's 8 frames are exactly what CLAP Encode gives for one window of it: encoded as
    a batch (4 at a time) they would differ from a batch of 1 in the last bits."""
    from clap_support import small_config
    from transformers import ClapModel

    from clap2diffusion_core.clap import ClapEncoder

    torch.manual_seed(0)
    tower = ClapEncoder(ClapModel(small_config()).eval()).audio
    rain = tiles[0]
    with torch.inference_mode():
        frames = timeline.encode_frames(tower.encode_windows, _tiled(*[rain] * 8), CLAP_SAMPLE_RATE, fps=2,
                                        window_seconds=0.5, batch_size=4)[0]  # fmt: skip
        single = tower.embed(rain[None, None], CLAP_SAMPLE_RATE, "first")  # [1, 512], the unscheduled path
    assert frames.shape == (8, 512)
    assert all(torch.equal(row, single[0]) for row in frames)


def test_schedule_equal_embeddings_give_bitwise_equal_tokens_whatever_the_batch() -> None:
    """Decompose and Project run once per distinct row: a constant sound's 8 frames give exactly the
    tokens of that sound alone (a batch of one), and frames of one sound in a mixed batch are
    bitwise equal to each other. (Rows of two sounds are a batch of two distinct rows, which CPU
    kernels compute in other last bits than a batch of one: equal within float rounding only.)"""
    model = random_model()
    sounds = F.normalize(torch.randn(2, model.config.decomposer.clap_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    constant = model.project(model.encode(sounds[[0] * 8])).tokens  # [8, 77, 768]
    alone = model.project(model.encode(sounds[:1])).tokens[0]
    assert all(torch.equal(row, alone) for row in constant)

    mixed = model.project(model.encode(sounds[[0, 0, 0, 0, 1, 1, 1, 1]])).tokens
    for frame in range(8):
        assert torch.equal(mixed[frame], mixed[0 if frame < 4 else 4]), f"frame {frame}"
        alone = model.project(model.encode(sounds[frame // 4][None])).tokens[0]
        torch.testing.assert_close(mixed[frame], alone, rtol=1e-5, atol=1e-4)
    levels = model.encode(sounds[[1, 0, 1]])  # distinct rows keep their places
    assert torch.equal(levels.tokens[0], levels.tokens[2]) and not torch.equal(levels.tokens[0], levels.tokens[1])


def test_schedule_equal_embeddings_give_bitwise_equal_pooled_vectors_too() -> None:
    """SDXL-family files also project a pooled vector per row: the same rule holds for it."""
    from clap2diffusion_core.model import CLAP2DiffusionModel, ModelConfig
    from clap2diffusion_core.pooled_head import PooledHeadConfig
    from clap2diffusion_core.projector import ProjectorConfig

    torch.manual_seed(0)
    config = ModelConfig(base_family="sdxl", projector=ProjectorConfig(context_dim=2048), pooled=PooledHeadConfig())
    model = CLAP2DiffusionModel(config).eval()
    sound = F.normalize(torch.randn(1, config.decomposer.clap_dim), dim=-1)
    frames = model.project(model.encode(sound[[0] * 8]))
    alone = model.project(model.encode(sound))
    assert frames.pooled is not None and frames.pooled.shape == (8, 1280)
    assert all(torch.equal(row, alone.pooled[0]) for row in frames.pooled)


# --------------------------------------------------------------------------------------------
# Prompt schedule


VOCAB = Vocabulary((
    SoundLabel("rain", "foreground", "rain"),
    SoundLabel("thunder", "foreground", "thunderstorm"),
    SoundLabel("wind", "background", "windy"),
))  # fmt: skip
LABELS = torch.stack([RAIN, THUNDER, F.normalize(RAIN + THUNDER + F.one_hot(torch.tensor(2), 16), dim=0)])


def test_schedule_prompt_schedule_switches_at_frame_80(frame_embeds: torch.Tensor) -> None:
    scores = frame_embeds @ LABELS.T  # [F, 3]
    result = schedule.prompt_schedule(scores, VOCAB, counts=(1, 0, 0), template="a city street, {audio}")
    assert len(result.prompts) == FRAMES
    assert [text for _, text in result.keyframes] == ["a city street, rain", "a city street, thunderstorm"]
    assert abs(result.keyframes[1][0] - SWITCH_FRAME) <= NEAR
    assert result.prompts[0] == "a city street, rain" and result.prompts[-1] == "a city street, thunderstorm"
    # The keyframe text is what prompt-schedule nodes read: "frame": "prompt" pairs.
    parsed = json.loads("{" + result.keyframe_text() + "}")
    assert parsed == {"0": "a city street, rain", str(result.keyframes[1][0]): "a city street, thunderstorm"}
    assert result.labels[0]["foreground"] == ("rain",) and result.labels[0]["background"] == ()


def test_schedule_hysteresis_stops_words_flickering() -> None:
    """Two labels that trade the lead by a hair every frame: the held one stays."""
    wobble = 0.005 * torch.tensor([(-1.0) ** i for i in range(40)])
    scores = torch.stack([0.3 + wobble, 0.3 - wobble, torch.zeros(40)], dim=1)
    held = schedule.prompt_schedule(scores, VOCAB, counts=(1, 0, 0))
    assert len(held.keyframes) == 1
    flicker = schedule.prompt_schedule(scores, VOCAB, counts=(1, 0, 0), margin=0.0, min_frames=0)
    assert len(flicker.keyframes) == 40  # the same scores without hysteresis change every frame
    # A clear, lasting lead still switches.
    clear = torch.stack([torch.cat([torch.full((20,), 0.4), torch.full((20,), 0.2)]),
                         torch.cat([torch.full((20,), 0.2), torch.full((20,), 0.4)]), torch.zeros(40)], dim=1)
    assert [f for f, _ in schedule.prompt_schedule(clear, VOCAB, counts=(1, 0, 0)).keyframes] == [0, 20]


def test_schedule_labels_below_the_threshold_leave_the_prompt() -> None:
    scores = torch.tensor([[0.4, 0.0, 0.0]] * 10 + [[0.05, 0.0, 0.0]] * 10)
    result = schedule.prompt_schedule(scores, VOCAB, counts=(1, 0, 0), threshold=0.15)
    assert result.keyframes == [(0, "rain"), (10, "")]


# --------------------------------------------------------------------------------------------
# Energy curves


def test_schedule_loudness_envelope_is_rms_db_normalised() -> None:
    sr = 16_000
    t = torch.arange(2 * sr) / sr
    tone = 0.5 * torch.sin(2 * math.pi * 440 * t)
    tone[sr:] *= 0.01  # second half 40 dB quieter
    db = energy.loudness_db(tone[None, None], sr, fps=8, num_frames=16)
    torch.testing.assert_close(db[0, :8], torch.full((8,), 20 * math.log10(0.5 / math.sqrt(2))), atol=0.05, rtol=0)
    torch.testing.assert_close(db[0, 8:] - db[0, :8], torch.full((8,), -40.0), atol=0.05, rtol=0)
    level = energy.normalise_db(db, range_db=60)
    torch.testing.assert_close(level[0], torch.tensor([1.0] * 8 + [20 / 60] * 8), atol=1e-3, rtol=0)
    # Frames past the end of the sound are silent: 0.
    assert energy.normalise_db(energy.loudness_db(tone[None, None], sr, 8, 20))[0, 16:].tolist() == [0.0] * 4


def test_schedule_onset_strength_peaks_on_hits_not_on_loudness() -> None:
    sr, fps = 16_000, 8
    gen = torch.Generator().manual_seed(3)
    sound = 0.3 * torch.randn(4 * sr, generator=gen) * (torch.arange(4 * sr) < 2 * sr)  # steady loud noise, 2 s
    hits = [20, 25, 29]
    for frame in hits:  # short clicks in the quiet second half
        start = frame * sr // fps + 200
        sound[start : start + 64] += 0.8
    onsets = energy.onset_strength(sound[None, None], sr, fps, 32)[0]
    assert onsets.shape == (32,) and float(onsets.max()) == 1.0
    assert sorted(onsets.topk(3).indices.tolist()) == hits
    assert float(onsets[:16].max()) < 0.25 * float(onsets[hits].min())  # steady noise, however loud, is not


# --------------------------------------------------------------------------------------------
# Timeline picture


def test_schedule_timeline_picture_marks_the_change(frame_embeds: torch.Tensor, sound: torch.Tensor) -> None:
    found = timeline.change_points(frame_embeds, span=WINDOW_FRAMES // 2)
    top = ["thunder" if flag else "rain" for flag in is_thunder(frame_embeds).tolist()]
    envelope = energy.normalise_db(energy.loudness_db(sound, 16_000, FPS, FRAMES))[0].tolist()
    image = render_timeline(FPS, {"foreground": top}, envelope, change_frames=found.frames, width=800)
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[2] == 800
    red = (image[0, ..., 0] > 0.8) & (image[0, ..., 1] < 0.35) & (image[0, ..., 2] < 0.35)
    columns = red.any(dim=0).nonzero().squeeze(1).tolist()
    x_change = 8 + 92 + (800 - 8 - 8 - 92) * found.frames[0] / FRAMES
    assert columns and all(abs(c - x_change) <= 30 for c in columns)  # the line (and its label) only
    # For a person to look at: the 20 s rain-then-thunder sound's timeline.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image[0] * 255).round().byte().numpy()).save(ARTIFACTS / "timeline_rain_then_thunder.png")
