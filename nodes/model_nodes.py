"""Model injection node: gated audio cross-attention in every UNet cross-attention layer."""

from __future__ import annotations

from comfy.model_patcher import ModelPatcher

from ..clap2diffusion_core.model import CLAP2DiffusionModel
from ..clap2diffusion_core.types import AudioTokens
from . import types
from .api import io
from .clap2diffusion_nodes import missing_model_input
from .model_patch import apply_audio_to_model


class ApplyAudioToModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_ApplyAudioToModel",
            display_name="Apply Audio to Model",
            category=types.CATEGORY,
            description="Adds a gated audio cross-attention beside the text one in every cross-attention "
            "layer of the UNet (needs a stage 2/3 CLAP2Diffusion file, on its own wire, and tokens made by "
            "that file). Returns a patched copy: the input MODEL is unchanged. Works with LoRA and "
            "ControlNet; chain two for two sounds. The level weights are set on Hierarchical Decompose.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5- or SDXL-family MODEL (the family the CLAP2Diffusion file was made for), e.g. from Load Checkpoint or a LoRA loader."),
                types.AudioTokens.Input(
                    "audio_tokens",
                    tooltip="From Audio Project or Load Audio Tokens, made by the CLAP2Diffusion file wired below. "
                    "One row for every latent, or one row per frame (CLAP Encode Frames): then latent i hears "
                    "row i, and the latent batch must have as many latents as rows (checked before sampling).",
                ),
                # Optional only so that a graph saved before this input existed gets a message that says
                # what to connect, not a bare "required input missing".
                types.Clap2DiffusionModel.Input(
                    "clap2diffusion", optional=True,
                    tooltip="Required. A stage 2/3 CLAP2Diffusion Loader output (its adapter layers): the "
                    "file that made the audio tokens.",
                ),
                io.Float.Input(
                    "strength", default=1.0, min=0.0, max=4.0, step=0.01,
                    tooltip="Scale of the audio attention. 0 gives exactly the image without audio.",
                ),
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                    tooltip="Sampling progress at which the sound starts to act (0 = first step).",
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                    tooltip="Sampling progress after which the sound stops acting (1 = last step).",
                ),
            ],
            outputs=[
                io.Model.Output(
                    tooltip="The MODEL with audio attention; unconditional rows hear silence, so CFG pushes "
                    "toward the sound. Goes to KSampler (or another Apply Audio to Model)."
                )
            ],
        )  # fmt: skip

    @classmethod
    def execute(
        cls,
        model: ModelPatcher,
        audio_tokens: AudioTokens,
        strength: float,
        start_percent: float,
        end_percent: float,
        clap2diffusion: CLAP2DiffusionModel | None = None,
    ) -> io.NodeOutput:
        if clap2diffusion is None:
            raise missing_model_input("Apply Audio to Model", "Audio Project")
        patched = apply_audio_to_model(model, clap2diffusion, audio_tokens, strength, start_percent, end_percent)
        return io.NodeOutput(patched)


NODES = [ApplyAudioToModel]
