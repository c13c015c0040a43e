"""Distil Audio Adapter (issue 24): the distillation as a ComfyUI node, through the real server.

Tiny SD1.5 and CLAP test models, 64 px (8x8 latents), 16 captions (2 held out), batch 2, a dozen
steps: an empty folder gives a file, the file an image through Apply Audio to Model; the same
inputs reuse it; Cancel keeps the state and a new queue resumes to the uninterrupted weights;
another family is refused before the first step; strength 0 is exactly the plain image. The
in-process test holds the node's path (ComfyUI's UNet, the core loop without accelerate) to the
command line's (diffusers' UNet, accelerate) after 3 steps.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from graphs import CHECKPOINT, CLAP, CLAP2DIFFUSION, audio_tokens, saved_images

from clap2diffusion_core.checkpoint import load_checkpoint
from clap2diffusion_core.testing import random_checkpoint
from tools.comfy_server import ComfyClient, EventStream, ExecutionFailed, Graph, uncached

STEPS = 24  # enough that an interrupt sent at step 2 lands before the last one on a loaded CPU
SETTINGS = {"steps": STEPS, "batch_size": 2, "learning_rate": 1e-3, "resolution": 64, "seed": 3, "corpus_size": 16,
            "preview_every": 0, "extra_captions": ""}
DISTIL = "distil"  # the node's id in the graphs below


def distil_graph(strength: float | None = 1.0, init: str = CLAP2DIFFUSION, prefix: str = "distil-node",
                 **settings: object) -> Graph:
    """Checkpoint + CLAP + a stage-1 file -> Distil Audio Adapter -> (thunder.wav's tokens) -> Apply Audio
    to Model -> KSampler (64 px, 1 step). ``strength=None``: the plain image (no audio node runs)."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    clap = g.node("C2D_ClapLoader", clap_name=CLAP)
    start = g.node("C2D_Clap2DiffusionLoader", clap2diffusion_name=init)
    distilled = g.node("C2D_DistilAudioAdapter", _id=DISTIL, model=ckpt[0], clip=ckpt[1], clap_model=clap.out,
                       clap2diffusion=start.out, vae=ckpt[2], **(SETTINGS | settings))
    tokens = audio_tokens(g, "thunder.wav")
    g.set(tokens, clap2diffusion=distilled.out)
    decompose = g.nodes[tokens.id]["inputs"]["audio_levels"][0]
    g.set(decompose, clap2diffusion=distilled.out)
    model = ckpt[0]
    if strength is not None:
        model = g.node("C2D_ApplyAudioToModel", model=ckpt[0], audio_tokens=tokens.out, clap2diffusion=distilled.out,
                       strength=strength, start_percent=0.0, end_percent=1.0).out
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="").out
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = g.node("KSampler", model=model, positive=positive, negative=negative, latent_image=latent.out, seed=1,
                     steps=1, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    image = g.node("VAEDecode", samples=sampled.out, vae=ckpt[2])
    g.node("SaveImage", images=image.out, filename_prefix=prefix)
    return g


def distilled_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("distil-sd15-*.safetensors"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict()


@pytest.fixture(scope="module")
def folder(comfy_server) -> Path:
    folder = comfy_server.base_dir / "models" / "clap2diffusion"
    for old in [*distilled_files(folder), *folder.glob("distil-sd15-*.resume")]:
        old.unlink()
    return folder


@pytest.fixture(scope="module")
def first_run(folder: Path, comfy_server) -> dict:  # noqa: ANN001
    """The uninterrupted run: its file's weights, the image, and the seconds it took."""
    comfy = comfy_server.client
    assert distilled_files(folder) == []
    t0 = time.monotonic()
    image, = saved_images(comfy, comfy.wait(comfy.queue(uncached(distil_graph().prompt())), timeout=600))
    files = distilled_files(folder)
    assert len(files) == 1, files
    return {"file": files[0], "weights": weights(files[0]), "image": image, "seconds": time.monotonic() - t0,
            "mtime": files[0].stat().st_mtime_ns}


def test_distil_node_empty_folder_gives_a_file_and_an_image(first_run: dict, folder: Path) -> None:
    model = load_checkpoint(first_run["file"])
    assert model.config.stage == 3 and model.config.base_family == "sd15"
    assert float(model.adapter.gates().abs().min()) > 0  # every gate opened (they start at exactly 0)
    start = load_checkpoint(folder / CLAP2DIFFUSION)
    assert not torch.equal(model.projector.queries, start.projector.queries)  # the projector trained too
    assert first_run["image"].shape == (64, 64, 3)
    assert not list(folder.glob("*.resume")), "a finished run leaves no resume file"


def test_distil_node_second_queue_reuses_the_file(first_run: dict, folder: Path, comfy: ComfyClient) -> None:
    with EventStream(comfy.ws_url) as events:
        prompt_id = comfy.queue(uncached(distil_graph().prompt()))
        image, = saved_images(comfy, comfy.wait(prompt_id, timeout=300))
        progress = [e for e in events.for_prompt(prompt_id) if e.type == "progress" and e.data.get("node") == DISTIL]
        seconds = events.node_times(prompt_id)[DISTIL]
    assert distilled_files(folder) == [first_run["file"]]
    assert first_run["file"].stat().st_mtime_ns == first_run["mtime"]  # read, not written again
    assert not progress, "a reused file runs no step"
    assert seconds < 10, seconds
    assert np.array_equal(image, first_run["image"])


def test_distil_node_strength_zero_gives_exactly_the_plain_image(first_run: dict, comfy: ComfyClient) -> None:
    silent, = saved_images(comfy, comfy.wait(comfy.queue(distil_graph(0.0, prefix="distil-node-0").prompt())))
    plain, = saved_images(comfy, comfy.wait(comfy.queue(distil_graph(None, prefix="distil-node-plain").prompt())))
    assert np.array_equal(silent, plain)
    assert np.abs(first_run["image"].astype(int) - plain.astype(int)).max() > 0  # the distilled audio acts


def test_distil_node_cancel_then_requeue_resumes_to_the_uninterrupted_weights(
        first_run: dict, folder: Path, comfy: ComfyClient) -> None:
    first_run["file"].unlink()  # the same inputs again: no file, so the node distils
    prompt = uncached(distil_graph().prompt())
    with EventStream(comfy.ws_url) as events:
        prompt_id = comfy.queue(prompt)
        deadline = time.monotonic() + 300
        while True:
            progress = [e.data["value"] for e in events.for_prompt(prompt_id)  # the steps' bar, not a preview's
                        if e.type == "progress" and e.data.get("node") == DISTIL and e.data.get("max") == STEPS]
            if progress and max(progress) >= 2:
                break
            assert comfy.history(prompt_id) is None, "finished before the interrupt"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        comfy.interrupt(prompt_id)
        with pytest.raises(ExecutionFailed) as err:
            comfy.wait(prompt_id, 300)
    assert err.value.interrupted, err.value
    resume, = folder.glob("distil-sd15-*.resume")
    stopped_at = torch.load(resume, weights_only=True)["step"]
    assert 2 <= stopped_at < STEPS, stopped_at
    assert distilled_files(folder) == []
    comfy.wait(comfy.queue(uncached(prompt)), timeout=600)
    resumed, = distilled_files(folder)
    assert resumed.name == first_run["file"].name
    assert not resume.exists()
    again = weights(resumed)
    worst = max(float((again[k] - first_run["weights"][k]).abs().max()) for k in again)
    assert worst <= 1e-6, f"resumed at step {stopped_at}: largest difference {worst:.2e} from the uninterrupted run"


def test_distil_node_wrong_family_is_named_before_the_first_step(folder: Path, comfy: ComfyClient) -> None:
    name = "distil-node-sdxl-init.safetensors"
    random_checkpoint(folder / name, context_dim=2048, stage=1)
    try:
        with EventStream(comfy.ws_url) as events:
            prompt_id = comfy.queue(uncached(distil_graph(init=name).prompt()))
            with pytest.raises(ExecutionFailed, match=r"made for sdxl .*but the MODEL is sd15") as err:
                comfy.wait(prompt_id, 300)
            progress = [e for e in events.for_prompt(prompt_id) if e.type == "progress"
                        and e.data.get("node") == DISTIL]
    finally:  # the session server's folder is shared: other modules count its files
        (folder / name).unlink(missing_ok=True)
    assert err.value.node_id == DISTIL
    assert not progress, "the error must come before the first step"


# ------------------------------------------------------------------------------------------------
# one loop: the node's path (ComfyUI's UNet and CLIP, no accelerate) == the command line's


def test_distil_node_path_and_the_cli_train_alike(tmp_path: Path, test_models) -> None:  # noqa: ANN001
    """3 steps from the same text-fitted file, seed and settings: the command line (diffusers' UNet and
    CLIP-L, accelerate) and the node's path (ComfyUI's loader, UNet and CLIP; ``run_local``) end within
    1e-4 of each other, having moved far more than that. AdamW's eps is 1e-5 here, as in the two-process
    test: parameters whose true gradient is 0 (the projector's attention key biases) get float noise
    that Adam at 1e-8 would scale up to lr-sized steps; real gradients are still normalised."""
    import comfy_pack

    from clap2diffusion_core.clap import load_clap_tower
    from clap2diffusion_core.training.config import load_config
    from clap2diffusion_core.training.trainer import train_stage

    pack = {m: comfy_pack.load(m) for m in ("nodes.distil_unet", "nodes.fit_nodes", "clap2diffusion_core.training.distil",
                                            "clap2diffusion_core.training.distil_local",
                                            "clap2diffusion_core.training.settings", "clap2diffusion_core.checkpoint",
                                            "clap2diffusion_core.training.captions")}
    sd15, clap, init = str(test_models.sd15_checkpoint), str(test_models.clap_folder), str(test_models.clap2diffusion)
    tree = {"steps": 3, "seed": 0, "sd15": sd15, "init_from": init, "output_dir": str(tmp_path), "mixed_precision": "no",
            "eval_every": 3, "eval_batch_size": 4, "checkpoint_every": 1000, "loss": {"audio_dropout": 0.25},
            "data": {"batch_size": 4}, "optim": {"lr": 1e-3, "warmup_steps": 1, "eps": 1e-5},
            "distil": {"clap": clap, "corpus_size": 24, "heldout": 4, "latent_size": 4, "sampler_steps": 4,
                       "teacher_steps": 2, "pure_noise": 0.5, "grid_every": 0}}
    cli = load_checkpoint(train_stage(load_config("distil", extra=tree), progress=False).file).state_dict()

    import comfy.sd  # importable once comfy_pack.load has put ComfyUI on the path

    config = pack["clap2diffusion_core.training.settings"].distil_config(tree)
    model, clip = comfy.sd.load_checkpoint_guess_config(sd15, output_vae=False, output_clip=True)[:2]
    captions = [c.text for c in pack["clap2diffusion_core.training.captions"].build_corpus(24, 0)]
    text = load_clap_tower(clap, "text")
    fit_nodes, distil_unet = pack["nodes.fit_nodes"], pack["nodes.distil_unet"]
    caption_set = pack["clap2diffusion_core.training.distil"].build_caption_set(
        captions, text.encode_text, lambda texts: (fit_nodes.sd15_states(clip, texts)[0], None), 4, 0)
    local = pack["clap2diffusion_core.training.distil_local"]
    start = local.start_model(pack["clap2diffusion_core.checkpoint"].load_checkpoint(init),
                              distil_unet.adapter_config_of(model), distil_unet.text_kv_of(model))
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    node = local.run_local(distil_unet.ComfyDistilUNet(model, start.adapter), caption_set, start, config).model.state_dict()
    assert node.keys() == cli.keys()
    worst = max(float((node[k] - cli[k]).abs().max()) for k in node)
    moved = max(float((cli[k] - initial[k]).abs().max()) for k in cli)
    print(f"node path vs command line after 3 steps: largest difference {worst:.2e}, largest move {moved:.2e}")
    assert moved > 1e-3, moved
    assert worst <= 1e-4, f"node vs command line after 3 steps: largest difference {worst:.2e} (moved {moved:.2e})"


def test_distil_node_sdxl_files_get_a_pooled_head_fitted_as_the_text_fit_fits_its_own() -> None:
    """``refit_pooled_head`` (the node's and the command line's last step for SDXL files): a model with no
    head gets one laid out as the text fit's (output norm = the captions' mean pooled norm), and at the
    callers' defaults (the text fit's closed-form solve) each training caption's head output then
    points at its own pooled vector; recipe 1's gradient steps still bring them towards it; an SD1.5
    caption set (no pooled vectors) leaves the model as it was."""
    import torch.nn.functional as F

    from clap2diffusion_core.testing import random_model
    from clap2diffusion_core.training.distil import CaptionSet, refit_pooled_head
    from clap2diffusion_core.training.textfit import TextFitConfig, pooled_outputs

    gen = torch.Generator().manual_seed(0)
    m = 24
    clap = F.normalize(torch.randn(m, 512, generator=gen), dim=-1)
    pooled = 20 * F.normalize(torch.randn(m, 1280, generator=gen), dim=-1)
    captions = CaptionSet([f"c{i}" for i in range(m)], clap, torch.zeros(m, 77, 2048).half(), torch.zeros(1, 77, 2048),
                          list(range(20)), [20, 21, 22, 23], pooled=pooled, neutral_pooled=torch.zeros(1, 1280))
    model = random_model(context_dim=2048, stage=1)
    assert model.pooled_head is None
    assert refit_pooled_head(model, CaptionSet(**{**captions.__dict__, "pooled": None}), 0.5) is model
    for fit, share in ((None, 0.95), (TextFitConfig(recipe=1, steps=60, warmup_steps=5, noise=0.0), 0.5)):
        fitted = refit_pooled_head(model, captions, 0.5, fit)  # None: what the node and the CLI pass
        assert fitted.config.pooled is not None and fitted.config.pooled.norm_target == pytest.approx(20.0, rel=1e-4)
        out = pooled_outputs(fitted, clap[:20])
        assert out.norm(dim=-1).mean() == pytest.approx(20.0, rel=1e-3)
        scores = F.normalize(out, dim=-1) @ F.normalize(pooled[:20], dim=-1).T
        assert float((scores.argmax(dim=1) == torch.arange(20)).float().mean()) >= share  # its own caption's vector
        for key, value in model.state_dict().items():  # nothing but the head moved
            assert torch.equal(fitted.state_dict()[key], value), key


def test_distil_node_settings_are_the_shipped_distil_yaml() -> None:
    """The node builds its config in code (no YAML in the lean install): the same as configs/distil.yaml."""
    from clap2diffusion_core.training.config import load_config
    from clap2diffusion_core.training.settings import distil_config

    overrides = {"sd15": "x.safetensors", "distil": {"clap": "c"}}
    assert distil_config(overrides) == load_config("distil", extra=overrides)
