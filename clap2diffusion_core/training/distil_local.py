"""The distillation in one process without accelerate: what the ComfyUI node "Distil Audio Adapter"
runs, on the loop of :mod:`.loop` and the step of :mod:`.distil` (the command line runs the same two
through :func:`.trainer.train_stage`). Torch only.

Resume: every ``checkpoint_every`` steps, and when the run is stopped between two steps (the node's
Cancel), the step, the model, the optimizer and the LR scheduler go to one ``torch.save`` file
(``weights_only`` loadable). A run given that file continues at that step: the data stream and every
step's randomness are functions of the step (:mod:`.loop`), so the final weights are those of a run
that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import AdapterConfig, AdapterLayer
from ..errors import CheckpointError
from ..model import CLAP2DiffusionModel
from .distil import CaptionSet, DistilModule, DistilUNet, final_model, grid_pixels, refit_pooled_head
from .loop import (
    PlainBackend,
    Progress,
    batch_stream,
    cosine_with_warmup,
    evaluate_batches,
    fixed_batches,
    train_steps,
)
from .settings import StageConfig

log = logging.getLogger(__name__)

#: ``layer -> (to_k weight, to_v weight)`` of the UNet's own text attention there (``adapter_init: text_kv``).
TextKV = Callable[[AdapterLayer], tuple[torch.Tensor, torch.Tensor]]


def start_model(source: CLAP2DiffusionModel, adapter: AdapterConfig, text_kv: TextKV | None,
                train: tuple[str, ...] = ("decomposer", "projector", "adapter"), stage: int = 3) -> CLAP2DiffusionModel:
    """The model a distillation starts from: ``source`` (a text-fitted stage-1 file) with a closed
    adapter of layout ``adapter`` (keys and values copied from the UNet's text ones by ``text_kv``), or
    ``source``'s own adapter if it has one. Parameters outside ``train`` are frozen. Built outside
    inference mode (ComfyUI runs nodes in it, and autograd cannot use tensors made there)."""
    with torch.inference_mode(False):
        return _start_model(source, adapter, text_kv, train, stage)


def _start_model(source: CLAP2DiffusionModel, adapter: AdapterConfig, text_kv: TextKV | None,
                 train: tuple[str, ...], stage: int) -> CLAP2DiffusionModel:
    if source.config.context_dim != adapter.context_dim:
        raise CheckpointError(
            f"the CLAP2Diffusion file is made for {source.config.base_family} (context_dim "
            f"{source.config.context_dim}), but the UNet takes context_dim {adapter.context_dim}: use a file "
            "fitted for this checkpoint's family")
    config = dataclasses.replace(source.config, stage=stage, adapter=source.config.adapter or adapter)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the fresh adapter's keys/values are overwritten below; nothing else is random
        model = CLAP2DiffusionModel(config)
    result = model.load_state_dict(source.state_dict(), strict=False)
    if result.unexpected_keys or any(not k.startswith("adapter.") for k in result.missing_keys):
        raise CheckpointError(f"the CLAP2Diffusion file does not fit a stage-{stage} model: {result}")
    if result.missing_keys and text_kv is not None:
        with torch.no_grad():
            for layer, spec in zip(model.adapter.layers, model.adapter.config.layer_specs(), strict=True):
                k, v = text_kv(spec)
                layer.to_k.weight.copy_(k)
                layer.to_v.weight.copy_(v)
    model.train()
    for name, module in model.named_children():
        module.requires_grad_(name in train)
    return model


@dataclass
class LocalResult:
    """What :func:`run_local` made: the final model (config at the final temperature) and its figures."""

    model: CLAP2DiffusionModel
    steps: int
    resumed_from: int
    #: ``(step, loss)`` of every step run in this call.
    losses: list[tuple[int, float]] = field(default_factory=list)
    #: Held-out evaluations: ``(step, {"distil", "distil_swapped", ...})`` at step 0 and at the end.
    heldout: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def save_resume(path: Path, state: Progress, module: DistilModule, optimizer: torch.optim.Optimizer,
                lr_scheduler: torch.optim.lr_scheduler.LRScheduler, heldout: list) -> None:
    """The resume file, written atomically (a cut write never replaces a good file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"step": state.step, "model": module.model.state_dict(), "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(), "heldout": heldout}, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def run_local(
    unet: DistilUNet,
    captions: CaptionSet,
    model: CLAP2DiffusionModel,
    config: StageConfig,
    device: torch.device | str = "cpu",
    *,
    resume_file: Path | None = None,
    checkpoint_every: int = 0,
    before_step: Callable[[int], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    preview_every: int = 0,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_preview: Callable[[int, torch.Tensor], None] | None = None,
) -> LocalResult:
    """Distil ``config.steps`` steps (see the module docstring). ``model`` from :func:`start_model`.

    ``before_step(step)`` runs before every step and ``on_step(step, total, loss)`` after it. Whatever
    raises to stop the run (Cancel: ComfyUI raises inside its UNet's layers too), the state as of the
    last whole step is saved to ``resume_file`` before the exception goes on;
    every ``preview_every`` steps (and at the end) ``on_preview(step, image [3, H, W] in [0, 1])``,
    the validation grid decoded by ``decoder``.
    """
    with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
        return _run(unet, captions, model, config, torch.device(device), resume_file, checkpoint_every,
                    before_step, on_step, preview_every, decoder, on_preview)


def _run(unet, captions, model, config, device, resume_file, checkpoint_every, before_step, on_step,  # noqa: ANN001, PLR0913
         preview_every, decoder, on_preview) -> LocalResult:
    # Ordinary copies of what may have been made in inference mode (autograd may save them).
    captions = dataclasses.replace(captions, **{f.name: getattr(captions, f.name).clone()
                                                for f in dataclasses.fields(captions)
                                                if isinstance(getattr(captions, f.name), torch.Tensor)})
    module = DistilModule(model, config, unet, captions.neutral, captions.neutral_pooled).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    o = config.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    lr_scheduler = cosine_with_warmup(optimizer, o.warmup_steps, config.steps)
    state = Progress()
    heldout_batches = fixed_batches(captions.dataset(captions.heldout, derange=True), range(len(captions.heldout)),
                                    config.seed + 1, config.eval_batch_size, module.draw, device)
    heldout: list[tuple[int, dict[str, float]]] = []
    if resume_file is not None and resume_file.is_file():
        saved = torch.load(resume_file, map_location="cpu", weights_only=True)
        module.model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        state.load_state_dict({"step": saved["step"]})
        heldout = [(int(s), dict(v)) for s, v in saved["heldout"]]
        log.info("distillation: resumed at step %d of %d from %s", state.step, config.steps, resume_file)
    resumed_from = state.step
    if not heldout:
        heldout.append((0, evaluate_batches(module, heldout_batches, config.temperature(0))))
    result = LocalResult(module.model, config.steps, resumed_from, heldout=heldout)

    def preview(step: int) -> None:
        if decoder is not None and on_preview is not None:
            on_preview(step, grid_pixels(module, captions, decoder, config.temperature(step)))

    # A stop may come from anywhere (ComfyUI checks for Cancel inside every layer of its UNet): the
    # weights and the optimizer still hold the last whole step unless it came while the optimizer
    # was writing them, which nothing of ComfyUI's interrupts (only these hooks say so).
    updating = [False]
    optimizer.register_step_pre_hook(lambda *_: updating.__setitem__(0, True))
    optimizer.register_step_post_hook(lambda *_: updating.__setitem__(0, False))

    def after_step(step: int, sums: dict[str, torch.Tensor], stats: dict, temperature: float) -> None:  # noqa: ARG001
        loss = float(sums["loss"])
        result.losses.append((step, loss))
        if on_step is not None:
            on_step(step, config.steps, loss)
        if resume_file is not None and checkpoint_every and step % checkpoint_every == 0 and step < config.steps:
            save_resume(resume_file, state, module, optimizer, lr_scheduler, heldout)
        if preview_every and step % preview_every == 0 and step < config.steps:
            preview(step)

    accumulation = o.gradient_accumulation_steps
    batches = batch_stream(captions.dataset(captions.train), config.data.batch_size, config.seed,
                           start=state.step * accumulation)
    try:
        if state.step == 0 and preview_every:
            preview(0)
        train_steps(module, module, batches, optimizer, lr_scheduler, state, config.steps, seed=config.seed,
                    accumulation=accumulation, max_grad_norm=o.max_grad_norm, temperature=config.temperature,
                    backend=PlainBackend(accumulation), device=device, on_step=after_step, before_step=before_step)
        # The last evaluation and preview: stopped there, a new run only redoes them.
        final = evaluate_batches(module, heldout_batches, config.temperature(config.steps))
        if preview_every or on_preview is not None:
            preview(config.steps)
    except BaseException:
        if not updating[0] and resume_file is not None and state.step > resumed_from:
            save_resume(resume_file, state, module, optimizer, lr_scheduler, heldout)
            log.info("distillation: stopped at step %d of %d; queue it again to resume (%s)",
                     state.step, config.steps, resume_file)
        raise
    heldout.append((config.steps, final))
    result.model = final_model(module.model, config.temperature(config.steps))
    # SDXL files: a pooled head fitted to the distilled decomposer, for Apply Audio to Conditioning.
    result.model = refit_pooled_head(result.model, captions, config.temperature(config.steps), device=device)
    return result


__all__ = ["LocalResult", "run_local", "save_resume", "start_model"]
