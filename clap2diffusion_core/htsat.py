"""HTS-AT, CLAP's audio encoder, run for inference on transformers' own ``ClapAudioModel`` weights.

The same computation as ``ClapAudioModel.forward`` (every module and weight is transformers'; only
the order of operations is ours), equal within ~1e-6, and faster, mostly on the CPU:

- **Linear layers through oneDNN.** On the CPU, ``F.linear`` in float32 is MKL's sgemm, and MKL
  runs without AVX-512 on AMD CPUs. The same product as a 1x1
  convolution over channels-last tokens goes to oneDNN, which uses AVX-512 wherever the CPU has it
  (1.1-2x faster for HTS-AT's shapes on the development machine's AMD EPYC, 2 threads). Elsewhere
  (CUDA, MPS) it is ``F.linear``.
- **Window attention in one call.** ``scaled_dot_product_attention`` with the relative-position
  bias and the shifted-window mask as one additive mask, instead of matmul, scale, two adds,
  softmax and matmul, each a pass over ``[windows, heads, 64, 64]``.
- **The wide stages two clips at a time.** Stages 1 and 2 hold 4096 and 1024 tokens per clip at
  96 and 192 channels: their layers are memory-bound, and for a batch of 8 clips each activation is
  12-50 MB, past the caches, so in transformers' forward a clip took longer in a batch of 8 than
  alone (its attention scores, 33 MB a block, made it worse). Stages 3 and 4 (256 and 64 tokens,
  384 and 768 channels) are compute-bound and want the whole batch. On the CPU, stages 1-2 therefore
  run ``WIDE_STAGE_CLIPS`` clips at a time and stages 3-4 on the batch: a batch of 8 is no slower per
  clip than one clip, and a streamed file's resident memory grows by under 100 MB, not 270 MB.
  (Not one clip at a time: on a busy machine every extra op is a wait between OpenMP threads.)

``pooled_audio_features`` replaces ``ClapAudioModel(...).pooler_output`` for windows that are
"not longer" than 10 s (``is_longer`` all false: what the pack always passes, so fused models read
only the first mel view, as laion-clap's inference does).

**Two branches.** The CPU branch (wide stages ``WIDE_STAGE_CLIPS`` clips at a time; oneDNN linears
in float32) runs for CPU tensors; the other branch (``F.linear``, whole batch) everywhere else (CUDA,
MPS). ``branch="cuda"`` (or ``CLAP2DIFFUSION_HTSAT_BRANCH=cuda``) runs the
latter on the CPU too, so the path a GPU takes is tested on machines without one.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

#: On the CPU, the first ``WIDE_STAGES`` stages run ``WIDE_STAGE_CLIPS`` clips at a time (see above).
WIDE_STAGES = 2
WIDE_STAGE_CLIPS = 2
#: transformers' (and laion-clap's) additive mask between tokens from different shifted regions.
_MASKED = -100.0
#: Environment switch: ``cuda`` runs the non-CPU branch on the CPU too (see the module docstring).
BRANCH_ENV = "CLAP2DIFFUSION_HTSAT_BRANCH"
BRANCHES = ("cpu", "cuda")


def pick_branch(x: torch.Tensor, branch: str | None = None) -> str:
    """``"cpu"`` or ``"cuda"``: ``branch``, else the environment's :data:`BRANCH_ENV`, else by tensor."""
    branch = branch or os.environ.get(BRANCH_ENV) or None
    if branch is None:
        return "cpu" if x.device.type == "cpu" else "cuda"
    if branch not in BRANCHES:
        raise ValueError(f"HTS-AT branch must be one of {BRANCHES} (argument or {BRANCH_ENV}), got {branch!r}")
    return branch


def pooled_audio_features(audio_model: nn.Module, mel: torch.Tensor, branch: str | None = None) -> torch.Tensor:
    """``[N, C, 1001, 64]`` log-mel (C = 1, or the 4 views of a fused model) -> ``[N, H]`` pooled
    HTS-AT features (H = 768 for HTSAT-tiny), as ``ClapAudioModel``'s ``pooler_output``.

    ``audio_model`` is a transformers ``ClapAudioModel``; its weights are read, never copied.
    ``branch``: see :func:`pick_branch` (None: by device; both give the same numbers within 1e-5).
    """
    enc = audio_model.audio_encoder
    x = enc.batch_norm(mel.transpose(1, 3)).transpose(1, 3)
    x = _mel_to_image(x, enc.spec_size, enc.freq_ratio)  # [N, C, 256, 256]
    on_cpu = pick_branch(x, branch) == "cpu"
    split = WIDE_STAGES if on_cpu else 0
    no_longer = torch.zeros(0, dtype=torch.long, device=x.device)

    def first_stages(images: torch.Tensor) -> torch.Tensor:
        tokens = enc.patch_embed(images, no_longer)  # [n, 64 * 64, 96]
        for i in range(split):
            tokens = _stage(enc, i, tokens, on_cpu)
        return tokens

    x = torch.cat([first_stages(part) for part in x.split(WIDE_STAGE_CLIPS)]) if split else first_stages(x)
    for i in range(split, len(enc.layers)):
        x = _stage(enc, i, x, on_cpu)
    x = enc.norm(x)  # [N, 8 * 8, 768]
    # HTS-AT's pooling: the mean over the final token grid (transformers' group reshape around
    # its average pool reorders tokens only; the mean is the same).
    return x.mean(1)


def _mel_to_image(x: torch.Tensor, spec_size: int, freq_ratio: int) -> torch.Tensor:
    """``[N, C, T, F]`` -> ``[N, C, spec_size, spec_size]``: time stretched (bicubic) to
    ``spec_size * freq_ratio`` frames, cut in ``freq_ratio`` pieces stacked along frequency."""
    n, c, t, f = x.shape
    width, height = spec_size * freq_ratio, spec_size // freq_ratio
    if t > width or f > height:
        raise ValueError(f"a {t}x{f} mel is larger than HTS-AT's {width}x{height} input")
    if t < width:
        x = F.interpolate(x, (width, f), mode="bicubic", align_corners=True)
    if f < height:
        x = F.interpolate(x, (x.shape[2], height), mode="bicubic", align_corners=True)
    t, f = x.shape[2:]
    x = x.reshape(n, c * freq_ratio, t // freq_ratio, f).permute(0, 1, 3, 2)
    return x.reshape(n, c, f * freq_ratio, t // freq_ratio)


def _stage(enc: nn.Module, index: int, x: torch.Tensor, on_cpu: bool) -> torch.Tensor:
    """One Swin stage: its blocks, then patch merging (all but the last). ``[N, h * w, C]``."""
    stage = enc.layers[index]
    height, width = enc.input_resolutions[index]
    window = enc.config.window_size
    for i, block in enumerate(stage.blocks):
        # Every second block shifts its windows by half; a grid no larger than a window is one
        # window, unshifted (transformers' set_shift_and_window_size, without mutating the block).
        ws, shift = (window, window // 2 if i % 2 else 0)
        if min(height, width) <= window:
            ws, shift = min(height, width), 0
        x = _block(block, x, height, width, ws, shift, on_cpu)
    if stage.downsample is not None:
        x = _merge_patches(stage.downsample, x, height, width, on_cpu)
    return x


def _block(block: nn.Module, x: torch.Tensor, height: int, width: int, ws: int, shift: int,
           on_cpu: bool) -> torch.Tensor:  # fmt: skip
    """A Swin block (transformers' ``ClapAudioLayer``): ``[N, h * w, C]`` -> the same shape."""
    n, _, c = x.shape
    attn = block.attention.self
    heads, length = attn.num_attention_heads, ws * ws
    if height % ws or width % ws:
        raise ValueError(f"HTS-AT grid {height}x{width} is not a whole number of {ws}x{ws} windows")

    h = block.layernorm_before(x).view(n, height, width, c)
    if shift:
        h = torch.roll(h, (-shift, -shift), (1, 2))
    rows, cols = height // ws, width // ws
    windows = h.view(n, rows, ws, cols, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, length, c)

    def heads_of(layer: nn.Linear) -> torch.Tensor:  # [n * windows, heads, 64, C / heads]
        return _linear(windows, layer, on_cpu).view(-1, length, heads, c // heads).transpose(1, 2)

    mask = _attention_mask(block, height, width, ws, shift, x.dtype)  # [1 or windows, heads, 64, 64]
    if mask.shape[0] > 1:
        mask = mask.repeat(n, 1, 1, 1)  # windows are batch-major: clip 0's, then clip 1's
    out = F.scaled_dot_product_attention(heads_of(attn.query), heads_of(attn.key), heads_of(attn.value), mask)
    out = _linear(out.transpose(1, 2).reshape(-1, length, c), block.attention.output.dense, on_cpu)
    out = out.view(n, rows, cols, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, height, width, c)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + out.reshape(n, -1, c)
    mlp = block.intermediate.intermediate_act_fn(_linear(block.layernorm_after(x), block.intermediate.dense, on_cpu))
    return x + _linear(mlp, block.output.dense, on_cpu)


def _attention_mask(block: nn.Module, height: int, width: int, ws: int, shift: int,
                    dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """The relative-position bias, plus -100 between tokens of different regions when shifted:
    ``[1, heads, ws*ws, ws*ws]``, or ``[windows, heads, ws*ws, ws*ws]`` with a shift."""
    attn = block.attention.self
    length = ws * ws
    index = attn.relative_position_index  # [64, 64] into the bias table, for the configured window
    if index.shape[0] != length:
        raise ValueError(f"HTS-AT window of {ws}x{ws} does not match its bias table ({index.shape[0]} positions)")
    table = attn.relative_position_bias_table  # [(2 * 8 - 1) ** 2, heads]
    bias = table[index.reshape(-1)].view(length, length, -1).permute(2, 0, 1).unsqueeze(0).to(dtype)
    if not shift:
        return bias

    # Label each position by the (row, column) region the cyclic shift brought it from; tokens of
    # a window attend only within their own region.
    def regions(size: int) -> torch.Tensor:
        i = torch.arange(size, device=table.device)
        return (i >= size - ws).long() + (i >= size - shift).long()

    label = (regions(height)[:, None] * 3 + regions(width)[None, :]).view(height // ws, ws, width // ws, ws)
    label = label.permute(0, 2, 1, 3).reshape(-1, length)  # [windows, 64], windows row-major
    different = label[:, None, :] != label[:, :, None]  # [windows, 64, 64]
    return bias + torch.where(different, _MASKED, 0.0).to(dtype)[:, None]


def _merge_patches(merge: nn.Module, x: torch.Tensor, height: int, width: int, on_cpu: bool) -> torch.Tensor:
    """Swin patch merging: ``[N, h * w, C]`` -> ``[N, h/2 * w/2, 2C]`` (2x2 neighbours concatenated
    in transformers' order, LayerNorm, linear)."""
    n, _, c = x.shape
    x = x.view(n, height, width, c)
    x = torch.cat([x[:, row::2, col::2, :] for col in range(2) for row in range(2)], dim=-1)
    return _linear(merge.norm(x.view(n, -1, 4 * c)), merge.reduction, on_cpu)


def _linear(x: torch.Tensor, layer: nn.Module, on_cpu: bool | None = None) -> torch.Tensor:
    """``layer(x)`` for ``x [..., in]`` (``layer``: an ``nn.Linear``'s weight and bias); on the CPU
    branch through oneDNN (see the module docstring). ``on_cpu`` None: by ``x``."""
    if on_cpu is None:
        on_cpu = pick_branch(x) == "cpu"
    if not on_cpu or x.device.type != "cpu" or x.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return F.linear(x, layer.weight, layer.bias)
    lead, k = x.shape[:-1], x.shape[-1]
    # [M, in] rows are an NHWC image of M x 1 pixels with `in` channels; the weight a 1x1 kernel.
    image = x.reshape(1, -1, 1, k).permute(0, 3, 1, 2)
    out = F.conv2d(image, layer.weight[:, :, None, None], layer.bias)  # [1, out, M, 1], channels-last
    return out.permute(0, 2, 3, 1).reshape(*lead, -1)
