"""The training smoke run end to end (slow: a few minutes on CPU).

Generated sounds -> feature cache -> stages 1, 2, 3 with the random tiny SD1.5 and CLAP test
models; the same with two processes; and the stage files in the real ComfyUI nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from graphs import CHECKPOINT, audio_tokens, model_of, sample, saved_images
from training_support import one_thread, scratch_dir  # noqa: F401

from clap2diffusion_core.checkpoint import load_checkpoint, read_metadata
from clap2diffusion_core.training.features import FeatureDataset
from clap2diffusion_core.training.metrics import caption_retrieval
from clap2diffusion_core.training.smoke import run_smoke
from tools.comfy_server import Graph

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, test_models):
    with scratch_dir(tmp_path_factory, "train-smoke") as out:
        yield run_smoke(out, str(test_models.sd15_checkpoint), str(test_models.clap_folder), progress=False)


def test_stage1_file_retrieves_captions_far_above_chance(smoke):
    """Recomputed here from the stage-1 file and the run's feature cache, not taken from the run."""
    root = Path(smoke["files"]["stage1"]).parents[2]
    dataset = FeatureDataset(root / "cache", "train", ("clap", "text_pooled"))
    retrieval = caption_retrieval(load_checkpoint(smoke["files"]["stage1"]), dataset)
    assert retrieval["chance"] == 1 / 8  # eight kinds of sound, one caption each
    assert retrieval["top1"] >= 0.5  # 4x chance; an untrained model sits near chance
    assert retrieval["top1"] == pytest.approx(smoke["stage1_top1"], abs=1e-4)  # the run reports what it has


def test_stage2_training_opens_the_gates_and_lowers_the_loss(smoke):
    gates = load_checkpoint(smoke["files"]["stage2"]).adapter.gates()
    assert torch.isfinite(gates).all()
    assert float(gates.abs().mean()) > 1e-4  # they start at exactly 0
    assert float(gates.abs().mean()) == pytest.approx(smoke["gate_abs_mean"], abs=1e-5)
    assert smoke["stage2_loss_last"] < smoke["stage2_loss_first"]  # the same fixed batch, noise and timesteps
    assert smoke["stage2_epsilon_last"] < smoke["stage2_epsilon_first"]


def test_stage3_fine_tunes_the_stage2_weights(smoke):
    stage2 = load_checkpoint(smoke["files"]["stage2"]).state_dict()
    stage3 = load_checkpoint(smoke["files"]["stage3"]).state_dict()
    assert stage2.keys() == stage3.keys()
    changed = [k for k in stage2 if not torch.equal(stage2[k], stage3[k])]
    assert any(k.startswith("adapter.") for k in changed) and any(not k.startswith("adapter.") for k in changed)


def test_the_cli_prints_one_json_line_last_with_two_processes(smoke, tmp_path, test_models):
    """``accelerate launch --num_processes 2 --cpu``: two processes, files of the same format."""
    command = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--num_processes", "2",
               "--cpu", "-m", "clap2diffusion_core.training", "smoke", "--out", str(tmp_path), "--no-progress",
               "--sd15", str(test_models.sd15_checkpoint), "--clap", str(test_models.clap_folder)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-5000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["processes"] == 2 and figures["ok"], figures
    for stage, single in smoke["files"].items():
        a, b = read_metadata(single), read_metadata(figures["files"][stage])
        assert a.keys() == b.keys()
        assert {k: a[k] for k in a if k != "config"} == {k: b[k] for k in b if k != "config"}
        shapes = {k: v.shape for k, v in load_checkpoint(single).state_dict().items()}
        assert shapes == {k: v.shape for k, v in load_checkpoint(figures["files"][stage]).state_dict().items()}


def _model_graph(file: str, strength: float) -> Graph:
    """Checkpoint -> Apply Audio to Model (the smoke's stage-3 file) -> KSampler -> SaveImage."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    tokens = audio_tokens(g, "thunder.wav", clap2diffusion=file)
    model = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out, clap2diffusion=model_of(g, tokens),
                   strength=strength, start_percent=0.0, end_percent=1.0)
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    sample(g, model.out, ckpt, positive, negative, size=128, prefix=f"smoke-stage3-{strength}")
    return g


def _text_only_graph(prefix: str) -> Graph:
    """The same checkpoint, prompts, seed and size, no audio node."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    sample(g, ckpt[0], ckpt, positive, negative, size=128, prefix=prefix)
    return g


def test_the_stage3_file_drives_a_real_comfyui_graph(smoke, comfy_server, comfy):
    folder = comfy_server.base_dir / "models" / "clap2diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    name = "smoke-" + os.path.basename(smoke["files"]["stage3"])
    shutil.copy(smoke["files"]["stage3"], folder / name)

    with_sound, = saved_images(comfy, comfy.wait(comfy.queue(_model_graph(name, 1.0).prompt())))
    without, = saved_images(comfy, comfy.wait(comfy.queue(_model_graph(name, 0.0).prompt())))
    text_only, = saved_images(comfy, comfy.wait(comfy.queue(_text_only_graph("smoke-text-only").prompt())))
    assert with_sound.shape == without.shape == (128, 128, 3)
    assert np.array_equal(without, text_only)  # strength 0: exactly the unpatched model
    # The trained gates are small after a smoke run, but open: the sound changes the image.
    assert np.abs(with_sound.astype(int) - text_only.astype(int)).mean() > 0.1


def test_the_stage1_file_drives_the_conditioning_node(smoke, comfy_server, comfy):
    folder = comfy_server.base_dir / "models" / "clap2diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    name = "smoke-" + os.path.basename(smoke["files"]["stage1"])
    shutil.copy(smoke["files"]["stage1"], folder / name)
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    tokens = audio_tokens(g, "thunder.wav", clap2diffusion=name)
    text = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach").out
    positive = g.node("C2D_ApplyAudioToConditioning", conditioning=text, audio_tokens=tokens.out, strength=1.0).out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    sample(g, ckpt[0], ckpt, positive, negative, size=128, prefix="smoke-stage1")
    image, = saved_images(comfy, comfy.wait(comfy.queue(g.prompt())))
    text_only, = saved_images(comfy, comfy.wait(comfy.queue(_text_only_graph("smoke-text-only-1").prompt())))
    assert image.shape == text_only.shape == (128, 128, 3)
    # The 77 audio tokens appended to the prompt change the picture.
    assert np.abs(image.astype(int) - text_only.astype(int)).mean() > 0.1


def test_smoke_figures_are_written_beside_the_run(smoke):
    root = Path(smoke["files"]["stage1"]).parents[2]
    assert json.loads((root / "smoke.json").read_text()) == smoke
    assert {Path(f).parent.name for f in smoke["files"].values()} == {"stage1", "stage2", "stage3"}
