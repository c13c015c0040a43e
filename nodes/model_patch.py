"""The model injection on ComfyUI's side: gated audio cross-attention composed into ``attn2``.

ComfyUI runs a layer's ``attn2`` replace patch with the layer's projected q, k, v (so LoRA weight
patches on to_q/to_k/to_v apply) and applies the layer's to_out to what it returns. Ours adds the
audio to whatever that layer would compute without us:

    inner = the replace ComfyUI would call at this layer, else the text attention
    out   = inner(q, k, v) + attn(q, k_audio, v_audio * w)       # clap2diffusion_core.audio_attention

**Composed at call time, never stored in the patch table.** ``apply_audio_to_model`` leaves the
MODEL's ``patches_replace`` alone and registers one :class:`AudioInjection` as a
``DIFFUSION_MODEL`` wrapper (ComfyUI's patcher-extension API). At each UNet call the wrapper reads
the attn2 table the UNet is about to use (whatever any pack put there, before or after ours, at a
``(block, number)`` or ``(block, number, transformer_index)`` key, in place or not), and hands the
UNet a copy in which each of our layers' three-part key holds an :class:`AudioAttn2Patch` wrapping
exactly what ComfyUI would have called there (the three-part entry, else the two-part one, else
nothing). So the order of Apply Audio to Model and other attention patches does not matter, a
patch added after ours is never shadowed, and no shared patch object is ever mutated. Packs that
stack IPAdapter-style (``.add`` on the object at a key) never meet our object, so it needs no
``.add``. Two sounds are two wrappers; the later one wraps the earlier one's layers.

**Never a silent drop.** Before sampling (ON_PRE_RUN) the injection checks that the UNet that will
run still has every layer it patches (a later node may swap the UNet); after the first UNet call
of a run it checks that every one of its layers was reached (a later wrapper may replace the attn2
entries without calling them). Either failure raises :class:`AudioNotReachedError`, which names
what stood in the way and the order that works.

**Per-frame tokens.** Tokens with one row per frame give latent i row i, in the cond half of the
UNet batch (the uncond half hears silence). The row count must equal the latent batch: an
OUTER_SAMPLE wrapper refuses any other before the first step, and a UNet call holding a context
window of the frames (core Context Windows, AnimateDiff-Evolved) hears that window's rows
(:func:`frame_window`); any other split is the same :class:`FrameBatchError`, never a repeat or cut.

Cost per step: the audio keys/values of every layer, for the sound and for silence, are computed
once when the node runs (:class:`~clap2diffusion_core.audio_attention.AudioKV`), held in their own
ModelPatcher (an additional model of the patched MODEL, so ComfyUI loads them with the UNet and
offloads them after) and stored in the UNet's compute dtype. A step adds one attention over 77
tokens and one add per layer; the per-row stack for a batch layout (``cond_or_uncond``) is
assembled on the first step and reused, and so is the composed attn2 table (until the table or
the UNet changes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import CallbacksMP, WrappersMP

from ..clap2diffusion_core.adapters import AdapterLayer, AudioAdapter, canonical_order
from ..clap2diffusion_core.audio_attention import COND, AudioKV, add_audio, frame_mismatch, frame_rows
from ..clap2diffusion_core.errors import AudioNotReachedError, CheckpointError, ModelMismatchError
from ..clap2diffusion_core.model import CLAP2DiffusionModel
from ..clap2diffusion_core.types import AudioTokens
from .managed import on_device

log = logging.getLogger(__name__)

#: Key of our DIFFUSION_MODEL wrappers, ON_PRE_RUN callbacks and additional models on a ModelPatcher.
CALLBACK_KEY = "clap2diffusion_audio"

Attn2Replace = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]
LayerKey = tuple[str, int, int]


# ------------------------------------------------------------------------------------------------
# layout of a ComfyUI UNet


def comfy_layout(model: ModelPatcher) -> tuple[tuple[AdapterLayer, ...], int | None]:
    """The cross-attention layers of ``model``'s UNet in canonical order, and their context size."""
    unet = model.get_model_object("diffusion_model")
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    return unet_layout(unet, unet_config)


def cross_attentions(unet: torch.nn.Module) -> dict[LayerKey, tuple[str, torch.nn.Module]]:
    """``{(block, number, transformer_index): (ldm name prefix, attn2 module)}`` of a ComfyUI UNetModel.

    Keys are those BasicTransformerBlock looks up; empty if ``unet`` is not a UNetModel.
    """
    if not hasattr(unet, "input_blocks"):
        return {}
    groups: list[tuple[str, int, str, Any]] = [
        ("input", i, f"input_blocks.{i}", m) for i, m in enumerate(unet.input_blocks)
    ]
    if unet.middle_block is not None:
        groups.append(("middle", 0, "middle_block", unet.middle_block))
    groups += [("output", i, f"output_blocks.{i}", m) for i, m in enumerate(unet.output_blocks)]
    found: dict[LayerKey, tuple[str, torch.nn.Module]] = {}
    for block, number, prefix, seq in groups:
        for pos, module in enumerate(seq):
            if not isinstance(module, SpatialTransformer):
                continue
            for t, tb in enumerate(module.transformer_blocks):
                attn = getattr(tb, "attn2", None)
                if attn is None or getattr(tb, "switch_temporal_ca_to_sa", False):
                    continue
                found[(block, number, t)] = (f"{prefix}.{pos}.transformer_blocks.{t}.attn2", attn)
    return found


def unet_layout(unet: torch.nn.Module, unet_config: dict) -> tuple[tuple[AdapterLayer, ...], int | None]:
    """The cross-attention layers of a ComfyUI ``UNetModel`` and their context size (None if mixed).

    The diffusers names come from ComfyUI's own ``unet_to_diffusers`` map (empty if it has none).
    """
    if not hasattr(unet, "input_blocks"):
        raise ModelMismatchError(
            f"Apply Audio to Model needs an SD1.5- or SDXL-family UNet; this MODEL is {type(unet).__name__}"
        )
    to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(unet_config).items()}
    layers: list[AdapterLayer] = []
    context_dims: set[int] = set()
    for key, (ldm, attn) in cross_attentions(unet).items():
        name = to_diffusers.get(f"{ldm}.to_q.weight", "").removesuffix(".to_q.weight")
        layers.append(AdapterLayer(key, name, attn.heads * attn.dim_head, attn.heads))
        context_dims.add(attn.to_k.in_features)
    layers.sort(key=lambda layer: canonical_order(layer.key))
    return tuple(layers), (context_dims.pop() if len(context_dims) == 1 else None)


def compute_dtype(model: ModelPatcher) -> torch.dtype:
    """The dtype the UNet computes in (what q arrives in): manual_cast_dtype, else its weights'."""
    return getattr(model.model, "manual_cast_dtype", None) or model.model_dtype() or torch.float32


# ------------------------------------------------------------------------------------------------
# the text attention, as the unpatched layer calls it


def text_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict, layer: torch.nn.Module | None = None
) -> torch.Tensor:
    """Exactly what the unpatched ``CrossAttention`` ``layer`` computes between to_q/to_k/to_v and to_out.

    ``optimized_attention`` is looked up at call time: it is chosen when ComfyUI starts (pytorch,
    xformers, sage, sub-quadratic, ...) and must be the function the plain model uses. Newer ComfyUI
    (0.38) layers own an attention preference (``layer.comfy_attention``) that they pass as
    ``preferred_attention=`` with q/k/v wrapped in ``AttentionTensorContainer`` (it lets a backend
    such as int8 attention take ownership); both are passed through where they exist (feature
    detection, so 0.3.x, which has neither, gets the plain call).
    """
    kwargs: dict[str, Any] = {
        "attn_precision": extra_options.get("attn_precision"),
        "transformer_options": extra_options,
    }
    preferred = getattr(layer, "comfy_attention", None)
    if preferred is not None:
        kwargs["preferred_attention"] = preferred
        container = getattr(comfy_attention, "AttentionTensorContainer", None)
        if container is not None:
            q, k, v = container(q), container(k), container(v)
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"], **kwargs)


# ------------------------------------------------------------------------------------------------
# context windows: which frames a UNet call holds


def frame_window(options: dict) -> list[int] | None:
    """The indices, in the whole batch of frames, of the latents a context-window sampler put in
    this UNet call; None when the call holds the whole batch (or nothing says otherwise).

    Read where the two samplers that window SD1.5 frames publish them in ``transformer_options``:
    core's Context Windows (``comfy/context_windows.py``: ``"context_window"``, an
    ``IndexListContextWindow``; batch dimension 0 only) and AnimateDiff-Evolved's context options
    (``"ad_params"["sub_idxs"]``, None outside sliding windows).
    """
    window = options.get("context_window")
    if window is not None and getattr(window, "dim", 0) == 0:
        indices = getattr(window, "index_list", None)
        if indices is not None:
            return list(indices)
    ad_params = options.get("ad_params")
    if isinstance(ad_params, dict) and ad_params.get("sub_idxs") is not None:
        return list(ad_params["sub_idxs"])
    return None


# ------------------------------------------------------------------------------------------------
# the injection (one per Apply Audio to Model) and its per-layer patch


class AudioInjection:
    """One Apply Audio to Model: a sound's keys/values (in a ModelPatcher), where and when they act.

    Registered as the patched MODEL's ``DIFFUSION_MODEL`` wrapper: at each UNet call it composes its
    layers into the attn2 table that call uses (see the module docstring). Shared, never copied, by
    every clone of the MODEL. Its only state besides the immutable settings is derived: the sigma
    range (re-read from the sampling model at each run's start, because a ModelSampling node may
    follow ours), a one-entry memo of the in-range decision per UNet call, a one-entry memo of the
    composed table, and whether this run's first UNet call has been checked.
    """

    def __init__(
        self,
        kv_patcher: ModelPatcher,
        keys: Sequence[LayerKey],
        model: ModelPatcher,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
    ) -> None:
        self.kv_patcher = kv_patcher
        self.keys: tuple[LayerKey, ...] = tuple(keys)  # slot i -> its layer's key
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        self.full_range = self.start_percent <= 0.0 and self.end_percent >= 1.0
        self.sigma_range = (float("inf"), 0.0)
        self._last: tuple[torch.Tensor | None, bool] = (None, True)
        self._composed: tuple[Any, Any, dict] | None = None  # (attn2 table in, unet, attn2 table out)
        self.reached: set[int] = set()
        self.checked = False
        if not self.full_range:
            self.resolve_sigmas(model)

    @property
    def kv(self) -> AudioKV:
        return self.kv_patcher.model

    # -- before sampling

    def pre_run(self, patcher: ModelPatcher) -> None:
        """ON_PRE_RUN callback: check the UNet that will run, resolve the percents, re-arm the check,
        drop the per-layout batches of the last run."""
        unet = patcher.get_model_object("diffusion_model")
        missing = [key for key in self.keys if key not in cross_attentions(unet)]
        if missing:
            raise AudioNotReachedError(
                f"Apply Audio to Model patched cross-attention layers {_keys(missing)}, but the UNet this "
                f"MODEL will sample with ({type(unet).__name__}) has no such layers: a node after Apply Audio "
                "to Model replaced the UNet (e.g. a compile, TensorRT or model-merge node). Put Apply Audio "
                "to Model after that node, directly before the sampler."
            )
        self.resolve_sigmas(patcher)
        self.checked = False
        self.kv.clear_memo()  # batches assembled for a past run may sit on a device the weights left

    def resolve_sigmas(self, patcher: ModelPatcher) -> None:
        """The percents as sigmas of the model_sampling that will sample."""
        if self.full_range:
            return
        sampling = patcher.get_model_object("model_sampling")
        self.sigma_range = (
            float(sampling.percent_to_sigma(self.start_percent)),
            float(sampling.percent_to_sigma(self.end_percent)),
        )
        self._last = (None, True)

    def active(self, sigmas: torch.Tensor | None) -> bool:
        """Whether this step's sigma lies in [end_sigma, start_sigma] (as ControlNet decides)."""
        if self.full_range or sigmas is None:
            return True
        last, decision = self._last
        if sigmas is last:
            return decision
        sigma = float(sigmas.reshape(-1)[0])
        decision = self.sigma_range[1] <= sigma <= self.sigma_range[0]
        self._last = (sigmas, decision)
        return decision

    # -- each UNet call

    def __call__(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """DIFFUSION_MODEL wrapper: run the UNet with our layers composed into its attn2 table.

        ``UNetModel.forward`` passes ``(x, timesteps, context, y, control, transformer_options)``
        positionally (0.3.x); a keyword ``transformer_options`` is handled too.
        """
        positional = "transformer_options" not in kwargs and len(args) > 5
        options = args[5] if positional else kwargs.get("transformer_options")
        if not isinstance(options, dict):
            raise AudioNotReachedError(
                "Apply Audio to Model could not find the UNet call's transformer_options (found "
                f"{type(options).__name__}); this ComfyUI calls the UNet in a way this version of the pack "
                "does not know. Update the pack, or use Apply Audio to Conditioning."
            )
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor) and self.kv.num_rows > 1:  # before the UNet does any work
            frame_rows(self.kv.num_rows, x.shape[0] // len(options.get("cond_or_uncond") or [COND]), frame_window(options))
        options = self.compose(options, executor.class_obj)
        if positional:
            args = (*args[:5], options, *args[6:])
        else:
            kwargs["transformer_options"] = options
        if self.checked:
            return executor(*args, **kwargs)
        self.reached = set()
        out = executor(*args, **kwargs)
        self.check_reached(options)
        return out

    def outer_sample(self, executor: Any, noise: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """OUTER_SAMPLE wrapper, before the first step: the guider must number its prompts as KSampler
        does, and per-frame tokens must have one row per latent (the latent batch is first known here)."""
        check_guider(getattr(executor, "class_obj", None))
        rows = self.kv.num_rows
        if rows > 1 and not getattr(noise, "is_nested", False) and noise.shape[0] != rows:
            raise frame_mismatch(rows, noise.shape[0])
        return executor(noise, *args, **kwargs)

    def compose(self, options: dict, unet: torch.nn.Module) -> dict:
        """A shallow copy of ``options`` whose attn2 table holds our patch at each of our layers."""
        replaces = options.get("patches_replace", {})
        table = replaces.get("attn2", {})
        memo = self._composed
        if memo is None or memo[0] is not table or memo[1] is not unet:
            layers = cross_attentions(unet)
            composed = dict(table)
            for slot, key in enumerate(self.keys):
                inner = table.get(key, table.get(key[:2]))  # what ComfyUI would call at this layer
                module = layers[key][1] if key in layers else None
                composed[key] = AudioAttn2Patch(self, slot, inner, module)
            memo = self._composed = (table, unet, composed)
        return {**options, "patches_replace": {**replaces, "attn2": memo[2]}}

    def check_reached(self, options: dict) -> None:
        """After a run's first UNet call: every layer we patched must have run our patch."""
        self.checked = True
        missing = [key for slot, key in enumerate(self.keys) if slot not in self.reached]
        if not missing:
            return
        wrappers = comfy.patcher_extension.get_all_wrappers(WrappersMP.DIFFUSION_MODEL, options)
        others = [_name(w) for w in wrappers if not isinstance(w, AudioInjection)]
        raise AudioNotReachedError(
            f"Apply Audio to Model's audio attention did not run in {len(missing)} of {len(self.keys)} "
            f"patched layers ({_keys(missing)}): something that runs after it replaced those layers' "
            "cross-attention without calling what was there"
            + (f" (other UNet wrappers on this MODEL: {', '.join(others)})" if others else "")
            + ". Apply that node before Apply Audio to Model, or remove it; the sound would otherwise be "
            "silently missing from the image."
        )

    def __deepcopy__(self, memo: dict) -> AudioInjection:
        return self  # shared by clones (ComfyUI <= 0.13 deep-copies model_options on clone; 0.14+ shares objects)

    def __repr__(self) -> str:
        return f"AudioInjection(layers={len(self.keys)}, percent={self.start_percent}..{self.end_percent})"


class AudioAttn2Patch:
    """``attn2`` replace for one layer of one call: what was there (or the text attention) + the audio."""

    __slots__ = ("injection", "slot", "inner", "layer")

    def __init__(
        self,
        injection: AudioInjection,
        slot: int,
        inner: Attn2Replace | None = None,
        layer: torch.nn.Module | None = None,
    ) -> None:
        self.injection = injection
        self.slot = slot
        self.inner = inner
        self.layer = layer  # the CrossAttention module, for the text call's preferred_attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        """``q [B, S, H*d]``, ``k``/``v [B, T, H*d]`` (projected) -> ``[B, S, H*d]`` before to_out."""
        injection = self.injection
        if not injection.checked:
            injection.reached.add(self.slot)
        if self.inner is None:
            out = text_attention(q, k, v, extra_options, self.layer)
        else:
            out = self.inner(q, k, v, extra_options)
        if not injection.active(extra_options.get("sigmas")):
            return out
        chunks = extra_options.get("cond_or_uncond") or [COND]
        chunk = q.shape[0] // len(chunks)
        kv = injection.kv
        rows = None if kv.num_rows == 1 else frame_rows(kv.num_rows, chunk, frame_window(extra_options))
        key, value = kv.batch(self.slot, chunks, chunk, q.device, q.dtype, rows)
        return add_audio(out, q, key, value)

    def __repr__(self) -> str:
        inner = type(self.inner).__name__ if self.inner is not None else None
        return f"AudioAttn2Patch(layer={self.injection.keys[self.slot]}, inner={inner})"


#: The prompts of guiders whose ``cond_or_uncond`` numbering the patch knows: positive 0, negative 1
#: (KSampler's CFGGuider, BasicGuider).
KNOWN_PROMPTS = frozenset({"positive", "negative"})


def check_guider(guider: Any) -> None:
    """Refuse, before sampling, a guider with prompts beyond positive and negative (DualCFGGuider's
    ``middle``, Perp-Neg's empty prompt): it numbers its prompts its own way, and the audio would
    silently reach the wrong ones (DualCFGGuider: its negative and cond1, not cond2)."""
    conds = getattr(guider, "conds", None)
    if not isinstance(conds, dict) or set(conds) <= KNOWN_PROMPTS:
        return
    raise ModelMismatchError(
        f"Apply Audio to Model: the sampler's guider ({type(guider).__name__}) runs the prompts "
        f"{sorted(conds)}, and the audio attention can only tell a positive prompt from a negative one. "
        "With this guider, add the sound to a prompt instead: Apply Audio to Conditioning on cond1 "
        "(see the audio_guidance example), and sample from the plain MODEL."
    )


def _keys(keys: Sequence[LayerKey]) -> str:
    shown = ", ".join(f"{b}.{n}.{t}" for b, n, t in keys[:4])
    return shown + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _name(obj: Any) -> str:
    owner = getattr(obj, "__self__", None)
    target = owner if owner is not None else obj
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__qualname__)}"


def audio_injections(model: ModelPatcher) -> tuple[AudioInjection, ...]:
    """The Apply Audio to Model injections on ``model``, first applied first."""
    wrappers = comfy.patcher_extension.get_wrappers_with_key(
        WrappersMP.DIFFUSION_MODEL, CALLBACK_KEY, model.model_options, is_model_options=True
    )
    return tuple(w for w in wrappers if isinstance(w, AudioInjection))


# ------------------------------------------------------------------------------------------------
# applying


def check_audio_fits(model: ModelPatcher, clap2diffusion: CLAP2DiffusionModel, audio: AudioTokens) -> AudioAdapter:
    """The adapter of ``clap2diffusion``, checked against ``model``'s UNet and against ``audio``'s source."""
    adapter = clap2diffusion.adapter
    if adapter is None:
        raise CheckpointError(
            f"this CLAP2Diffusion file is stage {clap2diffusion.config.stage}: it has no adapter layers for "
            "Apply Audio to Model. Use Apply Audio to Conditioning with it, or load a stage 2/3 file."
        )
    clap2diffusion.check_tokens(audio, "Apply Audio to Model")
    layers, context_dim = comfy_layout(model)
    adapter.config.check_fits(layers, context_dim or -1, "this MODEL")
    return adapter


def apply_audio_to_model(
    model: ModelPatcher,
    clap2diffusion: CLAP2DiffusionModel,
    audio: AudioTokens,
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
) -> ModelPatcher:
    """A clone of ``model`` whose cross-attention layers also attend to ``audio``, through the
    adapter of ``clap2diffusion`` (the file that made ``audio``).

    Unconditional rows attend to the file's silence tokens. The user's level weights
    (``audio.level_scale``) act once, on the adapter's values. Layers whose gate is closed, and the
    whole patch at strength 0, are skipped: the result is then the input model itself.
    """
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(
            f"start_percent ({start_percent}) must not be after end_percent ({end_percent}), both in [0, 1]"
        )
    adapter = check_audio_fits(model, clap2diffusion, audio)
    with torch.no_grad():
        silence = on_device(clap2diffusion).silence_tokens()
    kv = AudioKV(
        adapter, audio.tokens, silence, audio.token_levels,
        strength=strength, level_weights=audio.level_scale.tolist(),
        dtype=compute_dtype(model), device=model.offload_device,
        compute_dtype=clap2diffusion.dtype,
    )  # fmt: skip
    if not len(kv):
        return model
    kv_patcher = comfy.model_patcher.ModelPatcher(
        kv, load_device=model.load_device, offload_device=model.offload_device
    )
    specs = adapter.config.layer_specs()
    patched = model.clone()
    injection = AudioInjection(kv_patcher, [specs[i].key for i in kv.layers], patched, start_percent, end_percent)
    # In model_options (not only the patcher's own wrappers), so the wrapper also runs when something
    # calls the UNet with the MODEL's transformer_options outside a sampler.
    comfy.patcher_extension.add_wrapper_with_key(
        WrappersMP.DIFFUSION_MODEL, CALLBACK_KEY, injection, patched.model_options, is_model_options=True
    )
    comfy.patcher_extension.add_wrapper_with_key(
        WrappersMP.OUTER_SAMPLE, CALLBACK_KEY, injection.outer_sample, patched.model_options, is_model_options=True
    )
    patched.add_callback_with_key(CallbacksMP.ON_PRE_RUN, CALLBACK_KEY, injection.pre_run)
    patched.set_additional_models(
        CALLBACK_KEY, [*patched.get_additional_models_with_key(CALLBACK_KEY), kv_patcher]
    )
    log.debug("clap2diffusion: audio attention on %d of %d layers", len(kv), len(specs))
    return patched
