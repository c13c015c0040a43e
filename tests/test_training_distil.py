"""The distillation (issue 13): the adapter learnt from the base UNet on captions alone.

The smoke run (text fit -> distillation on the tiny SD1.5 and CLAP test models) learns; a resumed
distillation matches an uninterrupted one; its file drives Apply Audio to Model in a real server;
and two processes over gloo train stage 1, stage 2 and the distillation exactly like one process
with the same global batch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from graphs import CHECKPOINT, audio_tokens, model_of, sample, saved_images
from training_support import one_thread, scratch_dir, stage1_overrides, write_fake_cache  # noqa: F401

from clap2diffusion_core.checkpoint import load_checkpoint, read_metadata
from clap2diffusion_core.testing import adapter_config
from clap2diffusion_core.training.config import DISTIL_FILE_NAME, load_config
from clap2diffusion_core.training.distil import (
    ddim_grid,
    ddim_step,
    grid_difference,
    heldout_gain,
    split_corpus,
)
from clap2diffusion_core.training.distil_smoke import run_distil_smoke
from clap2diffusion_core.training.trainer import find_checkpoint, train_stage
from tools import test_models as tm
from tools.comfy_server import ExecutionFailed, Graph

REPO = Path(__file__).resolve().parents[1]


def distil_overrides(out: Path, sd15: str, clap: str, steps: int, **extra: object) -> list[str]:
    """A tiny distillation: 24 captions (4 held out), 4x4 latents, batch 4, no grids."""
    overrides = {
        "steps": steps, "seed": 0, "output_dir": str(out), "sd15": sd15, "distil.clap": clap,
        "mixed_precision": "no", "data.batch_size": 4, "optim.lr": 1e-3, "optim.warmup_steps": 1,
        "eval_every": steps, "eval_batch_size": 4, "log_every": 1, "checkpoint_every": 1000,
        "loss.audio_dropout": 0.25, "distil.corpus_size": 24, "distil.heldout": 4, "distil.latent_size": 4,
        "distil.sampler_steps": 4, "distil.teacher_steps": 2, "distil.pure_noise": 0.5, "distil.grid_every": 0,
        "model.projector": "{width: 64, num_layers: 2, num_heads: 4}",
    } | extra
    return [f"{k}={v}" for k, v in overrides.items()]


# ------------------------------------------------------------------------------------------------
# pieces


def test_distil_ddim_step_recovers_the_clean_latent_from_the_true_noise():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    alphas = torch.tensor([0.2, 0.5, 0.9])
    noisy = alphas.sqrt().view(-1, 1, 1, 1) * x0 + (1 - alphas).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(ddim_step(noisy, eps, alphas, torch.ones(3)), x0)
    assert ddim_grid(5).tolist() == [999, 749, 500, 250, 0]


def test_distil_heldout_split_is_seeded_and_disjoint():
    train, heldout = split_corpus(50, 8, seed=3)
    assert (train, heldout) == split_corpus(50, 8, seed=3) and len(heldout) == 8
    assert sorted(train + heldout) == list(range(50))
    assert heldout_gain([(0, {"distil": 2.0}), (5, {"distil": 0.5})]) == 0.75


def test_distil_config_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="distil.clap"):
        load_config("distil", ["sd15=x.safetensors"])
    with pytest.raises(ValueError, match="stage: 3"):
        load_config("distil", ["sd15=x.safetensors", "distil.clap=c", "stage=2"])
    with pytest.raises(ValueError, match="teacher_steps"):
        load_config("distil", ["sd15=x.safetensors", "distil.clap=c", "distil.teacher_steps=10"])


# ------------------------------------------------------------------------------------------------
# resume


def test_distil_resumes_exactly(tmp_path, test_models):
    sd15, clap = str(test_models.sd15_checkpoint), str(test_models.clap_folder)

    def overrides(out: Path, **extra: object) -> list[str]:
        return distil_overrides(out, sd15, clap, steps=4, checkpoint_every=2, **extra)

    straight = train_stage(load_config("distil", overrides(tmp_path / "a")), progress=False)
    interrupted = train_stage(load_config("distil", overrides(tmp_path / "b", stop_at=2)), progress=False)
    assert not interrupted.file.exists()
    assert find_checkpoint(tmp_path / "b" / "distil", "latest").name == "step-000002"
    resumed = train_stage(load_config("distil", overrides(tmp_path / "b")), resume="latest", progress=False)
    assert straight.file == tmp_path / "a" / "distil" / f"{DISTIL_FILE_NAME}.safetensors"
    a, b = load_checkpoint(straight.file).state_dict(), load_checkpoint(resumed.file).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    model = load_checkpoint(straight.file)
    assert model.config.stage == 3 and model.config.adapter == adapter_config("tiny")
    assert int((model.adapter.gates() != 0).sum()) == 4  # every gate opened (they start at exactly 0)
    assert resumed.heldout_losses[-1][1] == pytest.approx(straight.heldout_losses[-1][1], abs=1e-6)
    # The checkpoint folder holds the loader file as of that step, as for the other stages.
    assert (tmp_path / "b" / "distil" / "checkpoints" / "step-000002" / f"{DISTIL_FILE_NAME}.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# the smoke run and the real server (slow)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, test_models):
    with scratch_dir(tmp_path_factory, "distil-smoke") as out:
        yield run_distil_smoke(out, str(test_models.sd15_checkpoint), str(test_models.clap_folder), progress=False)


@pytest.mark.slow
def test_distil_smoke_learns(smoke):
    """The loss falls on a fixed training batch, the held-out gain is positive, the gates open; the
    figures are recomputed from the file where they can be."""
    assert smoke["ok"], smoke
    assert smoke["distil_loss_last"] < smoke["distil_loss_first"]
    assert smoke["heldout_gain"] > 0
    assert smoke["heldout_gain"] == pytest.approx(1 - smoke["heldout_loss_last"] / smoke["heldout_loss_first"],
                                                  abs=1e-3)
    model = load_checkpoint(smoke["file"])
    assert read_metadata(smoke["file"])["stage"] == "3"
    assert float(model.adapter.gates().abs().mean()) == pytest.approx(smoke["gate_abs_mean"], abs=1e-5)
    assert float(model.adapter.gates().abs().min()) > 0
    # Started from the text fit's projector: same architecture, weights moved on.
    textfit = load_checkpoint(smoke["init_from"])
    assert model.config.projector == textfit.config.projector
    assert not torch.equal(model.projector.queries, textfit.projector.queries)
    # Validation grids at 0, 20 and 40: at step 0 the gates are closed, so the student column is
    # the neutral column, pixel for pixel; afterwards the audio changes it.
    grids = sorted(int(s) for s in smoke["grids"])
    assert grids == [0, 20, 40]
    folder = Path(smoke["file"]).parent / "validation"
    first = grid_difference(folder / "step-000000.png", 3)
    assert first["student_neutral"] == 0 and first["neutral_teacher"] > 0
    assert grid_difference(folder / "step-000040.png", 3)["student_neutral"] > 0


def _model_graph(file: str, strength: float | None, prefix: str, checkpoint: str = CHECKPOINT) -> Graph:
    """Checkpoint -> (Apply Audio to Model with the distilled file) -> KSampler, 64 px, 1 step;
    ``strength=None``: no audio nodes at all."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=checkpoint)
    model = ckpt[0]
    if strength is not None:
        tokens = audio_tokens(g, "thunder.wav", clap2diffusion=file)
        model = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out,
                       clap2diffusion=model_of(g, tokens), strength=strength, start_percent=0.0,
                       end_percent=1.0).out
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    sample(g, model, ckpt, positive, negative, steps=1, size=64, prefix=prefix)
    return g


@pytest.mark.slow
def test_distil_file_drives_apply_audio_to_model_in_a_real_server(smoke, comfy_server, comfy):
    folder = comfy_server.base_dir / "models" / "clap2diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    name = "distil-smoke-" + os.path.basename(smoke["file"])
    shutil.copy(smoke["file"], folder / name)
    with_sound, = saved_images(comfy, comfy.wait(comfy.queue(_model_graph(name, 1.0, "distil-1").prompt())))
    silent, = saved_images(comfy, comfy.wait(comfy.queue(_model_graph(name, 0.0, "distil-0").prompt())))
    plain, = saved_images(comfy, comfy.wait(comfy.queue(_model_graph(name, None, "distil-plain").prompt())))
    assert with_sound.shape == plain.shape == (64, 64, 3)
    assert np.array_equal(silent, plain)  # strength 0: exactly the unpatched model
    assert np.abs(with_sound.astype(int) - plain.astype(int)).mean() > 0.05  # the distilled audio acts


# ------------------------------------------------------------------------------------------------
# two processes == one process with the same global batch (slow: launches torchrun)


def _torchrun(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "clap2diffusion_core.training", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-6000:]
    return done


def _assert_same_weights(one: Path, two: Path, atol: float = 1e-5) -> None:
    a, b = load_checkpoint(one).state_dict(), load_checkpoint(two).state_dict()
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"{one.name}: largest difference {worst:.2e} between 1 and 2 processes"


@pytest.mark.slow
def test_distil_two_processes_train_like_one_for_stage1_stage2_and_distil(tmp_path, test_models):
    """``torchrun --nproc_per_node 2`` (gloo, batch b each) vs one process (batch 2b): the same
    parameters within 1e-5 after a few steps of stage 1 (InfoNCE over the global batch), stage 2
    (epsilon, dropout draws, the level prior) and the distillation.

    AdamW's eps is 1e-5 here, not 1e-8: the projector's attention key biases have a true gradient
    of exactly 0 (softmax ignores a shift shared by all keys), so theirs is float noise (~1e-9)
    that differs with the summation order, and Adam at eps 1e-8 scales noise up to lr-sized steps.
    At 1e-5 that noise stays noise; real gradients (>1e-4) are still normalised as by Adam."""
    sd15, clap = str(test_models.sd15_checkpoint), str(test_models.clap_folder)
    cache = write_fake_cache(tmp_path / "cache", kinds=4, per_kind=2)

    def stage_overrides(out: Path, batch: int) -> list[str]:
        base = stage1_overrides(cache, out, steps=3, **{"data.batch_size": batch, "checkpoint_every": 1000})
        return base + [f"sd15={sd15}", "mixed_precision=no", "loss.audio_dropout=0.5", "loss.text_dropout=0.5",
                       "loss.prior=0.1", "optim.gradient_accumulation_steps=2", "optim.eps=1e-5"]

    _torchrun(["train", "stage1", "stage2", "--no-progress"]
              + [a for o in stage_overrides(tmp_path / "two", 2) for a in ("--set", o)])
    for stage in ("stage1", "stage2"):
        train_stage(load_config(stage, stage_overrides(tmp_path / "one", 4)), progress=False)
    _assert_same_weights(tmp_path / "one/stage1/audio_projector_stage1.safetensors",
                         tmp_path / "two/stage1/audio_projector_stage1.safetensors")
    _assert_same_weights(tmp_path / "one/stage2/audio_projector_stage2.safetensors",
                         tmp_path / "two/stage2/audio_projector_stage2.safetensors")

    two = distil_overrides(tmp_path / "two", sd15, clap, steps=3, **{"data.batch_size": 2, "optim.eps": 1e-5})
    _torchrun(["distil", "--no-progress"] + [a for o in two for a in ("--set", o)])
    one = distil_overrides(tmp_path / "one", sd15, clap, steps=3, **{"data.batch_size": 4, "optim.eps": 1e-5})
    train_stage(load_config("distil", one), progress=False)
    _assert_same_weights(tmp_path / f"one/distil/{DISTIL_FILE_NAME}.safetensors",
                         tmp_path / f"two/distil/{DISTIL_FILE_NAME}.safetensors")


# ------------------------------------------------------------------------------------------------
# SDXL: the Segmind Vega test checkpoint (slow: a 745M UNet and CLIP-G on the CPU)


@pytest.fixture(scope="module")
def sdxl_distil(tmp_path_factory, test_models):
    """One distillation step on the Vega UNet: 4 captions, 4x4 latents (32 px), batch 1."""
    import gc

    vega = tm.sdxl_checkpoint()
    with scratch_dir(tmp_path_factory, "distil-sdxl") as out:
        overrides = distil_overrides(out, str(vega), str(test_models.clap_folder), steps=1, **{
            "data.batch_size": 1, "eval_batch_size": 1, "distil.corpus_size": 4, "distil.heldout": 1,
            "optim.warmup_steps": 0, "distil.sampler_steps": 2, "distil.teacher_steps": 1, "loss.audio_dropout": 0.0})
        result = train_stage(load_config("distil", overrides), progress=False)
        gc.collect()  # the UNet and text encoders go before the server loads its own copy
        yield result


@pytest.mark.slow
def test_distil_sdxl_step_runs_on_the_vega_unet(sdxl_distil):
    """The adapter layout comes from the UNet's own cross-attention layers: Vega's 15 (widths 640
    and 1280, 64-channel heads), the tokens 2048 wide; the step moved the gates off 0."""
    from clap2diffusion_core.adapters import ldm_unet_layout
    from clap2diffusion_core.unet_configs import SEGMIND_VEGA_UNET_CONFIG, layout_args

    model = load_checkpoint(sdxl_distil.file)
    assert model.config.base_family == "sdxl" and model.config.context_dim == 2048
    vega_layers = ldm_unet_layout(**layout_args(SEGMIND_VEGA_UNET_CONFIG))
    assert model.config.adapter == adapter_config(vega_layers, 2048)
    assert len(model.adapter) == 15
    assert float(model.adapter.gates().abs().min()) > 0
    # Started from no file: the distillation gave it a pooled head, fitted as the text fit fits its own.
    assert model.pooled_head is not None and model.config.pooled.pooled_dim == 1280
    assert all(np.isfinite(v) for _, values in sdxl_distil.heldout_losses for v in values.values())


@pytest.mark.slow
def test_distil_sdxl_file_drives_apply_audio_to_model_and_the_other_family_is_refused(
        sdxl_distil, comfy_server, comfy):
    """The distilled Vega file through Apply Audio to Model on the Vega MODEL to an image (64 px,
    1 step); an SD1.5 adapter file (16 layers, context 768) on the same MODEL gets the layout error."""
    from clap2diffusion_core.testing import random_checkpoint

    folder = comfy_server.base_dir / "models" / "clap2diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    sdxl_name, sd15_name = "distil-sdxl.safetensors", "sd15-adapter-for-vega.safetensors"
    shutil.copy(sdxl_distil.file, folder / sdxl_name)
    random_checkpoint(folder / sd15_name, stage=3, layout="sd15")
    # The session's server lists the tiny SD1.5 only; ComfyUI rescans a folder that changed.
    vega = Path(tm.SDXL_CHECKPOINT).name
    link = comfy_server.base_dir / "models" / "checkpoints" / vega
    if not link.exists():
        link.symlink_to(tm.sdxl_checkpoint())
    image, = saved_images(comfy, comfy.wait(comfy.queue(_model_graph(sdxl_name, 1.0, "distil-sdxl", vega).prompt()),
                                            timeout=900))
    assert image.shape == (64, 64, 3)
    with pytest.raises(ExecutionFailed, match="made for a UNet with 16 cross-attention layers"):
        comfy.wait(comfy.queue(_model_graph(sd15_name, 1.0, "distil-sd15-on-vega", vega).prompt()), timeout=900)
