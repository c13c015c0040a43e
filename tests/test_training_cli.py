"""``python -m clap2diffusion_core.training``: the commands a user types, on the fake feature cache."""

from __future__ import annotations

import json

import pytest
from training_support import one_thread, stage1_overrides, write_fake_cache  # noqa: F401

from clap2diffusion_core.checkpoint import load_checkpoint
from clap2diffusion_core.training import trainer
from clap2diffusion_core.training.cli import main
from clap2diffusion_core.training.manifest import read_manifest


def test_train_then_eval(tmp_path, capsys):
    cache = write_fake_cache(tmp_path / "cache", kinds=3, per_kind=2)
    sets = [f"--set={o}" for o in stage1_overrides(cache, tmp_path / "run", steps=3)]
    assert main(["train", "stage1", "--output-dir", str(tmp_path / "run"), "--no-progress", *sets]) == 0
    stage1 = tmp_path / "run" / "stage1" / "audio_projector_stage1.safetensors"
    assert load_checkpoint(stage1).config.stage == 1
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(stage1), "--cache", str(cache), "--split", "train"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["chance"] == pytest.approx(1 / 3) and result["examples"] == 6


def test_audiocaps_csvs_become_one_manifest(tmp_path):
    data = tmp_path / "data"
    for split, row in (("train", "91139,r1nicOVtvkQ,130,A woman talks nearby"),
                       ("val", "97151,vfY_TJq7n_U,130,Rustling   occurs and ducks quack")):
        (tmp_path / f"{split}.csv").write_text(f"audiocap_id,youtube_id,start_time,caption\n{row}\n")
        assert main(["audiocaps-manifest", "--csv", str(tmp_path / f"{split}.csv"), "--audio-dir", str(data / "audio"),
                     "--image-dir", str(data / "frames"), "--split", split, "--out", str(data / "m.jsonl"),
                     "--append"]) == 0
    train, val = read_manifest(data / "m.jsonl")
    assert (train.id, train.split, val.split, val.caption) == ("audiocaps-91139", "train", "val",
                                                               "Rustling occurs and ducks quack")
    assert train.audio == str(data / "audio" / "r1nicOVtvkQ.wav")
    assert train.image == str(data / "frames" / "r1nicOVtvkQ.jpg")
    assert '"audio": "audio/r1nicOVtvkQ.wav"' in (data / "m.jsonl").read_text()  # stored relative


def test_one_process_is_refused_when_accelerate_was_asked_for_several_on_cpu(monkeypatch):
    """``accelerate launch --cpu --num_processes 2`` without MPI: the CLI restarts under
    torch.distributed.run; library callers get an error that says what to run."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert trainer.lonely_cpu_launch()
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node N"):
        trainer.check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not trainer.lonely_cpu_launch()
    assert trainer.use_cpu()
