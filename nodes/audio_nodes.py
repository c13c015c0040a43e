"""Load Audio (CLAP2Diffusion): a sound or a video's audio track from ComfyUI's input folder -> AUDIO."""

from __future__ import annotations

import hashlib
import logging
import os

import folder_paths

from ..clap2diffusion_core.audio import load_audio_file, validate_waveform
from . import types
from .api import io, ui

log = logging.getLogger(__name__)


def input_audio_files() -> list[str]:
    """Files in the input folder whose content type is audio or video (as core LoadAudio lists them)."""
    input_dir = folder_paths.get_input_directory()
    files = [f for f in os.listdir(input_dir) if os.path.isfile(os.path.join(input_dir, f))]
    return sorted(folder_paths.filter_files_content_types(files, ["audio", "video"]))


def resolve_input_file(name: str) -> str:
    """The real path of ``name`` inside the input folder; ``ValueError`` if it would leave it.

    Refuses absolute paths, ``..`` and symlinks that point outside the folder: a workflow shared
    with you must not read arbitrary files from your disk.
    """
    input_dir = os.path.realpath(folder_paths.get_input_directory())
    if not name or os.path.isabs(name) or os.path.splitdrive(name)[0]:
        raise ValueError(f"Audio file must be a name inside the input folder, got {name!r}.")
    if "\x00" in name:  # os.path would only say "embedded null byte"
        raise ValueError(f"Audio file name {name!r} contains a NUL character; pick a file from the list or upload it.")
    path = os.path.realpath(os.path.join(input_dir, name))
    if os.path.commonpath([path, input_dir]) != input_dir:
        raise ValueError(f"Audio file {name!r} lies outside ComfyUI's input folder; refusing to read it.")
    if not os.path.isfile(path):
        raise ValueError(f"Audio file {name!r} is not in ComfyUI's input folder; upload it first.")
    return path


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
                io.Combo.Input(
                    "audio",
                    options=input_audio_files(),
                    upload=io.UploadType.audio,
                    tooltip="A sound or video file in ComfyUI's input folder; use the upload button to add one.",
                ),
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
        waveform, sample_rate = load_audio_file(path, max_seconds=max_seconds or None)  # [C, T]
        for warning in validate_waveform(waveform, sample_rate):
            log.warning("Load Audio (CLAP2Diffusion) %s: %s", audio, warning)
        subfolder, filename = os.path.split(audio)
        preview = ui.SavedAudios([ui.SavedResult(filename, subfolder, io.FolderType.input)])
        return io.NodeOutput({"waveform": waveform.unsqueeze(0), "sample_rate": sample_rate}, ui=preview)

    @classmethod
    def fingerprint_inputs(cls, audio: str, max_seconds: float = 0.0) -> str:
        # Re-run when the file's bytes change, not only its name (as core LoadAudio does).
        digest = hashlib.sha256()
        try:
            with open(resolve_input_file(audio), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except (OSError, ValueError):
            return f"missing:{audio}"  # validate_inputs reports it
        return f"{digest.hexdigest()}:{max_seconds}"

    @classmethod
    def validate_inputs(cls, audio: str) -> bool | str:
        # `audio` only (no **kwargs): ComfyUI then reports a bad file once, on `audio`, and still
        # checks max_seconds against its min/max itself.
        try:
            resolve_input_file(audio)
        except ValueError as err:
            return str(err)
        return True


NODES: list[type[io.ComfyNode]] = [LoadAudio]
