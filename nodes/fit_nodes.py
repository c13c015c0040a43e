"""Fit Audio Projector (from text): a working stage-1 CLAP2Diffusion file from the user's own
CLAP and text encoder, with no data set (see clap2diffusion_core/training/textfit.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

from ..clap2diffusion_core.errors import TextEncoderError
from ..clap2diffusion_core.training.captions import (
    DEFAULT_CORPUS_SIZE,
    build_corpus,
    corpus_hash,
    parse_captions,
)
from ..clap2diffusion_core.training.textfit import (
    Provenance,
    TextFitConfig,
    caption_token_mean,
    fingerprint,
    fit_from_captions,
    save_text_fit,
    tensors_in,
)
from . import types
from .api import io
from .clap_nodes import ClapModelHandle
from .managed import load_managed

log = logging.getLogger(__name__)

#: ComfyUI text-encoder classes the fit serves: -> (family, what the metadata calls it).
SUPPORTED_TEXT_ENCODERS = {"SD1ClipModel": ("sd15", "sd15 CLIP-L"), "SDXLClipModel": ("sdxl", "sdxl CLIP-L + CLIP-G")}
#: Why some text encoders ComfyUI loads are refused (the error names the class and says this).
UNSUPPORTED_WHY = {
    "SD2ClipModel": "SD2.x (OpenCLIP-H, 1024-wide tokens) is not fitted yet",
    "SDXLRefinerClipModel": "the SDXL refiner (CLIP-G alone, 1280-wide tokens) has no CLAP2Diffusion family",
    "SD3ClipModel": "SD3 (CLIP-L + CLIP-G + T5-XXL, 4096-wide tokens) has no CLAP2Diffusion family yet",
    "FluxClipModel": "Flux (T5-XXL tokens + a CLIP-L pooled vector, a transformer, not a UNet) has no "
                     "CLAP2Diffusion family yet",
}
END_TOKEN = 49407  # CLIP's <|endoftext|>, which ComfyUI's SD1 tokenizer also pads with


def text_encoder_family(clip) -> tuple[str, str]:  # noqa: ANN001 (comfy.sd.CLIP)
    """``(family, description)`` of a CLIP object, or an error that names what it is."""
    inner = clip.cond_stage_model
    name = type(inner).__name__
    if name in SUPPORTED_TEXT_ENCODERS and getattr(inner, "clip_name", "l") == "l":
        family, what = SUPPORTED_TEXT_ENCODERS[name]
        return family, f"{what} (comfy {name})"
    why = f" ({UNSUPPORTED_WHY[name]})" if name in UNSUPPORTED_WHY else ""
    raise TextEncoderError(
        f"Fit Audio Projector (from text): the CLIP input is a {name} text encoder "
        f"({type(clip.tokenizer).__name__} tokenizer), which this pack cannot fit for yet{why}. Supported: "
        "SD1.5 checkpoints (CLIP-L, SD1ClipModel) and SDXL-family ones (CLIP-L + CLIP-G, SDXLClipModel). Load "
        "such a checkpoint's CLIP, or use a CLAP2Diffusion file trained for this model."
    )


def end_position(ids: list[int]) -> int:
    """Where a tokenized caption's end token stands (the last position if it was cut off)."""
    return ids.index(END_TOKEN, 1) if END_TOKEN in ids[1:] else len(ids) - 1


@contextlib.contextmanager
def positions_cut(clip, length: int) -> Iterator[None]:  # noqa: ANN001 (comfy.sd.CLIP)
    """Within the block, ComfyUI's CLIP towers read ``length`` token positions, not 77.

    ComfyUI's CLIP adds all 77 position embeddings to whatever it is given, so it cannot take
    shorter inputs. CLIP's text attention is causal: the states up to each caption's end token do
    not depend on what follows, so captions cut after the longest end token give the same values
    there for a fraction of the cost (1,024 captions x 77 positions through CLIP-G take ~20 minutes
    on a 2-core CPU). Each tower's position table is swapped for a view of its first ``length``
    rows and put back afterwards; load the model before (``clip.load_model()``), so that no weight
    patching sees the view.
    """
    tables = [m for m in clip.cond_stage_model.modules() if type(m).__name__ == "CLIPEmbeddings"]
    if not tables:
        raise TextEncoderError(f"{type(clip.cond_stage_model).__name__}: no CLIP position table found, "
                               "so the captions cannot be cut short")
    full = [m.position_embedding.weight for m in tables]
    try:
        for module, weight in zip(tables, full):
            module.position_embedding.weight = torch.nn.Parameter(weight[:length], requires_grad=False)
        yield
    finally:
        for module, weight in zip(tables, full):
            module.position_embedding.weight = weight


def sd15_states(clip, captions: list[str], cut: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """``(states [n, L, C], ends [n])``: ComfyUI's conditioning of each caption (its first 77-token
    section, L = 77) and where its end token stands. One batched forward: the captions go in as
    sections of one prompt, which ComfyUI encodes together and concatenates along the tokens.
    ``cut``: only up to the longest end token (L = its position + 1; the same values, :func:`positions_cut`)."""
    sections, ends = [], []
    for caption in captions:
        tokens = clip.tokenize(caption)
        first = tokens["l"][0]  # a caption longer than 75 tokens keeps its first 77-token section
        ids = [t[0] for t in first]
        ends.append(end_position(ids))
        sections.append([(t[0], 1.0) for t in first])
    length = max(ends) + 1 if cut else len(sections[0])
    clip.load_model()
    with positions_cut(clip, length) if cut else contextlib.nullcontext():
        cond = clip.encode_from_tokens({"l": [s[:length] for s in sections]}).float().cpu()  # [1, L * n, C]
    return cond.reshape(len(captions), -1, cond.shape[-1]), torch.tensor(ends)


def pooled_targets(clip, captions: list[str]) -> torch.Tensor:  # noqa: ANN001
    """``[n, 768]``: for each caption, the mean of ComfyUI's conditioning over its tokens and end
    token (the stage-1 target; what ``ClipTextEncoder`` computes on the command-line path)."""
    return caption_token_mean(*sd15_states(clip, captions, cut=True))


def sdxl_states(clip, captions: list[str], cut: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """SDXL's conditioning from ComfyUI's own CLIP: ``(states [n, L, 2048], ends [n], pooled [n, 1280])``,
    CLIP-L + CLIP-G penultimate states side by side (L = 77, or with ``cut`` the longest end token's
    position + 1, :func:`positions_cut`), each caption's end token, and its pooled vector (CLIP-G's
    projected end token).

    ``encode_from_tokens`` keeps only the first section's pooled vector, so captions cannot share
    one call as on the SD1.5 path, and one call per caption costs 3x more on a CPU (ComfyUI casts
    every fp16 weight on each call). So this does what ``encode_from_tokens`` does (clip skip, the
    patched weights loaded) and what ``SDXLClipModel.encode_token_weights`` does for unweighted
    tokens (each tower's ``encode``, side by side), for the whole batch at once.
    """
    ids_l, ids_g, ends = [], [], []
    for caption in captions:
        tokens = clip.tokenize(caption)  # a caption longer than 75 tokens keeps its first 77-token section
        ids_l.append([t[0] for t in tokens["l"][0]])
        ids_g.append([t[0] for t in tokens["g"][0]])
        ends.append(end_position(ids_l[-1]))
    length = max(ends) + 1 if cut else len(ids_l[0])
    inner = clip.cond_stage_model
    inner.reset_clip_options()
    if clip.layer_idx is not None:
        inner.set_clip_options({"layer": clip.layer_idx})
    clip.load_model()
    with positions_cut(clip, length) if cut else contextlib.nullcontext():
        out_l = inner.clip_l.encode([ids[:length] for ids in ids_l])[0]
        out_g, pooled = inner.clip_g.encode([ids[:length] for ids in ids_g])[:2]
    cond = torch.cat([out_l, out_g], dim=-1).float().cpu()  # [n, L, 2048]
    return cond, torch.tensor(ends), pooled.float().cpu()


def sdxl_targets(clip, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """SDXL's targets: ``([n, 2048], [n, 1280])``, for each caption the mean of its conditioning over
    its tokens and end token (:func:`sdxl_states`, cut after the longest end token), and its pooled vector."""
    cond, ends, pooled = sdxl_states(clip, captions, cut=True)
    return caption_token_mean(cond, ends), pooled


#: Each family's targets from ComfyUI's CLIP object: ``(clip, captions) ->`` what ``fit_from_captions`` wants.
TARGETS = {"sd15": pooled_targets, "sdxl": sdxl_targets}


#: CLIP weights the fit's targets never read: CLIP-L's projection (SD1.5 and SDXL take CLIP-L's
#: hidden states, never its projected pooled output). Checkpoints do not ship it, so ComfyUI leaves
#: it as uninitialised memory: hashed, it gave the same inputs a new name on every load.
UNREAD_CLIP_WEIGHTS = frozenset({"clip_l.transformer.text_projection.weight"})


def clip_fingerprint(clip) -> str:  # noqa: ANN001
    """The CLIP object's weights, its LoRA patches and its clip skip (what changes its conditioning).
    Weights the conditioning never reads (:data:`UNREAD_CLIP_WEIGHTS`) are left out."""
    patches = getattr(clip.patcher, "patches", {})
    weights = [(k, v) for k, v in clip.cond_stage_model.state_dict().items() if k not in UNREAD_CLIP_WEIGHTS]
    named = [*weights, *tensors_in(patches, "patches")]
    strengths = [(key, p[0], p[2]) for key in sorted(patches) for p in patches[key]]  # LoRA strengths
    return fingerprint(named, extra=f"layer_idx={getattr(clip, 'layer_idx', None)} {strengths}")


class FitAudioProjectorFromText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        defaults = TextFitConfig()
        return io.Schema(
            node_id="C2D_FitAudioProjectorFromText",
            display_name="Fit Audio Projector (from text)",
            category=types.CATEGORY,
            description="Makes a stage-1 CLAP2Diffusion file from your CLAP and this checkpoint's text encoder, "
            "with no data set: it learns from sound captions (CLAP's text embedding of each caption -> the "
            "text encoder's conditioning of it), then CLAP's audio embedding is fed in its place. Saved in "
            "models/clap2diffusion; the same inputs later load that file instead of fitting again.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder the images are made with: an SD1.5 or SDXL-family "
                              "checkpoint's CLIP (SDXL files also get a pooled head)."),
                types.ClapModel.Input(
                    "clap_model", tooltip="From CLAP Loader: the CLAP whose audio you will encode (its text tower "
                    "is used for the fit)."),
                io.Int.Input("corpus_size", default=DEFAULT_CORPUS_SIZE, min=2, max=20000,
                             tooltip="Captions to fit on, your own first, then generated from the pack's sound "
                             "vocabulary (every sound once, then mixtures of an event, a scene and a mood). "
                             "The fit itself is solved in closed form (under 30 s on a 2-core CPU); encoding the "
                             "captions takes the rest (1,024: about 1 minute in all for SD1.5, 3 for SDXL on such a "
                             "CPU). The file is then reused."),
                io.Int.Input("steps", default=defaults.steps, min=0, max=20000,
                             tooltip="Extra gradient steps after the closed-form fit (batch of 64 captions). 0, the "
                             "default, keeps the solved model; steps are experimental and slow on a CPU."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the generated captions and of the fit: same seed, same file."),
                io.String.Input("extra_captions", default="", multiline=True, optional=True,
                                tooltip="Your own sound captions, one per line ('#' starts a comment). They "
                                "come first and count towards corpus_size."),
            ],
            outputs=[
                types.Clap2DiffusionModel.Output(
                    display_name="clap2diffusion",
                    tooltip="A stage-1 file for Hierarchical Decompose and Audio Project (Apply Audio to "
                    "Conditioning); it has no adapters, so not for Apply Audio to Model."),
            ],
        )

    @classmethod
    def execute(cls, clip, clap_model: ClapModelHandle, corpus_size: int, steps: int, seed: int,
                extra_captions: str = "") -> io.NodeOutput:  # noqa: ANN001
        start = time.perf_counter()
        family, what = text_encoder_family(clip)
        captions = [c.text for c in build_corpus(corpus_size, seed, parse_captions(extra_captions or ""))]
        config = TextFitConfig(steps=steps, seed=seed)
        provenance = Provenance(
            corpus_sha256=corpus_hash(captions), corpus_size=len(captions),
            # The fit reads CLAP's text tower only, so that tower names the CLAP (the CLI does the same).
            clap_fingerprint=fingerprint(clap_model.text_patcher().model.state_dict().items()),
            text_encoder_fingerprint=clip_fingerprint(clip),
            text_encoder=what, text_fit=config,
        )
        name = f"{provenance.file_stem(family)}.safetensors"
        existing = folder_paths.get_full_path("clap2diffusion", name)
        if existing is not None:
            model = load_managed(existing)
            log.info("Fit Audio Projector (from text): reused %s (%.2f s)", name, time.perf_counter() - start)
            return io.NodeOutput(model)

        bar = comfy.utils.ProgressBar(2 * len(captions) + max(steps, 1))  # steps 0: the solve is one unit
        offsets = {"clap": 0, "targets": len(captions), "fit": 2 * len(captions)}

        def progress(phase: str, done: int, total: int) -> None:
            mm.throw_exception_if_processing_interrupted()  # Cancel: stops here, nothing is written
            bar.update_absolute(offsets[phase] + done)

        device = mm.get_torch_device()
        targets = TARGETS[family]
        model = fit_from_captions(captions, clap_model.load_text().encode_text, lambda texts: targets(clip, texts),
                                  config, progress, device=device)
        path = os.path.join(folder_paths.get_folder_paths("clap2diffusion")[0], name)
        save_text_fit(model, path, provenance)
        log.info("Fit Audio Projector (from text): fitted %d captions, %d steps -> %s (%.1f s)",
                 len(captions), steps, path, time.perf_counter() - start)
        return io.NodeOutput(load_managed(path))


NODES: list[type[io.ComfyNode]] = [FitAudioProjectorFromText]
