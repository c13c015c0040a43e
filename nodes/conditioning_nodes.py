"""Conditioning injection: audio tokens appended to a text CONDITIONING."""

from __future__ import annotations

from ..clap2diffusion_core.checkpoint import check_context_dim
from ..clap2diffusion_core.conditioning import append_audio_tokens
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
            "cross-attention. Wire the positive prompt through it; the negative stays audio-free.",
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
                    tooltip="Scale of the audio tokens. 0 returns the conditioning unchanged (the text-only image).",
                ),
            ],
            outputs=[io.Conditioning.Output(tooltip="Text + sound; goes to KSampler or ControlNet Apply.")],
        )

    @classmethod
    def execute(cls, conditioning: list, audio_tokens: AudioTokens, strength: float) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(conditioning)
        for text, _ in conditioning:
            # Name both base models, not only both sizes (SD2 is 1024, SDXL 2048).
            check_context_dim(audio_tokens.context_dim, text.shape[-1], "this conditioning")
        # The user's level weights act here, once (the model injection applies them in the adapter).
        tokens = audio_tokens.weighted()
        out = [[append_audio_tokens(text, tokens, strength), options.copy()] for text, options in conditioning]
        return io.NodeOutput(out)


NODES = [ApplyAudioToConditioning]
