"""Apply Audio to Model beside another attention pack, through a real ComfyUI server.

The other pack is ``tests/interop_standin`` (an IPAdapter-style stand-in, installed into the
session server's ``custom_nodes`` by conftest). One graph samples every order on one checkpoint
(64 px, 3 euler steps): each chain of "audio" and stand-in nodes ends in its own KSampler, and a
"plain" KSampler takes the unpatched MODEL as a parallel branch.

Every chain has nodes of its own: ComfyUI runs identical nodes of one prompt once and hands the
same MODEL to every consumer, and since ComfyUI 0.14 ``clone()`` shares patch objects, so the
stand-in's in-place ``.add`` in one chain would reach every chain fed by a shared node. The forks
("a MODEL fed into two chains") test that on purpose: a fork through Apply Audio to Model leaves
every branch as it is alone, on every version; a fork of two stand-in ``.add`` branches does so
only where ``clone()`` deep-copies (ComfyUI <= 0.13), and changes a branch from 0.14 on.
"""

from __future__ import annotations

import numpy as np
import pytest
from comfy_versions import clone_shares_patch_objects
from graphs import CHECKPOINT, audio_tokens, model_of, pixels

from clap2diffusion_core.testing import random_checkpoint
from tools.comfy_server import ComfyClient, ComfyServer, Graph, uncached

pytestmark = pytest.mark.slow

STAGE2 = "interop-stage2.safetensors"
OTHER, OTHER2 = ("other", 7, 1.0, "two"), ("other", 8, -0.8, "two")
OTHER3 = ("other", 9, 1.0, "three")
OTHER4 = ("other", 10, 1.0, "two")
AUDIO = ("audio",)
#: The two orders of one pair may differ by float rounding only; a pixel step is 1/255.
ORDER_TOLERANCE = 1
#: Mean pixel difference that counts as "the patch acted" (uint8 scale).
ACTED = 0.5

CHAINS = {
    "audio": [AUDIO],
    "other": [OTHER],
    "other3": [OTHER3],
    "other_audio": [OTHER, AUDIO],
    "audio_other": [AUDIO, OTHER],
    "other_audio_other2": [OTHER, AUDIO, OTHER2],
    "other_other2_audio": [OTHER, OTHER2, AUDIO],
    "audio_other3": [AUDIO, OTHER3],
    "other3_audio": [OTHER3, AUDIO],
    "other_other2": [OTHER, OTHER2],
    "other_other4": [OTHER, OTHER4],
}
#: A MODEL fed into two chains: fork name -> (the shared trunk, {branch: the steps after it}).
FORKS = {
    "ours_fork": ([OTHER], {"ours_fork_plain": [], "ours_fork_audio": [AUDIO]}),
    "standin_fork": ([OTHER], {"standin_fork_a": [OTHER2], "standin_fork_b": [OTHER4]}),
}
#: What each branch is alone: the same steps as a chain of its own.
ALONE = {"ours_fork_plain": "other", "ours_fork_audio": "other_audio",
         "standin_fork_a": "other_other2", "standin_fork_b": "other_other4"}


@pytest.fixture(scope="module")
def stage2_file(comfy_server: ComfyServer):
    """A stage-2 file with open gates for the tiny UNet in the server's models/clap2diffusion."""
    path = comfy_server.base_dir / "models" / "clap2diffusion" / STAGE2
    path.parent.mkdir(parents=True, exist_ok=True)
    random_checkpoint(path, stage=2, seed=12, layout="tiny")
    yield
    path.unlink(missing_ok=True)


def build(chains: dict[str, list[tuple]], forks: dict | None = None) -> Graph:
    """One KSampler per chain and per fork branch. A chain's nodes are its own (an undeclared
    ``_chain`` input keeps ComfyUI from merging equal nodes of two chains); a fork's trunk is one
    set of nodes whose MODEL every branch of the fork takes."""
    forks = forks or {}
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach at dusk").out
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="blurry").out
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    steps_used = [*chains.values(), *(trunk + branch for trunk, branches in forks.values()
                                      for branch in branches.values())]
    tokens = audio_tokens(g, "thunder.wav", clap2diffusion=STAGE2) if any(
        AUDIO in steps for steps in steps_used) else None

    def patched(model, steps: list[tuple], owner: str):
        for step in steps:
            if step == AUDIO:
                model = g.node("C2D_ApplyAudioToModel", model=model, audio_tokens=tokens.out,
                               clap2diffusion=model_of(g, tokens), strength=1.0, start_percent=0.0,
                               end_percent=1.0, _chain=owner).out
            else:
                _, seed, weight, parts = step
                model = g.node("InteropStandIn_AttentionPatch", model=model, weight=weight, seed=seed,
                               key_parts=parts, _chain=owner).out
        return model

    def sample(model, name: str) -> None:
        sampled = g.node("KSampler", model=model, positive=positive, negative=negative, latent_image=latent.out,
                         seed=5, steps=3, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0,
                         _chain=name)
        image = g.node("VAEDecode", samples=sampled.out, vae=ckpt[2], _chain=name)
        g.node("SaveImage", images=image.out, filename_prefix=f"interop_{name}", _chain=name)

    for name, chain in chains.items():
        sample(patched(ckpt[0], chain, name), name)
    for fork, (trunk, branches) in forks.items():
        shared = patched(ckpt[0], trunk, fork)
        for name, steps in branches.items():
            sample(patched(shared, steps, name), name)
    return g


def run(comfy: ComfyClient, g: Graph) -> dict[str, np.ndarray]:
    """Images by chain name, every node executed afresh."""
    prompt = uncached(g.prompt())
    entry = comfy.wait(comfy.queue(prompt), timeout=400)
    return {node["inputs"]["filename_prefix"].removeprefix("interop_"): pixels(comfy.images(entry, node_id)[0])
            for node_id, node in prompt.items() if node["class_type"] == "SaveImage"}


def diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(int) - b.astype(int))
    return int(d.max()), float(d.mean())


@pytest.fixture(scope="module")
def images(comfy_server: ComfyServer, stage2_file) -> dict[str, np.ndarray]:
    """Every chain, plus "plain" (the unpatched MODEL, in the same graph) and "plain_alone" (its own graph)."""
    comfy = comfy_server.client
    alone = run(comfy, build({"plain": []}))["plain"]
    out = run(comfy, build({**CHAINS, "plain": []}, FORKS))
    for name in [*CHAINS, *ALONE]:
        print(f"{name}: max/mean vs plain {diff(out[name], out['plain'])}")  # pytest -s shows the figures
    return {**out, "plain_alone": alone}


def test_interop_server_every_patch_acts_in_every_order(images) -> None:
    for name in CHAINS:
        assert diff(images[name], images["plain"])[1] > ACTED, f"{name} is the plain image"
    for both, alone in (("other_audio", "audio"), ("other_audio", "other"), ("audio_other", "audio"),
                        ("audio_other", "other"), ("audio_other3", "audio"), ("audio_other3", "other3"),
                        ("other_audio_other2", "other_audio")):
        assert diff(images[both], images[alone])[1] > ACTED, f"{both} lost a patch: it looks like {alone}"


@pytest.mark.parametrize(("one", "other"), [("other_audio", "audio_other"), ("other3_audio", "audio_other3"),
                                            ("other_audio_other2", "other_other2_audio")])
def test_interop_server_the_order_of_apply_audio_and_the_other_pack_does_not_matter(images, one, other) -> None:
    assert diff(images[one], images[other])[0] <= ORDER_TOLERANCE


def test_interop_server_a_parallel_branch_on_the_unpatched_model_is_the_plain_image(images) -> None:
    assert np.array_equal(images["plain"], images["plain_alone"])


def test_interop_server_a_model_fed_through_apply_audio_and_past_it_keeps_both_branches_apart(images) -> None:
    """The stand-in's MODEL into Apply Audio to Model and straight into a KSampler: each branch is
    what it is alone, on every ComfyUI (Apply Audio to Model never changes what it was given)."""
    for branch in FORKS["ours_fork"][1]:
        assert diff(images[branch], images[ALONE[branch]])[0] <= ORDER_TOLERANCE, branch


def test_interop_server_an_in_place_stand_in_fork_follows_this_comfyuis_clone(images, comfy: ComfyClient) -> None:
    """Two stand-in branches that each ``.add`` onto one stand-in MODEL. Up to ComfyUI 0.13 clone()
    deep-copies the patch object and each branch is what it is alone; from 0.14 on the branches
    share it, and whichever samples last carries the other branch's term too."""
    version = comfy.system_stats()["system"]["comfyui_version"]
    changed = {branch: diff(images[branch], images[ALONE[branch]]) for branch in FORKS["standin_fork"][1]}
    print(f"ComfyUI {version}: stand-in fork branches vs alone (max, mean): {changed}")
    if clone_shares_patch_objects(version):
        assert max(mean for _, mean in changed.values()) > ACTED, \
            f"ComfyUI {version} shares patch objects between clones, yet no branch of the fork changed: {changed}"
    else:
        assert max(worst for worst, _ in changed.values()) <= ORDER_TOLERANCE, \
            f"ComfyUI {version} deep-copies patch objects on clone, yet a branch of the fork changed: {changed}"


def test_interop_server_the_stand_in_is_a_second_pack_not_ours(comfy: ComfyClient) -> None:
    info = comfy.object_info()
    assert info["InteropStandIn_AttentionPatch"]["python_module"] != info["C2D_ApplyAudioToModel"]["python_module"]
