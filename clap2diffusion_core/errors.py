"""Every error the pack raises on purpose, under one base class.

Each message names what was expected, what was found and what to do. All derive from
:class:`Clap2DiffusionError` (a ``ValueError``: every one of them is a bad input, a bad file or a
bad wiring, never a bug), so a caller can catch the pack's errors apart from anything else.
The modules that raise them re-export them under their historical names.
"""

from __future__ import annotations

# ComfyUI's error panel names an exception by ``type(e).__module__``; it imports a custom node
# pack under its folder's full path, which would show the server's filesystem path there. Each
# error names the module by its place in the pack instead ("clap2diffusion_core.errors").
_MODULE = __name__[__name__.rfind("clap2diffusion_core"):] if "clap2diffusion_core" in __name__ else __name__


class Clap2DiffusionError(ValueError):
    """Base of the pack's errors."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__ == __name__:
            cls.__module__ = _MODULE


Clap2DiffusionError.__module__ = _MODULE


class AudioError(Clap2DiffusionError):
    """A sound that cannot be read or used (empty, silent, NaN, unreadable); the message says why."""


class ClapError(Clap2DiffusionError):
    """A CLAP model folder or file that cannot be loaded; the message says what is missing."""


class CheckpointError(Clap2DiffusionError):
    """A file that is not a usable CLAP2Diffusion checkpoint; the message says what and what to do."""


class ModelMismatchError(Clap2DiffusionError):
    """A base MODEL that the CLAP2Diffusion file does not fit (another architecture, another layout)."""


class AudioNotReachedError(ModelMismatchError):
    """Apply Audio to Model's audio attention cannot act in layers it patched: a node after it swapped
    the UNet or replaced those layers' attention without calling it; the message says which order works."""


class WiringError(Clap2DiffusionError):
    """Data on a socket that does not belong with the rest of the graph (tokens from another
    CLAP2Diffusion file, an input missing after a pack update); the message says what to rewire."""


class FileNameError(Clap2DiffusionError):
    """A file name from a graph that is not a file inside the folder its loader reads from."""


class TokensFileError(Clap2DiffusionError):
    """A saved audio-tokens file that cannot be read back (not safetensors, not tokens, a pickle)."""


class LaionConversionError(Clap2DiffusionError):
    """A LAION-CLAP checkpoint that cannot be converted."""


class VocabularyError(Clap2DiffusionError):
    """A sound-label vocabulary file that is malformed."""


class FeatureCacheError(Clap2DiffusionError):
    """A training feature cache that does not match the data or the models."""


class ManifestError(Clap2DiffusionError):
    """A training manifest that is malformed or names missing files."""


class CorpusError(Clap2DiffusionError):
    """Captions the text fit cannot learn from (fewer than two different ones)."""


class TextEncoderError(Clap2DiffusionError):
    """A text encoder (ComfyUI CLIP object) the text fit cannot serve; the message names it."""


class FrameBatchError(WiringError):
    """Per-frame audio tokens whose row count does not match the latents they are sampled with (row i
    is for latent i); the message says which counts to make equal."""
