"""Audio to Prompt: the training-free path. CLAP names what it hears; the words join the prompt."""

from __future__ import annotations

import logging
import os

import folder_paths

from ..clap2diffusion_core.audio import validate_waveform
from ..clap2diffusion_core.clap import EMBED_MODES
from ..clap2diffusion_core.levels import LEVELS
from ..clap2diffusion_core.prompt import (
    DEFAULT_COUNTS,
    DEFAULT_THRESHOLD,
    LabelEmbeddingCache,
    describe_audio,
    render_scores,
)
from . import types
from .api import io, ui
from .clap_nodes import ClapModelHandle

log = logging.getLogger(__name__)

_label_cache: LabelEmbeddingCache | None = None


def label_cache() -> LabelEmbeddingCache:
    """The server's label-embedding cache, on disk in a system user folder (never served over
    HTTP). Made on first use: the user directory is final only once ComfyUI has parsed its args."""
    global _label_cache
    if _label_cache is None:
        folder = folder_paths.get_system_user_directory("clap2diffusion")
        _label_cache = LabelEmbeddingCache(os.path.join(folder, "label_embeddings"))
    return _label_cache


_LEVEL_EXAMPLES = {
    "foreground": "events and their sources: thunder, a dog barking, an engine, a siren",
    "background": "scenes and textures: rain, a crowd, traffic, wind, waves",
    "ambience": "mood, space and music genre: eerie, a quiet room, a reverberant hall, jazz",
}


class AudioToPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        count_inputs = [
            io.Int.Input(
                f"{level}_count",
                default=default,
                min=0,
                max=16,
                tooltip=f"How many {level} labels ({_LEVEL_EXAMPLES[level]}) may enter the "
                "prompt, best first. 0 leaves this level out.",
            )
            for level, default in zip(LEVELS, DEFAULT_COUNTS)
        ]
        level_outputs = [
            io.String.Output(
                level,
                display_name=level,
                is_output_list=True,
                tooltip=f"The {level} words alone ({_LEVEL_EXAMPLES[level]}); one string per "
                "row, like prompt.",
            )
            for level in LEVELS
        ]
        return io.Schema(
            node_id="C2D_AudioToPrompt",
            display_name="Audio to Prompt",
            category=types.CATEGORY,
            description="Names what is heard with CLAP alone, no trained CLAP2Diffusion file: the "
            "best-matching sound labels per level become prompt words for CLIP Text Encode. "
            "A preview shows each label's score.",
            inputs=[
                types.ClapModel.Input("clap_model", tooltip="From CLAP Loader."),
                io.Audio.Input(
                    "audio", tooltip="From Load Audio (ours or core), any length and sample rate."
                ),
                io.Combo.Input(
                    "window_mode",
                    options=list(EMBED_MODES),
                    default="mean",
                    tooltip="CLAP hears 10 s at a time. first: the first 10 s. mean: the whole "
                    "sound at once. per_window: one prompt per 10 s window (a storyboard: "
                    "downstream nodes run once per window).",
                ),
                *count_inputs,
                io.Float.Input(
                    "threshold",
                    default=DEFAULT_THRESHOLD,
                    min=-1.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Minimum CLAP similarity (cosine, -1..1) for a label to be used. The "
                    "preview draws it as a dashed line: raise it to keep only clear matches, "
                    "lower it if a level comes out empty.",
                ),
                io.String.Input(
                    "template",
                    multiline=True,
                    default="",
                    placeholder="a beach at dusk, {audio}, photograph",
                    tooltip="Your prompt with {audio} where the sound's words go ({foreground}, "
                    "{background}, {ambience} place one level). Without a placeholder the "
                    "words are appended; empty gives the words alone.",
                ),
            ],
            outputs=[
                io.String.Output(
                    "prompt",
                    display_name="prompt",
                    is_output_list=True,
                    tooltip="The filled template, for CLIP Text Encode. A list with one string "
                    "per sound in the batch, or per window in per_window mode; nodes "
                    "downstream run once per string.",
                ),
                *level_outputs,
            ],
        )

    @classmethod
    def execute(
        cls,
        clap_model: ClapModelHandle,
        audio: dict,
        window_mode: str,
        foreground_count: int,
        background_count: int,
        ambience_count: int,
        threshold: float,
        template: str = "",
    ) -> io.NodeOutput:
        waveform, sample_rate = audio["waveform"], int(audio["sample_rate"])
        for warning in validate_waveform(waveform, sample_rate):  # raises AudioError on unusable audio
            log.warning("Audio to Prompt: %s", warning)
        encoder = clap_model.load()  # on the compute device, through ComfyUI's model management
        embeds = encoder.embed(waveform, sample_rate, window_mode)  # [B', 512]
        bank = label_cache().get(encoder)  # the first use of a CLAP model encodes the labels
        counts = (foreground_count, background_count, ambience_count)
        prompts = describe_audio(embeds, bank, counts, threshold, template)
        texts = [p.text for p in prompts]
        # The chart for the canvas, and the words in the history for API clients.
        preview = ui.PreviewImage(render_scores(prompts, threshold), cls=cls).as_dict()
        return io.NodeOutput(
            texts,
            *([p.levels[level] for p in prompts] for level in LEVELS),
            ui={**preview, "text": texts},
        )


NODES = [AudioToPrompt]
