"""The training settings as typed dataclasses, with no YAML (the ComfyUI node builds them in code;
``config.py`` reads them from the shipped YAML files)."""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from .temperature import TemperatureSchedule

#: The distillation's loader file (a stage-3 file: Apply Audio to Model loads it).
DISTIL_FILE_NAME = "audio_adapter_distilled"


@dataclasses.dataclass
class DataConfig:
    #: Feature cache made by ``prepare``.
    cache: str = "data/cache"
    split: str = "train"
    #: Per process and micro-batch; the effective batch is ``batch_size x processes x accumulation``.
    batch_size: int = 8
    num_workers: int = 2


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    #: A diffusers.optimization schedule name.
    schedule: str = "cosine"
    warmup_steps: int = 200
    #: 0 disables clipping.
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1


@dataclasses.dataclass
class LossConfig:
    """Loss weights (0 switches a term off) and the classifier-free dropout of stage 2/3."""

    infonce: float = 1.0
    infonce_temperature: float = 0.07
    mse: float = 0.5
    epsilon: float = 0.0
    orthogonality: float = 0.0
    entropy: float = 0.0
    prior: float = 0.0
    #: Rows whose audio is replaced by the silence tokens (what unconditional rows see in ComfyUI).
    audio_dropout: float = 0.0
    #: Rows whose caption is replaced by the empty caption (audio alone must shape the image).
    text_dropout: float = 0.0


@dataclasses.dataclass
class ModelOptions:
    base_family: str = "sd15"
    #: Overrides of DecomposerConfig / ProjectorConfig for a model trained from scratch (stage 1).
    decomposer: dict[str, Any] = dataclasses.field(default_factory=dict)
    projector: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Which parts the optimizer updates (the rest stays frozen).
    train: tuple[str, ...] = ("decomposer", "projector")
    #: A new adapter's audio keys/values: copies of each layer's text to_k/to_v, or random.
    adapter_init: Literal["text_kv", "random"] = "text_kv"


@dataclasses.dataclass
class DistilConfig:
    """The distillation objective (``objective: distil``): see :mod:`.distil`.

    No data set: captions (the text fit's corpus) give the teacher's text and the student's CLAP text
    embedding; the latents are noise and the states the teacher reaches from it.
    """

    #: CLAP model whose *text* tower embeds the captions (transformers folder or laion-clap .pt).
    clap: str | None = None
    #: CLIP-L tokenizer folder (default: ComfyUI's comfy/sd1_tokenizer).
    tokenizer: str | None = None
    #: Extra captions, one per line (they come first in the corpus).
    captions: str | None = None
    corpus_size: int = 1024
    corpus_seed: int = 0
    #: Captions kept out of training; ``heldout_gain`` is measured on them.
    heldout: int = 64
    #: Gap bridging of the CLAP text embeddings (the text fit's noise norm; 0: none).
    bridge_noise: float = 1.0
    #: Teacher classifier-free guidance ``u + g (c - u)`` (``u``: the neutral prompt): 1 = the text
    #: prediction alone; above 1 the audio learns to act as CFG'd text does (sample with low CFG then).
    guidance_scale: float = 1.0
    #: Latent side (image side / 8) of the states the student sees.
    latent_size: int = 64
    #: The teacher's DDIM grid: ``sampler_steps`` timesteps from 999 down.
    sampler_steps: int = 10
    #: A row's state is the teacher's after 1..``teacher_steps`` DDIM steps on the grid from noise.
    teacher_steps: int = 6
    #: Share of rows at pure noise instead, at a timestep drawn in [``pure_noise_min_t``, 999].
    pure_noise: float = 0.25
    pure_noise_min_t: int = 800
    #: Validation grid (teacher / student / neutral for a few held-out captions) every this many
    #: steps and at the end; 0: never.
    grid_every: int = 500
    grid_captions: int = 3
    grid_steps: int = 20
    #: CFG of the grid's samplers (uncond: the neutral prompt; the student's with the silence tokens).
    grid_guidance: float = 7.5
    grid_seed: int = 0


@dataclasses.dataclass
class StageConfig:
    stage: int = 1
    #: ``dataset``: the feature cache's clips (stages 1-3); ``distil``: self-distillation from the
    #: base UNet on captions alone (a stage-3 file, written to ``<output_dir>/distil/``).
    objective: Literal["dataset", "distil"] = "dataset"
    steps: int = 3000
    seed: int = 42
    #: The run folder; stage ``n`` writes ``<output_dir>/stage<n>/``.
    output_dir: str = "runs/clap2diffusion"
    #: The file to start from; default for stage n > 1: the stage n-1 file of this run.
    init_from: str | None = None
    #: Single-file SD1.5 checkpoint (``models/checkpoints/*.safetensors``); stages 2 and 3.
    sd15: str | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    #: Loss on a fixed batch (same examples, noise and timesteps) every this many steps.
    eval_every: int = 100
    eval_batch_size: int = 8
    #: Stop after this step (a job time limit); resume later with ``--resume latest``.
    stop_at: int | None = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    temperature: TemperatureSchedule = dataclasses.field(default_factory=TemperatureSchedule)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    model: ModelOptions = dataclasses.field(default_factory=ModelOptions)
    distil: DistilConfig = dataclasses.field(default_factory=DistilConfig)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.stage > 1 and not self.sd15:
            raise ValueError(f"stage {self.stage} trains through the SD1.5 UNet: set sd15 to a single-file checkpoint")
        known = {"decomposer", "projector", "adapter"}
        if not set(self.model.train) <= known or (self.stage == 1 and "adapter" in self.model.train):
            raise ValueError(f"model.train {self.model.train}: choose from {sorted(known)} (no adapter in stage 1)")
        if self.objective == "distil":
            if self.stage != 3:
                raise ValueError("objective distil writes a stage-3 file (adapter included): set stage: 3")
            if not self.distil.clap:
                raise ValueError("objective distil embeds its captions with CLAP's text tower: set distil.clap")
            d = self.distil
            if not 1 <= d.teacher_steps < d.sampler_steps:
                raise ValueError(f"distil.teacher_steps {d.teacher_steps}: choose 1 .. sampler_steps - 1")
            if d.heldout < 1 or d.heldout >= d.corpus_size:
                raise ValueError(f"distil.heldout {d.heldout}: choose 1 .. corpus_size - 1")

    @property
    def name(self) -> str:
        """``stage<n>`` or ``distil``: the run folder's subfolder and the TensorBoard run name."""
        return "distil" if self.objective == "distil" else f"stage{self.stage}"

    @property
    def stage_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def file_name(self) -> str:
        """The loader file's name (without ``.safetensors``)."""
        from ..checkpoint import STAGE_FILE_NAMES

        return DISTIL_FILE_NAME if self.objective == "distil" else STAGE_FILE_NAMES[self.stage]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown keys {unknown}; known: {sorted(names)}")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _from_dict(hint, value, f"{where}{key}.")
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            values[key] = tuple(value)
        elif typing.get_origin(hint) is Literal:
            if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/yes as a bool
                value = "yes" if value else "no"
            if value not in typing.get_args(hint):
                raise ValueError(f"{where}{key}: {value!r} is not one of {typing.get_args(hint)}")
            values[key] = value
        elif hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            # YAML 1.1 reads "3e-4" (no dot) as a string.
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"{where}{key}: expected a number, got {value!r}") from None
        else:
            values[key] = value
    return cls(**values)


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the config tree ``base`` with ``extra`` laid over it, section by section."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge_trees(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


#: ``configs/distil.yaml`` as a tree, for code that builds a distillation config without YAML (the
#: ComfyUI node); ``tests/test_distil_node.py`` checks that the two agree.
DISTIL_DEFAULTS: dict[str, Any] = {
    "stage": 3, "objective": "distil", "steps": 4000, "seed": 42, "output_dir": "runs/clap2diffusion",
    "sd15": None, "init_from": None, "mixed_precision": "bf16", "gradient_checkpointing": False,
    "checkpoint_every": 500, "keep_checkpoints": 3, "log_every": 10, "eval_every": 100, "eval_batch_size": 16,
    "data": {"batch_size": 8, "num_workers": 0},
    "optim": {"lr": 1.0e-4, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1.0e-8, "schedule": "cosine",
              "warmup_steps": 100, "max_grad_norm": 1.0, "gradient_accumulation_steps": 1},
    "temperature": {"start": 0.5, "end": 0.5, "warmup_steps": 0, "anneal_steps": 1, "offset": 0},
    "loss": {"infonce": 0.0, "mse": 0.0, "audio_dropout": 0.1},
    "model": {"base_family": "sd15", "train": ["decomposer", "projector", "adapter"], "adapter_init": "text_kv"},
    "distil": {"clap": None, "corpus_size": 1024, "corpus_seed": 0, "heldout": 64, "bridge_noise": 1.0,
               "guidance_scale": 1.0, "latent_size": 64, "sampler_steps": 10, "teacher_steps": 6, "pure_noise": 0.25,
               "pure_noise_min_t": 800, "grid_every": 500, "grid_captions": 3, "grid_steps": 20, "grid_guidance": 7.5,
               "grid_seed": 0},
}  # fmt: skip


def distil_config(overrides: dict[str, Any] | None = None) -> StageConfig:
    """The distillation's config (``configs/distil.yaml``) with ``overrides`` (a nested dict) laid over it."""
    return _from_dict(StageConfig, merge_trees(DISTIL_DEFAULTS, overrides or {}), "")
