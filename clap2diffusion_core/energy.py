"""Energy beside meaning: per-frame loudness and onset strength, as audio-reactive packs use them.

Convention (the one Yvann-Nodes' audio weights, IPAdapter Weights' custom weights and FizzNodes'
batch value schedules read): a Python list of floats, one per frame, normalised to 0..1 over
the clip. Frame ``i`` covers the sound from ``i / fps`` to ``(i + 1) / fps``.

Pure PyTorch; the sound is read one block of frames at a time, so a long sound is never copied
whole (no mono or resampled copy of it is made).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

#: Loudness range mapped to 0..1: the loudest frame is 1, anything this many dB below it is 0.
DEFAULT_RANGE_DB = 60.0
#: Frames read per block.
_BLOCK_FRAMES = 256


def _frame_bounds(frame: int, fps: float, sample_rate: int) -> int:
    return round(frame * sample_rate / fps)


def _frame_blocks(
    waveform: torch.Tensor, sample_rate: int, fps: float, num_frames: int
) -> Iterator[tuple[int, torch.Tensor, list[int]]]:
    """``(first_frame, mono [B, n] samples of the block, frame edges relative to the block)``."""
    for first in range(0, num_frames, _BLOCK_FRAMES):
        last = min(first + _BLOCK_FRAMES, num_frames)
        lo = _frame_bounds(first, fps, sample_rate)
        hi = _frame_bounds(last, fps, sample_rate)
        mono = waveform[..., lo:hi].float().mean(dim=-2)  # [B, n]
        edges = [_frame_bounds(f, fps, sample_rate) - lo for f in range(first, last + 1)]
        yield first, mono, edges


def loudness_db(waveform: torch.Tensor, sample_rate: int, fps: float, num_frames: int) -> torch.Tensor:
    """RMS level of each frame's span in dBFS: ``[B, C, T]`` -> ``[B, F]``.

    A frame past the end of the sound (or with no samples) reads -inf (silence).
    """
    if waveform.ndim == 2:
        waveform = waveform.unsqueeze(0)
    out = torch.full((waveform.shape[0], num_frames), float("-inf"))
    for first, mono, edges in _frame_blocks(waveform, sample_rate, fps, num_frames):
        power = torch.cat([mono.new_zeros(mono.shape[0], 1), (mono.double() ** 2).cumsum(-1)], dim=-1)
        n = mono.shape[-1]
        for j in range(len(edges) - 1):
            a, b = min(edges[j], n), min(edges[j + 1], n)
            if b > a:
                rms = ((power[:, b] - power[:, a]) / (b - a)).sqrt()
                out[:, first + j] = 20 * torch.log10(rms.clamp(min=1e-10)).float()
    return out


def normalise_db(levels_db: torch.Tensor, range_db: float = DEFAULT_RANGE_DB) -> torch.Tensor:
    """``[B, F]`` dB -> 0..1 per row: the loudest frame 1, ``range_db`` below it (or quieter) 0."""
    if range_db <= 0:
        raise ValueError(f"range_db must be positive, got {range_db}")
    peak = levels_db.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return ((levels_db - (peak - range_db)) / range_db).clamp(0, 1).nan_to_num(0.0)


def onset_strength(waveform: torch.Tensor, sample_rate: int, fps: float, num_frames: int) -> torch.Tensor:
    """Spectral flux per frame, normalised to 0..1 per row: ``[B, C, T]`` -> ``[B, F]``.

    Each frame's span is Hann-windowed and transformed; the onset strength is the sum of the
    increases in log magnitude over the previous frame (positive flux), so a drum hit or a
    thunder crack peaks and a steady sound, however loud, stays near 0.
    """
    if waveform.ndim == 2:
        waveform = waveform.unsqueeze(0)
    span = max(2, _frame_bounds(1, fps, sample_rate))
    n_fft = 1 << math.ceil(math.log2(span))
    window = torch.hann_window(span, periodic=False, dtype=torch.float32)
    flux = torch.zeros(waveform.shape[0], num_frames)
    previous: torch.Tensor | None = None
    for first, mono, edges in _frame_blocks(waveform, sample_rate, fps, num_frames):
        frames = torch.zeros(mono.shape[0], len(edges) - 1, span)
        for j in range(len(edges) - 1):
            piece = mono[:, edges[j] : edges[j] + span]
            frames[:, j, : piece.shape[-1]] = piece
        spectrum = torch.fft.rfft(frames * window, n=n_fft).abs()
        log_mag = torch.log1p(100.0 * spectrum)  # [B, n, bins]
        # Frame 0 has nothing before it: 0, not the whole spectrum against silence (which would
        # dwarf every later hit once the curve is normalised).
        start = log_mag[:, :1] if previous is None else previous
        before = torch.cat([start, log_mag[:, :-1]], dim=1)
        flux[:, first : first + log_mag.shape[1]] = (log_mag - before).clamp(min=0).sum(-1)
        previous = log_mag[:, -1:]
    peak = flux.amax(dim=-1, keepdim=True)
    return torch.where(peak > 0, flux / peak.clamp(min=1e-12), torch.zeros_like(flux))
