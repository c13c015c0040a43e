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

import numpy as np
import torch
import torch.nn.functional as F

from .errors import AudioError

CLAP_SAMPLE_RATE = 48_000
WINDOW_SECONDS = 10.0
WINDOW_SAMPLES = int(CLAP_SAMPLE_RATE * WINDOW_SECONDS)  # 480000
# A trailing piece shorter than this is dropped when at least one full window exists: repeating
# a few hundred milliseconds to fill 10 s makes a buzz, not the sound the user meant.
MIN_TAIL_SECONDS = 1.0
# Peak amplitude under which a clip counts as silent (about -100 dBFS).
SILENCE_PEAK = 1e-5
# Shorter than this is no sound at all (one sample repeated is a constant): refused, not padded.
MIN_SECONDS = 0.01
# Lowest sample rate accepted: telephone audio is 8 kHz; 1 Hz is a broken header, and resampling
# it to 48 kHz would multiply the samples (and the memory) by 48000.
MIN_SAMPLE_RATE = 1_000

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif", ".wma")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def load_audio_file(path: str | os.PathLike, max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """Decode an audio file, or the audio track of a video, to ``([C, T] float32, sample_rate)``.

    PyAV (FFmpeg) reads everything it knows; soundfile is the fallback. With ``max_seconds`` the
    decoder stops once that much audio is read, so memory stays bounded on long files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"Audio file not found: {path!r}. Put it in ComfyUI's input folder or upload it.")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{os.path.basename(path)!r} is empty (0 bytes). Re-export or re-upload the file.")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")

    try:
        waveform, sample_rate = _load_with_pyav(path, max_seconds)
    except _NoAudioStream as err:
        raise AudioError(
            f"{os.path.basename(path)!r} {err}; {_sniff(path)}. Use a wav, flac, mp3 or ogg file, or a video with sound."
        ) from None
    except Exception as pyav_error:  # noqa: BLE001 - any FFmpeg failure: try the other decoder
        try:
            waveform, sample_rate = _load_with_soundfile(path, max_seconds)
        except Exception:  # noqa: BLE001
            raise AudioError(_describe_unreadable(path, pyav_error)) from pyav_error

    if waveform.shape[-1] == 0:
        raise AudioError(f"{os.path.basename(path)!r} decoded to no samples: the audio track is empty.")
    return waveform, sample_rate


class _NoAudioStream(Exception):
    pass


def _load_with_pyav(path: str, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    import av

    with av.open(path) as container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise _NoAudioStream(f"has no audio track (found: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        chunks: list[torch.Tensor] = []
        sample_rate = stream.codec_context.sample_rate or 0
        limit = None
        total = 0
        for frame in container.decode(stream):
            sample_rate = sample_rate or frame.sample_rate
            if limit is None and max_seconds is not None:
                limit = math.ceil(max_seconds * sample_rate)
            chunks.append(_frame_to_float(frame))
            total += chunks[-1].shape[-1]
            if limit is not None and total >= limit:
                break
    if not chunks:
        return torch.zeros(stream.codec_context.channels or 1, 0), sample_rate or 1
    waveform = torch.cat(chunks, dim=-1).float()
    if limit is not None:
        waveform = waveform[:, :limit]
    return waveform.contiguous(), int(sample_rate)


# Sample formats FFmpeg decodes to (planar or packed) -> (offset, scale) to float in [-1, 1].
_PCM_SCALE = {"u8": (128.0, 128.0), "s16": (0.0, 2.0**15), "s32": (0.0, 2.0**31), "s64": (0.0, 2.0**63),
              "flt": (0.0, 1.0), "dbl": (0.0, 1.0)}  # fmt: skip


def _frame_to_float(frame) -> torch.Tensor:
    """One decoded frame -> float32 ``[C, n]``, converted here rather than by PyAV's AudioResampler:
    the resampler crashes the process (segfault) on layouts without a channel order, such as an
    8-channel WAV that has no channel mask."""
    name = frame.format.name.removesuffix("p")
    if name not in _PCM_SCALE:
        raise ValueError(f"unsupported sample format {frame.format.name!r}")
    channels = len(frame.layout.channels) or 1
    data = frame.to_ndarray()  # planar: [C, n]; packed: [1, n * C], interleaved
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    offset, scale = _PCM_SCALE[name]
    if offset == 0.0 and scale == 1.0:
        return torch.from_numpy(data.astype(np.float32, copy=True))
    return torch.from_numpy(((data.astype(np.float64) - offset) / scale).astype(np.float32))


def _load_with_soundfile(path: str, max_seconds: float | None) -> tuple[torch.Tensor, int]:
    import soundfile as sf

    with sf.SoundFile(path) as f:
        frames = -1 if max_seconds is None else math.ceil(max_seconds * f.samplerate)
        data = f.read(frames=frames, dtype="float32", always_2d=True)  # [T, C]
        return torch.from_numpy(data.T.copy()), int(f.samplerate)


_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x80\x02", "a Python pickle"),
    (b"RIFF", "a WAV file"),
    (b"FORM", "an AIFF file"),
    (b"fLaC", "a FLAC file"),
    (b"OggS", "an Ogg file"),
    (b"ID3", "an MP3 file"),
    (b"{", "a JSON/text file"),
    (b"<", "an HTML/XML file"),
)


def _sniff(path: str) -> str:
    """What a file looks like from its first bytes, so a wrong file reads differently from a broken one."""
    with open(path, "rb") as f:
        head = f.read(16)
    looks = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
    if looks is None and head[4:8] == b"ftyp":
        looks = "an MP4/MOV file"
    if looks is None and head and all(32 <= b < 127 or b in b"\r\n\t" for b in head):
        looks = "a text file"
    return f"it looks like {looks}" if looks else f"it starts with bytes {head[:8].hex(' ')}"


def _describe_unreadable(path: str, error: Exception) -> str:
    name = os.path.basename(path)
    return (
        f"Cannot read {name!r} as audio ({os.path.getsize(path)} bytes; {_sniff(path)}). "
        f"Decoder said: {error}. Use a wav, flac, mp3 or ogg file, or a video with an audio track; "
        f"if the file is damaged, re-export it."
    )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_waveform(waveform: torch.Tensor, sample_rate: int) -> list[str]:
    """Raise ``AudioError`` for unusable audio; return warnings (e.g. silence) for usable audio.

    ``waveform`` is ``[C, T]`` or ``[B, C, T]``.
    """
    if not isinstance(waveform, torch.Tensor):
        raise AudioError(f"Expected a waveform tensor, got {type(waveform).__name__}.")
    if waveform.ndim not in (2, 3):
        raise AudioError(f"Expected a waveform shaped [C, T] or [B, C, T], got {list(waveform.shape)}.")
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise AudioError(f"Sample rate must be a positive integer, got {sample_rate!r}.")
    if waveform.numel() == 0:
        raise AudioError(f"The audio is empty (shape {list(waveform.shape)}): load a file with sound in it.")
    if not waveform.is_floating_point():
        raise AudioError(f"Expected float samples in [-1, 1], got {waveform.dtype}.")
    # Reductions, not elementwise copies: a long file must not double its memory to be checked.
    hi, lo = waveform.flatten(-2).amax(-1), waveform.flatten(-2).amin(-1)  # [B] or scalar; NaN propagates
    if not bool(torch.isfinite(hi).all() and torch.isfinite(lo).all()):
        bad = int((~torch.isfinite(waveform)).sum())
        raise AudioError(
            f"The audio holds {bad} NaN/Inf samples: the file is damaged or an upstream node is broken. "
            "Re-export the file, or check the node that made this audio."
        )
    if sample_rate < MIN_SAMPLE_RATE:
        raise AudioError(
            f"Sample rate {sample_rate} Hz is not an audio rate (expected at least {MIN_SAMPLE_RATE} Hz; "
            "files use 8000 to 192000 Hz): the file's header is probably damaged. Re-export the file."
        )
    samples = waveform.shape[-1]
    seconds = samples / sample_rate
    if seconds < MIN_SECONDS:
        raise AudioError(
            f"The audio is only {samples} sample{'s' if samples != 1 else ''} long ({seconds * 1000:.2f} ms at "
            f"{sample_rate} Hz): too short to hold a sound. Use a clip of at least {MIN_SECONDS * 1000:.0f} ms "
            "(CLAP listens to 10 s; shorter clips are repeated to fill it)."
        )

    warnings: list[str] = []
    peak = torch.maximum(hi.abs(), lo.abs())
    if bool((peak < SILENCE_PEAK).any()):
        warnings.append("The audio is silent (peak below -100 dBFS): its CLAP embedding says little.")
    elif waveform.shape[-2] > 1:
        mono = waveform.mean(dim=-2)  # [B, T] or [T]
        mono_peak = torch.maximum(mono.amax(-1).abs(), mono.amin(-1).abs())
        if bool((mono_peak < (1e-3 * peak).clamp(min=SILENCE_PEAK)).any()):  # 60 dB quieter than the channels
            warnings.append(
                "The channels cancel out when mixed to mono (one is the other inverted), so CLAP hears "
                "silence. Use one channel, or fix the polarity of the other."
            )
    if seconds < 0.5:
        warnings.append(f"The audio is only {seconds:.2f} s long; it is repeated to fill a 10 s window.")
    return warnings


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
    so callers log its warnings only once.
    """
    key = id(waveform)
    seen = _VALIDATED.get(key)
    if (seen is not None and seen[0]() is waveform and seen[1] == _version(waveform)
            and seen[2] == sample_rate):  # fmt: skip
        return list(seen[3]), False
    warnings = validate_waveform(waveform, sample_rate)
    try:
        ref = weakref.ref(waveform, lambda _, key=key: _VALIDATED.pop(key, None))
    except TypeError:  # not weak-referenceable: nothing to remember it by
        return warnings, True
    _VALIDATED[key] = (ref, _version(waveform), sample_rate, tuple(warnings))
    return warnings, True


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

    Memory stays at about one ``block_seconds`` piece whatever the file's length. The same checks
    as :func:`load_audio_file` for missing, empty and unreadable files; each piece is validated
    (non-finite samples raise ``AudioError`` there).
    """
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"Audio file not found: {path!r}. Put it in ComfyUI's input folder or upload it.")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{os.path.basename(path)!r} is empty (0 bytes). Re-export or re-upload the file.")
    try:
        container = av.open(path)
    except Exception as err:  # noqa: BLE001 - FFmpeg cannot open it: the whole-file path explains why
        raise AudioError(_describe_unreadable(path, err)) from err
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise AudioError(
            f"{os.path.basename(path)!r} has no audio track (found: {', '.join(kinds)}); {_sniff(path)}. "
            "Use a wav, flac, mp3 or ogg file, or a video with sound."
        )
    stream = container.streams.audio[0]
    sample_rate = int(stream.codec_context.sample_rate or 0)
    if sample_rate <= 0:
        container.close()
        raise AudioError(f"{os.path.basename(path)!r} does not say its sample rate: re-export the file.")
    estimate = None
    if stream.duration is not None and stream.time_base is not None:
        estimate = int(stream.duration * stream.time_base * sample_rate)
    limit = None if not max_seconds else math.ceil(max_seconds * sample_rate)
    if limit is not None and estimate is not None:
        estimate = min(estimate, limit)

    def pieces() -> Iterator[torch.Tensor]:
        block = max(1, int(block_seconds * sample_rate))
        held: list[torch.Tensor] = []
        held_len = total = 0
        try:
            for frame in container.decode(stream):
                data = _frame_to_float(frame)
                if limit is not None:
                    data = data[:, : max(limit - total, 0)]
                held.append(data)
                held_len += data.shape[-1]
                total += data.shape[-1]
                if held_len >= block:
                    yield _checked_piece(torch.cat(held, dim=-1), sample_rate, path)
                    held, held_len = [], 0
                if limit is not None and total >= limit:
                    break
            if held_len:
                yield _checked_piece(torch.cat(held, dim=-1), sample_rate, path)
            if total == 0:
                raise AudioError(f"{os.path.basename(path)!r} decoded to no samples: the audio track is empty.")
        finally:
            container.close()

    return sample_rate, estimate, pieces()


def _checked_piece(piece: torch.Tensor, sample_rate: int, path: str) -> torch.Tensor:
    if not bool(torch.isfinite(piece.amax()) and torch.isfinite(piece.amin())):
        raise AudioError(
            f"{os.path.basename(path)!r} holds NaN/Inf samples: the file is damaged. Re-export it."
        )
    return piece.unsqueeze(0)  # [1, C, n]
