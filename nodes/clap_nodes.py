"""CLAP Loader and CLAP Encode: sound -> CLAP_EMBEDS ([B, 512]), through ComfyUI's model management."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy.model_patcher import ModelPatcher

from ..clap2diffusion_core.audio import check_waveform, count_windows, open_sound
from ..clap2diffusion_core.clap import (
    CHECKPOINT_EXTENSIONS,
    BatchCallback,
    ClapAudioTower,
    ClapEncoder,
    ClapTextTower,
    load_clap_tower,
)
from . import types
from .api import io
from .audio_nodes import LoadAudio, audio_file_input, resolve_input_file, sound_warnings
from .paths import resolve_model_file, validation_message

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
    """The CLAP_MODEL socket value: where the model is, and each tower once loaded.

    The towers load separately, on first use, each inside its own ModelPatcher so ComfyUI moves
    and offloads it: the audio tower for the nodes that encode sound, the text tower only for the
    nodes that need text (Audio to Prompt, the text fit). A graph that only encodes sound never
    holds the text tower's ~480 MB.

    Text tower for other nodes: ``clap_model.load_text()`` returns a
    :class:`~clap2diffusion_core.clap.ClapTextTower` on the compute device (``encode_text(texts)``
    -> ``[N, 512]``); ``clap_model.text_patcher()`` is its ModelPatcher.
    """

    name: str
    path: str
    patchers: dict[str, ModelPatcher] = field(default_factory=dict)

    def audio_patcher(self) -> ModelPatcher:
        return self._patcher("audio")

    def text_patcher(self) -> ModelPatcher:
        return self._patcher("text")

    def load_audio(self) -> ClapAudioTower:
        """The audio tower on the compute device (ComfyUI frees memory for it if needed)."""
        patcher = self.audio_patcher()
        mm.load_model_gpu(patcher)
        return patcher.model

    def load_text(self) -> ClapTextTower:
        """The text tower on the compute device (ComfyUI frees memory for it if needed)."""
        patcher = self.text_patcher()
        mm.load_model_gpu(patcher)
        return patcher.model

    def _patcher(self, tower: str) -> ModelPatcher:
        patcher = self.patchers.get(tower)
        if patcher is None:
            patcher = self.patchers[tower] = wrap_tower(load_clap_tower(self.path, tower))
        return patcher


def wrap_tower(tower: torch.nn.Module) -> ModelPatcher:
    load_device = mm.text_encoder_device()
    offload_device = mm.text_encoder_offload_device()
    # float32: CLAP is small and its embedding steers the whole image.
    tower = tower.to(device=offload_device, dtype=torch.float32)
    return ModelPatcher(tower, load_device=load_device, offload_device=offload_device)


def wrap_encoder(encoder: ClapEncoder, name: str) -> ClapModelHandle:
    """A CLAP_MODEL around a whole in-memory :class:`ClapEncoder` (both towers at once), for code
    that built or trained one itself rather than loading it from models/clap."""
    return ClapModelHandle(name=name, path="", patchers={"audio": wrap_tower(encoder.audio),
                                                          "text": wrap_tower(encoder.text)})


def handle_for(path: str, name: str) -> ClapModelHandle:
    """A CLAP_MODEL for ``path``; towers load when a node first needs them."""
    return ClapModelHandle(name=name, path=path)


# --------------------------------------------------------------------------------------------
# The one encode path: every node that turns sound into CLAP embeddings goes through here.


def progress_callback(node: str) -> BatchCallback:
    """Per batch of windows: Cancel stops the encode there, and the node's progress bar moves.
    Every node that runs CLAP over windows passes this as its ``on_batch``."""
    bar: list[comfy.utils.ProgressBar] = []

    def between_batches(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        if not bar or bar[0].total != total:
            bar[:] = [comfy.utils.ProgressBar(total)]
        bar[0].update_absolute(done, total)

    return between_batches


def check_audio(audio: dict, node: str) -> tuple[torch.Tensor, int, dict[str, list[str]]]:
    """An AUDIO input through the sound check: ``(waveform, sample_rate, ui)``. Raises ``AudioError``
    on unusable audio. A sound is scanned once (one Load Audio output feeds several nodes) and its
    warnings logged once; every node that takes it shows them in its UI output."""
    waveform, sample_rate = audio["waveform"], int(audio["sample_rate"])
    warnings, first_time = check_waveform(waveform, sample_rate)
    return waveform, sample_rate, sound_warnings(node, warnings, log_them=first_time)


def encode_audio(clap_model: ClapModelHandle, audio: dict, window_mode: str,
                 node: str) -> tuple[torch.Tensor, dict[str, list[str]]]:  # fmt: skip
    """ComfyUI AUDIO -> (``[B', 512]`` CLAP embeddings (see ``ClapAudioTower.embed``), UI warnings),
    streamed by windows, with progress and Cancel per batch; checked by :func:`check_audio`."""
    waveform, sample_rate, shown = check_audio(audio, node)
    tower = clap_model.load_audio()
    embeds = tower.embed(waveform, sample_rate, window_mode, on_batch=progress_callback(node))
    return embeds.to(mm.intermediate_device()), shown


def encode_audio_file(clap_model: ClapModelHandle, path: str, window_mode: str, max_seconds: float,
                      node: str) -> tuple[torch.Tensor, dict[str, list[str]]]:  # fmt: skip
    """A file in the input folder -> (``[1', 512]``, UI warnings), decoded and encoded a batch of
    windows at a time: memory holds a few windows, not the file (an hour of audio is about 700 MB
    decoded). The sound check runs as the file is read (each piece, then the whole), so this path
    refuses and warns as Load Audio does; in 'first' mode it judges the 11 s it reads."""
    limit = max_seconds or None
    if window_mode == "first":  # the first window and the resampler's context: stop reading there
        limit = min(limit or 11.0, 11.0)
    stream = open_sound(path, max_seconds=limit)
    try:
        samples, sample_rate = stream.estimated_samples, stream.sample_rate
        total = 1 if window_mode == "first" else (count_windows(samples, sample_rate) if samples else None)
        tower = clap_model.load_audio()
        embeds = tower.embed_stream(iter(stream), sample_rate, window_mode, total, on_batch=progress_callback(node))
    finally:
        stream.close()
    return embeds.to(mm.intermediate_device()), sound_warnings(node, stream.finish())


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
        handle = handle_for(resolve_clap_model(clap_name), clap_name)
        # A broken or mismatched file is named on this node, before anything downstream runs: the
        # audio tower loads here and stays (every graph that encodes sound needs it); the text tower
        # is built once to check its weights against the config, then dropped, and loads again only
        # in the nodes that need text.
        handle.audio_patcher()
        load_clap_tower(handle.path, "text")
        return io.NodeOutput(handle)

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
                types.window_mode_input(
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
        embeds, shown = encode_audio(clap_model, audio, window_mode, "CLAP Encode")  # [B', 512]
        return io.NodeOutput(embeds, ui=shown or None)


class ClapEncodeFile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_ClapEncodeFile",
            display_name="CLAP Encode File (streamed)",
            category=types.CATEGORY,
            description="CLAP Encode straight from a file in the input folder, decoding and encoding "
            "a few windows at a time: an hour-long recording in 'mean' or 'per_window' mode needs "
            "no more memory than 10 s of it.",
            inputs=[
                types.ClapModel.Input("clap_model", tooltip="From CLAP Loader."),
                audio_file_input(),
                types.window_mode_input(
                    default="mean",
                    tooltip="'first': the first 10 s; 'mean': the average of every 10 s window; "
                    "'per_window': one embedding per window (a batch, one image each).",
                ),
                io.Float.Input(
                    "max_seconds",
                    default=0.0,
                    min=0.0,
                    max=86400.0,
                    step=1.0,
                    tooltip="Read at most this many seconds from the start (0 = the whole file).",
                ),
            ],
            outputs=[
                types.ClapEmbeds.Output(
                    display_name="clap_embeds",
                    tooltip="L2-normalised CLAP audio embeddings [windows or 1, 512], for Hierarchical "
                    "Decompose.",
                )
            ],
        )

    @classmethod
    def execute(cls, clap_model: ClapModelHandle, audio: str, window_mode: str = "mean",
                max_seconds: float = 0.0) -> io.NodeOutput:  # fmt: skip
        path = resolve_input_file(audio)
        embeds, shown = encode_audio_file(clap_model, path, window_mode, max_seconds, "CLAP Encode File")
        return io.NodeOutput(embeds, ui=shown or None)

    @classmethod
    def fingerprint_inputs(cls, clap_model=None, audio: str = "", window_mode: str = "mean",
                           max_seconds: float = 0.0) -> str:  # fmt: skip
        # Re-run when the file's bytes change, as Load Audio does.
        return f"{LoadAudio.fingerprint_inputs(audio, max_seconds)}:{window_mode}"

    @classmethod
    def validate_inputs(cls, audio: str) -> bool | str:
        return LoadAudio.validate_inputs(audio)


NODES: list[type[io.ComfyNode]] = [ClapLoader, ClapEncode, ClapEncodeFile]
