"""Load Audio (CLAP2Diffusion): a sound or a video's audio track from ComfyUI's input folder -> AUDIO."""

from __future__ import annotations

import logging
import os

import folder_paths

from ..clap2diffusion_core.audio import read_sound, remember_checked
from . import types
from .api import io, ui
from .paths import file_fingerprint, resolve_input_file, validation_message

log = logging.getLogger(__name__)


def sound_warnings(node: str, warnings: list[str], log_them: bool = True) -> dict[str, list[str]]:
    """The sound check's warnings as a node shows them: in the log (once per sound: ``log_them``)
    and in the node's UI output under ``sound_warnings`` (history, API clients, the canvas)."""
    for warning in warnings if log_them else ():
        log.warning("%s: %s", node, warning)
    return {"sound_warnings": list(warnings)} if warnings else {}


def input_audio_files() -> list[str]:
    """Files in the input folder whose content type is audio or video (as core LoadAudio lists them)."""
    input_dir = folder_paths.get_input_directory()
    files = [f for f in os.listdir(input_dir) if os.path.isfile(os.path.join(input_dir, f))]
    return sorted(folder_paths.filter_files_content_types(files, ["audio", "video"]))


def audio_file_input() -> io.Combo.Input:
    """The 'audio' file picker with its upload button, listing the sounds in the input folder."""
    return io.Combo.Input(
        "audio",
        options=input_audio_files(),
        upload=io.UploadType.audio,
        tooltip="A sound or video file in ComfyUI's input folder; use the upload button to add one.",
    )


class LoadAudio(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_LoadAudio",
            display_name="Load Audio (CLAP2Diffusion)",
            category=types.CATEGORY,
            description="Loads a sound (wav, flac, mp3, ogg, ...) or the audio track of a video from the input "
            "folder. Checks it is usable and plays it back in the node.",
            inputs=[
                audio_file_input(),
                io.Float.Input(
                    "max_seconds",
                    default=0.0,
                    min=0.0,
                    max=3600.0,
                    step=1.0,
                    optional=True,  # graphs saved without it load the whole file, as core LoadAudio does
                    tooltip="Read at most this many seconds from the start (0 = the whole file). CLAP Encode in "
                    "'first' mode uses only the first 10 s, so a limit keeps long files quick and small.",
                ),
            ],
            outputs=[
                io.Audio.Output(
                    display_name="audio",
                    tooltip="The sound at its own sample rate, [1, channels, samples]; works with CLAP Encode "
                    "and with core audio nodes (Preview Audio, Save Audio).",
                )
            ],
        )

    @classmethod
    def execute(cls, audio: str, max_seconds: float = 0.0) -> io.NodeOutput:
        path = resolve_input_file(audio)
        waveform, sample_rate, warnings = read_sound(path, max_seconds=max_seconds or None)  # [C, T], checked
        waveform = waveform.unsqueeze(0)  # [1, C, T], ComfyUI's AUDIO
        # The encoders receive this very tensor: they find its warnings (which name the file) here
        # instead of scanning it again.
        remember_checked(waveform, sample_rate, warnings)
        subfolder, filename = os.path.split(audio)
        preview = ui.SavedAudios([ui.SavedResult(filename, subfolder, io.FolderType.input)]).as_dict()
        return io.NodeOutput({"waveform": waveform, "sample_rate": sample_rate},
                             ui={**preview, **sound_warnings("Load Audio (CLAP2Diffusion)", warnings)})

    @classmethod
    def fingerprint_inputs(cls, audio: str, max_seconds: float = 0.0) -> str:
        return f"{file_fingerprint(audio)}:{max_seconds}"

    @classmethod
    def validate_inputs(cls, audio: str) -> bool | str:
        # `audio` only (no **kwargs): ComfyUI then reports a bad file once, on `audio`, and still
        # checks max_seconds against its min/max itself.
        return validation_message(resolve_input_file, audio)


NODES: list[type[io.ComfyNode]] = [LoadAudio]
