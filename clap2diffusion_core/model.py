"""CLAP2DiffusionModel: the trained audio modules of one checkpoint file, and their config."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .adapters import AdapterConfig, AudioAdapter
from .decomposer import DecomposerConfig, HierarchicalDecomposer
from .errors import WiringError
from .pooled_head import PooledHead, PooledHeadConfig
from .projector import AudioProjector, ProjectorConfig
from .types import AudioLevels, AudioTokens, fingerprint

#: Base model families a file can be made for, with the context size of their cross-attention.
BASE_FAMILIES: dict[str, int] = {"sd15": 768, "sd2": 1024, "sdxl": 2048}
#: Families whose conditioning also has a pooled vector, with its width: their files carry a pooled head.
POOLED_FAMILIES: dict[str, int] = {"sdxl": 1280}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the modules of a file. Stage 1 has no adapter."""

    base_family: str = "sd15"
    stage: int = 1
    decomposer: DecomposerConfig = dataclasses.field(default_factory=DecomposerConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    #: The gated audio cross-attention layers of stage 2/3 files; None for stage 1.
    adapter: AdapterConfig | None = None
    #: The pooled head of families with a pooled vector (SDXL); None for SD1.5 (and older files).
    pooled: PooledHeadConfig | None = None

    def __post_init__(self) -> None:
        if self.decomposer.token_dim != self.projector.token_dim:
            raise ValueError("decomposer and projector token_dim differ")
        if self.pooled is not None and (self.pooled.token_dim, self.pooled.num_tokens) != (
                self.decomposer.token_dim, self.decomposer.num_tokens):
            raise ValueError("the pooled head does not read the decomposer's tokens (token_dim / num_tokens differ)")
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")

    @property
    def context_dim(self) -> int:
        return self.projector.context_dim

    @property
    def pooled_dim(self) -> int | None:
        """Width of the pooled vector the file makes (SDXL 1280), None without a pooled head."""
        return None if self.pooled is None else self.pooled.pooled_dim

    def to_dict(self) -> dict[str, Any]:
        out = {
            "base_family": self.base_family,
            "stage": self.stage,
            "decomposer": self.decomposer.to_dict(),
            "projector": self.projector.to_dict(),
            "adapter": None if self.adapter is None else self.adapter.to_dict(),
        }
        if self.pooled is not None:  # absent, not null, without one: SD1.5 files stay as they were
            out["pooled"] = self.pooled.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        adapter = data.get("adapter")
        if adapter is not None:
            adapter = AdapterConfig.from_dict(adapter)
        return cls(
            base_family=data["base_family"],
            stage=int(data["stage"]),
            decomposer=DecomposerConfig.from_dict(data["decomposer"]),
            projector=ProjectorConfig.from_dict(data["projector"]),
            adapter=adapter,
            pooled=None if data.get("pooled") is None else PooledHeadConfig.from_dict(data["pooled"]),
        )


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``x [B, F]`` -> ``(first [U], inverse [B])``: the first row of each distinct value and, per
    row, its distinct row (``x[first][inverse] == x``); ``(None, None)`` when all rows differ.

    A batch of 8 rows and a batch of 1 take different CPU matrix kernels (results differ in the
    last bits), so the modules run on the distinct rows only: equal inputs give bitwise equal
    outputs, whatever else is in the batch (a constant sound's frames, a sound shared by latents).
    """
    if x.shape[0] < 2:
        return None, None
    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    count = int(inverse.max()) + 1
    if count == x.shape[0]:
        return None, None
    order = torch.arange(x.shape[0], device=x.device)
    first = torch.full((count,), x.shape[0], dtype=torch.long, device=x.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    # Renumber by first appearance, so row i of the distinct batch is the i-th new value met.
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(count, device=x.device)
    return first.sort().values, rank[inverse]


class CLAP2DiffusionModel(nn.Module):
    """Decomposer + projector (+ the pooled head of SDXL-family files) (+ the gated audio
    cross-attention adapter after stage 2).

    ``encode`` turns CLAP embeddings into :class:`AudioLevels`, ``project`` turns those into
    :class:`AudioTokens`; both are plain data naming this model by :attr:`fingerprint`. The
    tokens of silence, which only the model injection uses, come from :meth:`silence_tokens`.

    ``operations`` builds every layer: ``torch.nn`` (training: fp32 master weights) or, in ComfyUI,
    the ``comfy.ops`` class model management picks, with the weights' ``dtype``/``device`` (see
    ``nodes/managed.py``). Inference computes in :attr:`dtype` on :attr:`device`; its outputs are
    float32, on the device of its input.
    """

    def __init__(self, config: ModelConfig, name: str = "", *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, operations: Any = nn) -> None:
        super().__init__()
        self.config = config
        #: The file it was loaded from (for messages); "" for a model built in memory.
        self.name = name
        built = {"dtype": dtype, "device": device, "operations": operations}
        self.decomposer = HierarchicalDecomposer(config.decomposer, **built)
        self.projector = AudioProjector(config.projector, **built)
        self.adapter: AudioAdapter | None = None if config.adapter is None else AudioAdapter(config.adapter, **built)
        self.pooled_head: PooledHead | None = None if config.pooled is None else PooledHead(config.pooled, **built)
        self._fingerprint: str | None = None
        #: The dtype inference computes in; None: the weights'. ComfyUI sets it (float32 for float16
        #: weights on a CPU, which ``manual_cast`` layers cast per call).
        self.compute_dtype: torch.dtype | None = None
        self._device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        """The device inference computes on: the weights' unless set (ComfyUI's ModelPatcher sets it
        when it loads or offloads the model; partly loaded layers cast their weights to it)."""
        return self._device or self.projector.queries.device

    @device.setter
    def device(self, device: torch.device | str | None) -> None:
        self._device = None if device is None else torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inference computes in (float32 for a model built by training code)."""
        return self.compute_dtype or self.projector.queries.dtype

    @property
    def fingerprint(self) -> str:
        """Identity of the weights (see :func:`~.types.fingerprint`). Computed once: an inference
        model's weights do not change (training never asks for it)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.state_dict())
        return self._fingerprint

    @torch.no_grad()
    def encode(self, clap_embeds: torch.Tensor, temperature: float | None = None) -> AudioLevels:
        """``clap_embeds [B, clap_dim]`` -> AudioLevels, float32 on ``clap_embeds``' device (inference: no grad)."""
        embeds = clap_embeds.to(self.device, torch.float32)
        first, inverse = distinct_rows(embeds)
        rows = embeds if first is None else embeds[first]  # each distinct embedding once (see distinct_rows)
        levels = self.decomposer(rows.to(self.dtype), temperature)
        back = {"device": clap_embeds.device, "dtype": torch.float32}
        pick = (lambda t: t.to(**back)) if first is None else (lambda t: t[inverse].to(**back))  # one row per input
        return replace(
            levels,
            tokens=pick(levels.tokens),
            assignment=pick(levels.assignment),
            level_weights=pick(levels.level_weights),
            source=self.fingerprint,
        )

    def silence_tokens(self, temperature: float | None = None) -> torch.Tensor:
        """``[1, N, C]`` tokens of a zero CLAP embedding: what unconditional rows attend to.

        The one place they are computed: the model injection (no grad) and training (with grad,
        at the annealed temperature) both call this.
        """
        zeros = torch.zeros(1, self.config.decomposer.clap_dim, device=self.device, dtype=self.dtype)
        return self.projector(self.decomposer(zeros, temperature))

    @torch.no_grad()
    def project(self, levels: AudioLevels) -> AudioTokens:
        """AudioLevels -> AudioTokens ``[B, N, C]`` carrying the levels' user weights, unapplied (and
        the pooled vector ``[B, P]`` when the file has a pooled head); float32, on the levels' device."""
        if levels.source and levels.source != self.fingerprint:
            raise WiringError(
                f"these audio levels were made by another CLAP2Diffusion file (fingerprint {levels.source}) "
                f"than the one given to Audio Project ({self.name or 'fingerprint'} {self.fingerprint}): wire "
                "the same CLAP2Diffusion Loader into Hierarchical Decompose and Audio Project."
            )
        flat = [levels.tokens, levels.assignment, levels.level_weights]
        first, inverse = distinct_rows(torch.cat([t.reshape(t.shape[0], -1) for t in flat], dim=1))
        # Each distinct row once (see distinct_rows), in the compute dtype, then one row per input row.
        kept = (lambda t: t) if first is None else (lambda t: t[first.to(t.device)])
        here = {"device": self.device, "dtype": self.dtype}
        rows = replace(
            levels,
            tokens=kept(levels.tokens).to(**here),
            assignment=kept(levels.assignment).to(**here),
            level_weights=kept(levels.level_weights).to(**here),
        )
        tokens = self.projector(rows)
        pooled = None if self.pooled_head is None else self.pooled_head(rows)
        if first is not None:
            tokens = tokens[inverse.to(tokens.device)]
            pooled = None if pooled is None else pooled[inverse.to(pooled.device)]
        back = {"device": levels.tokens.device, "dtype": torch.float32}
        return AudioTokens(
            tokens=tokens.to(**back),
            token_levels=self.projector.token_levels.clone().to(levels.tokens.device),
            level_scale=levels.level_scale.clone(),
            source=self.fingerprint,
            source_name=self.name,
            pooled=None if pooled is None else pooled.to(**back),
        )

    def check_tokens(self, tokens: AudioTokens, what: str = "this node") -> None:
        """Raise :class:`WiringError` unless ``tokens`` were made by this model."""
        tokens.check_source(self.fingerprint, self.name, what)
