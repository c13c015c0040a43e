"""Apply Audio to Model stacks with other packs' attention patches, in process (no server).

The other pack is the IPAdapter-style stand-in in ``tests/interop_standin`` (two-part keys with
``("middle", 1)``, ``.add`` in place, or three-part keys). The tiny SD1.5 UNet runs one forward;
hooks read each cross-attention layer's projected q/k/v and what reaches its to_out, which must be

    text attention + the term of every stand-in ComfyUI would call there + every sound's audio term

(computed here from q/k/v with plain SDPA, not with the pack's code), in every order.
"""

from __future__ import annotations

import copy

import comfy_pack
import pytest
import torch
import torch.nn.functional as F
from comfy_versions import checkout_version, clone_shares_patch_objects

from tools import test_models as tm

TOLERANCE = 1e-5  # fp32; observed at most 1.4e-6


@pytest.fixture(scope="module")
def env():
    """(nodes.model_patch, the stand-in pack, the tiny SD1.5 ModelPatcher, a stage-2 model for it)."""
    patch = comfy_pack.load("nodes.model_patch")
    testing = comfy_pack.load("clap2diffusion_core.testing")
    import interop_standin

    model = comfy_pack.tiny_sd15_model(0)
    return patch, interop_standin, model, testing.random_model(stage=2, layout="tiny", seed=1)


def sound(c2d, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return c2d.project(c2d.encode(F.normalize(torch.randn(1, 512, generator=gen), dim=-1)))


def heads_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``q [B, S, H*d]``, ``k``/``v [B, T, H*d]`` or ``[B, H, T, d]`` -> ``[B, S, H*d]``."""
    b, s, inner = q.shape
    split = [t if t.ndim == 4 else t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, s, inner)


def run_layers(patch, model) -> dict:
    """One UNet forward (cond rows only); per cross-attention layer: q, k, v and to_out's input."""
    unet = model.model.diffusion_model
    seen: dict = {}
    handles = []
    for key, (_, attn) in patch.cross_attentions(unet).items():
        rec = seen.setdefault(key, {"heads": attn.heads})
        for name in ("to_q", "to_k", "to_v"):
            handles.append(getattr(attn, name).register_forward_hook(
                lambda m, i, o, rec=rec, name=name: rec.__setitem__(name, o)))
        handles.append(attn.to_out.register_forward_pre_hook(lambda m, i, rec=rec: rec.__setitem__("out", i[0])))
    gen = torch.Generator().manual_seed(5)
    options = {**model.model_options["transformer_options"], "cond_or_uncond": [0], "sigmas": torch.tensor([5.0])}
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 16, 16, generator=gen), timesteps=torch.tensor([700.0]),
                 context=torch.randn(1, 77, 768, generator=gen), transformer_options=options)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def expected(standin, rec: dict, key: tuple, others: list[tuple], injections) -> torch.Tensor:
    """Text + the stand-in terms ComfyUI itself would run at ``key`` + the audio terms."""
    q, k, v, heads = rec["to_q"], rec["to_k"], rec["to_v"], rec["heads"]
    out = heads_sdpa(q, k, v, heads)
    three = [o for o in others if o[2] == "three"]
    # ComfyUI prefers the three-part key; the stand-in's two-part middle key ("middle", 1) never runs
    active = three if three else [o for o in others if key[0] != "middle"]
    for seed, weight, _ in active:
        out = out + standin.standin_term(q, heads, seed, weight)
    for injection in injections:
        slot = injection.keys.index(key)
        kv = injection.kv.slots[slot]
        out = out + heads_sdpa(q, kv.k_cond, kv.v_cond, heads)
    return out


ORDERS = {
    "other-audio": ["other", "audio"],
    "audio-other": ["audio", "other"],
    "other-audio-other": ["other", "audio", "other"],
    "audio-other3": ["audio", "other3"],
    "other3-audio-other3": ["other3", "audio", "other3"],
    "audio-other-audio": ["audio", "other", "audio"],
}


@pytest.mark.parametrize("order", ORDERS, ids=list(ORDERS))
def test_interop_each_layer_is_text_plus_every_other_term_plus_the_audio(env, order):
    patch, standin, model, c2d = env
    others: list[tuple] = []
    chained = model
    for n, step in enumerate(ORDERS[order]):
        if step == "audio":
            chained = patch.apply_audio_to_model(chained, c2d, sound(c2d, n))
        else:
            parts = "three" if step == "other3" else "two"
            others.append((10 + n, 0.5 + n, parts))
            chained = standin.apply_standin(chained, others[-1][1], others[-1][0], parts)
    injections = patch.audio_injections(chained)
    assert len(injections) == ORDERS[order].count("audio")
    layers = run_layers(patch, chained)
    for key in injections[0].keys:
        want = expected(standin, layers[key], key, others, injections)
        assert (layers[key]["out"] - want).abs().max() < TOLERANCE, key
        # the audio term is real: without it the layer would differ
        assert (layers[key]["out"] - expected(standin, layers[key], key, others, [])).abs().max() > 1e-3, key


def test_interop_the_stand_in_alone_checks_the_harness(env):
    """Without our pack the same expectation holds (other terms only), so the hooks read the right tensors."""
    patch, standin, model, _ = env
    chained = standin.apply_standin(standin.apply_standin(model, 0.7, 3), -0.4, 4)
    layers = run_layers(patch, chained)
    for key, rec in layers.items():
        assert (rec["out"] - expected(standin, rec, key, [(3, 0.7, "two"), (4, -0.4, "two")], [])).abs().max() \
            < TOLERANCE, key


def attn2_table(model) -> dict:
    return model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})


def test_interop_apply_audio_never_changes_the_model_it_was_given(env):
    """other -> audio: the upstream MODEL keeps the very patch objects it had, unchanged, on every
    ComfyUI (whether clone() deep-copies them or shares them)."""
    patch, standin, model, c2d = env
    upstream = standin.apply_standin(model, 0.5, 1)
    before = {key: (p, list(p.kwargs)) for key, p in attn2_table(upstream).items()}
    branch = patch.apply_audio_to_model(upstream, c2d, sound(c2d, 0))
    assert {key: (p, list(p.kwargs)) for key, p in attn2_table(upstream).items()} == before
    assert all(after is p for (p, _), after in zip(before.values(), attn2_table(upstream).values()))
    assert not patch.audio_injections(upstream) and len(patch.audio_injections(branch)) == 1
    assert not attn2_table(model)


@pytest.mark.parametrize("through_audio", [True, False], ids=["through_apply_audio", "stand_in_only"])
def test_interop_an_in_place_stand_in_on_a_branch_follows_this_comfyuis_clone(env, through_audio):
    """other -> (audio ->) other on a branch: up to ComfyUI 0.13 clone() deep-copies the patch objects
    and the upstream MODEL keeps one term per key; from 0.14 on it shares them, so the branch's
    in-place ``.add`` lands on the upstream too, with or without Apply Audio to Model between."""
    patch, standin, model, c2d = env
    shared = clone_shares_patch_objects(checkout_version(tm.comfyui_path()))
    upstream = standin.apply_standin(model, 0.5, 1)
    key, first = next(iter(attn2_table(upstream).items()))
    assert (attn2_table(upstream.clone())[key] is first) == shared, "clone() is not what this version's is"
    middle = patch.apply_audio_to_model(upstream, c2d, sound(c2d, 0)) if through_audio else upstream
    branch = standin.apply_standin(middle, 0.9, 2)
    assert {len(p.kwargs) for p in attn2_table(branch).values()} == {2}
    assert {len(p.kwargs) for p in attn2_table(upstream).values()} == ({2} if shared else {1})
    assert not attn2_table(model)


def test_interop_a_wrapper_that_drops_our_layers_is_an_error_not_a_silent_image(env):
    import comfy.patcher_extension as pe

    patch, _, model, c2d = env
    patched = patch.apply_audio_to_model(model, c2d, sound(c2d, 0))

    def overwrite_attn2(executor, *args, **kwargs):  # a careless pack: replaces, never calls what was there
        options = copy.copy(args[5])
        table = {key: (lambda q, k, v, extra: heads_sdpa(q, k, v, extra["n_heads"]))
                 for key in options["patches_replace"]["attn2"]}
        options["patches_replace"] = {**options["patches_replace"], "attn2": table}
        return executor(*args[:5], options, *args[6:], **kwargs)

    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "careless_pack", overwrite_attn2,
                            patched.model_options, is_model_options=True)
    with pytest.raises(patch.AudioNotReachedError,
                       match=r"did not run in 4 of 4 .*overwrite_attn2.*before Apply Audio to Model"):
        run_layers(patch, patched)


def test_interop_a_later_node_that_swaps_the_unet_is_refused_before_sampling(env):
    patch, _, model, c2d = env
    patched = patch.apply_audio_to_model(model, c2d, sound(c2d, 0)).clone()
    patched.add_object_patch("diffusion_model", torch.nn.Identity())
    with pytest.raises(patch.AudioNotReachedError, match=r"Identity\) has no such layers.*after that node"):
        patched.pre_run()
