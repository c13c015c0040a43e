"""What a sampling run with the audio costs on our side: counted, never timed (the bench times it).

One in-process ComfyUI sampling run of the tiny SD1.5 UNet (64 px, 2 euler steps, cfg 7) per
variant, plain / Apply Audio to Conditioning / Apply Audio to Model, with calls of our code counted
and torch.profiler events counted:

- while sampling, the adapter never projects the sound again and no silence tokens are computed:
  keys/values come once per sound, from Apply Audio to Model;
- the per-row keys/values are assembled once per layer and run, not per step;
- the model injection adds no host reads (``.item()``: a device sync on cuda), no dtype/device
  conversions and no host<->device copies to plain sampling;
- the audio attention runs in the UNet's compute dtype; ComfyUI loads the keys/values with the UNet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import comfy_pack
import pytest
import torch

from tools import test_models as tm

STEPS, SIZE = 2, 64
#: Profiler events that mean a host read of a tensor, a dtype/device conversion, or a copy between
#: host and device (the cuda ones stay 0 on a CPU).
EVENT_KINDS = {
    "aten::_local_scalar_dense": "host_reads",
    "aten::_to_copy": "to_copies",
    "Memcpy HtoD": "memcpy_htod",
    "Memcpy DtoH": "memcpy_dtoh",
    "cudaStreamSynchronize": "syncs",
    "cudaDeviceSynchronize": "syncs",
}


@contextlib.contextmanager
def counting(targets: list[tuple[Any, str]]) -> Iterator[dict[str, int]]:
    """Count calls to ``getattr(owner, name)`` for each target inside the block: ``"Owner.name" -> n``."""
    counts: dict[str, int] = {}
    originals = []
    for owner, name in targets:
        original = getattr(owner, name)
        label = f"{getattr(owner, '__name__', type(owner).__name__).split('.')[-1]}.{name}"
        counts[label] = 0

        def wrapper(*a, _original=original, _label=label, **kw):  # noqa: ANN002, ANN003, ANN202
            counts[_label] += 1
            return _original(*a, **kw)

        originals.append((owner, name, original))
        setattr(owner, name, wrapper)
    try:
        yield counts
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def profiled(run: Callable[[], Any]) -> dict[str, int]:
    """Counts of each of EVENT_KINDS' kinds in one call of ``run``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    counts = dict.fromkeys(sorted(set(EVENT_KINDS.values())), 0)
    for event in prof.events():
        for marker, kind in EVENT_KINDS.items():
            if event.name.startswith(marker):
                counts[kind] += 1
    return counts


class Run:
    """The tiny UNet as a ComfyUI ModelPatcher, text and audio conditionings, both injections."""

    def __init__(self) -> None:
        self.patch = comfy_pack.load("nodes.model_patch")  # puts ComfyUI on sys.path first
        cond_nodes = comfy_pack.load("nodes.conditioning_nodes")
        testing = comfy_pack.load("clap2diffusion_core.testing")
        import comfy.sample
        import comfy.sd

        sd = {f"model.diffusion_model.{k}": v for k, v in tm.tiny_unet(0).state_dict().items()}
        self.model = comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=False)[0]
        self.c2d = testing.random_model(stage=2, layout="tiny", seed=1)
        gen = torch.Generator().manual_seed(0)
        sound = torch.nn.functional.normalize(torch.randn(1, 512, generator=gen), dim=-1)
        self.tokens = self.c2d.project(self.c2d.encode(sound))
        self.positive = [[torch.randn(1, 77, 768, generator=gen), {}]]  # stands for CLIP Text Encode's output
        self.negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
        self.positive_audio = cond_nodes.ApplyAudioToConditioning.execute(self.positive, self.tokens, 1.0).result[0]
        self.patched = self.patch.apply_audio_to_model(self.model, self.c2d, self.tokens)
        (self.injection,) = self.patch.audio_injections(self.patched)
        self.latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
        self.noise = comfy.sample.prepare_noise(self.latent, seed=0)

    def sample(self, model, positive) -> torch.Tensor:  # noqa: ANN001
        import comfy.sample

        return comfy.sample.sample(model, self.noise, STEPS, 7.0, "euler", "normal", positive, self.negative,
                                   self.latent, seed=0, disable_pbar=True)


@pytest.fixture(scope="module")
def run() -> Run:
    return Run()


@pytest.fixture(scope="module")
def model_run(run: Run) -> dict[str, Any]:
    """One sampling run with Apply Audio to Model, our calls counted; the dtypes the audio met."""
    adapters = comfy_pack.load("clap2diffusion_core.adapters")
    attention = comfy_pack.load("clap2diffusion_core.audio_attention")
    model_mod = comfy_pack.load("clap2diffusion_core.model")
    seen: set[tuple[torch.dtype, torch.dtype]] = set()
    original_add = run.patch.add_audio

    def add_audio(out, q, key, value):  # noqa: ANN001, ANN202
        seen.add((q.dtype, key.dtype))
        return original_add(out, q, key, value)

    targets = [
        (adapters.AudioAdapter, "layer_kv"),
        (model_mod.CLAP2DiffusionModel, "silence_tokens"),
        (attention.AudioKV, "batch"),
        (attention, "rows_for_chunks"),
        (run.patch.AudioAttn2Patch, "__call__"),
    ]
    run.patch.add_audio = add_audio
    try:
        with counting(targets) as counts:
            run.sample(run.patched, run.positive)
    finally:
        run.patch.add_audio = original_add
    return {"counts": counts, "dtypes": seen}


def test_sampling_never_projects_the_sound_again_nor_computes_silence(model_run) -> None:
    counts = model_run["counts"]
    assert counts["AudioAttn2Patch.__call__"] > 0, "the patch never ran: nothing was measured"
    assert counts["AudioAdapter.layer_kv"] == 0
    assert counts["CLAP2DiffusionModel.silence_tokens"] == 0


def test_keys_and_values_are_assembled_once_per_layer_not_per_step(run: Run, model_run) -> None:
    counts, layers = model_run["counts"], len(run.injection.kv)
    assert layers == 4  # the tiny UNet's cross-attention layers, gates open
    unet_calls = counts["AudioAttn2Patch.__call__"] // layers
    assert counts["AudioAttn2Patch.__call__"] == layers * unet_calls
    assert unet_calls == STEPS  # euler, cond and uncond batched in one call per step
    # rows_for_chunks builds keys and values: two calls per assembly
    assert counts["audio_attention.rows_for_chunks"] == 2 * layers
    assert counts["AudioKV.batch"] == layers * unet_calls  # a lookup per layer and call, built once


def test_audio_attention_runs_in_the_unets_compute_dtype(run: Run, model_run) -> None:
    dtype = run.patch.compute_dtype(run.model)
    assert model_run["dtypes"] == {(dtype, dtype)}
    assert next(run.injection.kv.parameters()).dtype == dtype


def test_comfyui_loads_the_keys_and_values_with_the_unet(run: Run) -> None:
    import comfy.model_management as mm

    try:
        mm.load_models_gpu([run.patched])
        assert any(getattr(m, "model", None) is run.injection.kv_patcher for m in mm.current_loaded_models)
    finally:
        mm.unload_all_models()


def test_the_model_injection_adds_no_host_reads_conversions_or_copies(run: Run) -> None:
    plain = profiled(lambda: run.sample(run.model, run.positive))
    with_audio = profiled(lambda: run.sample(run.patched, run.positive))
    assert sum(plain.values()) > 0, "the profiler counted nothing: the comparison would be empty"
    assert with_audio == plain


def test_the_conditioning_injection_adds_none_either(run: Run) -> None:
    assert profiled(lambda: run.sample(run.model, run.positive_audio)) == profiled(
        lambda: run.sample(run.model, run.positive))
