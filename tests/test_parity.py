"""Parity: the trained weights mean the same thing in training (diffusers) and in ComfyUI.

The tiny SD1.5 test checkpoint is loaded twice: by ComfyUI's own ``load_checkpoint_guess_config``
(then patched by Apply Audio to Model's code) and by ``clap2diffusion_core.sd15.load_unet`` into a
diffusers ``UNet2DConditionModel`` (with the adapter's processors). Same latent, timestep, text
and audio tokens -> the same noise prediction, for cond and uncond rows in either batch order.
"""

from __future__ import annotations

import comfy_pack
import pytest
import torch
import torch.nn.functional as F

TOLERANCE = 1e-4  # fp32; observed about 2e-6
STRENGTH, LEVEL_WEIGHTS = 0.8, (1.0, 0.5, 1.5)


@pytest.fixture(scope="module")
def pack():
    return {
        name: comfy_pack.load(module)
        for name, module in {
            "patch": "nodes.model_patch",
            "testing": "clap2diffusion_core.testing",
            "sd15": "clap2diffusion_core.sd15",
            "processor": "clap2diffusion_core.diffusers_processor",
            "adapters": "clap2diffusion_core.adapters",
        }.items()
    }


@pytest.fixture(scope="module")
def models(pack, test_models):
    import comfy.sd

    comfy_model = comfy.sd.load_checkpoint_guess_config(
        str(test_models.sd15_checkpoint), output_vae=False, output_clip=False
    )[0]
    assert type(comfy_model.model.model_config).__name__ == "SD15"
    unet = pack["sd15"].load_unet(test_models.sd15_checkpoint)
    c2d = pack["testing"].random_model(stage=2, layout="tiny", seed=1)
    gen = torch.Generator().manual_seed(7)
    sounds = F.normalize(torch.randn(2, 512, generator=gen), dim=-1)
    audio = c2d.project(c2d.encode(sounds))  # two sounds: one per latent row
    return comfy_model, unet, c2d, audio


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 4, 16, 16, generator=gen)  # a batch of two latents
    text = {0: torch.randn(2, 77, 768, generator=gen), 1: torch.randn(2, 77, 768, generator=gen)}
    return latent, text


def comfy_eps(model, latent, text, t, order, sigma=5.0):
    """ComfyUI's UNet forward as the sampler calls it: chunks in ``order`` (0 cond, 1 uncond)."""
    options = dict(model.model_options["transformer_options"])
    options.update(cond_or_uncond=list(order), sigmas=torch.tensor([sigma]))
    x = torch.cat([latent] * len(order))
    context = torch.cat([text[c] for c in order])
    with torch.no_grad():
        return model.model.diffusion_model(
            x, timesteps=torch.full((x.shape[0],), t), context=context, transformer_options=options
        )


def diffusers_eps(hook, unet, silence, audio, latent, text, t, order):
    """The diffusers UNet with the audio processors; uncond rows get the silence tokens."""
    x = torch.cat([latent] * len(order))
    context = torch.cat([text[c] for c in order])
    rows = torch.cat([silence.expand(latent.shape[0], -1, -1) if c else audio.tokens for c in order])
    with torch.no_grad(), hook.audio(rows, audio.token_levels, strength=STRENGTH, level_weights=LEVEL_WEIGHTS):
        return unet(x, torch.full((x.shape[0],), t), context).sample


@pytest.mark.parametrize("order", [(0, 1), (1, 0), (0,), (1,)], ids=["cond-uncond", "uncond-cond", "cond", "uncond"])
def test_parity_noise_prediction_comfyui_patch_vs_diffusers_processor(pack, models, inputs, order):
    comfy_model, unet, c2d, audio = models
    latent, text = inputs
    patched = pack["patch"].apply_audio_to_model(comfy_model, c2d, audio.with_level_scale(*LEVEL_WEIGHTS), STRENGTH)
    hook = pack["processor"].attach_audio_adapter(unet, c2d.adapter)
    try:
        ours = comfy_eps(patched, latent, text, 700.0, order)
        theirs = diffusers_eps(hook, unet, c2d.silence_tokens(), audio, latent, text, 700.0, order)
    finally:
        hook.detach()
    plain = comfy_eps(comfy_model, latent, text, 700.0, order)
    assert (ours - theirs).abs().max() < TOLERANCE
    assert (ours - plain).abs().max() > 0.05, "audio must change the prediction, or parity proves nothing"


def test_parity_through_comfyui_batching_and_model_sampling(pack, models, inputs):
    """The same, through ComfyUI's calc_cond_batch (it decides the batch order) and eps scaling."""
    import comfy.sampler_helpers
    import comfy.samplers

    comfy_model, unet, c2d, audio = models
    latent, text = inputs
    patched = pack["patch"].apply_audio_to_model(comfy_model, c2d, audio.with_level_scale(*LEVEL_WEIGHTS), STRENGTH)
    conds = {
        "positive": comfy.sampler_helpers.convert_cond([[text[0][:1], {}]]),
        "negative": comfy.sampler_helpers.convert_cond([[text[1][:1], {}]]),
    }
    conds = comfy.samplers.process_conds(patched.model, latent, conds, "cpu")
    patched.pre_run()
    sampling = patched.get_model_object("model_sampling")
    sigma = torch.full((2,), 3.0)
    with torch.no_grad():
        denoised = comfy.samplers.calc_cond_batch(
            patched.model, [conds["positive"], conds["negative"]], latent, sigma, patched.model_options
        )
    t = float(sampling.timestep(sigma)[0])
    x_in = sampling.calculate_input(sigma, latent)
    one_text = {c: text[c][:1].expand(2, -1, -1) for c in (0, 1)}
    hook = pack["processor"].attach_audio_adapter(unet, c2d.adapter)
    try:
        for index, rows in ((0, audio.tokens), (1, c2d.silence_tokens().expand(2, -1, -1))):
            with torch.no_grad(), hook.audio(rows, audio.token_levels, strength=STRENGTH, level_weights=LEVEL_WEIGHTS):
                eps = unet(x_in, torch.full((2,), t), one_text[index]).sample
            expected = sampling.calculate_denoised(sigma, eps, latent)
            assert (denoised[index] - expected).abs().max() < TOLERANCE * 3.0  # eps x sigma
    finally:
        hook.detach()


def test_outside_start_end_the_patched_layers_compute_the_plain_model_bit_for_bit(pack, models, inputs):
    comfy_model, _, c2d, audio = models
    latent, text = inputs
    late = pack["patch"].apply_audio_to_model(comfy_model, c2d, audio, 1.0, start_percent=0.6, end_percent=1.0)
    # sigma 14 is near the start of sampling (percent ~0): the audio is not yet on
    assert torch.equal(comfy_eps(late, latent, text, 990.0, (1, 0), sigma=14.0),
                       comfy_eps(comfy_model, latent, text, 990.0, (1, 0), sigma=14.0))
    assert not torch.equal(comfy_eps(late, latent, text, 100.0, (1, 0), sigma=0.1),
                           comfy_eps(comfy_model, latent, text, 100.0, (1, 0), sigma=0.1))


def test_without_audio_bound_the_processor_is_diffusers_default_bit_for_bit(pack, models, inputs):
    _, unet, c2d, _ = models
    latent, text = inputs
    x, t = latent, torch.full((2,), 500.0)
    with torch.no_grad():
        before = unet(x, t, text[0]).sample
        hook = pack["processor"].attach_audio_adapter(unet, c2d.adapter)
        assert type(unet.get_submodule(c2d.adapter.config.diffusers_layers[0]).processor).__name__ == "AudioAttnProcessor"
        during = unet(x, t, text[0]).sample
        hook.detach()
        after = unet(x, t, text[0]).sample
    assert torch.equal(before, during) and torch.equal(before, after)


def test_processor_takes_one_sound_for_the_whole_batch_or_one_per_row(pack, models, inputs):
    _, unet, c2d, audio = models
    latent, text = inputs
    t = torch.full((2,), 500.0)
    hook = pack["processor"].attach_audio_adapter(unet, c2d.adapter)
    try:
        with torch.no_grad():
            with hook.audio(audio.tokens[:1], audio.token_levels):
                one = unet(latent, t, text[0]).sample
            with hook.audio(audio.tokens[:1].expand(2, -1, -1), audio.token_levels):
                each = unet(latent, t, text[0]).sample
            with pytest.raises(ValueError, match="audio tokens for 3 rows, but the UNet batch has 2"):
                with hook.audio(audio.tokens[:1].expand(3, -1, -1), audio.token_levels):
                    unet(latent, t, text[0])
    finally:
        hook.detach()
    torch.testing.assert_close(one, each)


def test_training_gradients_reach_gates_projections_and_routing(pack, models, inputs):
    _, unet, c2d, audio = models
    latent, text = inputs
    adapter = pack["testing"].random_model(stage=2, layout="tiny", seed=5).adapter.train().requires_grad_(True)
    with torch.no_grad():
        adapter.layers[0].gate.zero_()  # a closed gate still gets a gradient: training opens it
    hook = pack["processor"].attach_audio_adapter(unet, adapter)
    try:
        with hook.audio(audio.tokens, audio.token_levels):
            unet(latent, torch.full((2,), 500.0), text[0]).sample.square().mean().backward()
    finally:
        hook.detach()
    assert adapter.layers[0].gate.grad.abs() > 0
    assert adapter.layers[2].to_k.weight.grad.abs().sum() > 0 and adapter.route_logits.grad.abs().sum() > 0
    assert adapter.layers[0].to_v.weight.grad.abs().sum() == 0  # gate 0: nothing flows past it yet


# ------------------------------------------------------------------------------------------------
# the text part calls exactly what the unpatched layer calls (0.3.75, and the newer API simulated)


class FakeContainer:
    """Stand-in for ComfyUI 0.38's ``AttentionTensorContainer`` (single-owner q/k/v; ``take()``)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def take(self) -> torch.Tensor:
        tensor, self.tensor = self.tensor, None
        return tensor


def forward_038(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
    """``CrossAttention.forward`` with the newer call: q/k/v in containers, ``preferred_attention=``."""
    import comfy.ldm.modules.attention as attention

    q = self.to_q(x)
    context = x if context is None else context
    k = self.to_k(context)
    v = self.to_v(context if value is None else value)
    box = attention.AttentionTensorContainer
    out = attention.optimized_attention(
        box(q), box(k), box(v), self.heads, attn_precision=self.attn_precision,
        transformer_options=transformer_options, preferred_attention=self.comfy_attention,
    )  # fmt: skip
    return self.to_out(out)


def text_calls(model, latent, text, monkeypatch) -> list[tuple]:
    """How each cross-attention text call (k over 77 tokens) reaches ``optimized_attention``."""
    import comfy.ldm.modules.attention as attention

    original, calls = attention.optimized_attention, []

    def record(q, k, v, heads, *args, **kwargs):
        boxed = isinstance(q, FakeContainer)
        if boxed:
            q, k, v = q.take(), k.take(), v.take()
        if k.shape[1] == 77:
            options = kwargs.get("transformer_options", {})
            calls.append((
                boxed, heads, tuple(sorted(kwargs)), id(kwargs.get("preferred_attention")),
                kwargs.get("attn_precision"), options.get("block"), options.get("block_index"),
                options.get("optimized_attention_override"),
            ))  # fmt: skip
        kwargs.pop("preferred_attention", None)
        return original(q, k, v, heads, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(attention, "optimized_attention", record)
        comfy_eps(model, latent, text, 700.0, (0,))
    return calls


def test_parity_text_call_is_the_unpatched_layers_call_on_this_comfyui(pack, models, inputs, monkeypatch):
    comfy_model, _, c2d, audio = models
    latent, text = inputs
    patched = pack["patch"].apply_audio_to_model(comfy_model, c2d, audio, STRENGTH)
    plain, ours = text_calls(comfy_model, latent, text, monkeypatch), text_calls(patched, latent, text, monkeypatch)
    assert len(plain) == len(pack["testing"].TINY_SD15_LAYERS) and ours == plain
    assert not any(call[0] for call in plain)  # 0.3.75: plain tensors, no preferred_attention


def test_parity_text_call_passes_preferred_attention_and_containers_on_the_newer_api(
    pack, models, inputs, monkeypatch
):
    """ComfyUI 0.38 cannot be installed here: its CrossAttention call is simulated (forward_038,
    a container class, one ``comfy_attention`` preference per layer) on the installed one."""
    import comfy.ldm.modules.attention as attention

    comfy_model, _, c2d, audio = models
    latent, text = inputs
    patched = pack["patch"].apply_audio_to_model(comfy_model, c2d, audio, STRENGTH)
    unet = comfy_model.model.diffusion_model
    monkeypatch.setattr(attention, "AttentionTensorContainer", FakeContainer, raising=False)
    monkeypatch.setattr(attention.CrossAttention, "forward", forward_038)
    preferences = {}
    for module in unet.modules():
        if isinstance(module, attention.CrossAttention):
            monkeypatch.setattr(module, "comfy_attention", object(), raising=False)
            preferences[id(module.comfy_attention)] = module
    plain, ours = text_calls(comfy_model, latent, text, monkeypatch), text_calls(patched, latent, text, monkeypatch)
    assert len(plain) == len(pack["testing"].TINY_SD15_LAYERS) and ours == plain
    assert all(call[0] and "preferred_attention" in call[2] for call in ours)
    layers = [module for _, module in pack["patch"].cross_attentions(unet).values()]
    assert sorted(id(preferences[call[3]]) for call in ours) == sorted(map(id, layers))  # each layer's own


# ------------------------------------------------------------------------------------------------
# one layout, three derivations


def test_layouts_agree_comfyui_diffusers_and_the_adapter_config(pack, models):
    comfy_model, unet, _, _ = models
    layers, context_dim = pack["patch"].comfy_layout(comfy_model)
    assert layers == pack["processor"].diffusers_layout(unet) == pack["testing"].TINY_SD15_LAYERS
    assert context_dim == 768


def test_real_sd15_layout_and_key_map_agree_with_comfyui(pack):
    """Full-size SD1.5, built on the meta device (no memory): ComfyUI's UNetModel with its SD15
    config has the 16 layers of SD15_LAYERS, its state dict infers the shipped diffusers config,
    and every weight lands in the diffusers UNet with the right shape."""
    import comfy.ops
    import comfy.supported_models
    from accelerate import init_empty_weights
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = dict(comfy.supported_models.SD15.unet_config)
    config.update(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2] * 4,
        channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
        num_heads=8, num_head_channels=-1, use_spatial_transformer=True, legacy=False,
    )  # fmt: skip
    ldm_unet = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    ldm = ldm_unet.state_dict()
    sd15 = pack["sd15"]
    assert sd15.infer_unet_config(ldm) == sd15.unet_config("sd15")
    unet = sd15.load_unet(ldm)  # raises naming any missing / unexpected / misshapen key
    assert pack["processor"].diffusers_layout(unet) == pack["adapters"].SD15_LAYERS
    assert pack["patch"].unet_layout(ldm_unet, config) == (pack["adapters"].SD15_LAYERS, 768)
    with init_empty_weights():
        assert sum(p.numel() for p in sd15.build_unet("sd15").parameters()) == sum(
            p.numel() for p in unet.parameters()) == 859_520_964
