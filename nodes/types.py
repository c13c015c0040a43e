"""ComfyUI socket types this pack adds, in one place so every node module agrees on the names."""

from ..clap2diffusion_core.clap import EMBED_MODES
from .api import io

#: A loaded CLAP model (``nodes.clap_nodes.ClapModelHandle``).
ClapModel = io.Custom("CLAP_MODEL")
#: L2-normalised CLAP audio embeddings, ``Tensor[B, 512]``.
ClapEmbeds = io.Custom("CLAP_EMBEDS")
#: A loaded CLAP2Diffusion file (``clap2diffusion_core.model.CLAP2DiffusionModel``).
Clap2DiffusionModel = io.Custom("CLAP2DIFFUSION")
#: ``clap2diffusion_core.types.AudioLevels``: data only (the model travels on CLAP2DIFFUSION).
AudioLevels = io.Custom("AUDIO_LEVELS")
#: ``clap2diffusion_core.types.AudioTokens``: ``[B, 77, C]`` tokens for either injection, with their
#: level weights and the fingerprint of the file that made them; no model.
AudioTokens = io.Custom("AUDIO_TOKENS")

CATEGORY = "audio/clap2diffusion"


def level_inputs(tooltips: dict[str, str]) -> list[io.Float.Input]:
    """The foreground / background / ambience weight widgets (same range on every node), in that order."""
    return [
        io.Float.Input(level, default=1.0, min=0.0, max=4.0, step=0.05, tooltip=tooltips[level])
        for level in ("foreground", "background", "ambience")
    ]


def window_mode_input(default: str, tooltip: str) -> io.Combo.Input:
    """How a sound longer than CLAP's 10 s window is heard: 'first', 'mean' or 'per_window'."""
    return io.Combo.Input("window_mode", options=list(EMBED_MODES), default=default, tooltip=tooltip)
