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

import numpy as np
import pytest
import torch
from graphs import CHECKPOINT, audio_tokens, sample, saved_images
from training_support import one_thread  # noqa: F401

from clap2diffusion_core.checkpoint import load_checkpoint, read_metadata
from clap2diffusion_core.training.smoke import run_smoke
from tools.comfy_server import Graph

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, test_models):
    out = tmp_path_factory.mktemp("train-smoke")
    return run_smoke(out, str(test_models.sd15_checkpoint), str(test_models.clap_folder), progress=False)


def test_smoke_run_learns_in_every_stage(smoke):
    assert smoke["checks"] == {"stage1_learns": True, "stage2_loss_falls": True, "stage2_epsilon_falls": True,
                               "gates_open": True, "clap_separates": True}
    assert smoke["stage1_top1"] >= 3 * smoke["chance"] and smoke["stage1_top1"] > smoke["stage1_top1_init"]
    assert smoke["stage2_loss_last"] < smoke["stage2_loss_first"]
    assert smoke["gate_abs_mean"] > 0


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
    model = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out, strength=strength,
                   start_percent=0.0, end_percent=1.0, foreground=1.0, background=1.0, ambience=1.0)
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    sample(g, model.out, ckpt, positive, negative, size=128, prefix=f"smoke-stage3-{strength}")
    return g


def test_the_stage3_file_drives_a_real_comfyui_graph(smoke, comfy_server, comfy):
    folder = comfy_server.base_dir / "models" / "clap2diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    name = "smoke-" + os.path.basename(smoke["files"]["stage3"])
    shutil.copy(smoke["files"]["stage3"], folder / name)

    with_sound, = saved_images(comfy, comfy.wait(comfy.queue(_model_graph(name, 1.0).prompt())))
    without, = saved_images(comfy, comfy.wait(comfy.queue(_model_graph(name, 0.0).prompt())))
    assert with_sound.shape == without.shape == (128, 128, 3)
    # The trained gates are small after a smoke run, but open: the sound changes the image.
    assert np.abs(with_sound.astype(int) - without.astype(int)).max() > 0


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
    assert image.shape == (128, 128, 3) and image.std() > 0


def test_smoke_figures_are_written_beside_the_run(smoke):
    files = {k: v for k, v in smoke["files"].items()}
    root = os.path.dirname(os.path.dirname(os.path.dirname(files["stage1"])))
    with open(os.path.join(root, "smoke.json")) as f:
        assert json.load(f) == smoke
    assert torch.isfinite(load_checkpoint(files["stage3"]).adapter.gates()).all()
