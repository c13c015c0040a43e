"""Stage 1 from text alone: fit the decomposer + projector on CLAP *text* embeddings of captions.

CLAP puts audio and text in one space, so the stage-1 pair (CLAP embedding of a clip, the text
encoder's conditioning of its caption) can be made from the caption alone: CLAP's text embedding
of the caption stands in for the clip's audio embedding. At inference the *audio* embedding is fed
instead. The two clouds sit apart in a real CLAP (matching pairs have a cosine well below 1, and a
shared shift separates them, the "modality gap"), so the fit **bridges the gap**:

- **noise injection**: each CLAP text embedding is moved by Gaussian noise of norm about ``noise``
  and re-normalised (recipe 2: the solve reads noisy copies of every caption and sizes each
  caption's kernel by them; recipe 1: every step), so the projector maps a neighbourhood of each
  caption, not just its point, to that caption's conditioning (``noise`` 0 switches it off);
- **caption memory** (inference, optional, :func:`memory_project`): the audio embedding replaced
  by a softmax-weighted mix of its nearest caption embeddings, which puts it back in the text
  cloud the projector was fitted on.

The model, the losses (InfoNCE + direction MSE of the mean audio token against the pooled target,
:mod:`.losses`; for SDXL the same two terms again between the pooled head's output and the text
encoder's pooled vector), the seeded data order (:mod:`.sampling`) and the temperature schedule are stage 1's.
The loop is a small in-memory one instead of :func:`.trainer.train_stage`: the whole data set is a
few thousand vectors, there is one process, the ComfyUI node needs a per-step callback (progress,
Cancel), and the node may import only what the pack's lean requirements hold (torch, safetensors:
no accelerate, diffusers or yaml, which the trainer needs).

The file is a normal stage-1 file whose metadata also says how it was made
(:data:`PROVENANCE_KEYS`): ``training`` = ``text-only``, the corpus hash and size, fingerprints of
the CLAP and of the text encoder, and the fit settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..checkpoint import build_metadata, read_metadata
from ..decomposer import DecomposerConfig
from ..model import BASE_FAMILIES, POOLED_FAMILIES, CLAP2DiffusionModel, ModelConfig
from ..pooled_head import PooledHeadConfig
from ..projector import ProjectorConfig
from . import losses
from .kernelfit import kernel_fit
from .sampling import StreamBatchSampler, step_generator
from .temperature import TemperatureSchedule

#: ``(step, total)``, called after every optimizer step; raise to stop (nothing is written then).
StepCallback = Callable[[int, int], None]
TEXT_ONLY = "text-only"
PROVENANCE_KEYS = (
    "training", "corpus_sha256", "corpus_size", "clap_fingerprint", "text_encoder_fingerprint",
    "text_encoder", "text_fit", "textfit_recipe",
)  # fmt: skip
#: Version of the fit's recipe, in every file's metadata (``textfit_recipe``) and name: 1 was the
#: gradient fit of issue 12 (files without the key), 2 the closed-form kernel fit (issue 23).
RECIPE = 2


@dataclasses.dataclass(frozen=True)
class TextFitConfig:
    """How the projector is fitted. The defaults are the tuned ones (see the README figures)."""

    #: 2: the closed-form kernel fit (:func:`kernel_fit`), then ``steps`` gradient steps (default
    #: none); 1: issue 12's gradient fit from a random start (kept to reproduce old files).
    recipe: int = RECIPE
    steps: int = 0
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    #: Norm of the Gaussian noise that moves each unit CLAP text embedding (0: no bridging). 2.0
    #: leaves a caption's noisy copy at cosine ~0.45 to the caption, where a sound sits from its own
    #: caption across the modality gap (issue 23's construction; 1.0, cosine 0.71, under-bridged it).
    noise: float = 2.0
    infonce: float = 1.0
    infonce_temperature: float = 0.07
    mse: float = 0.5
    #: Soft-assignment temperature: held at 2.0 for the first tenth, cosine down to this at the end.
    final_temperature: float = 0.5
    #: Overrides of the projector's config (``width``, ``num_layers``...); ``context_dim`` is set
    #: from the targets.
    projector: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Recipe 2: width of the centred CLAP projection (and of the projector), kernel units per
    #: caption neighbourhood (``4 * width`` of them), their sharpness, noisy copies per caption in
    #: the ridge solves, and the ridge strength (relative to the features' mean energy).
    width: int = 256
    kernel_beta: float = 20.0
    #: A kernel unit fires above this share of the mean cosine between a bridged copy of a caption
    #: and the caption (so ``noise`` sets the neighbourhood each caption's conditioning covers).
    kernel_threshold: float = 0.5
    copies: int = 4
    ridge: float = 1e-3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bridge_noise(clap: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``clap [B, D]`` unit vectors moved by Gaussian noise of norm ~``noise``, re-normalised."""
    if noise <= 0:
        return clap
    eps = torch.randn(clap.shape, generator=generator) * (noise / clap.shape[-1] ** 0.5)
    return F.normalize(clap + eps.to(clap), dim=-1)


def bridged_copies(clap: torch.Tensor, config: TextFitConfig) -> list[torch.Tensor]:
    """Recipe 2's bridging: ``config.copies`` copies of ``clap [M, D]`` moved by :func:`bridge_noise`,
    drawn from one generator seeded with ``config.seed``; none when ``config.noise`` is 0."""
    if config.noise <= 0:
        return []
    generator = torch.Generator().manual_seed(config.seed)
    return [bridge_noise(clap, config.noise, generator) for _ in range(config.copies)]


def memory_project(
    audio: torch.Tensor, memory: torch.Tensor, temperature: float = 0.05, top_k: int = 8
) -> torch.Tensor:
    """``audio [B, D]`` -> ``[B, D]``: the softmax(cos / temperature)-weighted mix of the ``top_k``
    nearest rows of ``memory [M, D]`` (the corpus's CLAP text embeddings), re-normalised."""
    memory = F.normalize(memory.float(), dim=-1).to(audio.device)
    scores = F.normalize(audio.float(), dim=-1) @ memory.T  # [B, M]
    k = min(top_k, memory.shape[0])
    top, index = scores.topk(k, dim=-1)
    weights = torch.softmax(top / temperature, dim=-1)  # [B, k]
    return F.normalize(torch.einsum("bk,bkd->bd", weights, memory[index]), dim=-1)


def base_family_for(context_dim: int) -> str:
    """``sd15`` (768) / ``sd2`` (1024) / ``sdxl`` (2048); other sizes are refused by name."""
    for family, dim in BASE_FAMILIES.items():
        if dim == context_dim:
            return family
    raise ValueError(
        f"targets of width {context_dim}: no base family has that context size "
        f"(known: {', '.join(f'{k} {v}' for k, v in BASE_FAMILIES.items())})"
    )


def temperature_schedule(config: TextFitConfig) -> TemperatureSchedule:
    return TemperatureSchedule(start=2.0, end=config.final_temperature, warmup_steps=config.steps // 10,
                               anneal_steps=config.steps)


def new_model(config: TextFitConfig, context_dim: int, pooled_dim: int | None = None,
              pooled_norm: float = 1.0) -> CLAP2DiffusionModel:
    """A fresh stage-1 model (default decomposer, projector with ``config.projector``), seeded;
    with ``pooled_dim``, a pooled head of that width whose output norm is ``pooled_norm``."""
    family = base_family_for(context_dim)
    if pooled_dim is not None and POOLED_FAMILIES.get(family) != pooled_dim:
        raise ValueError(f"pooled targets of width {pooled_dim} do not fit {family} "
                         f"(pooled widths: {POOLED_FAMILIES or 'none'})")
    decomposer = DecomposerConfig()
    pooled = None if pooled_dim is None else PooledHeadConfig(
        pooled_dim=pooled_dim, token_dim=decomposer.token_dim, num_tokens=decomposer.num_tokens,
        norm_target=float(pooled_norm))
    model_config = ModelConfig(
        base_family=family, stage=1, decomposer=decomposer,
        projector=ProjectorConfig.from_dict({**config.projector, "context_dim": context_dim}), pooled=pooled,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return CLAP2DiffusionModel(model_config)


def _match(pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor, config: TextFitConfig) -> torch.Tensor:
    return (config.infonce * losses.info_nce(pred, target, config.infonce_temperature, index)
            + config.mse * losses.direction_mse(pred, target))


def stage1_loss(model: CLAP2DiffusionModel, clap: torch.Tensor, targets: torch.Tensor, index: torch.Tensor,
                temperature: float, config: TextFitConfig, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1's objective (as ``StageModule`` computes it with ``loss.epsilon == 0``): InfoNCE +
    direction MSE between the mean audio token ``[B, C]`` and the token target ``targets [B, C]``;
    with a pooled head and ``pooled [B, P]`` (SDXL's pooled text vector), the same two terms between
    the head's output and it, at the same weights."""
    levels = model.decomposer(clap, temperature)
    loss = _match(model.projector(levels).mean(dim=1), targets, index, config)
    if pooled is not None:
        if model.pooled_head is None:
            raise ValueError("pooled targets given to a model without a pooled head")
        loss = loss + _match(model.pooled_head(levels), pooled, index, config)
    return loss


def _cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' ``cosine`` schedule (linear warm-up, half a cosine to 0), in torch alone."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit_text(
    clap_text: torch.Tensor,
    targets: torch.Tensor,
    config: TextFitConfig = TextFitConfig(),
    on_step: StepCallback | None = None,
    device: torch.device | str = "cpu",
    pooled: torch.Tensor | None = None,
) -> CLAP2DiffusionModel:
    """Fit a stage-1 model: ``clap_text [M, 512]`` (CLAP text embeddings of M captions) ->
    ``targets [M, C]`` (the token conditioning of the same captions, pooled over their tokens) and,
    for SDXL, ``pooled [M, P]`` (the text encoder's own pooled vectors, which adds a pooled head).
    Deterministic for a seed on a device. Returns the model (eval mode) with the final
    soft-assignment temperature."""
    if clap_text.ndim != 2 or targets.ndim != 2 or clap_text.shape[0] != targets.shape[0]:
        raise ValueError(f"expected clap_text [M, D] and targets [M, C], got {tuple(clap_text.shape)} "
                         f"and {tuple(targets.shape)}")
    if pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != targets.shape[0]):
        raise ValueError(f"expected pooled targets [M, P] with M = {targets.shape[0]}, got {tuple(pooled.shape)}")
    if clap_text.shape[0] < 2:
        raise ValueError(f"the fit needs at least 2 captions, got {clap_text.shape[0]}")
    # ComfyUI runs nodes under inference mode: train outside it, on ordinary copies of the inputs.
    with torch.inference_mode(False), torch.enable_grad():
        return _fit(clap_text.clone(), targets.clone(), config, on_step, device,
                    None if pooled is None else pooled.clone())


def _fit(clap_text: torch.Tensor, targets: torch.Tensor, config: TextFitConfig, on_step: StepCallback | None,
         device: torch.device | str, pooled: torch.Tensor | None = None) -> CLAP2DiffusionModel:
    if pooled is not None:
        pooled = pooled.float()
    if config.recipe >= 2:
        family = base_family_for(targets.shape[-1])
        if pooled is not None and POOLED_FAMILIES.get(family) != pooled.shape[-1]:
            raise ValueError(f"pooled targets of width {pooled.shape[-1]} do not fit {family} "
                             f"(pooled widths: {POOLED_FAMILIES or 'none'})")
        noisy = bridged_copies(F.normalize(clap_text.float(), dim=-1), config)
        model = kernel_fit(clap_text, targets, family, noisy, pooled=pooled, width=config.width,
                           beta=config.kernel_beta, threshold=config.kernel_threshold, strength=config.ridge,
                           seed=config.seed)
        if config.steps == 0:
            return model.to(device).eval()
    elif pooled is None:
        model = new_model(config, targets.shape[-1])
    else:
        model = new_model(config, targets.shape[-1], pooled.shape[-1], float(pooled.norm(dim=-1).mean()))
    model = model.to(device).train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _cosine_with_warmup(optimizer, config.warmup_steps, config.steps)
    temperature = temperature_schedule(config)
    clap_text = F.normalize(clap_text.float(), dim=-1)
    targets = targets.float()
    m = clap_text.shape[0]
    batches = iter(StreamBatchSampler(m, min(config.batch_size, m), config.seed))
    for step in range(config.steps):
        index = torch.tensor(next(batches))
        clap = bridge_noise(clap_text[index], config.noise, step_generator(config.seed, step, 0, 0))
        loss = stage1_loss(model, clap.to(device), targets[index].to(device), index.to(device),
                           temperature(step), config, None if pooled is None else pooled[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(step + 1, config.steps)
    # The file records the temperature the fit ended at, as stage files do.
    decomposer = dataclasses.replace(model.config.decomposer, temperature=float(temperature(config.steps)))
    out = CLAP2DiffusionModel(dataclasses.replace(model.config, decomposer=decomposer))
    out.load_state_dict(model.state_dict())
    return out.eval()


def caption_token_mean(cond: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``cond [n, T, C]`` (a text encoder's conditioning of n captions) and ``ends [n]`` (each one's
    end-token position) -> ``[n, C]``: the mean over the caption's tokens and its end token, the
    stage-1 token target. The start token (the same state for every caption) and the padding are left out."""
    position = torch.arange(cond.shape[1], device=cond.device)
    mask = ((position[None] >= 1) & (position[None] <= ends.to(cond.device)[:, None])).to(cond.dtype)
    return (cond * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


@torch.no_grad()
def pooled_queries(model: CLAP2DiffusionModel, clap: torch.Tensor) -> torch.Tensor:
    """``clap [B, 512]`` -> ``[B, C]``: the mean audio token, what stage 1 matched to the target."""
    model = model.eval()
    return torch.cat([model.projector(model.decomposer(chunk.to(model.device))).mean(dim=1).float().cpu()
                      for chunk in clap.split(256)])


@torch.no_grad()
def pooled_outputs(model: CLAP2DiffusionModel, clap: torch.Tensor) -> torch.Tensor:
    """``clap [B, 512]`` -> ``[B, P]``: the pooled head's vectors (SDXL); the model must have one."""
    if model.pooled_head is None:
        raise ValueError("this model has no pooled head (an SD1.5 file)")
    model = model.eval()
    return torch.cat([model.pooled_head(model.decomposer(chunk.to(model.device))).float().cpu()
                      for chunk in clap.split(256)])


# ------------------------------------------------------------------------------------------------
# from captions to a model

#: ``(phase, done, total)``: phase ``"clap"`` (CLAP text embeddings), ``"targets"`` (the text
#: encoder's conditioning) or ``"fit"`` (optimizer steps); raise to stop.
ProgressCallback = Callable[[str, int, int], None]
#: What a text encoder gives for a batch of captions: the token target ``[n, C]``, or for families
#: with a pooled vector ``(tokens [n, C], pooled [n, P])``.
Targets = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def encode_batched(
    encode: Callable[[list[str]], torch.Tensor],
    captions: Sequence[str],
    batch_size: int = 32,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """``encode`` over ``captions`` in batches -> ``[M, ...]`` float32 on the CPU; ``on_batch(done,
    total)`` before the first batch (done 0: the phase's clock starts there) and after each batch."""
    if on_batch is not None:
        on_batch(0, len(captions))
    out = []
    for start in range(0, len(captions), batch_size):
        out.append(encode(list(captions[start:start + batch_size])).float().cpu())
        if on_batch is not None:
            on_batch(min(start + batch_size, len(captions)), len(captions))
    return torch.cat(out)


def encode_targets(
    targets: Callable[[list[str]], Targets],
    captions: Sequence[str],
    batch_size: int = 32,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`encode_batched` for a text encoder's targets: ``(tokens [M, C], pooled [M, P] or None)``."""
    tokens: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []

    def encode(batch: list[str]) -> torch.Tensor:
        out = targets(batch)
        if isinstance(out, tuple):
            tokens.append(out[0].float().cpu())
            pooled.append(out[1].float().cpu())
        else:
            tokens.append(out.float().cpu())
        return tokens[-1]

    encode_batched(encode, captions, batch_size, on_batch)
    if pooled and len(pooled) != len(tokens):
        raise ValueError("the text encoder gave pooled vectors for some batches only")
    return torch.cat(tokens), (torch.cat(pooled) if pooled else None)


def fit_from_captions(
    captions: Sequence[str],
    clap_text: Callable[[list[str]], torch.Tensor],
    targets: Callable[[list[str]], Targets],
    config: TextFitConfig = TextFitConfig(),
    on_progress: ProgressCallback | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> CLAP2DiffusionModel:
    """Captions -> a fitted stage-1 model. ``clap_text`` maps captions to CLAP text embeddings
    ``[n, 512]``, ``targets`` to the token-pooled conditioning ``[n, C]`` of the target text encoder,
    or for SDXL to ``(tokens [n, 2048], pooled [n, 1280])`` (the file then has a pooled head)."""
    def phase(name: str) -> Callable[[int, int], None] | None:
        return None if on_progress is None else (lambda done, total: on_progress(name, done, total))

    clap = encode_batched(clap_text, captions, batch_size, phase("clap"))
    tokens, pooled = encode_targets(targets, captions, batch_size, phase("targets"))
    if config.steps == 0:  # the closed-form solve alone: one unit of progress
        if on_progress is not None:
            on_progress("fit", 0, 1)
        model = fit_text(clap, tokens, config, None, device, pooled)
        if on_progress is not None:
            on_progress("fit", 1, 1)
        return model
    if on_progress is not None:
        on_progress("fit", 0, config.steps)
    return fit_text(clap, tokens, config, phase("fit"), device, pooled)


# ------------------------------------------------------------------------------------------------
# provenance and the file


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], extra: str = "") -> str:
    """A model's fingerprint: sha256 over each tensor's name, shape, dtype and a strided sample of up
    to 1,024 of its values (exact bytes), plus ``extra`` (settings such as a clip skip). Cheap (no
    forward, no loading onto the GPU), so reusing a fitted file stays well under a second, and a
    different checkpoint, LoRA or fine-tune changes it."""
    digest = hashlib.sha256(extra.encode())
    for name, tensor in named_tensors:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def tensors_in(value: object, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested tuples / lists / dicts / objects with a ``weights`` attribute
    (ComfyUI's LoRA patches), with a path-like name: what :func:`fingerprint` needs from patches."""
    if depth > 6:
        return
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from tensors_in(value[key], f"{prefix}.{key}", depth + 1)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from tensors_in(item, f"{prefix}.{i}", depth + 1)
    elif hasattr(value, "weights"):
        yield from tensors_in(value.weights, f"{prefix}.weights", depth + 1)


@dataclasses.dataclass(frozen=True)
class Provenance:
    """How a text-fitted file was made (its metadata, :data:`PROVENANCE_KEYS`)."""

    corpus_sha256: str
    corpus_size: int
    clap_fingerprint: str
    text_encoder_fingerprint: str
    text_encoder: str  # e.g. "sd15 CLIP-L (comfy SD1ClipModel)"
    text_fit: TextFitConfig

    def metadata(self) -> dict[str, str]:
        return {
            "training": TEXT_ONLY,
            "corpus_sha256": self.corpus_sha256,
            "corpus_size": str(self.corpus_size),
            "clap_fingerprint": self.clap_fingerprint,
            "text_encoder_fingerprint": self.text_encoder_fingerprint,
            "text_encoder": self.text_encoder,
            "text_fit": json.dumps(self.text_fit.to_dict(), sort_keys=True),
            "textfit_recipe": str(self.text_fit.recipe),
        }

    def file_stem(self, family: str) -> str:
        """``textfit-<family>-<12 hex>``: the same inputs give the same name."""
        key = json.dumps({"family": family, **self.metadata()}, sort_keys=True)
        return f"textfit-{family}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def save_text_fit(model: CLAP2DiffusionModel, path: str | os.PathLike, provenance: Provenance) -> Path:
    """Write ``model`` as a stage-1 file with the provenance in its metadata, atomically: an
    interrupted write never leaves a file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=build_metadata(model.config) | provenance.metadata())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def read_provenance(path: str | os.PathLike) -> dict[str, str] | None:
    """The text-fit metadata of a file, or None for a file not fitted from text."""
    metadata = read_metadata(path)
    if metadata.get("training") != TEXT_ONLY:
        return None
    return {k: metadata[k] for k in PROVENANCE_KEYS if k in metadata}


__all__ = [
    "PROVENANCE_KEYS", "caption_token_mean", "encode_batched", "encode_targets", "fit_from_captions", "Provenance", "TextFitConfig",
    "base_family_for", "bridge_noise", "bridged_copies", "fingerprint", "fit_text", "memory_project", "pooled_outputs", "pooled_queries",
    "read_provenance", "save_text_fit", "tensors_in",
]
