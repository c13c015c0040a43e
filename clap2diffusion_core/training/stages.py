"""What a training step computes in each stage, and the models it computes it with.

:class:`StageModule` is the ``nn.Module`` accelerate prepares (and DDP wraps): its parameters are
exactly the CLAP2Diffusion modules, so checkpoints and gradient all-reduce cover those and nothing
else. The frozen SD1.5 UNet of stages 2/3 sits beside it in a :class:`FrozenUNet` holder, not as
a submodule; the adapter reaches into it through the diffusers attention processors of
:mod:`clap2diffusion_core.diffusers_processor`, so gradients flow from the epsilon loss through
the frozen UNet into the adapter, projector and decomposer.

Everything random in a step (noise, timesteps, dropout rows) is drawn by :meth:`StageModule.draw`
from a generator the trainer seeds with (seed, step, micro-batch, process): a resumed run draws the
same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint
from ..decomposer import DecomposerConfig
from ..model import BASE_FAMILIES, CLAP2DiffusionModel, ModelConfig
from ..projector import ProjectorConfig
from . import losses
from .config import StageConfig
from .distil import final_model  # noqa: F401 (the trainer's import)
from .distributed import gather_rows
from .encoders import CONFIG_DIR

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ..adapters import AdapterConfig
    from ..diffusers_processor import AudioAdapterHook

log = logging.getLogger(__name__)


@dataclass
class FrozenUNet:
    """The frozen SD1.5 UNet (``dtype`` on the training device), its noise schedule, and the hook
    that routes audio tokens to the adapter inside it."""

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    dtype: torch.dtype
    hook: AudioAdapterHook | None = None
    #: ``sd15`` or ``sdxl`` (the distillation only: stages 2/3 read SD1.5 feature caches).
    family: str = "sd15"


def load_frozen_unet(
    checkpoint: str | os.PathLike, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool = False
) -> FrozenUNet:
    """The UNet of a single-file SD1.5 checkpoint (via :mod:`clap2diffusion_core.sd15`) or an
    SDXL-family one (:mod:`clap2diffusion_core.sdxl`), frozen, with the DDPM training schedule both
    families share (shipped config)."""
    from diffusers import DDPMScheduler

    from ..sd15 import load_unet
    from ..sdxl import checkpoint_family, load_sdxl_unet

    family = checkpoint_family(checkpoint)
    unet = (load_sdxl_unet(checkpoint, dtype) if family == "sdxl" else load_unet(checkpoint, dtype=dtype))
    unet = unet.to(device).requires_grad_(False)
    if gradient_checkpointing:
        # Trades compute for activation memory; still frozen, the adapter's gradients pass through.
        unet.enable_gradient_checkpointing()
        unet.train()
    scheduler = DDPMScheduler.from_config(json.loads((CONFIG_DIR / "scheduler_sd15.json").read_text()))
    return FrozenUNet(unet, scheduler, dtype, family=family)


def adapter_config_for(unet: UNet2DConditionModel) -> AdapterConfig:
    """The adapter layout of a diffusers UNet (16 layers for SD1.5, 4 for the tests' tiny one)."""
    from ..adapters import AdapterConfig
    from ..diffusers_processor import diffusers_layout

    return AdapterConfig.for_layers(diffusers_layout(unet), unet.config.cross_attention_dim)


def build_model(config: StageConfig, frozen: FrozenUNet | None) -> CLAP2DiffusionModel:
    """The model a stage trains: from ``config.init_from`` (the previous stage's file) or from
    scratch (stage 1), with an adapter for ``frozen.unet`` added in stage 2 if the file has none.
    Parameters not in ``config.model.train`` are frozen."""
    adapter = None
    if config.init_from:
        source = load_checkpoint(config.init_from)
        adapter = source.config.adapter
        if config.stage >= 2 and adapter is None:
            adapter = adapter_config_for(frozen.unet)
        if frozen is not None and source.config.context_dim != frozen.unet.config.cross_attention_dim:
            raise CheckpointError(
                f"{config.init_from}: made for {source.config.base_family} (context_dim {source.config.context_dim}), "
                f"but the UNet of {config.sd15} has context_dim {frozen.unet.config.cross_attention_dim}: start "
                "from a file made for this checkpoint's family (or from none)")
        model_config = dataclasses.replace(source.config, stage=config.stage, adapter=adapter)
        model = CLAP2DiffusionModel(model_config)
        result = model.load_state_dict(source.state_dict(), strict=False)
        if result.unexpected_keys or any(not k.startswith("adapter.") for k in result.missing_keys):
            raise CheckpointError(f"{config.init_from}: does not fit the stage-{config.stage} model: {result}")
        fresh_adapter = bool(result.missing_keys)
    else:
        projector, family = dict(config.model.projector), config.model.base_family
        if config.stage >= 2:
            adapter = adapter_config_for(frozen.unet)
            # The tokens go where the UNet's text goes: its context size names the family.
            projector["context_dim"] = frozen.unet.config.cross_attention_dim
            family = {v: k for k, v in BASE_FAMILIES.items()}.get(projector["context_dim"], family)
        model = CLAP2DiffusionModel(
            ModelConfig(
                base_family=family,
                stage=config.stage,
                decomposer=DecomposerConfig.from_dict(config.model.decomposer),
                projector=ProjectorConfig.from_dict(projector),
                adapter=adapter,
            )
        )
        fresh_adapter = adapter is not None
    if fresh_adapter and config.model.adapter_init == "text_kv":
        from ..diffusers_processor import init_adapter_from_unet

        init_adapter_from_unet(model.adapter, frozen.unet)
    model.train()
    for name, module in model.named_children():
        module.requires_grad_(name in config.model.train)
    return model


class StageModule(nn.Module):
    """One stage's forward: CLAP embeddings -> decomposition -> audio tokens -> weighted losses.

    Stage 1 (``loss.epsilon == 0``): InfoNCE + direction MSE of the pooled audio tokens against
    the pooled caption. Stage 2/3 add the epsilon loss through the frozen UNet (audio tokens via the
    adapter, caption hidden states as the text context) and the level regularisers.
    """

    def __init__(
        self,
        model: CLAP2DiffusionModel,
        config: StageConfig,
        frozen: FrozenUNet | None = None,
        empty_caption: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_config = config.loss
        self.frozen = frozen  # a plain holder: the UNet is not a submodule (not saved, not all-reduced)
        if config.loss.epsilon:
            if frozen is None or frozen.hook is None or model.adapter is None:
                raise ValueError("the epsilon loss needs the frozen UNet with the adapter attached")
            if config.loss.text_dropout and empty_caption is None:
                raise ValueError("caption dropout needs the empty caption's CLIP hidden state")
        if empty_caption is not None:
            self.register_buffer("empty_caption", empty_caption.float(), persistent=False)

    def draw(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator, part: tuple[int, int] = (0, 1),
        evaluation: bool = False,
    ) -> dict[str, torch.Tensor]:
        """This step's randomness for ``batch`` (on the CPU, from ``generator``).

        ``part = (rank, world)``: the numbers are drawn for the global batch (``world`` x this
        batch's rows) and this process takes its slice, so N processes draw what one process with
        the global batch draws. ``evaluation``: no dropped rows.
        """
        cfg = self.loss_config
        if not cfg.epsilon:
            return {}
        latents = batch["latents"]
        b, (rank, world) = latents.shape[0], part
        n = b * world
        steps = self.frozen.scheduler.config.num_train_timesteps
        drawn = {
            "noise": torch.randn((n, *latents.shape[1:]), generator=generator),
            "timesteps": torch.randint(0, steps, (n,), generator=generator),
            "drop_audio": torch.rand(n, generator=generator) < cfg.audio_dropout,
            "drop_text": torch.rand(n, generator=generator) < cfg.text_dropout,
        }
        if evaluation:
            drawn["drop_audio"].zero_()
            drawn["drop_text"].zero_()
        return {k: v[rank * b:(rank + 1) * b] for k, v in drawn.items()}

    def forward(
        self, batch: dict[str, torch.Tensor], temperature: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``batch``: ``clap [B, 512]``, ``text_pooled [B, C]``, ``caption_index [B]`` (+ ``text
        [B, 77, C]``, ``latents [B, 4, h, w]`` and :meth:`draw`'s tensors for the epsilon loss).

        Returns ``(loss, terms, stats)``: the weighted sum, each unweighted term, and detached
        statistics for the logs (level usage, level weights, gates).
        """
        cfg = self.loss_config
        levels = self.model.decomposer(batch["clap"], temperature)
        tokens = self.model.projector(levels)  # [B, N, C]
        pooled = tokens.mean(dim=1)
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}

        def add(name: str, weight: float, compute) -> None:  # noqa: ANN001
            if weight:
                terms[name], weights[name] = compute(), weight

        # Losses that couple rows see the global batch while training (see .distributed).
        gather = gather_rows if self.training else (lambda x: x)
        add("infonce", cfg.infonce,
            lambda: losses.info_nce(gather(pooled), gather(batch["text_pooled"]), cfg.infonce_temperature,
                                    gather(batch["caption_index"])))
        add("mse", cfg.mse, lambda: losses.direction_mse(pooled, batch["text_pooled"]))
        add("orthogonality", cfg.orthogonality, lambda: losses.orthogonality(levels))
        add("entropy", -cfg.entropy, lambda: losses.assignment_entropy(levels))  # maximised
        add("prior", cfg.prior, lambda: losses.prior_kl_of_usage(
            gather(levels.assignment.float().mean(dim=1)).mean(dim=0), self.model.config.decomposer.level_prior))
        add("epsilon", cfg.epsilon, lambda: self._epsilon(batch, tokens, temperature))
        loss = sum(weights[k] * v for k, v in terms.items())

        with torch.no_grad():
            stats = {
                "level_usage": levels.level_usage().mean(0),
                "level_weights": levels.level_weights.mean(0),
                "token_norm": tokens.norm(dim=-1).mean(),
            }
            if self.model.adapter is not None:
                stats["gates"] = self.model.adapter.gates()
        return loss, terms, stats

    def _epsilon(self, batch: dict[str, torch.Tensor], tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        f = self.frozen
        # Rows with dropped audio attend to the silence tokens, as unconditional rows do in ComfyUI;
        # computed here with gradients, so the silence tokens are trained too.
        silence = self.model.silence_tokens(temperature)
        audio = torch.where(batch["drop_audio"][:, None, None], silence, tokens)
        text = batch["text"]
        if self.loss_config.text_dropout:
            text = torch.where(batch["drop_text"][:, None, None], self.empty_caption, text)
        latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = f.scheduler.add_noise(latents, noise, t)
        with f.hook.audio(audio, self.model.projector.token_levels):
            prediction = f.unet(noisy.to(f.dtype), t, encoder_hidden_states=text.to(f.dtype)).sample
        if f.scheduler.config.prediction_type == "v_prediction":
            target = f.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        return losses.diffusion_mse(prediction, target)
