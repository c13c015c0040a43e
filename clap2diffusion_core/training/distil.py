"""Self-distillation of the audio adapter from the base UNet: a stage-3 file with no data set.

The base model already knows what a caption looks like, so the adapter can learn from it:

- **teacher**: the frozen UNet on the caption's text (CLIP hidden states ``[B, 77, C]``), with an
  optional guidance scale ``g``: ``u + g (c - u)``, ``u`` the neutral prompt's prediction;
- **student**: the same UNet on the neutral prompt (``""``) with the audio adapter fed the tokens of
  the caption's CLAP *text* embedding, moved by the text fit's gap-bridging noise (at inference the
  audio embedding is fed instead);
- **loss**: MSE between the student's and the teacher's noise predictions.

States (what the UNet denoises): from pure noise, the teacher walks ``j`` deterministic DDIM steps
on a coarse grid (``distil.sampler_steps`` timesteps from 999), ``j`` drawn in 1..``teacher_steps``
per row, so the student sees the states its sampler will see. A ``pure_noise`` share of rows is
pure noise at a timestep in [``pure_noise_min_t``, 999] instead. The walk runs once per micro-batch
without gradient (``max j`` teacher evaluations) before the student's forward. Rows whose audio is
dropped (``loss.audio_dropout``) get the silence tokens and the neutral prediction as target, so
the unconditional rows of CFG, which ComfyUI feeds the silence tokens, stay neutral.

``heldout_gain`` (the smoke's figure, :func:`heldout_gain`): on captions kept out of training, with
fixed states, ``1 - mse(student_trained, teacher) / mse(student_untrained, teacher)``. The
untrained student has closed gates (the adapter starts at exactly zero), so it *is* the neutral
prediction, and the gain is the share of the text's effect on the noise prediction that the audio
adapter reproduces for unseen captions: 0 = none, 1 = all of it.

Validation grid (:func:`validation_grid`): at set steps, a few held-out captions sampled from the
same seed with DDIM and CFG: teacher (text), student (neutral prompt + audio), neutral prompt alone;
decoded with the checkpoint's VAE into ``<run>/distil/validation/step-<n>.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..model import CLAP2DiffusionModel
from . import losses
from .settings import StageConfig

if TYPE_CHECKING:
    from .textfit import TextFitConfig

#: Captions -> ``(states [n, 77, C], pooled [n, P] or None)``: the teacher's text conditioning.
TextStates = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]


# ------------------------------------------------------------------------------------------------
# captions


@dataclass
class CaptionSet:
    """The corpus, encoded once: ``clap [M, 512]`` (CLAP text, unit), ``text [M, 77, C]`` (the
    teacher's context), ``neutral [1, 77, C]`` (the empty prompt); ``train`` / ``heldout`` rows.
    SDXL adds the pooled text ``pooled [M, 1280]`` and ``neutral_pooled [1, 1280]``."""

    captions: list[str]
    clap: torch.Tensor
    text: torch.Tensor
    neutral: torch.Tensor
    train: list[int]
    heldout: list[int]
    pooled: torch.Tensor | None = None
    neutral_pooled: torch.Tensor | None = None

    def dataset(self, rows: Sequence[int], derange: bool = False) -> CaptionDataset:
        return CaptionDataset(self, list(rows), derange)


class CaptionDataset(torch.utils.data.Dataset):
    """``dataset[i]`` -> ``{"clap" [512], "text" [77, C], "caption_index"}`` for the chosen rows.
    ``derange``: also ``"swap_clap" [512]``, the CLAP embedding of row ``i + 1`` (mod n), a fixed
    derangement of the rows (:func:`heldout_specific_gain`)."""

    def __init__(self, captions: CaptionSet, rows: list[int], derange: bool = False) -> None:
        if derange and len(rows) < 2:
            raise ValueError("a derangement needs at least 2 rows (distil.heldout >= 2)")
        self.captions, self.rows, self.derange = captions, rows, derange

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row, c = self.rows[i], self.captions
        item = {"clap": c.clap[row], "text": c.text[row].float(), "caption_index": torch.tensor(row)}
        if c.pooled is not None:
            item["pooled"] = c.pooled[row]
        if self.derange:
            item["swap_clap"] = c.clap[self.rows[(i + 1) % len(self.rows)]]
        return item


def split_corpus(size: int, heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``size`` caption rows into (train, heldout), both sorted."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 7_919 + 1)).tolist()
    return sorted(order[heldout:]), sorted(order[:heldout])


def build_caption_set(captions: Sequence[str], clap_text: Callable[[list[str]], torch.Tensor],
                      text_states: TextStates, heldout: int, seed: int, batch_size: int = 32,
                      on_batch: Callable[[int, int], None] | None = None) -> CaptionSet:
    """Encode ``captions`` once: ``clap_text`` (CLAP's text tower, ``[n, 512]``) and ``text_states``
    (the checkpoint's text encoder: ``(states [n, 77, C], pooled [n, P] or None)``), the neutral
    prompt ``""`` too, and split them (:func:`split_corpus`). The command line and the node both come
    here, with their own encoders. Text states are stored in float16 (half the memory of a big corpus).
    ``on_batch(done, total)`` after each batch of captions."""
    captions = list(captions)
    clap_rows, states, pooled = [], [], []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        clap_rows.append(clap_text(chunk).float().cpu().clone())
        h, p = text_states(chunk)
        states.append(h.detach().float().cpu().half())
        if p is not None:
            pooled.append(p.detach().float().cpu().clone())
        if on_batch is not None:
            on_batch(start + len(chunk), len(captions))
    neutral, neutral_pooled = text_states([""])
    train, held = split_corpus(len(captions), heldout, seed)
    return CaptionSet(captions, F.normalize(torch.cat(clap_rows), dim=-1), torch.cat(states),
                      neutral.detach().float().cpu().clone(), train, held,
                      pooled=torch.cat(pooled) if pooled else None,
                      neutral_pooled=None if neutral_pooled is None else neutral_pooled.detach().float().cpu().clone())

def final_model(model: CLAP2DiffusionModel, temperature: float) -> CLAP2DiffusionModel:
    """A copy of ``model`` whose config carries the temperature training ended at, so the ComfyUI
    nodes decompose at the temperature the weights were trained for."""
    decomposer = dataclasses.replace(model.config.decomposer, temperature=float(temperature))
    out = CLAP2DiffusionModel(dataclasses.replace(model.config, decomposer=decomposer))
    out.load_state_dict(model.state_dict())
    return out.eval()


def refit_pooled_head(model: CLAP2DiffusionModel, captions: CaptionSet, temperature: float,
                      fit: TextFitConfig | None = None, device: torch.device | str = "cpu") -> CLAP2DiffusionModel:
    """SDXL files: fit ``model``'s pooled head again on the training captions, as the text fit fits its
    own, with everything else frozen: the distillation moved the decomposer the head reads, so the
    text fit's head no longer matches it. A model without a head (a distillation started from no file)
    gets a new one first, laid out as the text fit lays out its own. Returns the model (``model``
    itself, fitted in place, when it had a head; SD1.5: ``model`` untouched).

    ``fit.recipe`` 2 (the default): solved in closed form (:func:`.kernelfit.solve_pooled_head`, the
    text fit's kernel and bridging). Recipe 1: ``fit.steps`` of :func:`.textfit.stage1_loss` (its
    pooled term: with only the head trainable the token term adds no gradient), its gap bridging,
    batches and rate."""
    from .loop import cosine_with_warmup
    from .sampling import StreamBatchSampler, step_generator
    from .textfit import TextFitConfig, bridge_noise, bridged_copies, stage1_loss

    if captions.pooled is None:
        return model
    fit = fit or TextFitConfig()
    if model.pooled_head is None:
        from ..pooled_head import PooledHeadConfig

        d = model.config.decomposer
        head = PooledHeadConfig(pooled_dim=captions.pooled.shape[-1], token_dim=d.token_dim, num_tokens=d.num_tokens,
                                norm_target=float(captions.pooled.float().norm(dim=-1).mean()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(fit.seed)
            grown = CLAP2DiffusionModel(dataclasses.replace(model.config, pooled=head))
        grown.load_state_dict(model.state_dict(), strict=False)
        model = grown.to(next(model.parameters()).device)
    rows = torch.tensor(captions.train)
    clap_all = captions.clap[rows].float()
    if fit.recipe >= 2:
        from .kernelfit import solve_pooled_head

        noisy = bridged_copies(clap_all, fit)
        was_device = next(model.parameters()).device
        model = model.cpu().eval()  # a few thousand rows: the solve runs on the CPU
        solve_pooled_head(model, clap_all, captions.pooled[rows].float(), noisy, beta=fit.kernel_beta,
                          threshold=fit.kernel_threshold, strength=fit.ridge, seed=fit.seed, temperature=temperature)
        return model.to(was_device)
    tokens_all = captions.text[rows].float().mean(dim=1)  # [M, C] (no gradient reaches the head from it)
    pooled_all = captions.pooled[rows].float()
    with torch.inference_mode(False), torch.enable_grad():
        was = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        head = model.pooled_head.requires_grad_(True)
        params = list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=fit.lr, weight_decay=fit.weight_decay)
        scheduler = cosine_with_warmup(optimizer, fit.warmup_steps, fit.steps)
        batches = iter(StreamBatchSampler(len(rows), min(fit.batch_size, len(rows)), fit.seed))
        model.train()
        try:
            for step in range(fit.steps):
                index = torch.tensor(next(batches))
                clap = bridge_noise(clap_all[index], fit.noise, step_generator(fit.seed, step, 0, 0))
                loss = stage1_loss(model, clap.to(device), tokens_all[index].to(device), index.to(device),
                                   temperature, fit, pooled_all[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(was[name])
    return model.eval()


# ------------------------------------------------------------------------------------------------
# the sampler's grid


def ddim_grid(steps: int, train_steps: int = 1000) -> torch.Tensor:
    """``[steps]`` timesteps from ``train_steps - 1`` down to 0, evenly spaced (long)."""
    return torch.linspace(train_steps - 1, 0, steps).round().long()


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, alpha_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta 0) of an epsilon model: ``x [B, ...]`` at cumulative alpha
    ``alpha [B]`` -> the state at ``alpha_next [B]`` (1 = the clean estimate)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    a, a_next = alpha.view(shape).to(x), alpha_next.view(shape).to(x)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


# ------------------------------------------------------------------------------------------------
# the UNet both sides hand the loop


class DistilUNet(Protocol):
    """The frozen UNet the distillation runs, whoever holds it: diffusers' on the command line
    (:class:`.distil_diffusers.DiffusersDistilUNet`), ComfyUI's in the node
    (``nodes/distil_unet.py``). Both run the adapter math of :mod:`..audio_attention`."""

    #: Latent channels (4), whether it takes SDXL's pooled text and size ids, the DDPM schedule
    #: ``[T]`` (cumulative alphas) and what it predicts (``"epsilon"``).
    in_channels: int
    sdxl: bool
    alphas_cumprod: torch.Tensor
    prediction_type: str

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, 4, s, s]`` at timesteps ``t [B]`` (long), ``context [B, 77, C]``, ``pooled [B, P]``
        (SDXL) -> the noise prediction ``[B, 4, s, s]`` in float32."""

    def audio(self, tokens: torch.Tensor, token_levels: torch.Tensor) -> contextlib.AbstractContextManager:
        """Bind ``tokens [B | 1, N, C]`` to the adapter for the calls inside (with gradient)."""


# ------------------------------------------------------------------------------------------------
# the module the trainer prepares


class DistilModule(nn.Module):
    """The distillation step; the trainer's interface of :class:`.stages.StageModule`
    (``draw``, ``forward(batch, temperature) -> (loss, terms, stats)``). Parameters: the model's."""

    def __init__(self, model: CLAP2DiffusionModel, config: StageConfig, unet: DistilUNet,
                 neutral: torch.Tensor, neutral_pooled: torch.Tensor | None = None) -> None:
        super().__init__()
        if unet is None or model.adapter is None:
            raise ValueError("the distillation needs the frozen UNet and a model with an adapter")
        if unet.prediction_type != "epsilon":
            raise ValueError(f"the distillation's DDIM walk expects an epsilon model, not {unet.prediction_type!r}")
        self.model = model
        self.distil = config.distil
        self.audio_dropout = config.loss.audio_dropout
        self.unet = unet  # a plain holder: not a submodule (not saved, not all-reduced)
        self.register_buffer("neutral", neutral.float(), persistent=False)  # [1, 77, C]
        # SDXL: the UNet also takes the pooled text and the size/crop ids.
        self.sdxl = unet.sdxl
        if self.sdxl and neutral_pooled is None:
            raise ValueError("an SDXL UNet needs the pooled text of the neutral prompt")
        if self.sdxl:
            self.register_buffer("neutral_pooled", neutral_pooled.float(), persistent=False)  # [1, 1280]
        train_steps = unet.alphas_cumprod.shape[0]
        self.register_buffer("grid", ddim_grid(config.distil.sampler_steps, train_steps), persistent=False)
        self.register_buffer("alphas", unet.alphas_cumprod.float().clone(), persistent=False)

    # ---- randomness

    def draw(self, batch: dict[str, torch.Tensor], generator: torch.Generator, part: tuple[int, int] = (0, 1),
             evaluation: bool = False) -> dict[str, torch.Tensor]:
        """This micro-batch's randomness, drawn for the global batch (``part = (rank, world)``) and
        sliced: ``noise [B, 4, s, s]``, ``steps [B]`` (teacher steps, 0 = pure noise),
        ``pure_t [B]``, ``bridge [B, 512]`` (unit Gaussian, scaled in forward), ``drop_audio [B]``.
        ``evaluation``: no gap-bridging noise, no dropped rows."""
        d = self.distil
        b, (rank, world) = batch["clap"].shape[0], part
        n = b * world
        train_steps = self.alphas.shape[0]
        size = d.latent_size
        drawn = {
            "noise": torch.randn((n, self.unet.in_channels, size, size), generator=generator),
            "steps": torch.randint(1, d.teacher_steps + 1, (n,), generator=generator),
            "pure": torch.rand(n, generator=generator) < d.pure_noise,
            "pure_t": torch.randint(min(d.pure_noise_min_t, train_steps - 1), train_steps, (n,), generator=generator),
            "bridge": torch.randn((n, batch["clap"].shape[-1]), generator=generator),
            "drop_audio": torch.rand(n, generator=generator) < self.audio_dropout,
        }
        drawn["steps"] = torch.where(drawn.pop("pure"), 0, drawn["steps"])
        if evaluation:
            drawn["bridge"].zero_()
            drawn["drop_audio"].zero_()
        return {k: v[rank * b:(rank + 1) * b] for k, v in drawn.items()}

    # ---- teacher

    def _unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
              pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen UNet; ``pooled [B, 1280]`` (SDXL; default the neutral prompt's)."""
        if self.sdxl and pooled is None:
            pooled = self.neutral_pooled.expand(x.shape[0], -1)
        return self.unet(x, t, context, pooled if self.sdxl else None)

    def _neutral_pooled(self, n: int) -> torch.Tensor | None:
        return self.neutral_pooled.expand(n, -1) if self.sdxl else None

    @torch.no_grad()
    def teacher(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(u + g (c - u), u)``: the teacher's prediction and the neutral one (None when ``g`` is 1,
        where the neutral prediction is not needed for it)."""
        g = self.distil.guidance_scale
        if g == 1.0:
            return self._unet(x, t, text, pooled), None
        n = x.shape[0]
        neutral = self.neutral.expand(n, -1, -1)
        both = None if pooled is None else torch.cat([self._neutral_pooled(n), pooled])
        u, c = self._unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([neutral, text]), both).chunk(2)
        return u + g * (c - u), u

    @torch.no_grad()
    def states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x [B, 4, s, s], t [B], target [B, 4, s, s])``: each row's state (the teacher's after
        ``steps`` DDIM steps from ``noise``, or the noise itself at ``pure_t``), its timestep, and the
        target there (the teacher's prediction; the neutral one for rows with dropped audio)."""
        x, steps, text, pooled = batch["noise"].float(), batch["steps"], batch["text"], batch.get("pooled")
        grid, alphas = self.grid, self.alphas
        for k in range(int(steps.max())):
            t = grid[k].expand(x.shape[0])
            eps, _ = self.teacher(x, t, text, pooled)
            stepped = ddim_step(x, eps, alphas[t], alphas[grid[k + 1]].expand(x.shape[0]))
            x = torch.where((steps > k).view(-1, 1, 1, 1), stepped, x)
        t = torch.where(steps == 0, batch["pure_t"], grid[steps])
        target, neutral = self.teacher(x, t, text, pooled)
        drop = batch["drop_audio"]
        if bool(drop.any()):
            if neutral is None:
                neutral = self._unet(x, t, self.neutral.expand(x.shape[0], -1, -1))
            target = torch.where(drop.view(-1, 1, 1, 1), neutral, target)
        return x, t, target

    # ---- student

    def tokens(self, clap: torch.Tensor, temperature: float | None) -> torch.Tensor:
        """``clap [B, 512]`` -> audio tokens ``[B, N, C]`` (with gradient)."""
        return self.model.projector(self.model.decomposer(clap, temperature))

    def student(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The UNet on the neutral prompt with ``tokens [B | 1, N, C]`` through the adapter."""
        with self.unet.audio(tokens, self.model.projector.token_levels):
            return self._unet(x, t, self.neutral.expand(x.shape[0], -1, -1))

    def _student_tokens(self, batch: dict[str, torch.Tensor], clap: torch.Tensor, temperature: float):  # noqa: ANN202
        """``(levels, tokens [B, N, C])`` for ``clap [B, 512]``: gap-bridged, dropped rows silent."""
        scale = self.distil.bridge_noise / math.sqrt(clap.shape[-1])
        clap = F.normalize(clap.float() + scale * batch["bridge"].float(), dim=-1)
        levels = self.model.decomposer(clap, temperature)
        tokens = self.model.projector(levels)
        if self.audio_dropout:
            silence = self.model.silence_tokens(temperature)
            tokens = torch.where(batch["drop_audio"][:, None, None], silence, tokens)
        return levels, tokens

    def forward(self, batch: dict[str, torch.Tensor], temperature: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``batch``: ``clap [B, 512]``, ``text [B, 77, C]`` and :meth:`draw`'s tensors; with
        ``swap_clap [B, 512]`` (held-out evaluation) also the student fed that other caption's audio,
        on the same states, against the same target (term ``distil_swapped``).
        Returns ``(loss, {"distil": loss, ...}, stats)`` as ``StageModule`` does."""
        x, t, target = self.states(batch)
        levels, tokens = self._student_tokens(batch, batch["clap"], temperature)
        loss = losses.diffusion_mse(self.student(x, t, tokens), target)
        terms = {"distil": loss}
        if "swap_clap" in batch:
            _, swapped = self._student_tokens(batch, batch["swap_clap"], temperature)
            terms["distil_swapped"] = losses.diffusion_mse(self.student(x, t, swapped), target)
        with torch.no_grad():
            stats = {
                "level_usage": levels.level_usage().mean(0),
                "level_weights": levels.level_weights.mean(0),
                "token_norm": tokens.norm(dim=-1).mean(),
                "gates": self.model.adapter.gates(),
            }
        return loss, terms, stats


def heldout_gain(heldout_losses: Sequence[tuple[int, dict[str, float]]]) -> float:
    """``1 - last / first`` of the held-out distillation loss (see the module docstring)."""
    first, last = heldout_losses[0][1]["distil"], heldout_losses[-1][1]["distil"]
    return 1.0 - last / first if first > 0 else 0.0


def heldout_specific_gain(heldout_losses: Sequence[tuple[int, dict[str, float]]]) -> float | None:
    """``1 - mse(student(audio_i), teacher_i) / mse(student(audio_j), teacher_i)`` at the last
    evaluation, over the held-out captions, ``j`` a fixed derangement of ``i`` (the next held-out
    caption), with the same noise and states: above 0 only if the audio carries *which* caption it
    stands for, not just that some caption is there (the share that :func:`heldout_gain` cannot tell).
    None when it was not measured (fewer than 2 held-out captions)."""
    values = heldout_losses[-1][1]
    if "distil_swapped" not in values:
        return None
    own, swapped = values["distil"], values["distil_swapped"]
    return 1.0 - own / swapped if swapped > 0 else 0.0


# ------------------------------------------------------------------------------------------------
# validation grid


@torch.no_grad()
def sample_columns(module: DistilModule, clap: torch.Tensor, text: torch.Tensor, temperature: float,
                   steps: int, guidance: float, seed: int, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """``[3, n, 4, s, s]`` latents for ``n`` captions: teacher (text), student (neutral prompt +
    audio tokens of ``clap [n, 512]``), neutral prompt alone; the same seeded noise, DDIM with CFG
    ``guidance`` (uncond: the neutral prompt; the student's with the silence tokens, as ComfyUI's)."""
    n, size = clap.shape[0], module.distil.latent_size
    channels = module.unet.in_channels
    noise = torch.randn((n, channels, size, size), generator=torch.Generator().manual_seed(seed)).to(clap.device)
    neutral = module.neutral.expand(n, -1, -1)
    audio = module.tokens(clap, temperature)
    silence = module.model.silence_tokens(temperature).expand(n, -1, -1)
    grid = ddim_grid(steps, module.alphas.shape[0]).to(clap.device)
    alphas = module.alphas
    out = []
    for column in ("teacher", "student", "neutral"):
        x = noise.clone()
        for k in range(steps):
            t = grid[k].expand(2 * n)
            xx = torch.cat([x, x])
            if column == "student":
                with module.unet.audio(torch.cat([silence, audio]), module.model.projector.token_levels):
                    u, c = module._unet(xx, t, torch.cat([neutral, neutral])).chunk(2)
            else:
                teacher = column == "teacher"
                both = None if pooled is None else torch.cat(
                    [module._neutral_pooled(n), pooled if teacher else module._neutral_pooled(n)])
                u, c = module._unet(xx, t, torch.cat([neutral, text if teacher else neutral]), both).chunk(2)
            eps = u + guidance * (c - u)
            a_next = alphas[grid[k + 1]] if k + 1 < steps else torch.ones((), device=x.device)
            x = ddim_step(x, eps, alphas[grid[k]].expand(n), a_next.expand(n))
        out.append(x)
    return torch.stack(out)


def grid_image(images: torch.Tensor) -> torch.Tensor:
    """``[3, n, 3, H, W]`` in [-1, 1] -> ``[3, n*H, 3*W]`` in [0, 1]: a row per caption, columns
    teacher / student / neutral."""
    columns, n, c, h, w = images.shape
    return ((images.permute(2, 1, 3, 0, 4).reshape(c, n * h, columns * w) + 1) / 2).clamp(0, 1)


def grid_pixels(module: DistilModule, captions: CaptionSet, decoder: Callable[[torch.Tensor], torch.Tensor],
                temperature: float) -> torch.Tensor:
    """The validation grid of the first ``grid_captions`` held-out captions as a ``[3, H, W]`` image in
    [0, 1]; ``decoder`` maps latents ``[n, 4, s, s]`` to pixels ``[n, 3, 8s, 8s]`` in [-1, 1]."""
    d = module.distil
    rows = captions.heldout[:d.grid_captions]
    device = module.neutral.device
    clap = captions.clap[rows].to(device)
    text = captions.text[rows].float().to(device)
    was_training = module.training
    module.eval()
    try:
        pooled = None if captions.pooled is None else captions.pooled[rows].to(device)
        latents = sample_columns(module, clap, text, temperature, d.grid_steps, d.grid_guidance, d.grid_seed, pooled)
    finally:
        module.train(was_training)
    pixels = decoder(latents.flatten(0, 1)).float().cpu()
    return grid_image(pixels.view(3, len(rows), *pixels.shape[1:]))


def validation_grid(module: DistilModule, captions: CaptionSet, decoder, temperature: float, folder: Path,
                    step: int) -> tuple[Path, torch.Tensor]:
    """Sample and write ``folder/step-<n>.png`` (and ``captions.json`` naming its rows); returns the
    path and the ``[3, H, W]`` image in [0, 1]."""
    from PIL import Image

    d = module.distil
    rows = captions.heldout[:d.grid_captions]
    image = grid_pixels(module, captions, decoder, temperature)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(path)
    (folder / "captions.json").write_text(json.dumps(
        {"rows": [captions.captions[r] for r in rows], "columns": ["teacher (text)", "student (audio from the "
         "caption's CLAP text embedding)", "neutral prompt"], "guidance": d.grid_guidance, "steps": d.grid_steps},
        indent=2))
    return path, image


def grid_difference(path: str | os.PathLike, rows: int) -> dict[str, float]:
    """Mean absolute pixel differences (0..255) in a validation grid: ``student_teacher``,
    ``neutral_teacher`` and ``student_neutral``; the student closer to the teacher than the neutral
    prompt is shows the audio doing the text's work."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB")).astype(float)
    w = a.shape[1] // 3
    teacher, student, neutral = a[:, :w], a[:, w:2 * w], a[:, 2 * w:3 * w]
    return {"student_teacher": float(np.abs(student - teacher).mean()),
            "neutral_teacher": float(np.abs(neutral - teacher).mean()),
            "student_neutral": float(np.abs(student - neutral).mean()), "rows": rows}
