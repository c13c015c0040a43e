"""Stage 1 through the accelerate trainer: it learns, writes the loader's file, logs, and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from training_support import one_thread, stage1_overrides, write_fake_cache  # noqa: F401

from clap2diffusion_core.checkpoint import STAGE_FILE_NAMES, load_checkpoint, read_metadata
from clap2diffusion_core.training.config import load_config
from clap2diffusion_core.training.features import FeatureDataset
from clap2diffusion_core.training.metrics import caption_retrieval
from clap2diffusion_core.training.trainer import StreamBatchSampler, find_checkpoint, train_stage


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_fake_cache(tmp_path_factory.mktemp("cache"), kinds=4, per_kind=4)


def _weights(path):
    return load_checkpoint(path).state_dict()


def test_stage1_learns_to_find_the_caption_and_writes_the_loader_file(cache, tmp_path):
    config = load_config("stage1", stage1_overrides(cache, tmp_path, steps=30))
    result = train_stage(config, progress=False)
    assert result.file == tmp_path / "stage1" / f"{STAGE_FILE_NAMES[1]}.safetensors"
    meta = read_metadata(result.file)
    assert (meta["stage"], meta["base_family"], meta["context_dim"]) == ("1", "sd15", "768")
    model = load_checkpoint(result.file)
    assert model.adapter is None
    # Decomposes at the temperature training ended at (2.0 -> 0.5 over these 30 steps).
    assert model.config.decomposer.temperature == pytest.approx(config.temperature(30)) == 0.5
    retrieval = caption_retrieval(model, FeatureDataset(cache, "train"))
    assert retrieval["top1"] >= 0.9 > retrieval["chance"] * 3
    first, last = result.fixed_losses[0][1]["loss"], result.fixed_losses[-1][1]["loss"]
    assert last < 0.5 * first


def test_stage1_logs_tensorboard_scalars(cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_stage(load_config("stage1", stage1_overrides(cache, tmp_path, steps=4)), progress=False)
    tags = set()
    for events in (tmp_path / "stage1" / "logs").rglob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    expected = {"train/loss", "train/infonce", "train/mse", "train/temperature", "train/lr",
                "level_usage/foreground", "level_usage/background", "level_usage/ambience",
                "level_weights/foreground", "eval/fixed_batch_loss"}
    assert expected <= tags


def test_resuming_mid_stage_gives_the_same_weights_as_an_uninterrupted_run(cache, tmp_path):
    overrides = stage1_overrides(cache, tmp_path / "straight", steps=8, checkpoint_every=3,
                                 **{"optim.gradient_accumulation_steps": 2, "data.batch_size": 4})
    straight = train_stage(load_config("stage1", overrides), progress=False)

    resumed_dir = [o.replace(str(tmp_path / "straight"), str(tmp_path / "resumed")) for o in overrides]
    interrupted = train_stage(load_config("stage1", resumed_dir + ["stop_at=5"]), progress=False)
    assert not interrupted.file.exists()  # stopped before the end: no final file yet
    assert find_checkpoint(tmp_path / "resumed" / "stage1", "latest").name == "step-000005"
    resumed = train_stage(load_config("stage1", resumed_dir), resume="latest", progress=False)

    a, b = _weights(straight.file), _weights(resumed.file)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # The resumed run evaluates the fixed batch at the same steps after the restart, to the same values.
    assert resumed.fixed_losses[-1][1] == pytest.approx(straight.fixed_losses[-1][1], abs=1e-6)


def test_resume_latest_without_a_checkpoint_starts_fresh(cache, tmp_path):
    result = train_stage(load_config("stage1", stage1_overrides(cache, tmp_path, steps=2)), resume="latest",
                         progress=False)
    assert result.file.exists()


def test_old_checkpoints_are_pruned(cache, tmp_path):
    train_stage(load_config("stage1", stage1_overrides(cache, tmp_path, steps=6, checkpoint_every=2,
                                                       keep_checkpoints=2)), progress=False)
    kept = sorted(p.name for p in (tmp_path / "stage1" / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000006"]
    assert (tmp_path / "stage1" / "checkpoints" / "step-000006" / f"{STAGE_FILE_NAMES[1]}.safetensors").is_file()


def test_stream_sampler_shards_processes_and_starts_anywhere():
    whole = StreamBatchSampler(10, 3, seed=1)
    stream = iter(whole)
    first = [next(stream) for _ in range(8)]  # 24 positions: crosses two epoch boundaries
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    # Two processes take alternate batches of the same stream.
    p0, p1 = iter(StreamBatchSampler(10, 3, 1, rank=0, world=2)), iter(StreamBatchSampler(10, 3, 1, rank=1, world=2))
    assert [next(p0), next(p1), next(p0), next(p1)] == first[:4]
    # Starting at global batch 2 is where an uninterrupted process would be after 2 batches.
    assert next(iter(StreamBatchSampler(10, 3, 1, rank=1, world=2, start=2))) == first[5]
