"""CLAP2Diffusion loader, hierarchical decomposition and audio projection nodes."""

from __future__ import annotations

import folder_paths
import torch

from ..clap2diffusion_core.errors import WiringError
from ..clap2diffusion_core.model import CLAP2DiffusionModel
from ..clap2diffusion_core.preview import render_levels
from ..clap2diffusion_core.types import AudioLevels
from . import types
from .api import io, ui
from .managed import load_managed, on_device
from .paths import resolve_model_file, validation_message


def resolve_clap2diffusion(name: str) -> str:
    return resolve_model_file(
        "clap2diffusion", name, "CLAP2Diffusion file", "models/clap2diffusion or the pack's checkpoints folder"
    )


class Clap2DiffusionLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_Clap2DiffusionLoader",
            display_name="CLAP2Diffusion Loader",
            category=types.CATEGORY,
            description="Loads a trained CLAP2Diffusion file (decomposer + projector, + adapters from stage 2).",
            inputs=[
                io.Combo.Input(
                    "clap2diffusion_name",
                    options=folder_paths.get_filename_list("clap2diffusion"),
                    tooltip="A .safetensors file from models/clap2diffusion/ or the pack's checkpoints/ folder. "
                    "Stage 1 files work with Apply Audio to Conditioning; stage 2/3 files also with "
                    "Apply Audio to Model.",
                ),
            ],
            outputs=[
                types.Clap2DiffusionModel.Output(
                    display_name="clap2diffusion",
                    tooltip="The audio modules: wire it into Hierarchical Decompose, Audio Project and (stage 2/3) "
                    "Apply Audio to Model.",
                )
            ],
        )

    @classmethod
    def execute(cls, clap2diffusion_name: str) -> io.NodeOutput:
        # Stored in the dtype model management picks and loaded to the compute device when a node uses
        # it (nodes/managed.py); Apply Audio to Model keeps the adapters' keys/values with the UNet.
        return io.NodeOutput(load_managed(resolve_clap2diffusion(clap2diffusion_name)))

    @classmethod
    def validate_inputs(cls, clap2diffusion_name: str) -> bool | str:
        # ComfyUI 0.3.75 checks a V3 combo's value against its options for no node: do it here, so a
        # shared workflow naming another file is refused before anything runs.
        return validation_message(resolve_clap2diffusion, clap2diffusion_name)


class HierarchicalDecompose(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        level = "How strongly the {} of the sound shapes the image (1 = as the model decided, 0 = off)."
        return io.Schema(
            node_id="C2D_HierarchicalDecompose",
            display_name="Hierarchical Decompose",
            category=types.CATEGORY,
            description="Splits a CLAP embedding into foreground, background and ambience tokens.",
            inputs=[
                types.Clap2DiffusionModel.Input("clap2diffusion", tooltip="From CLAP2Diffusion Loader."),
                types.ClapEmbeds.Input(
                    "clap_embeds",
                    tooltip="From CLAP Encode: one embedding per sound or window.",
                ),
                *types.level_inputs(
                    {
                        "foreground": level.format("foreground (events: thunder, a bark, an engine)"),
                        "background": level.format("background (scenes: rain, crowd, traffic)"),
                        "ambience": level.format("ambience (mood and space: eerie, a quiet room)"),
                    }
                ),
                io.Float.Input(
                    "temperature",
                    default=0.0,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    optional=True,
                    tooltip="Softness of the token-to-level assignment; 0 uses the file's own "
                    "(0.5 after training). Higher spreads tokens across levels.",
                ),
            ],
            outputs=[
                types.AudioLevels.Output(display_name="audio_levels", tooltip="For Audio Project."),
            ],
        )

    @classmethod
    def execute(
        cls,
        clap2diffusion: CLAP2DiffusionModel,
        clap_embeds: torch.Tensor,
        foreground: float,
        background: float,
        ambience: float,
        temperature: float = 0.0,
    ) -> io.NodeOutput:
        levels = on_device(clap2diffusion).encode(clap_embeds, temperature=temperature or None)
        levels = levels.with_level_scale(foreground, background, ambience)
        preview = ui.PreviewImage(render_levels(levels), cls=cls)
        return io.NodeOutput(levels, ui=preview)


def missing_model_input(node: str, feeds: str) -> WiringError:
    """The error of a graph saved before the model got its own wire (0.x: it rode on the data)."""
    return WiringError(
        f"{node}: its 'clap2diffusion' input is not connected. Since the model travels on its own wire, "
        f"{node} takes it directly: connect the output of the CLAP2Diffusion Loader that feeds {feeds} "
        f"to {node}'s 'clap2diffusion' input."
    )


class AudioProject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_AudioProject",
            display_name="Audio Project",
            category=types.CATEGORY,
            description="Projects the decomposed sound to 77 cross-attention tokens (mean norm 60 by default).",
            inputs=[
                types.AudioLevels.Input("audio_levels", tooltip="From Hierarchical Decompose."),
                # Last and optional only so that a graph saved before this input existed keeps its link
                # slots and gets a message that says what to connect, not a bare "required input missing".
                types.Clap2DiffusionModel.Input(
                    "clap2diffusion",
                    optional=True,
                    tooltip="Required. The same CLAP2Diffusion Loader output as Hierarchical Decompose's.",
                ),
            ],
            outputs=[
                types.AudioTokens.Output(
                    display_name="audio_tokens",
                    tooltip="For Apply Audio to Conditioning (any file), Apply Audio to Model (stage 2/3, with "
                    "the same CLAP2Diffusion file) or Save Audio Tokens. From an SDXL file they also carry "
                    "the sound's pooled vector.",
                )
            ],
        )

    @classmethod
    def execute(cls, audio_levels: AudioLevels, clap2diffusion: CLAP2DiffusionModel | None = None) -> io.NodeOutput:
        if clap2diffusion is None:
            raise missing_model_input("Audio Project", "Hierarchical Decompose")
        return io.NodeOutput(on_device(clap2diffusion).project(audio_levels))


NODES = [Clap2DiffusionLoader, HierarchicalDecompose, AudioProject]
