"""Save Audio Tokens / Load Audio Tokens: encode a sound once, share its AUDIO_TOKENS as a file."""

from __future__ import annotations

import os

import folder_paths

from ..clap2diffusion_core.tokens_file import load_tokens, save_tokens
from ..clap2diffusion_core.types import AudioTokens
from . import types
from .api import io, ui
from .paths import file_fingerprint, resolve_input_file, validation_message

EXTENSION = ".safetensors"
WHAT = "Audio tokens file"


def input_token_files() -> list[str]:
    """``.safetensors`` files in the input folder (top level and subfolders), as Load Audio lists sounds."""
    input_dir = folder_paths.get_input_directory()
    found = []
    for root, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(root, f), input_dir).replace(os.sep, "/")
                  for f in files if f.endswith(EXTENSION)]
    return sorted(found)


class SaveAudioTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_SaveAudioTokens",
            display_name="Save Audio Tokens",
            category=types.CATEGORY,
            description="Writes audio tokens to ComfyUI's output folder as .safetensors, with the CLAP2Diffusion "
            "file that made them, so a sound is encoded once: copy the file to the input folder (or upload "
            "it) and use Load Audio Tokens.",
            is_output_node=True,
            inputs=[
                types.AudioTokens.Input("audio_tokens", tooltip="From Audio Project."),
                io.String.Input(
                    "filename_prefix",
                    default="audio_tokens/clap2diffusion",
                    tooltip="Where in the output folder, and the start of the file name; a counter is added.",
                ),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, audio_tokens: AudioTokens, filename_prefix: str) -> io.NodeOutput:
        output_dir = folder_paths.get_output_directory()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        name = f"{filename}_{counter:05}_{EXTENSION}"
        save_tokens(audio_tokens, os.path.join(folder, name))
        return io.NodeOutput(ui=ui.PreviewText(f"saved {os.path.join(subfolder, name)} in the output folder"))


class LoadAudioTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_LoadAudioTokens",
            display_name="Load Audio Tokens",
            category=types.CATEGORY,
            description="Reads audio tokens that Save Audio Tokens wrote, from ComfyUI's input folder: no CLAP "
            "or decomposition needed. Apply Audio to Model still needs the CLAP2Diffusion file that made them.",
            inputs=[
                io.Combo.Input(
                    "tokens_file",
                    options=input_token_files(),
                    upload=io.UploadType.model,
                    tooltip="A .safetensors file from Save Audio Tokens in ComfyUI's input folder; upload one "
                    "or copy it there from the output folder.",
                ),
            ],
            outputs=[
                types.AudioTokens.Output(
                    display_name="audio_tokens",
                    tooltip="For Apply Audio to Conditioning, or Apply Audio to Model with the file they name.",
                )
            ],
        )

    @classmethod
    def execute(cls, tokens_file: str) -> io.NodeOutput:
        return io.NodeOutput(load_tokens(resolve_input_file(tokens_file, WHAT)))

    @classmethod
    def fingerprint_inputs(cls, tokens_file: str) -> str:
        return file_fingerprint(tokens_file, WHAT)

    @classmethod
    def validate_inputs(cls, tokens_file: str) -> bool | str:
        return validation_message(resolve_input_file, tokens_file, WHAT)


NODES: list[type[io.ComfyNode]] = [SaveAudioTokens, LoadAudioTokens]
