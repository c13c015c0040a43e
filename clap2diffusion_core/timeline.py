"""Meaning over time: one CLAP embedding per animation frame, smoothing, and change points.

Frame ``i`` of a clip at ``fps`` shows the sound between ``i / fps`` and ``(i + 1) / fps``; its
window is centred on the middle of that span, ``(i + 0.5) / fps``. A window that would reach past
either end of the sound is slid inside it (a frame near the start hears the first seconds, not
silence), and a sound shorter than the window is repeat-padded, as CLAP does.

CLAP is costly (one 10 s window per pass), so windows are encoded on every ``stride``-th frame
(the anchors; the last frame is always one) and the frames between are interpolated linearly
and renormalised. ``stride = 1`` is hop = 1 / fps.

Memory is bounded: the sound is resampled to 48 kHz mono block by block and only the samples
the next windows need, plus one batch of windows, are held, whatever the sound's length.
Pure PyTorch; never imports ComfyUI.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from .audio import CLAP_SAMPLE_RATE, WINDOW_SAMPLES, repeat_pad, resample, to_mono

#: ``encode([n, 480000] 48 kHz mono windows) -> [n, D]`` L2-normalised (``ClapEncoder.encode_windows``).
WindowEncoder = Callable[[torch.Tensor], torch.Tensor]
#: ``progress(done, total)`` windows encoded so far; raise in it to stop.
Progress = Callable[[int, int], None]

#: Samples resampled per block while streaming (10 s at 48 kHz).
RESAMPLE_BLOCK = WINDOW_SAMPLES


@dataclass(frozen=True)
class FramePlan:
    """Where each frame's window lies, at 48 kHz.

    Attributes:
        num_frames: frames in the clip.
        fps: frames per second.
        window: window length in 48 kHz samples (at most 480000; shorter ones are repeat-padded).
        total: length of the sound in 48 kHz samples.
        anchors: ``[A]`` frame indices whose windows are encoded, increasing, last = num_frames - 1.
        starts: ``[A]`` first 48 kHz sample of each anchor's window.
    """

    num_frames: int
    fps: float
    window: int
    total: int
    anchors: list[int]
    starts: list[int]

    @property
    def stride(self) -> int:
        return self.anchors[1] - self.anchors[0] if len(self.anchors) > 1 else 1


def frame_count(seconds: float, fps: float) -> int:
    """Frames a clip of ``seconds`` has at ``fps`` (a started frame counts): at least 1."""
    return max(1, math.ceil(seconds * fps - 1e-9))


def frame_centre(frame: int, fps: float) -> float:
    """Seconds at the middle of frame ``frame``'s span ``[frame / fps, (frame + 1) / fps)``."""
    return (frame + 0.5) / fps


def plan_frames(
    num_frames: int, fps: float, total_samples: int, window_seconds: float = 10.0, stride: int = 1
) -> FramePlan:
    """Place the windows: one centred on every ``stride``-th frame (and the last), slid inside the sound.

    ``total_samples`` is the sound's length at 48 kHz.
    """
    if num_frames < 1:
        raise ValueError(f"need at least 1 frame, got {num_frames}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 0.1 <= window_seconds <= WINDOW_SAMPLES / CLAP_SAMPLE_RATE:
        raise ValueError(f"window_seconds must be between 0.1 and 10 (CLAP's window), got {window_seconds}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1 frame, got {stride}")
    window = int(round(window_seconds * CLAP_SAMPLE_RATE))
    anchors = list(range(0, num_frames, stride))
    if anchors[-1] != num_frames - 1:
        anchors.append(num_frames - 1)
    last_start = max(total_samples - window, 0)
    starts = [
        min(max(round(frame_centre(f, fps) * CLAP_SAMPLE_RATE) - window // 2, 0), last_start)
        for f in anchors
    ]
    return FramePlan(num_frames, float(fps), window, total_samples, anchors, starts)


def resampled_length(samples: int, sample_rate: int) -> int:
    """Length at 48 kHz of ``samples`` at ``sample_rate`` (what :func:`audio.resample` returns)."""
    if sample_rate == CLAP_SAMPLE_RATE:
        return samples
    ratio = Fraction(CLAP_SAMPLE_RATE, sample_rate).limit_denominator(1000)
    return math.ceil(ratio.numerator * samples / ratio.denominator)


def mono_blocks(waveform: torch.Tensor, sample_rate: int, block: int = RESAMPLE_BLOCK) -> Iterator[torch.Tensor]:
    """``[B, C, T]`` at ``sample_rate`` -> consecutive 48 kHz mono blocks ``[B, <= block]``.

    The blocks join to exactly what :func:`audio.resample` gives for the whole sound: each block is
    resampled from a slice that starts on a whole polyphase step and carries the filter's context,
    so only one block (plus its margins) is ever resampled at a time.
    """
    total = resampled_length(waveform.shape[-1], sample_rate)
    if sample_rate == CLAP_SAMPLE_RATE:
        for start in range(0, total, block):
            yield to_mono(waveform[..., start : start + block].float())[:, 0]
        return
    ratio = Fraction(CLAP_SAMPLE_RATE, sample_rate).limit_denominator(1000)
    up, down = ratio.numerator, ratio.denominator
    margin = 64 * down  # input samples of context each side: far wider than the sinc kernel
    for start in range(0, total, block):
        end = min(start + block, total)
        # Output sample k reads input k * down / up: start the slice on a multiple of ``down`` so
        # the slice's output grid coincides with the whole sound's.
        first = max((start * down // up - margin) // down * down, 0)
        last = min(math.ceil(end * down / up) + margin, waveform.shape[-1])
        piece = resample(to_mono(waveform[..., first:last].float()), sample_rate, CLAP_SAMPLE_RATE)[:, 0]
        offset = first // down * up
        yield piece[:, start - offset : end - offset]


def plan_windows(
    plan: FramePlan, blocks: Iterator[torch.Tensor], starts: list[int] | None = None
) -> Iterator[torch.Tensor]:
    """The windows ``[B, 480000]`` at ``starts`` (default: the anchors'), in order, read from 48 kHz
    mono ``blocks``. ``starts`` must not decrease.

    Holds only the samples from the next window's start on (at most a window plus a block).
    """
    held: list[torch.Tensor] = []
    held_from = 0  # 48 kHz index of held[0][:, 0]
    held_len = 0
    exhausted = False
    for start in plan.starts if starts is None else starts:
        end = min(start + plan.window, plan.total)
        while held_from + held_len < end and not exhausted:
            block = next(blocks, None)
            if block is None:
                exhausted = True
                break
            held.append(block)
            held_len += block.shape[-1]
        # Keep only what this and later windows need (starts never decrease).
        joined = torch.cat(held, dim=-1)[:, start - held_from :] if len(held) > 1 else held[0][:, start - held_from :]
        held[:] = [joined]
        held_len -= start - held_from
        held_from = start
        window = joined[:, : end - start]
        yield repeat_pad(window, WINDOW_SAMPLES)


def encode_frames(
    encode: WindowEncoder,
    waveform: torch.Tensor,
    sample_rate: int,
    fps: float,
    num_frames: int | None = None,
    window_seconds: float = 10.0,
    stride: int = 1,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> torch.Tensor:
    """One CLAP embedding per frame: ``[B, C, T]`` sound -> ``[B, F, D]`` L2-normalised.

    ``num_frames`` defaults to the sound's length at ``fps``; a longer clip holds the last
    window. Windows are encoded ``batch_size`` at a time as they are cut; ``progress(done,
    total)`` runs before each batch and at the end (window positions, ``total`` of them).

    Each *distinct* window is encoded once: frames whose windows hold bitwise the same samples
    (slid to the same place at the ends, or a sound that repeats) share one row, bitwise. So a
    constant sound's frames are exactly the row CLAP Encode gives for that window, whatever the
    batch: CPU matrix kernels for a batch of 8 and a batch of 1 differ in the last bits.
    """
    if waveform.ndim == 2:
        waveform = waveform.unsqueeze(0)
    total = resampled_length(waveform.shape[-1], sample_rate)
    if num_frames is None:
        num_frames = frame_count(total / CLAP_SAMPLE_RATE, fps)
    plan = plan_frames(num_frames, fps, total, window_seconds, stride)
    starts = sorted(set(plan.starts))  # frames slid to the same place read one window
    windows = plan_windows(plan, mono_blocks(waveform, sample_rate), starts)
    b = waveform.shape[0]
    rows: list[torch.Tensor] = []  # per batch: [B, n, D]
    batch: list[torch.Tensor] = []
    row_of_digest: dict[bytes, int] = {}  # window content -> its row among the distinct windows
    row_of_start: dict[int, int] = {}
    visited = batch_from = 0  # window positions read; positions read when the pending batch began

    def flush() -> None:
        if progress is not None:
            progress(batch_from, len(starts))
        stacked = torch.stack(batch, dim=1)  # [B, n, 480000]
        n = stacked.shape[1]
        rows.append(encode(stacked.reshape(b * n, -1)).detach().float().cpu().reshape(b, n, -1))
        batch.clear()

    for start, window in zip(starts, windows):
        digest = window_digest(window)
        row = row_of_digest.get(digest)
        if row is None:
            if not batch:
                batch_from = visited
            row = row_of_digest[digest] = len(row_of_digest)
            batch.append(window)
            if len(batch) * b >= batch_size:
                flush()
        row_of_start[start] = row
        visited += 1
    if batch:
        flush()
    if progress is not None:
        progress(len(starts), len(starts))
    # Already L2-normalised by the encoder: normalising again would move the last bits away from
    # what CLAP Encode gives for the same window.
    distinct = torch.cat(rows, dim=1)  # [B, U, D]
    anchor_embeds = distinct[:, [row_of_start[start] for start in plan.starts]]  # [B, A, D]
    return interpolate_anchors(anchor_embeds, plan.anchors, num_frames)


def window_digest(window: torch.Tensor) -> bytes:
    """A 256-bit digest of a window's samples (dtype, shape and bytes): equal only for equal windows."""
    data = window.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(f"{data.dtype}{tuple(data.shape)}".encode(), digest_size=32)
    digest.update(data.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.digest()


def interpolate_anchors(embeds: torch.Tensor, anchors: list[int], num_frames: int) -> torch.Tensor:
    """``[B, A, D]`` embeddings at frames ``anchors`` -> ``[B, F, D]``: linear between anchors, renormalised.

    Written segment by segment into one output, so a long clip makes no full-size temporaries.
    """
    if len(anchors) == num_frames:
        return embeds
    out = embeds.new_empty(embeds.shape[0], num_frames, embeds.shape[2])
    if len(anchors) == 1:
        out[:] = embeds[:, :1]
        return out
    for k in range(len(anchors) - 1):
        a, b = anchors[k], anchors[k + 1]
        t = torch.arange(b - a + 1, dtype=embeds.dtype)[None, :, None] / (b - a)  # [1, n, 1]
        segment = torch.lerp(embeds[:, k : k + 1], embeds[:, k + 1 : k + 2], t)
        out[:, a : b + 1] = F.normalize(segment, dim=-1)
    return out


def smooth_frames(embeds: torch.Tensor, sigma_frames: float) -> torch.Tensor:
    """Gaussian smoothing over frames of ``[..., F, D]`` embeddings (edges held), renormalised.

    ``sigma_frames <= 0`` returns the input unchanged.
    """
    if sigma_frames <= 0 or embeds.shape[-2] < 2:
        return embeds
    radius = max(1, math.ceil(3 * sigma_frames))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma_frames) ** 2)
    kernel = (kernel / kernel.sum()).to(embeds.dtype)
    shape = embeds.shape
    x = embeds.reshape(-1, shape[-2], shape[-1]).transpose(1, 2)  # [M, D, F]
    x = F.pad(x, (radius, radius), mode="replicate")
    d = x.shape[1]
    out = F.conv1d(x, kernel.view(1, 1, -1).expand(d, 1, -1).contiguous(), groups=d)
    return F.normalize(out.transpose(1, 2).reshape(shape), dim=-1)


@dataclass(frozen=True)
class ChangePoints:
    """Where the meaning changes.

    Attributes:
        frames: frame indices where a new meaning starts, increasing.
        novelty: ``[F]`` cosine distance between the mean embedding of the ``span`` frames
            before each frame and of the ``span`` frames from it on (0 = same meaning).
    """

    frames: list[int]
    novelty: torch.Tensor


def novelty_curve(embeds: torch.Tensor, span: int, chunk: int = 2048) -> torch.Tensor:
    """``[F, D]`` -> ``[F]``: ``1 - cos(mean(e[i - span : i]), mean(e[i : i + span]))`` (0 at frame 0).

    Running sums over ``chunk`` frames (and ``span`` either side) at a time: memory is one chunk,
    not a second ``[F, D]`` tensor (28 MB for 10 minutes at 24 fps).
    """
    f = embeds.shape[0]
    span = max(1, span)
    novelty = torch.zeros(f)
    for first in range(0, f, chunk):
        last = min(first + chunk, f)
        lo_edge, hi_edge = max(first - span, 0), min(last + span, f)
        csum = embeds.new_zeros(hi_edge - lo_edge + 1, embeds.shape[1], dtype=torch.float32)  # row 0 = 0
        torch.cumsum(embeds[lo_edge:hi_edge].float(), 0, out=csum[1:])
        idx = torch.arange(first, last)
        lo, hi = (idx - span).clamp(min=0), (idx + span).clamp(max=f)
        before = csum[idx - lo_edge] - csum[lo - lo_edge]
        after = csum[hi - lo_edge] - csum[idx - lo_edge]
        novelty[first:last] = (1 - F.cosine_similarity(before, after, dim=-1)).clamp(min=0)
    novelty[0] = 0.0
    return novelty


def change_points(embeds: torch.Tensor, span: int, threshold: float = 0.05) -> ChangePoints:
    """Peaks of the novelty curve of ``[F, D]`` embeddings: frames where meaning changes.

    A frame is a change point when its novelty is at least ``threshold`` and the highest within
    ``span`` frames either side (ties: the earliest). ``span`` is how many frames each side are
    compared; about half a window in frames suits CLAP's 10 s windows.
    """
    novelty = novelty_curve(embeds, span)
    frames: list[int] = []
    values = novelty.tolist()
    for i, value in enumerate(values):
        if value < threshold:
            continue
        lo, hi = max(0, i - span), min(len(values), i + span + 1)
        neighbourhood = values[lo:hi]
        if value >= max(neighbourhood) and all(v < value for v in values[lo:i]):
            frames.append(i)
    return ChangePoints(frames, novelty)
