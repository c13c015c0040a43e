"""The rules a sound must pass, the same on every path into the pack (issue 26).

Load Audio, CLAP Encode (and every node that takes AUDIO), CLAP Encode File (streamed) and the
training data reader all check a sound with :class:`SoundCheck`: a whole waveform is one piece,
a streamed file is checked piece by piece as it is decoded and as a whole at the end (length,
silence, cancelling channels). So one file gives the same refusal (an ``AudioError``) or the
same warnings whichever node reads it.

Refused: a sample rate under 1000 Hz, NaN or infinite samples, no samples, less than 10 ms.
Warned: silence (peak below -100 dBFS), channels that cancel when mixed to mono, under 0.5 s;
the decoder adds its own warnings (damaged stretches skipped, a file cut short) through
:meth:`SoundCheck.note`. docs/SOUNDS.md lists them for users.

Pure PyTorch; messages name the file (its name, never a path), the cause in a user's words, and
what to do.
"""

from __future__ import annotations

import torch

from .errors import AudioError

# Peak amplitude under which a clip counts as silent (about -100 dBFS).
SILENCE_PEAK = 1e-5
# Shorter than this is no sound at all (one sample repeated is a constant): refused, not padded.
MIN_SECONDS = 0.01
# Under this a clip is repeated many times to fill CLAP's 10 s window: said, not refused.
SHORT_SECONDS = 0.5
# Lowest sample rate accepted: telephone audio is 8 kHz; 500 Hz holds nothing above 250 Hz, and
# resampling 1 Hz to 48 kHz would multiply the samples (and the memory) by 48000.
MIN_SAMPLE_RATE = 1_000
# Mixed to mono, channels 60 dB quieter than the loudest channel cancel each other.
CANCEL_RATIO = 1e-3


def clock(seconds: float) -> str:
    """``3.094`` -> ``"0:03.09"``; ``3725.5`` -> ``"1:02:05.50"`` (a time in a file, as players show it)."""
    minutes, secs = divmod(max(seconds, 0.0), 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:05.2f}" if hours else f"{minutes}:{secs:05.2f}"


def subject(name: str | None) -> str:
    """How a message names the sound: ``'rain.wav'``, or "The audio" when it came from a node."""
    return f"{name!r}" if name else "The audio"


def check_sample_rate(sample_rate: int, name: str | None = None) -> None:
    """Refuse a rate no sound is recorded at; a file's rate is what its header says."""
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool):
        raise AudioError(f"{subject(name)}: the sample rate must be a whole number of Hz, got {sample_rate!r}.")
    said = "its header says" if name else "its sample rate is"
    if sample_rate <= 0:
        raise AudioError(
            f"{subject(name)}: {said} {sample_rate} Hz, which is no sample rate, so the header is damaged. "
            "Re-export the file from an audio editor (or convert it to wav or flac)."
        )
    if sample_rate < MIN_SAMPLE_RATE:
        raise AudioError(
            f"{subject(name)}: {said} {sample_rate} Hz; sounds are recorded at 8000 Hz or more (CLAP needs at "
            f"least {MIN_SAMPLE_RATE} Hz). If that rate is wrong, re-export the file; if the sound really is "
            f"{sample_rate} Hz, resample it to 8 kHz or more first."
        )


class SoundCheck:
    """The rules, fed a sound whole or piece by piece, in order.

    ``piece([B, C, n])`` refuses non-finite samples at once, naming the time of the first;
    ``finish()`` refuses what is too short and returns the warnings (the decoder's notes first).
    A ``[B, C, T]`` batch is checked per row: a warning holds if it holds for any row.
    """

    def __init__(self, sample_rate: int, name: str | None = None) -> None:
        check_sample_rate(sample_rate, name)
        self.sample_rate = sample_rate
        self.name = name
        self.samples = 0  # per row, so far
        self.peak: torch.Tensor | None = None  # [B], loudest sample so far
        self.mono_peak: torch.Tensor | None = None  # [B], loudest sample of the mono mix so far
        self.channels = 0
        self.notes: list[str] = []
        self.warnings: list[str] | None = None  # set by finish()

    def note(self, warning: str) -> None:
        """A warning found while decoding (a damaged stretch skipped, a file cut short)."""
        self.notes.append(warning)

    def piece(self, piece: torch.Tensor) -> None:
        """Check ``[B, C, n]`` (or ``[C, n]``) samples that follow the ones seen so far."""
        if piece.ndim == 2:
            piece = piece.unsqueeze(0)
        if piece.shape[-1] == 0:
            return
        # Reductions, not elementwise copies: an hour-long sound must not double its memory.
        flat = piece.flatten(1)
        hi, lo = flat.amax(-1), flat.amin(-1)  # [B]; NaN propagates
        if not bool(torch.isfinite(hi).all() and torch.isfinite(lo).all()):
            finite = torch.isfinite(piece).all(dim=0).all(dim=0)  # [n]: every channel and row finite
            first = int(torch.nonzero(~finite)[0, 0]) + self.samples
            raise AudioError(
                f"{subject(self.name)} holds NaN or infinite samples (the first at {clock(first / self.sample_rate)}), "
                "which no sound has: the file is damaged or the node that made this audio is broken. "
                "Re-export the file, or check that node."
            )
        peak = torch.maximum(hi.abs(), lo.abs()).float()
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.channels = piece.shape[-2]
        if self.channels > 1:
            mono = piece.mean(dim=-2)  # [B, n]
            mono_peak = torch.maximum(mono.amax(-1).abs(), mono.amin(-1).abs()).float()
            self.mono_peak = mono_peak if self.mono_peak is None else torch.maximum(self.mono_peak, mono_peak)
        self.samples += piece.shape[-1]

    def finish(self) -> list[str]:
        """Refuse a sound too short to mean anything; return every warning. Idempotent."""
        if self.warnings is not None:
            return list(self.warnings)
        seconds = self.samples / self.sample_rate
        if self.samples == 0:
            raise AudioError(
                f"{subject(self.name)} holds no samples: its audio track is empty. Use a file with sound in it."
            )
        if seconds < MIN_SECONDS:
            raise AudioError(
                f"{subject(self.name)} is only {self.samples} sample{'s' if self.samples != 1 else ''} long "
                f"({seconds * 1000:.2f} ms at {self.sample_rate} Hz): too short to hold a sound. Use a clip of "
                f"at least {MIN_SECONDS * 1000:.0f} ms (CLAP listens to 10 s; shorter clips are repeated to fill it)."
            )
        warnings = list(self.notes)
        assert self.peak is not None
        if bool((self.peak < SILENCE_PEAK).any()):
            warnings.append(
                f"{subject(self.name)} is silent (its loudest sample is below -100 dBFS): its CLAP embedding "
                "says little. Check the file, or that the right track was exported."
            )
        elif self.mono_peak is not None and bool((self.mono_peak < (CANCEL_RATIO * self.peak).clamp(min=SILENCE_PEAK)).any()):
            warnings.append(
                f"{subject(self.name)}: its channels cancel out when mixed to mono (one is the other inverted), "
                "so CLAP hears silence. Use one channel, or fix the polarity of the other."
            )
        if seconds < SHORT_SECONDS:
            warnings.append(
                f"{subject(self.name)} is only {seconds:.2f} s long; it is repeated to fill CLAP's 10 s window."
            )
        self.warnings = warnings
        return list(warnings)


def check_sound(waveform: torch.Tensor, sample_rate: int, name: str | None = None) -> list[str]:
    """Refuse unusable audio (``AudioError``) and return the warnings for usable audio.

    ``waveform`` is ``[C, T]`` or ``[B, C, T]`` float; the same rules as a file streamed through
    :class:`SoundCheck`, applied to the whole.
    """
    if not isinstance(waveform, torch.Tensor):
        raise AudioError(f"Expected a waveform tensor, got {type(waveform).__name__}: wire an AUDIO output here.")
    if waveform.ndim not in (2, 3):
        raise AudioError(f"Expected a waveform shaped [C, T] or [B, C, T], got {list(waveform.shape)}.")
    if not waveform.is_floating_point():
        raise AudioError(f"Expected float samples in [-1, 1], got {waveform.dtype}.")
    if waveform.shape[-2] == 0 or (waveform.ndim == 3 and waveform.shape[0] == 0):
        raise AudioError(f"{subject(name)} is empty (shape {list(waveform.shape)}): load a file with sound in it.")
    check = SoundCheck(sample_rate, name)
    check.piece(waveform)
    return check.finish()
