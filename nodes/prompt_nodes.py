"""Audio to Prompt: the training-free path. CLAP names what it hears; the words join the prompt."""

from __future__ import annotations

import logging
import os

import folder_paths

from ..clap2diffusion_core.levels import LEVELS
from ..clap2diffusion_core.prompt import (
    DEFAULT_COUNTS,
    DEFAULT_MIN_RELATIVE,
    DEFAULT_THRESHOLD,
    SELECTIONS,
    LabelEmbeddingCache,
    describe_audio,
    render_scores,
)
from ..clap2diffusion_core.vocabulary import Vocabulary, load_label_list, parse_label_list
from . import types
from .api import io, ui
from .audio_nodes import resolve_input_file
from .clap_nodes import ClapModelHandle, encode_audio

BUILT_IN = "built-in"
#: Label files Audio to Prompt lists from the input folder.
LABEL_FILE_SUFFIXES = (".labels.txt", ".labels.json")

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


def label_files() -> list[str]:
    """``built-in`` and the label lists in the input folder (``*.labels.txt`` / ``*.labels.json``)."""
    folder = folder_paths.get_input_directory()
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(LABEL_FILE_SUFFIXES))
    except OSError:
        names = []
    return [BUILT_IN, *names]


def user_vocabulary(label_file: str, labels: str) -> Vocabulary | None:
    """The labels the user chose: the ``labels`` text if any, else a file, else None (built-in)."""
    if labels.strip():
        return parse_label_list(labels, source="Audio to Prompt 'labels'")
    if not label_file or label_file == BUILT_IN:
        return None
    return load_label_list(resolve_input_file(label_file))


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
                types.window_mode_input(
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
                    tooltip="With selection 'cosine': the minimum CLAP similarity (cosine, -1..1) for "
                    "a label to be used. Ignored with 'relative' (see min_relative).",
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
                io.Combo.Input(
                    "selection",
                    options=list(SELECTIONS),
                    default="relative",
                    optional=True,
                    tooltip="relative: a label is used when it stands out from the whole vocabulary "
                    "for this sound (min_relative standard deviations above the mean), which works "
                    "alike on every CLAP model. cosine: the raw similarity against threshold, whose "
                    "good value differs between models.",
                ),
                io.Float.Input(
                    "min_relative",
                    default=DEFAULT_MIN_RELATIVE,
                    min=-5.0,
                    max=10.0,
                    step=0.1,
                    optional=True,
                    tooltip="With selection 'relative': how many standard deviations above the "
                    "vocabulary's mean similarity a label must stand. The preview draws it as a "
                    "dashed line: raise it for only clear matches, lower it if a level is empty.",
                ),
                io.Combo.Input(
                    "label_file",
                    options=label_files(),
                    default=BUILT_IN,
                    optional=True,
                    tooltip="The labels CLAP chooses from: the pack's built-in list, or your own "
                    "file in the input folder named *.labels.txt (lines 'foreground: dog bark = "
                    "a barking dog') or *.labels.json (the pack's vocabulary format).",
                ),
                io.String.Input(
                    "labels",
                    multiline=True,
                    default="",
                    optional=True,
                    placeholder="foreground: thunder\nbackground: rain = heavy rain\nambience: eerie",
                    tooltip="Your own labels, one per line: 'level: label' or 'level: label = phrase' "
                    "(level is foreground, background or ambience; the phrase goes into the prompt). "
                    "When not empty, used instead of label_file.",
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
    def validate_inputs(cls, label_file: str = BUILT_IN) -> bool | str:
        if label_file and label_file != BUILT_IN:
            try:
                resolve_input_file(label_file)
            except ValueError as err:
                return str(err).replace("Audio file", "Label file")
        return True

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
        selection: str = "relative",
        min_relative: float = DEFAULT_MIN_RELATIVE,
        label_file: str = BUILT_IN,
        labels: str = "",
    ) -> io.NodeOutput:
        vocabulary = user_vocabulary(label_file, labels)  # errors before any model work
        embeds, shown = encode_audio(clap_model, audio, window_mode, "Audio to Prompt")  # [B', 512]
        # The text tower loads only here, and its label embeddings are cached per model.
        bank = label_cache().get(clap_model.load_text(), vocabulary)
        counts = (foreground_count, background_count, ambience_count)
        cut = min_relative if selection == "relative" else threshold
        prompts = describe_audio(embeds, bank, counts, cut, template, selection=selection)
        texts = [p.text for p in prompts]
        # The chart for the canvas, and the words in the history for API clients.
        name = "min relative" if selection == "relative" else "threshold"
        preview = ui.PreviewImage(render_scores(prompts, cut, score_name=name), cls=cls).as_dict()
        return io.NodeOutput(
            texts,
            *([p.levels[level] for p in prompts] for level in LEVELS),
            ui={**preview, "text": texts, **shown},
        )


NODES = [AudioToPrompt]
