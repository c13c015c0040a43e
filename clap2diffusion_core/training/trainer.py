"""The accelerate training loop shared by the three stages and the distillation (:mod:`.distil`).

One process or many (``accelerate launch``: several GPUs, several machines, or ``--cpu``), fp32 /
bf16 / fp16, gradient accumulation; tqdm progress, TensorBoard scalars, periodic checkpoints and
exact resume.

Exact resume: a checkpoint (``<stage dir>/checkpoints/step-<n>/``) is accelerate's ``save_state``
(model, optimizer, grad scaler, RNG states, accumulation counter) plus the LR scheduler and the
step. Nothing else is stateful: the data order is a pure function of (seed, position) and the
position is ``step x accumulation``; each micro-batch's noise, timesteps and dropout come from a
generator seeded with (seed, step, micro-batch, process); the temperature and LR are functions of
the step. So a run resumed from step k makes the same updates as one that never stopped.

N processes train like one process with the same global batch: the data order hands process p its
slice of each global batch, the per-step randomness is drawn for the global batch and sliced, and
the losses that couple rows (InfoNCE, the level prior) gather the global batch (:mod:`.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import STAGE_FILE_NAMES, save_checkpoint
from ..levels import LEVELS
from .config import StageConfig
from .features import FeatureCache, FeatureDataset
from .loop import Progress, batch_stream, evaluate_batches, fixed_batches, train_steps
from .sampling import StreamBatchSampler, step_generator
from .schedules import build_lr_scheduler
from .stages import StageModule, build_model, final_model, load_frozen_unet

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainResult:
    """What a stage produced: the loader file (on the main process) and the fixed-batch losses."""

    stage: int
    file: Path
    steps: int
    #: ``(step, {"loss": total, <term>: unweighted value})`` on the fixed batch.
    fixed_losses: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    #: The same on the held-out captions (the distillation only).
    heldout_losses: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    #: Validation grids written (the distillation only): ``(step, png path)``.
    grids: list[tuple[int, Path]] = field(default_factory=list)
    seconds: float = 0.0


def use_cpu() -> bool:
    """Whether the processes train on the CPU: ``accelerate launch --cpu``, or several processes
    (torchrun, ``accelerate launch --multi_gpu``) on a machine without GPUs, where accelerate would
    otherwise fall back to independent single processes."""
    from accelerate.utils import parse_flag_from_env

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return parse_flag_from_env("ACCELERATE_USE_CPU") or (world > 1 and not torch.cuda.is_available())


def lonely_cpu_launch() -> bool:
    """True in the one process ``accelerate launch --cpu --num_processes N`` (N > 1) starts.

    Without ``--mpirun_hostfile`` accelerate starts a single process and leaves the other N - 1 to
    ``mpirun``; it sets ``MASTER_ADDR`` (only when N > 1) but no world size.
    """
    from accelerate.utils import parse_flag_from_env

    world_vars = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return (parse_flag_from_env("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ
            and not any(v in os.environ for v in world_vars))


def check_launch() -> None:
    """Refuse to train in one process when several were asked for (see :func:`lonely_cpu_launch`)."""
    if lonely_cpu_launch():
        raise RuntimeError(
            "accelerate launch --cpu --num_processes N starts one process and expects mpirun to start the "
            "others (--mpirun_hostfile). For N processes on CPUs without MPI use\n"
            "  accelerate launch --multi_gpu --num_processes N -m clap2diffusion_core.training ...\n"
            "(with no GPU present the processes run on the CPU, gloo backend), or\n"
            "  torchrun --nproc_per_node N -m clap2diffusion_core.training ..."
        )


def process_state():
    """accelerate's ``PartialState`` for this launch (see :func:`use_cpu`, :func:`check_launch`)."""
    from accelerate import PartialState

    check_launch()
    return PartialState(cpu=use_cpu())


def find_checkpoint(stage_dir: str | os.PathLike, which: str) -> Path | None:
    """``latest`` -> the newest ``step-*`` folder of a stage (None if there is none), else the path."""
    if which != "latest":
        path = Path(which)
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint folder {path}")
        return path
    root = Path(stage_dir) / "checkpoints"
    steps = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name)))
    return steps[-1][1] if steps else None


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _scalars(prefix: str, values: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if key in ("level_usage", "level_weights"):
            out.update({f"{key}/{name}": float(v) for name, v in zip(LEVELS, value)})
        elif key == "gates":
            out["gates/abs_mean"] = float(value.abs().mean())
            out.update({f"gates/layer_{i:02d}": float(v) for i, v in enumerate(value)})
        else:
            out[f"{prefix}{key}"] = float(value)
    return out


def train_stage(config: StageConfig, resume: str | None = None, progress: bool = True) -> TrainResult:
    """Train one stage as configured; write its checkpoints and its loader file.

    ``resume``: ``"latest"`` (the newest checkpoint of this stage, or a fresh start if there is
    none) or a checkpoint folder. Call in every process of an ``accelerate launch``.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    out = config.stage_dir
    if config.stage > 1 and not config.init_from and config.objective == "dataset":
        previous = Path(config.output_dir) / f"stage{config.stage - 1}" / f"{STAGE_FILE_NAMES[config.stage - 1]}.safetensors"
        config = dataclasses.replace(config, init_from=str(previous))
    use_tb = _tensorboard_available()
    process_state()  # the launch's processes, before accelerate decides on its own
    # accelerate keeps precision and accumulation in process-wide singletons, and stage 1 (fp32) and
    # stage 2 (bf16) run in one process: start each stage afresh, keeping the processes' group.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=use_cpu(),
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with="tensorboard" if use_tb else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if not use_tb:
        log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    accum = config.optim.gradient_accumulation_steps
    set_seed(config.seed)  # the same initial weights in every process

    # ---- data and models
    distil = config.objective == "distil"
    captions = None
    if distil:
        from .distil_diffusers import encode_captions

        captions = encode_captions(config)  # every process encodes the corpus: deterministic, cheap
        dataset = captions.dataset(captions.train)
    else:
        fields = ["clap", "text_pooled"] + (["text", "latents"] if config.loss.epsilon else [])
        dataset = FeatureDataset(config.data.cache, config.data.split, fields)
    frozen = None
    if config.stage > 1:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)
        frozen = load_frozen_unet(config.sd15, device, dtype, config.gradient_checkpointing)
    model = build_model(config, frozen)
    if frozen is not None:
        from ..diffusers_processor import attach_audio_adapter

        frozen.hook = attach_audio_adapter(frozen.unet, model.adapter)
    if distil:
        from .distil import DistilModule
        from .distil_diffusers import DiffusersDistilUNet

        module = DistilModule(model, config, DiffusersDistilUNet(frozen), captions.neutral,
                              captions.neutral_pooled).to(device)
    else:
        empty = FeatureCache(config.data.cache).empty_caption() if config.loss.text_dropout else None
        module = StageModule(model, config, frozen, empty).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=config.optim.betas,
                                  eps=config.optim.eps, weight_decay=config.optim.weight_decay)
    lr_scheduler = build_lr_scheduler(optimizer, config.optim.schedule, config.optim.warmup_steps, config.steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    # Not prepared: accelerate would step it once per process; ours counts optimizer steps.
    state = Progress()
    accelerator.register_for_checkpointing(lr_scheduler, state)

    checkpoint = find_checkpoint(out, resume) if resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"{config.name}: resumed from {checkpoint} at step {state.step}")
    stop = min(config.steps, config.stop_at or config.steps)

    batches = batch_stream(dataset, config.data.batch_size, config.seed, (rank, world), start=state.step * accum,
                           num_workers=config.data.num_workers, pin_memory=device.type == "cuda")
    unwrapped: StageModule = accelerator.unwrap_model(module)

    # The same examples, noise and timesteps every time: a loss curve free of sampling noise. The
    # distillation also evaluates every held-out caption (in batches of eval_batch_size).
    def fixed(data, rows: range, seed: int) -> list[dict[str, torch.Tensor]]:  # noqa: ANN001
        return fixed_batches(data, rows, seed, config.eval_batch_size, unwrapped.draw, device)

    fixed_sets = {"fixed_batch": fixed(dataset, range(min(config.eval_batch_size, len(dataset))), config.seed)}
    if distil:
        # + the held-out specific gain's swap (it needs two held-out captions)
        heldout = captions.dataset(captions.heldout, derange=len(captions.heldout) >= 2)
        fixed_sets["heldout"] = fixed(heldout, range(len(heldout)), config.seed + 1)
    decoder = None
    if distil and config.distil.grid_every > 0 and accelerator.is_main_process:
        from ..sdxl import SDXL_LATENT_SCALE
        from .encoders import SD15_LATENT_SCALE, load_latent_decoder

        scale = SDXL_LATENT_SCALE if frozen.family == "sdxl" else SD15_LATENT_SCALE
        decoder = load_latent_decoder(config.sd15, scale).to(device)

    def evaluate(step: int) -> None:
        for name, batches in fixed_sets.items():
            values = evaluate_batches(unwrapped, batches, config.temperature(step), accelerator.autocast)
            if values.get("distil_swapped", 0.0) > 0:  # the audio's caption-specific share (distil.py)
                values["specific_gain"] = 1.0 - values["distil"] / values["distil_swapped"]
            (result.heldout_losses if name == "heldout" else result.fixed_losses).append((step, values))
            accelerator.log({f"eval/{name}_{k}": v for k, v in values.items()}, step=step)

    def grid(step: int) -> None:
        from .distil import validation_grid

        path, image = validation_grid(unwrapped, captions, decoder, config.temperature(step),
                                      config.stage_dir / "validation", step)
        result.grids.append((step, path))
        if use_tb:
            accelerator.get_tracker("tensorboard", unwrap=True).add_image("validation/grid", image, step)

    if use_tb:
        hparams = {k: v for k, v in _flat(config.to_dict()).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(config.name, config=hparams)
    result = TrainResult(config.stage, out / f"{config.file_name}.safetensors", config.steps)
    grid_every = config.distil.grid_every if decoder is not None else 0
    if state.step == 0:
        evaluate(0)
        if grid_every:
            grid(0)

    bar = tqdm(total=config.steps, initial=state.step, desc=config.name, unit="step",
               disable=not (progress and accelerator.is_local_main_process), dynamic_ncols=True)

    def after_step(step: int, sums: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], temperature: float) -> None:
        bar.update(1)
        if step % config.log_every == 0 or step == stop:
            reduced = {k: accelerator.reduce(v.float(), "mean") for k, v in sums.items() if k != "grad_norm"}
            logs = _scalars("train/", reduced) | _scalars("", stats)
            logs.update({"train/temperature": temperature, "train/lr": lr_scheduler.get_last_lr()[0]})
            if "grad_norm" in sums:
                logs["train/grad_norm"] = float(sums["grad_norm"])
            accelerator.log(logs, step=step)
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", T=f"{temperature:.2f}")
        if step % config.eval_every == 0 or step == config.steps:
            evaluate(step)
        if grid_every and (step % grid_every == 0 or step == config.steps):
            grid(step)
        if step % config.checkpoint_every == 0 or step == stop:
            _save(accelerator, config, unwrapped, step)

    train_steps(module, unwrapped, batches, optimizer, lr_scheduler, state, stop, seed=config.seed, accumulation=accum,
                max_grad_norm=config.optim.max_grad_norm, temperature=config.temperature, backend=accelerator,
                device=device, part=(rank, world), on_step=after_step)
    bar.close()

    if state.step >= config.steps and accelerator.is_main_process:
        final = final_model(unwrapped.model, config.temperature(config.steps))
        if distil:  # SDXL files: the pooled head fitted again to the distilled decomposer (distil.py)
            from .distil import refit_pooled_head

            final = refit_pooled_head(final.to(device), captions, config.temperature(config.steps), device=device)
        save_checkpoint(final, result.file)
        accelerator.print(f"{config.name}: wrote {result.file}")
    accelerator.wait_for_everyone()
    # Not end_training(): it also destroys the process group, which the next stage still needs.
    for tracker in accelerator.trackers:
        tracker.finish()
    if frozen is not None and frozen.hook is not None:
        frozen.hook.detach()
    result.seconds = time.perf_counter() - start_time
    return result


def _save(accelerator, config: StageConfig, unwrapped: StageModule, step: int) -> None:  # noqa: ANN001
    """A resumable checkpoint, with the loader file as of this step beside it; keep the newest few."""
    folder = config.stage_dir / "checkpoints" / f"step-{step:06d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        model = final_model(unwrapped.model, config.temperature(step))
        save_checkpoint(model, folder / f"{config.file_name}.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps({"stage": config.stage, "name": config.name, "step": step,
                                                                "config": config.to_dict()}, indent=2))
        steps = sorted((int(m.group(1)), p) for p in folder.parent.glob("step-*") if (m := _STEP_DIR.match(p.name)))
        for _, old in steps[:-config.keep_checkpoints] if config.keep_checkpoints > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


__all__ = ["Progress", "StreamBatchSampler", "TrainResult", "find_checkpoint", "step_generator", "train_stage"]
