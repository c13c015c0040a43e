"""CLAP Loader and CLAP Encode: sound -> CLAP_EMBEDS ([B, 512]), through ComfyUI's model management."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy.model_patcher import ModelPatcher

from ..clap2diffusion_core.audio import validate_waveform
from ..clap2diffusion_core.clap import CHECKPOINT_EXTENSIONS, EMBED_MODES, ClapEncoder, load_clap
from . import types
from .api import io
from .paths import resolve_model_file, validation_message

log = logging.getLogger(__name__)

FOLDER = "clap"
FILE_EXTENSIONS = (".safetensors", *CHECKPOINT_EXTENSIONS)


def clap_folders() -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(FOLDER))
    except KeyError:  # the pack's __init__ registers it; absent when imported bare
        return []


def list_clap_models() -> list[str]:
    """Entries of models/clap: transformers folders (holding config.json) and single weight files."""
    entries: set[str] = set()
    for base in clap_folders():
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            rel = os.path.relpath(root, base)
            if rel != "." and "config.json" in files:
                entries.add(rel.replace(os.sep, "/"))
                dirs.clear()  # a model folder's files are its own, not separate entries
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if name.endswith(FILE_EXTENSIONS):
                    entries.add(os.path.normpath(os.path.join(rel, name)).replace(os.sep, "/"))
    return sorted(entries)


def resolve_clap_model(name: str) -> str:
    """Full path of a CLAP Loader entry.

    The name must stay inside a clap folder (no absolute paths, no ``..``), as a shared workflow
    could name anything. Symlinks placed inside the folder are followed: users link model folders.
    """
    return resolve_model_file(FOLDER, name, "CLAP model")


@dataclass
class ClapModelHandle:
    """The CLAP_MODEL socket value: the encoder inside a ModelPatcher, so ComfyUI loads and offloads it."""

    patcher: ModelPatcher
    name: str

    @property
    def encoder(self) -> ClapEncoder:
        return self.patcher.model

    def load(self) -> ClapEncoder:
        """Put the encoder on the compute device (freeing memory if needed) and return it."""
        mm.load_model_gpu(self.patcher)
        return self.patcher.model


def wrap_encoder(encoder: ClapEncoder, name: str) -> ClapModelHandle:
    load_device = mm.text_encoder_device()
    offload_device = mm.text_encoder_offload_device()
    # float32: CLAP is small (about 600 MB) and its embedding steers the whole image.
    encoder = encoder.to(device=offload_device, dtype=torch.float32)
    return ClapModelHandle(
        ModelPatcher(encoder, load_device=load_device, offload_device=offload_device), name
    )


class ClapLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_ClapLoader",
            display_name="CLAP Loader",
            category=types.CATEGORY,
            description="Loads a CLAP audio-text model from models/clap: a transformers folder "
            "(laion/clap-htsat-unfused, laion/larger_clap_music_and_speech, ...) or a laion-clap "
            "checkpoint (630k-audioset-best.pt, ...), converted on load.",
            inputs=[
                io.Combo.Input(
                    "clap_name",
                    options=list_clap_models(),
                    tooltip="A model folder (with config.json) or a .pt/.safetensors file in models/clap. "
                    "laion-clap .pt files are read safely (weights only) and converted on load.",
                ),
            ],
            outputs=[
                types.ClapModel.Output(
                    display_name="clap_model",
                    tooltip="The CLAP model, for CLAP Encode. ComfyUI moves it to the GPU when it is used "
                    "and offloads it when memory is needed.",
                )
            ],
        )

    @classmethod
    def execute(cls, clap_name: str) -> io.NodeOutput:
        encoder = load_clap(resolve_clap_model(clap_name))
        return io.NodeOutput(wrap_encoder(encoder, clap_name))

    @classmethod
    def validate_inputs(cls, clap_name: str) -> bool | str:
        return validation_message(resolve_clap_model, clap_name)


class ClapEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_ClapEncode",
            display_name="CLAP Encode",
            category=types.CATEGORY,
            description="Turns a sound into CLAP embeddings: 48 kHz mono, 10 s windows, one 512-number "
            "vector per sound (or per window).",
            inputs=[
                types.ClapModel.Input("clap_model", tooltip="From CLAP Loader."),
                io.Audio.Input(
                    "audio",
                    tooltip="From Load Audio (CLAP2Diffusion) or core Load Audio; any sample rate and "
                    "channel count.",
                ),
                io.Combo.Input(
                    "window_mode",
                    options=list(EMBED_MODES),
                    default="first",
                    tooltip="Sounds longer than 10 s: 'first' uses the first 10 s; 'mean' averages every "
                    "10 s window; 'per_window' gives one embedding per window (a batch, one image each).",
                ),
            ],
            outputs=[
                types.ClapEmbeds.Output(
                    display_name="clap_embeds",
                    tooltip="L2-normalised CLAP audio embeddings [batch, 512], for Hierarchical Decompose.",
                )
            ],
        )

    @classmethod
    def execute(cls, clap_model: ClapModelHandle, audio: dict, window_mode: str = "first") -> io.NodeOutput:
        waveform, sample_rate = audio["waveform"], int(audio["sample_rate"])
        for warning in validate_waveform(waveform, sample_rate):  # raises AudioError on unusable audio
            log.warning("CLAP Encode: %s", warning)
        encoder = clap_model.load()
        progress: list[comfy.utils.ProgressBar] = []

        def between_batches(done: int, total: int) -> None:
            # A long file in mean/per_window mode is many batches: let Cancel stop it between them.
            mm.throw_exception_if_processing_interrupted()
            if not progress:
                progress.append(comfy.utils.ProgressBar(total))
            progress[0].update_absolute(done, total)

        embeds = encoder.embed(waveform, sample_rate, window_mode, on_batch=between_batches)  # [B', 512]
        return io.NodeOutput(embeds.to(mm.intermediate_device()))


NODES: list[type[io.ComfyNode]] = [ClapLoader, ClapEncode]
