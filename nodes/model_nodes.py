"""Model injection node: gated audio cross-attention in every UNet cross-attention layer."""

from __future__ import annotations

from comfy.model_patcher import ModelPatcher

from ..clap2diffusion_core.types import AudioTokens
from . import types
from .api import io
from .model_patch import apply_audio_to_model


class ApplyAudioToModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        level = "Weight of the {} tokens in the audio attention (1 = as trained, 0 = off)."
        return io.Schema(
            node_id="C2D_ApplyAudioToModel",
            display_name="Apply Audio to Model",
            category=types.CATEGORY,
            description="Adds a gated audio cross-attention beside the text one in every cross-attention "
            "layer of the UNet (needs a stage 2/3 CLAP2Diffusion file). Returns a patched copy: the input "
            "MODEL is unchanged. Works with LoRA and ControlNet; chain two for two sounds.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5-family MODEL, e.g. from Load Checkpoint or a LoRA loader."),
                types.AudioTokens.Input(
                    "audio_tokens",
                    tooltip="From Audio Project, made with a stage 2/3 file (one with adapter layers).",
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
                *types.level_inputs({
                    "foreground": level.format("foreground (events: thunder, a bark); routed mostly to the last blocks"),
                    "background": level.format("background (scenes: rain, crowd); routed mostly to the middle blocks"),
                    "ambience": level.format("ambience (mood, space); routed mostly to the first blocks"),
                }),
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
        foreground: float,
        background: float,
        ambience: float,
    ) -> io.NodeOutput:
        patched = apply_audio_to_model(
            model, audio_tokens, strength, start_percent, end_percent,
            level_weights=(foreground, background, ambience),
        )  # fmt: skip
        return io.NodeOutput(patched)


NODES = [ApplyAudioToModel]
