"""Conditioning injection: audio tokens appended to a text CONDITIONING."""

from __future__ import annotations

from ..clap2diffusion_core.conditioning import apply_audio_to_conditioning
from ..clap2diffusion_core.types import AudioTokens
from . import types
from .api import io


class ApplyAudioToConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="C2D_ApplyAudioToConditioning",
            display_name="Apply Audio to Conditioning",
            category=types.CATEGORY,
            description="Appends the audio tokens to the text tokens, so the prompt and the sound share the "
            "cross-attention; with an SDXL file it also mixes the sound's pooled vector into the prompt's. "
            "Wire the positive prompt through it; the negative stays audio-free.",
            inputs=[
                io.Conditioning.Input(
                    "conditioning",
                    tooltip="Usually the positive prompt from CLIP Text Encode.",
                ),
                types.AudioTokens.Input(
                    "audio_tokens",
                    tooltip="From Audio Project or Load Audio Tokens. One row for every latent, or one row per "
                    "frame (CLAP Encode Frames): then latent i hears row i, and the latent batch must have as "
                    "many latents as rows (ComfyUI repeats or cuts rows to fit, without a word).",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=3.0,
                    step=0.01,
                    tooltip="Scale of the audio tokens. 0 returns the conditioning unchanged (the text-only image). "
                    "SDXL files also move the pooled vector from the prompt's towards the sound's: halfway at 1, "
                    "all the way at 2 and above.",
                ),
            ],
            outputs=[io.Conditioning.Output(tooltip="Text + sound; goes to KSampler or ControlNet Apply.")],
        )

    @classmethod
    def execute(cls, conditioning: list, audio_tokens: AudioTokens, strength: float) -> io.NodeOutput:
        return io.NodeOutput(apply_audio_to_conditioning(conditioning, audio_tokens, strength))


NODES = [ApplyAudioToConditioning]
