"""Stages 2 and 3: the adapter trains through the frozen SD1.5 UNet (the tiny test checkpoint),
the files fit the model node, and a resumed run matches an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from training_support import one_thread, stage1_overrides, write_fake_cache  # noqa: F401

from clap2diffusion_core.checkpoint import STAGE_FILE_NAMES, load_checkpoint, read_metadata
from clap2diffusion_core.testing import adapter_config
from clap2diffusion_core.training.config import load_config
from clap2diffusion_core.training.trainer import train_stage


@pytest.fixture(scope="module")
def run(tmp_path_factory, test_models):
    """A fake feature cache (8x8 latents: 64 px images) and a short stage-1 run on it."""
    root = tmp_path_factory.mktemp("run")
    cache = write_fake_cache(root / "cache", kinds=4, per_kind=2)
    train_stage(load_config("stage1", stage1_overrides(cache, root, steps=4)), progress=False)
    return root, cache, str(test_models.sd15_checkpoint)


def later_stage(stage: int, root, cache, sd15: str, steps: int, **extra) -> list[str]:
    overrides = {
        "steps": steps, "seed": 0, "output_dir": str(root), "data.cache": str(cache), "sd15": sd15,
        "mixed_precision": "no", "data.batch_size": 2, "data.num_workers": 0, "optim.lr": 1e-3,
        "optim.warmup_steps": 1, "optim.gradient_accumulation_steps": 2, "eval_every": steps,
        "eval_batch_size": 4, "log_every": 1, "checkpoint_every": 1000,
        "loss.audio_dropout": 0.5, "loss.text_dropout": 0.5,  # exercise both dropout paths
    } | extra
    return [f"{k}={v}" for k, v in overrides.items()]


def test_stage2_opens_the_gates_and_writes_a_file_for_the_model_node(run):
    root, cache, sd15 = run
    result = train_stage(load_config("stage2", later_stage(2, root, cache, sd15, steps=6)), progress=False)
    assert result.file == root / "stage2" / f"{STAGE_FILE_NAMES[2]}.safetensors"
    assert read_metadata(result.file)["stage"] == "2"
    model = load_checkpoint(result.file)
    assert model.config.adapter == adapter_config("tiny")  # the tiny UNet's four cross-attention layers
    assert model.adapter.gates().abs().min() > 0  # zero at initialisation, opened by training
    first, last = result.fixed_losses[0][1], result.fixed_losses[-1][1]
    assert set(first) >= {"epsilon", "orthogonality", "entropy", "prior", "infonce", "mse"}
    assert last["loss"] < first["loss"]
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tags = set()
    for events in (root / "stage2" / "logs").rglob("events.out.tfevents.*"):
        tags |= set(tensorboard.EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"gates/abs_mean", "gates/layer_00", "gates/layer_03", "train/epsilon", "train/orthogonality",
            "train/prior", "eval/fixed_batch_epsilon"} <= tags
    # Stage 1's weights were the starting point (the decomposer's architecture came from its file).
    stage1 = load_checkpoint(root / "stage1" / f"{STAGE_FILE_NAMES[1]}.safetensors")
    assert model.config.projector == stage1.config.projector


def test_stage3_fine_tunes_the_stage2_file(run):
    root, cache, sd15 = run
    if not (root / "stage2" / f"{STAGE_FILE_NAMES[2]}.safetensors").exists():
        train_stage(load_config("stage2", later_stage(2, root, cache, sd15, steps=2)), progress=False)
    stage2 = load_checkpoint(root / "stage2" / f"{STAGE_FILE_NAMES[2]}.safetensors")
    result = train_stage(load_config("stage3", later_stage(3, root, cache, sd15, steps=2)), progress=False)
    assert result.file.name == "audio_projector_stage3_finetuned.safetensors"
    model = load_checkpoint(result.file)
    assert model.config.stage == 3 and model.config.adapter == stage2.config.adapter
    assert model.config.decomposer.temperature == 0.5
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, stage2.state_dict()[k])]
    assert any(k.startswith("adapter.") for k in changed)


def test_stage2_resumes_exactly(run, tmp_path):
    root, cache, sd15 = run
    stage1 = str(root / "stage1" / f"{STAGE_FILE_NAMES[1]}.safetensors")

    def overrides(out, **extra):
        return later_stage(2, out, cache, sd15, steps=4, init_from=stage1, checkpoint_every=2, **extra)

    straight = train_stage(load_config("stage2", overrides(tmp_path / "a")), progress=False)
    train_stage(load_config("stage2", overrides(tmp_path / "b", stop_at=2)), progress=False)
    resumed = train_stage(load_config("stage2", overrides(tmp_path / "b")), resume="latest", progress=False)
    a, b = load_checkpoint(straight.file).state_dict(), load_checkpoint(resumed.file).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_stages_in_one_process_may_use_different_precisions(run, tmp_path):
    """``train stage1 stage2 stage3`` runs stage 1 in fp32 and stage 2 with the UNet in bf16."""
    root, cache, sd15 = run
    stage1 = str(root / "stage1" / f"{STAGE_FILE_NAMES[1]}.safetensors")
    config = load_config("stage2", later_stage(2, tmp_path, cache, sd15, steps=1, init_from=stage1,
                                               mixed_precision="bf16"))
    result = train_stage(config, progress=False)
    assert load_checkpoint(result.file).adapter is not None
    assert all(torch.isfinite(torch.tensor(v)) for v in result.fixed_losses[-1][1].values())
