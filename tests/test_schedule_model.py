"""Per-frame tokens through Apply Audio to Model, in one in-process ComfyUI sampler (no server).

The tiny SD1.5 UNet has no temporal layers, so each latent is denoised on its own: latent i of a
batch fed per-frame tokens must come out as latent i of a batch fed row i's sound alone (equal
within float rounding of other batch sizes). ComfyUI concatenates cond and uncond into one UNet
batch, so a batch of 8 latents is a UNet call of 16 rows: the rows must follow the latents in both
halves, and in context windows (core Context Windows) each window must hear its own frames.
"""

from __future__ import annotations

import comfy_pack
import pytest
import torch
import torch.nn.functional as F

FRAMES, SIZE = 8, 64
# Sampled latents here reach about 400; rows computed in batches of other sizes (other CPU kernels)
# move them by about 1e-3, the other sound by about 30.
CLOSE = dict(rtol=0.0, atol=1e-2)


class Frames:
    """The tiny UNet, a stage-2 model for it, two sounds, and per-frame tokens made of them."""

    def __init__(self) -> None:
        self.patch = comfy_pack.load("nodes.model_patch")  # puts ComfyUI on sys.path first
        testing = comfy_pack.load("clap2diffusion_core.testing")
        self.errors = comfy_pack.load("clap2diffusion_core.errors")
        import comfy.sample

        self.model = comfy_pack.tiny_sd15_model(0)
        self.c2d = testing.random_model(stage=2, layout="tiny", seed=1)
        gen = torch.Generator().manual_seed(0)
        self.sounds = F.normalize(torch.randn(2, 512, generator=gen), dim=-1)  # rain, thunder
        self.positive = [[torch.randn(1, 77, 768, generator=gen), {}]]  # stands for CLIP Text Encode
        self.negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
        self.latent = torch.zeros(FRAMES, 4, SIZE // 8, SIZE // 8)
        self.noise = comfy.sample.prepare_noise(self.latent, seed=3)

    def tokens(self, rows: list[int]):  # noqa: ANN201
        """Audio tokens with one row per entry of ``rows`` (0: rain, 1: thunder)."""
        return self.c2d.project(self.c2d.encode(self.sounds[rows]))

    def patched(self, rows: list[int], model=None):  # noqa: ANN001, ANN201
        return self.patch.apply_audio_to_model(model or self.model, self.c2d, self.tokens(rows))

    def sample(self, model, latents: int = FRAMES, steps: int = 1) -> torch.Tensor:  # noqa: ANN001
        import comfy.sample

        return comfy.sample.sample(model, self.noise[:latents], steps, 7.0, "euler", "normal", self.positive,
                                   self.negative, self.latent[:latents], seed=0, disable_pbar=True)  # fmt: skip


@pytest.fixture(scope="module")
def frames() -> Frames:
    return Frames()


def _windowed(model, length: int):  # noqa: ANN001, ANN202
    """``model`` with core Context Windows (as the ContextWindowsManual node sets them): batched
    windows of ``length`` frames, no overlap."""
    import comfy.context_windows as cw

    model = model.clone()
    model.model_options["context_handler"] = cw.IndexListContextHandler(
        context_schedule=cw.get_matching_context_schedule(cw.ContextSchedules.BATCHED),
        fuse_method=cw.get_matching_fuse_method(cw.ContextFuseMethods.FLAT),
        context_length=length, context_overlap=0, dim=0,
    )  # fmt: skip
    cw.create_prepare_sampling_wrapper(model)
    return model


def test_schedule_model_injection_gives_latent_i_the_sound_of_frame_i(frames: Frames) -> None:
    mixed = frames.sample(frames.patched([0, 0, 0, 0, 1, 1, 1, 1]))  # the sound changes at frame 4
    rain = frames.sample(frames.patched([0]))  # one row for every latent: the unscheduled path
    thunder = frames.sample(frames.patched([1]))
    torch.testing.assert_close(mixed[:4], rain[:4], **CLOSE)
    torch.testing.assert_close(mixed[4:], thunder[4:], **CLOSE)
    # ...and the sound matters: the other sound moves every latent far beyond the tolerance.
    assert (rain - thunder).flatten(1).abs().amax(1).min() > 100 * CLOSE["atol"]


def test_schedule_model_injection_of_a_constant_sound_is_the_single_embedding(frames: Frames) -> None:
    """8 identical rows are the same rows as one row broadcast, bitwise: the same samples."""
    assert torch.equal(frames.sample(frames.patched([0] * FRAMES)), frames.sample(frames.patched([0])))


def test_schedule_model_rows_that_do_not_match_the_latents_are_an_error_before_sampling(frames: Frames) -> None:
    calls = []
    model = frames.patched([0, 0, 0, 0, 1, 1, 1, 1])
    model.model.diffusion_model.register_forward_pre_hook(lambda *_: calls.append(1))  # removed below
    hooks = model.model.diffusion_model._forward_pre_hooks
    try:
        with pytest.raises(frames.errors.FrameBatchError) as err:
            frames.sample(model, latents=6)
    finally:
        hooks.clear()
    assert not calls, "the UNet ran before the mismatch was found"
    message = str(err.value)
    assert "8 rows, one per frame, but the latent batch has 6 latents" in message
    assert "batch_size of 8" in message and "context windows" in message


def test_schedule_model_context_windows_hear_their_own_frames(frames: Frames) -> None:
    """Core Context Windows run windows of 2 of 4 latents (each UNet call: 2 cond + 2 uncond rows);
    window [2, 3] must hear rows 2 and 3, not the first rows again."""
    rows = [0, 1, 1, 0]  # each window hears both sounds, in its own order
    # ComfyUI 0.3.75's Context Windows find the step by comparing the schedule's sigmas with the
    # whole timestep batch (later versions take timestep[0]): they run only when steps + 1 == frames.
    latents, steps = len(rows), len(rows) - 1
    plain = frames.sample(frames.patched(rows), latents=latents, steps=steps)
    seen: list[list[int] | None] = []
    original = frames.patch.frame_window

    def spy(options: dict) -> list[int] | None:
        seen.append(original(options))
        return seen[-1]

    frames.patch.frame_window = spy
    try:
        windowed = frames.sample(_windowed(frames.patched(rows), length=2), latents=latents, steps=steps)
    finally:
        frames.patch.frame_window = original
    assert [0, 1] in seen and [2, 3] in seen  # the windows ran, and were read
    torch.testing.assert_close(windowed, plain, **CLOSE)


def test_schedule_model_reads_animatediff_evolved_windows_too(frames: Frames) -> None:
    """AnimateDiff-Evolved publishes its window as ``ad_params["sub_idxs"]`` (None outside windows)."""
    window = frames.patch.frame_window
    assert window({"ad_params": {"sub_idxs": [8, 9, 10, 11], "full_length": 16}}) == [8, 9, 10, 11]
    assert window({"ad_params": {"sub_idxs": None, "full_length": 16}}) is None
    assert window({}) is None
