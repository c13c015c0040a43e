"""Audio in, CLAP-ready windows out: decode, validate, mono, resample to 48 kHz, 10 s windows.

Pure PyTorch (+ PyAV / soundfile for decoding); never imports ComfyUI. Waveforms are float32 in
[-1, 1]: a file decodes to ``[C, T]``, ComfyUI's AUDIO carries ``[B, C, T]``.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterable, Iterator
from fractions import Fraction
from functools import lru_cache

import torch
import torch.nn.functional as F

from .errors import AudioError  # noqa: F401 - re-exported: callers catch it from here
from .sound_check import MIN_SAMPLE_RATE, MIN_SECONDS, SILENCE_PEAK, check_sound  # noqa: F401 - re-exported
from .sound_file import open_sound, read_sound

CLAP_SAMPLE_RATE = 48_000
WINDOW_SECONDS = 10.0
WINDOW_SAMPLES = int(CLAP_SAMPLE_RATE * WINDOW_SECONDS)  # 480000
# A trailing piece shorter than this is dropped when at least one full window exists: repeating
# a few hundred milliseconds to fill 10 s makes a buzz, not the sound the user meant.
MIN_TAIL_SECONDS = 1.0

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


# --------------------------------------------------------------------------------------------
# Decoding and checking: clap2diffusion_core.sound_file and .sound_check own the rules
# --------------------------------------------------------------------------------------------


def load_audio_file(path: str | os.PathLike, max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """Decode an audio file, or the audio track of a video, to ``([C, T] float32, sample_rate)``.

    :func:`~.sound_file.read_sound` without its warnings: the same decoder and refusals as every
    node. With ``max_seconds`` the decoder stops once that much audio is read.
    """
    waveform, sample_rate, _ = read_sound(path, max_seconds)
    return waveform, sample_rate


def validate_waveform(waveform: torch.Tensor, sample_rate: int, name: str | None = None) -> list[str]:
    """Raise ``AudioError`` for unusable audio; return warnings (e.g. silence) for usable audio.

    ``waveform`` is ``[C, T]`` or ``[B, C, T]``; see :func:`~.sound_check.check_sound`.
    """
    return check_sound(waveform, sample_rate, name)


# A waveform is checked once per sound: Load Audio checks what it decodes, and the encode path
# then finds the same tensor here instead of scanning an hour of samples again. Keyed by the
# tensor's identity and version (an in-place edit makes it a new sound), held weakly.
_VALIDATED: dict[int, tuple[weakref.ref, int, int, tuple[str, ...]]] = {}


def _version(waveform: torch.Tensor) -> int:
    """The tensor's in-place edit counter; -1 for an inference tensor, which keeps none.

    ComfyUI runs nodes under ``torch.inference_mode``, so what a node outputs is usually such a
    tensor. Node outputs are shared through ComfyUI's cache and never edited in place, so identity
    alone names the sound there.
    """
    try:
        return waveform._version
    except (AttributeError, RuntimeError):  # RuntimeError: "Inference tensors do not track version counter"
        return -1


def check_waveform(waveform: torch.Tensor, sample_rate: int) -> tuple[list[str], bool]:
    """:func:`validate_waveform`, once per tensor: ``(warnings, first_time)``.

    ``first_time`` is False when this very tensor (same version, same rate) was checked before,
    so callers log its warnings only once. A tensor Load Audio read from a file keeps the
    warnings it got there (:func:`remember_checked`), which name the file.
    """
    key = id(waveform)
    seen = _VALIDATED.get(key)
    if (seen is not None and seen[0]() is waveform and seen[1] == _version(waveform)
            and seen[2] == sample_rate):  # fmt: skip
        return list(seen[3]), False
    warnings = validate_waveform(waveform, sample_rate)
    remember_checked(waveform, sample_rate, warnings)
    return warnings, True


def remember_checked(waveform: torch.Tensor, sample_rate: int, warnings: list[str]) -> None:
    """Record that ``waveform`` passed the checks with ``warnings``: later checks of this very
    tensor return them without scanning it again."""
    key = id(waveform)
    try:
        ref = weakref.ref(waveform, lambda _, key=key: _VALIDATED.pop(key, None))
    except TypeError:  # not weak-referenceable: nothing to remember it by
        return
    _VALIDATED[key] = (ref, _version(waveform), sample_rate, tuple(warnings))


# --------------------------------------------------------------------------------------------
# Mono, resampling, windows
# --------------------------------------------------------------------------------------------


def to_mono(waveform: torch.Tensor) -> torch.Tensor:
    """Average the channels: ``[..., C, T] -> [..., 1, T]``."""
    return waveform.mean(dim=-2, keepdim=True)


def resample(waveform: torch.Tensor, orig_sr: int, new_sr: int = CLAP_SAMPLE_RATE) -> torch.Tensor:
    """Band-limited (windowed-sinc) resampling along the last axis, pure PyTorch.

    The same kernel as ``torchaudio.functional.resample`` (Hann window, 6 zero crossings, 0.99
    rolloff) without needing torchaudio. Odd rates are snapped to a ratio with a denominator
    of at most 1000 (error below 1e-6) so the polyphase kernel stays small.
    """
    if orig_sr == new_sr:
        return waveform
    ratio = Fraction(new_sr, orig_sr).limit_denominator(1000)
    up, down = ratio.numerator, ratio.denominator
    kernel, width = _sinc_kernel(down, up, str(waveform.device), waveform.dtype)
    shape = waveform.shape
    flat = waveform.reshape(-1, 1, shape[-1])
    padded = F.pad(flat, (width, width + down))
    out = F.conv1d(padded, kernel, stride=down)  # [M, up, frames]
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    target = math.ceil(up * shape[-1] / down)
    return out[:, :target].reshape(*shape[:-1], target)


@lru_cache(maxsize=16)
def _sinc_kernel(down: int, up: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Polyphase kernel ``[up, 1, 2 * width + down]`` for resampling by ``up / down``."""
    zero_crossings, rolloff = 6, 0.99
    base = min(down, up) * rolloff  # cutoff below both Nyquist rates
    width = math.ceil(zero_crossings * down / base)
    idx = torch.arange(-width, width + down, dtype=torch.float64)[None, None] / down
    t = torch.arange(0, -up, -1, dtype=torch.float64)[:, None, None] / up + idx
    t = (t * base).clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = sinc * window * (base / down)
    return kernel.to(device=device, dtype=dtype), width


def repeat_pad(waveform: torch.Tensor, length: int = WINDOW_SAMPLES) -> torch.Tensor:
    """CLAP's "repeatpad": tile a short clip as many whole times as fit, then zero-pad to ``length``."""
    t = waveform.shape[-1]
    if t >= length:
        return waveform[..., :length]
    tiled = waveform.repeat(*([1] * (waveform.ndim - 1)), length // t)
    return F.pad(tiled, (0, length - tiled.shape[-1]))


def prepare_windows(
    waveform: torch.Tensor, sample_rate: int, window_seconds: float = WINDOW_SECONDS
) -> torch.Tensor:
    """ComfyUI AUDIO ``[B, C, T]`` -> CLAP input windows ``[B, N, window_samples]`` (mono, 48 kHz).

    ``N = ceil(T / window)`` at 48 kHz, except that a last piece shorter than 1 s is dropped when
    a full window precedes it. Each window shorter than the window length is repeat-padded.
    Raises ``AudioError`` on empty or non-finite audio.
    """
    if waveform.ndim == 2:
        waveform = waveform.unsqueeze(0)
    check_waveform(waveform, sample_rate)
    size = int(round(window_seconds * CLAP_SAMPLE_RATE))
    mono = resample(to_mono(waveform.float()), sample_rate, CLAP_SAMPLE_RATE)[:, 0]  # [B, T']
    total = mono.shape[-1]
    n = max(1, math.ceil(total / size))
    if n > 1 and total - (n - 1) * size < MIN_TAIL_SECONDS * CLAP_SAMPLE_RATE:
        n -= 1
    windows = [repeat_pad(mono[:, i * size : (i + 1) * size], size) for i in range(n)]
    return torch.stack(windows, dim=1)


# --------------------------------------------------------------------------------------------
# Streaming: windows from a sound of any length, a few windows in memory at a time
# --------------------------------------------------------------------------------------------

#: Input samples read per step when streaming (about 10 s at 48 kHz).
STREAM_BLOCK = WINDOW_SAMPLES


class StreamingResampler:
    """:func:`resample` of a long signal fed in pieces: the same samples out (equal to float32
    rounding), holding only the filter's context between pieces.

    ``push([M, n])`` returns the resampled samples that are final so far; ``finish()`` the rest.
    """

    def __init__(self, orig_sr: int, new_sr: int = CLAP_SAMPLE_RATE) -> None:
        self.identity = orig_sr == new_sr
        ratio = Fraction(new_sr, orig_sr).limit_denominator(1000)
        self.up, self.down = ratio.numerator, ratio.denominator
        self.width = 0
        self.kernel: torch.Tensor | None = None
        self.buffer: torch.Tensor | None = None  # input from frame ``self.frame`` minus the context
        self.frame = 0  # next output frame (of ``up`` samples)
        self.seen = 0  # input samples pushed

    def push(self, piece: torch.Tensor) -> torch.Tensor:
        """``[M, n]`` input -> ``[M, k]`` output samples, final and in order."""
        if self.identity:
            self.seen += piece.shape[-1]
            return piece
        if self.kernel is None:
            self.kernel, self.width = _sinc_kernel(self.down, self.up, str(piece.device), piece.dtype)
            # The whole-signal version pads ``width`` zeros on the left.
            self.buffer = piece.new_zeros(piece.shape[0], self.width)
        self.buffer = torch.cat([self.buffer, piece], dim=-1)
        self.seen += piece.shape[-1]
        # Frame f reads input [f * down - width, f * down + width + down): only frames whose whole
        # span has arrived are final.
        ready = (self.seen - self.width - self.down) // self.down + 1 - self.frame
        return self._frames(max(ready, 0))

    def finish(self) -> torch.Tensor:
        if self.identity or self.buffer is None:  # nothing held back
            return torch.zeros(1, 0)
        target = math.ceil(self.up * self.seen / self.down)
        frames = math.ceil(target / self.up) - self.frame
        self.buffer = F.pad(self.buffer, (0, self.width + self.down))  # right padding, as resample()
        out = self._frames(max(frames, 0))
        done_before = (self.frame - max(frames, 0)) * self.up
        return out[:, : max(target - done_before, 0)]

    def _frames(self, count: int) -> torch.Tensor:
        assert self.buffer is not None and self.kernel is not None
        if count <= 0:
            return self.buffer.new_zeros(self.buffer.shape[0], 0)
        span = (count - 1) * self.down + 2 * self.width + self.down
        out = F.conv1d(self.buffer[:, None, :span], self.kernel, stride=self.down)  # [M, up, count]
        self.buffer = self.buffer[:, count * self.down :]
        self.frame += count
        return out.transpose(1, 2).reshape(out.shape[0], -1)


def stream_windows(
    pieces: Iterable[torch.Tensor], sample_rate: int, window_seconds: float = WINDOW_SECONDS,
    first_only: bool = False,
) -> Iterator[torch.Tensor]:
    """Pieces of a sound ``[B, C, n]`` (in order) -> its CLAP windows, ``[B, window_samples]`` each.

    The same windows as :func:`prepare_windows` on the whole sound (equal within float32 rounding
    of the resampler), but only the current pieces, the resampler's context and one window are in
    memory. ``first_only`` stops after the first window (nothing more is read).
    """
    size = int(round(window_seconds * CLAP_SAMPLE_RATE))
    resampler = StreamingResampler(sample_rate, CLAP_SAMPLE_RATE)
    pending: list[torch.Tensor] = []  # 48 kHz mono, less than one window
    pending_len = 0
    emitted = 0

    def take(samples: torch.Tensor) -> Iterator[torch.Tensor]:
        nonlocal pending_len, emitted
        if samples.shape[-1]:
            pending.append(samples)
            pending_len += samples.shape[-1]
        while pending_len >= size:
            joined = torch.cat(pending, dim=-1)
            window, rest = joined[:, :size], joined[:, size:]
            pending[:] = [rest] if rest.shape[-1] else []
            pending_len = rest.shape[-1]
            emitted += 1
            yield window.contiguous()

    for piece in pieces:
        if piece.ndim == 2:
            piece = piece.unsqueeze(0)
        mono = to_mono(piece.float())[:, 0]  # [B, n]
        for window in take(resampler.push(mono)):
            yield window
            if first_only:
                return
    for window in take(resampler.finish()):
        yield window
        if first_only:
            return
    # The tail, as prepare_windows: dropped when shorter than MIN_TAIL_SECONDS after a full window.
    if pending_len and (emitted == 0 or pending_len >= MIN_TAIL_SECONDS * CLAP_SAMPLE_RATE):
        yield repeat_pad(torch.cat(pending, dim=-1), size)


def waveform_pieces(waveform: torch.Tensor, sample_rate: int, block: int = STREAM_BLOCK,
                    max_samples: int | None = None) -> Iterator[torch.Tensor]:
    """An in-memory ``[B, C, T]`` sound as views of about ``block`` 48 kHz-samples' worth each."""
    step = max(1, int(block * sample_rate / CLAP_SAMPLE_RATE))
    end = waveform.shape[-1] if max_samples is None else min(waveform.shape[-1], max_samples)
    for start in range(0, end, step):
        yield waveform[..., start : min(start + step, end)]


def count_windows(samples: int, sample_rate: int, window_seconds: float = WINDOW_SECONDS) -> int:
    """How many windows :func:`prepare_windows` makes of ``samples`` at ``sample_rate``."""
    size = int(round(window_seconds * CLAP_SAMPLE_RATE))
    total = math.ceil(Fraction(CLAP_SAMPLE_RATE, sample_rate).limit_denominator(1000) * samples)
    n = max(1, math.ceil(total / size))
    if n > 1 and total - (n - 1) * size < MIN_TAIL_SECONDS * CLAP_SAMPLE_RATE:
        n -= 1
    return n


def stream_audio_file(path: str | os.PathLike, max_seconds: float | None = None,
                      block_seconds: float = WINDOW_SECONDS) -> tuple[int, int | None, Iterator[torch.Tensor]]:
    """Decode a file piece by piece: ``(sample_rate, estimated_samples or None, pieces [1, C, n])``.

    :func:`~.sound_file.open_sound` as a tuple: memory stays at about one ``block_seconds``
    piece whatever the file's length; each piece is checked as it comes, and the whole at the end
    (too short, empty: ``AudioError`` from the iterator). Nodes use ``open_sound`` for the warnings.
    """
    stream = open_sound(path, max_seconds, block_seconds)
    return stream.sample_rate, stream.estimated_samples, iter(stream)
