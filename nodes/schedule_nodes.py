"""Meaning over time: per-frame CLAP embeddings, energy curves, a prompt schedule and its timeline.

Frame ``i`` of a clip at ``fps`` covers the sound from ``i / fps`` to ``(i + 1) / fps``. Per-frame
embeddings go through Hierarchical Decompose and Audio Project like any batch: the tokens have one
row per frame, and both injections give latent ``i`` of a batch row ``i``.
"""

from __future__ import annotations

import dataclasses

import comfy.model_management as mm
import torch

from ..clap2diffusion_core import energy, timeline
from ..clap2diffusion_core.levels import LEVELS
from ..clap2diffusion_core.prompt import DEFAULT_COUNTS, DEFAULT_THRESHOLD
from ..clap2diffusion_core.schedule import DEFAULT_MARGIN, DEFAULT_MIN_FRAMES, prompt_schedule
from ..clap2diffusion_core.timeline_preview import render_timeline
from . import types
from .api import io, ui
from .clap_nodes import ClapModelHandle, check_audio, progress_callback
from .prompt_nodes import label_cache

# Windows per CLAP pass: CLAP's activations for a batch, not the sound's length, set the memory.
# On the CPU a batch of 4 held about 120-190 MB more than a batch of 1 (47 MB) for a 10-minute
# sound; 2 keeps the whole encode under the 200 MB with ComfyUI's own decode beside it.
_BATCH = 2
_FPS_TOOLTIP = "Frames per second of the animation; the same value as the node that saves or plays the frames."
_FRAMES_TOOLTIP = "How many frames. 0: as many as the sound lasts at this fps (a 20 s sound at 8 fps is 160)."


def _one_sound(audio: dict, node: str) -> tuple[torch.Tensor, int, dict[str, list[str]]]:
    """One sound through the sound check: ``([1, C, T], sample_rate, UI warnings)``."""
    waveform, sample_rate, shown = check_audio(audio, node)  # raises AudioError on unusable audio
    if waveform.ndim == 3 and waveform.shape[0] != 1:
        raise ValueError(
            f"{node} schedules one sound, found a batch of {waveform.shape[0]} sounds. "
            "Split the batch, or join the sounds into one track first."
        )
    return (waveform if waveform.ndim == 3 else waveform[None]), sample_rate, shown


def _num_frames(waveform: torch.Tensor, sample_rate: int, fps: float, frames: int) -> int:
    return frames if frames > 0 else timeline.frame_count(waveform.shape[-1] / sample_rate, fps)


def _parse_frames(text: str) -> list[int]:
    """``"80, 212"`` -> ``[80, 212]``; raises naming what was found."""
    try:
        return [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"change_frames must be frame numbers separated by commas, e.g. '80, 212'; found {text!r}") from None


class ClapEncodeFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_ClapEncodeFrames",
            display_name="CLAP Encode Frames",
            category=types.CATEGORY,
            description="One CLAP embedding per animation frame: a window centred on each frame, so the "
            "sound's meaning follows the frames. Feed Hierarchical Decompose for one token row per frame, "
            "or Audio to Prompt Schedule for words over time.",
            inputs=[
                types.ClapModel.Input("clap_model", tooltip="From CLAP Loader."),
                io.Audio.Input("audio", tooltip="One sound, any length, sample rate and channel count."),
                io.Float.Input("fps", default=8.0, min=0.1, max=240.0, step=0.5, tooltip=_FPS_TOOLTIP),
                io.Int.Input("frames", default=0, min=0, max=100_000, tooltip=_FRAMES_TOOLTIP),
                io.Float.Input(
                    "window_seconds",
                    default=10.0,
                    min=0.5,
                    max=10.0,
                    step=0.5,
                    tooltip="How much sound each frame hears, centred on the frame. 10 s is what CLAP "
                    "was trained on; shorter windows follow quick changes but are repeated to fill 10 s.",
                ),
                io.Float.Input(
                    "hop_seconds",
                    default=0.5,
                    min=0.0,
                    max=60.0,
                    step=0.05,
                    tooltip="Encode a window every this many seconds and interpolate the frames between "
                    "(each window is a full CLAP pass). 0: every frame gets its own window.",
                ),
                io.Float.Input(
                    "smoothing_seconds",
                    default=0.0,
                    min=0.0,
                    max=10.0,
                    step=0.05,
                    tooltip="Gaussian smoothing of the embeddings over time (its sigma); 0 is off.",
                ),
                io.Float.Input(
                    "change_threshold",
                    default=0.05,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="How different (cosine distance, 0..2) the sound on either side of a frame must "
                    "be for the frame to be a change point. Lower finds more changes.",
                ),
            ],
            outputs=[
                types.ClapEmbeds.Output(
                    display_name="clap_embeds",
                    tooltip="L2-normalised CLAP embeddings, one row per frame [frames, 512].",
                ),
                io.Int.Output(display_name="frames", tooltip="The number of frames (rows)."),
                io.String.Output(
                    display_name="change_frames",
                    tooltip="Frames where the meaning changes, comma-separated ('80, 212'); empty if none.",
                ),
                io.Float.Output(
                    display_name="novelty",
                    tooltip="Per frame, how much the meaning changes there (a list of floats, one per "
                    "frame; not normalised).",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        clap_model: ClapModelHandle,
        audio: dict,
        fps: float,
        frames: int,
        window_seconds: float,
        hop_seconds: float,
        smoothing_seconds: float,
        change_threshold: float,
    ) -> io.NodeOutput:
        waveform, sample_rate, shown = _one_sound(audio, "CLAP Encode Frames")
        num_frames = _num_frames(waveform, sample_rate, fps, frames)
        stride = max(1, round(hop_seconds * fps))
        encoder = clap_model.load_audio()  # the audio tower alone (issue 16)
        embeds = timeline.encode_frames(
            encoder.encode_windows, waveform, sample_rate, fps, num_frames, window_seconds, stride,
            batch_size=_BATCH, progress=progress_callback("CLAP Encode Frames"),
        )[0]  # [F, 512]
        embeds = timeline.smooth_frames(embeds, smoothing_seconds * fps)
        span = max(1, round(window_seconds * fps / 2))  # half a window each side
        found = timeline.change_points(embeds, span, change_threshold)
        change_text = ", ".join(str(f) for f in found.frames)
        summary = f"{num_frames} frames at {fps:g} fps; changes at: {change_text or 'none'}"
        return io.NodeOutput(
            embeds.to(mm.intermediate_device()), num_frames, change_text, found.novelty.tolist(),
            ui={"text": [summary], **shown},
        )


class AudioEnergyCurves(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_AudioEnergyCurves",
            display_name="Audio Energy Curves",
            category=types.CATEGORY,
            description="Per-frame loudness and onset strength as lists of floats in 0..1, one per frame: "
            "the audio-reactive weights convention (Yvann-Nodes' audio weights; IPAdapter Weights' custom "
            "weights and batch value schedules read the same lists). Scale Audio Tokens per Frame takes them.",
            inputs=[
                io.Audio.Input("audio", tooltip="One sound, any length, sample rate and channel count."),
                io.Float.Input("fps", default=8.0, min=0.1, max=240.0, step=0.5, tooltip=_FPS_TOOLTIP),
                io.Int.Input("frames", default=0, min=0, max=100_000, tooltip=_FRAMES_TOOLTIP),
                io.Float.Input(
                    "range_db",
                    default=energy.DEFAULT_RANGE_DB,
                    min=6.0,
                    max=120.0,
                    step=1.0,
                    tooltip="Loudness range mapped to 0..1: the loudest frame is 1, frames this many dB "
                    "quieter (or more) are 0.",
                ),
            ],
            outputs=[
                io.Float.Output(
                    display_name="loudness",
                    tooltip="RMS level per frame in dB, normalised to 0..1 (a list of floats, one per frame).",
                ),
                io.Float.Output(
                    display_name="onsets",
                    tooltip="Onset strength (spectral flux) per frame, 0..1: peaks on hits, low on steady "
                    "sound (a list of floats, one per frame).",
                ),
                io.Int.Output(display_name="frames", tooltip="The number of frames."),
            ],
        )

    @classmethod
    def execute(cls, audio: dict, fps: float, frames: int, range_db: float) -> io.NodeOutput:
        waveform, sample_rate, shown = _one_sound(audio, "Audio Energy Curves")
        num_frames = _num_frames(waveform, sample_rate, fps, frames)
        loudness = energy.normalise_db(energy.loudness_db(waveform, sample_rate, fps, num_frames), range_db)
        onsets = energy.onset_strength(waveform, sample_rate, fps, num_frames)
        return io.NodeOutput(loudness[0].tolist(), onsets[0].tolist(), num_frames, ui=shown or None)


class ScaleAudioTokensPerFrame(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_ScaleAudioTokensPerFrame",
            display_name="Scale Audio Tokens per Frame",
            category=types.CATEGORY,
            description="Multiplies token row i by weight i, so loudness (or any per-frame list) drives how "
            "strongly each frame hears the sound. With Apply Audio to Conditioning this is its strength, "
            "per frame.",
            inputs=[
                types.AudioTokens.Input("audio_tokens", tooltip="From Audio Project: one row per frame, or one for all."),
                io.Float.Input(
                    "weights",
                    force_input=True,
                    tooltip="A list of floats, one per frame (Audio Energy Curves, or any audio-reactive node).",
                ),
                io.Float.Input("multiply", default=1.0, min=0.0, max=4.0, step=0.05, tooltip="Scales every weight."),
                io.Float.Input("add", default=0.0, min=-4.0, max=4.0, step=0.05, tooltip="Added to every weight after scaling."),
            ],
            outputs=[types.AudioTokens.Output(display_name="audio_tokens", tooltip="One row per weight.")],
        )

    @classmethod
    def execute(cls, audio_tokens, weights, multiply: float, add: float) -> io.NodeOutput:
        values = [float(weights)] if isinstance(weights, (int, float)) else [float(w) for w in weights]
        tokens = audio_tokens.tokens
        if tokens.shape[0] not in (1, len(values)):
            raise ValueError(
                f"{len(values)} weights for {tokens.shape[0]} token rows: give one weight per frame "
                "(use the same fps and frames on both nodes)."
            )
        scale = torch.tensor(values, dtype=tokens.dtype, device=tokens.device) * multiply + add
        rows = tokens.expand(len(values), -1, -1) * scale[:, None, None]
        # An SDXL file's pooled vector follows the rows; a norm-fixed direction cannot be scaled, so
        # each row's weight scales its share in Apply Audio to Conditioning's pooled mix instead.
        pooled = audio_tokens.pooled
        if pooled is None:
            return io.NodeOutput(dataclasses.replace(audio_tokens, tokens=rows))
        weight = scale.to(pooled) if audio_tokens.pooled_weight is None else \
            audio_tokens.pooled_weight.to(pooled).expand(len(values)) * scale.to(pooled)
        return io.NodeOutput(dataclasses.replace(audio_tokens, tokens=rows, pooled=pooled.expand(len(values), -1),
                                                 pooled_weight=weight))


class AudioToPromptSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        counts = [
            io.Int.Input(
                f"{level}_count", default=default, min=0, max=8,
                tooltip=f"How many {level} labels may be in a frame's prompt; 0 leaves the level out.",
            )
            for level, default in zip(LEVELS, DEFAULT_COUNTS)
        ]  # fmt: skip
        return io.Schema(
            node_id="C2D_AudioToPromptSchedule",
            display_name="Audio to Prompt Schedule",
            category=types.CATEGORY,
            is_output_node=True,  # the timeline and the keyframes show on the node even when unwired
            description="Words over time: per frame, CLAP names what is heard, held with hysteresis so words "
            "do not flicker. Gives keyframe text for prompt-schedule nodes and one prompt per frame. The "
            "timeline picture shows the labels, the loudness and the change points.",
            inputs=[
                types.ClapModel.Input("clap_model", tooltip="The CLAP Loader that made the embeddings."),
                types.ClapEmbeds.Input("clap_embeds", tooltip="From CLAP Encode Frames: one row per frame."),
                io.Float.Input("fps", default=8.0, min=0.1, max=240.0, step=0.5, tooltip=_FPS_TOOLTIP),
                *counts,
                io.Float.Input(
                    "threshold", default=DEFAULT_THRESHOLD, min=-1.0, max=1.0, step=0.01,
                    tooltip="Minimum CLAP similarity (cosine) for a label to enter a frame's prompt.",
                ),
                io.Float.Input(
                    "margin", default=DEFAULT_MARGIN, min=0.0, max=1.0, step=0.005,
                    tooltip="Hysteresis: a new label replaces a held one only when it scores this much "
                    "higher. 0 lets words change every frame.",
                ),
                io.Int.Input(
                    "min_frames", default=DEFAULT_MIN_FRAMES, min=0, max=1000,
                    tooltip="A label stays at least this many frames once it enters.",
                ),
                io.String.Input(
                    "template", multiline=True, default="", placeholder="a city street, {audio}, film still",
                    tooltip="Your prompt with {audio} where the sound's words go ({foreground}, {background}, "
                    "{ambience} place one level); without a placeholder the words are appended.",
                ),
                io.Audio.Input("audio", optional=True, tooltip="The same sound, to draw its loudness on the timeline."),
                io.String.Input(
                    "change_frames", optional=True, force_input=True,
                    tooltip="From CLAP Encode Frames, to mark the change points on the timeline.",
                ),
            ],  # fmt: skip
            outputs=[
                io.String.Output(
                    display_name="keyframes",
                    tooltip='Keyframe text, one line per change: "0": "...",\\n"80": "..." (the format '
                    "Batch Prompt Schedule nodes read).",
                ),
                io.String.Output(
                    display_name="prompts",
                    is_output_list=True,
                    tooltip="One prompt per frame, as a list: nodes downstream run once per frame.",
                ),
                io.Image.Output(display_name="timeline", tooltip="The timeline picture."),
            ],
        )

    @classmethod
    def execute(
        cls,
        clap_model: ClapModelHandle,
        clap_embeds: torch.Tensor,
        fps: float,
        foreground_count: int,
        background_count: int,
        ambience_count: int,
        threshold: float,
        margin: float,
        min_frames: int,
        template: str = "",
        audio: dict | None = None,
        change_frames: str | None = None,
    ) -> io.NodeOutput:
        if clap_embeds.ndim != 2:
            raise ValueError(f"expected clap_embeds [frames, 512] from CLAP Encode Frames, found {list(clap_embeds.shape)}")
        bank = label_cache().get(clap_model.load_text())  # the text tower, loaded only here
        scores = bank.scores(clap_embeds)  # [F, L]
        counts = (foreground_count, background_count, ambience_count)
        result = prompt_schedule(scores, bank.vocabulary, counts, threshold, margin, min_frames, template)
        num_frames = len(result.prompts)
        envelope, shown = None, {}
        if audio is not None:
            waveform, sample_rate, shown = _one_sound(audio, "Audio to Prompt Schedule")
            envelope = energy.normalise_db(energy.loudness_db(waveform, sample_rate, fps, num_frames))[0].tolist()
        top = {
            level: [labels[level][0] if labels[level] else "" for labels in result.labels]
            for level, count in zip(LEVELS, counts)
            if count > 0
        }
        picture = render_timeline(fps, top, envelope, change_frames=_parse_frames(change_frames or ""))
        keyframes = result.keyframe_text()
        preview = ui.PreviewImage(picture, cls=cls).as_dict()
        return io.NodeOutput(keyframes, result.prompts, picture, ui={**preview, "text": [keyframes], **shown})


NODES: list[type[io.ComfyNode]] = [ClapEncodeFrames, AudioEnergyCurves, ScaleAudioTokensPerFrame, AudioToPromptSchedule]
