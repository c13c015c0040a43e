"""Odd and damaged sound files for the sound-check tests (issue 26), all made at test time.

Each :class:`Case` writes one file and states the one outcome every path into the pack must
give it: ``works`` (with exactly the listed warnings, each given as substrings, in order) or
``refused`` (an ``AudioError`` whose text holds the substrings). Files are 0.2-4 s long, so the
CLAP work per path is one window.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from bad_inputs import RATE, s16, scene_at

SECONDS = 4.0


def _wav_bytes(data: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> bytearray:
    buf = io.BytesIO()
    sf.write(buf, data, rate, subtype=subtype, format="WAV")
    return bytearray(buf.getvalue())


def _patch_fmt(data: bytearray, offset: int, fmt: str, value: int) -> bytearray:
    """Overwrite a field of the WAV's fmt chunk (offset 2: channels, 4: sample rate)."""
    struct.pack_into(fmt, data, data.index(b"fmt ") + 8 + offset, value)
    return data


def _garbage(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def mp3_bytes(seconds: float = SECONDS) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, scene_at(RATE, seconds), RATE, format="MP3", subtype="MPEG_LAYER_III")
    return buf.getvalue()


def m4a_bytes(seconds: float = SECONDS, faststart: bool = False) -> bytes:
    """AAC in an M4A (PyAV's muxer): its index (``moov``) at the end, or at the start with ``faststart``."""
    import av

    pcm = scene_at(RATE, seconds).astype(np.float32)[None]
    # A real file: the faststart pass reopens it to move the index to the front.
    tmp = tempfile.NamedTemporaryFile(suffix=".m4a", delete=False)
    tmp.close()
    with av.open(tmp.name, "w", format="ipod", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("aac", rate=RATE)
        stream.layout = "mono"
        for start in range(0, pcm.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start : start + 1024]),
                                               format="fltp", layout="mono")  # fmt: skip
            frame.sample_rate = RATE
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    data = Path(tmp.name).read_bytes()
    os.unlink(tmp.name)
    return data


def damaged_mp3(path: Path) -> None:
    """8 KB of garbage inserted at the middle of an mp3 (what issue 26 found failing)."""
    data = mp3_bytes()
    mid = len(data) // 2
    path.write_bytes(data[:mid] + _garbage(8192, 26) + data[mid:])


def damaged_m4a(path: Path) -> None:
    """2 KB of the AAC data in the middle of an m4a overwritten with garbage."""
    data = bytearray(m4a_bytes())
    mid = len(data) // 2
    data[mid : mid + 2048] = _garbage(2048, 27)
    path.write_bytes(bytes(data))


def ruined_m4a(path: Path) -> None:
    """Nearly all of an m4a's audio data overwritten: far more damaged than whole."""
    data = bytearray(m4a_bytes())
    start, end = data.index(b"mdat") + 8 + 200, data.index(b"moov") - 16
    data[start:end] = _garbage(end - start, 28)
    path.write_bytes(bytes(data))


def m4a_cut_before_index(path: Path) -> None:
    """The first half of an m4a whose index comes last: the index is gone (an interrupted upload)."""
    data = m4a_bytes()
    path.write_bytes(data[: len(data) // 2])


def m4a_cut_after_index(path: Path) -> None:
    """The first half of a 'faststart' m4a: the index is whole, half the audio it lists is missing."""
    data = m4a_bytes(faststart=True)
    path.write_bytes(data[: len(data) // 2])


def wav_cut_short(path: Path) -> None:
    """A 16-bit WAV whose header announces 4 s, holding the first 1 s."""
    data = _wav_bytes(s16(scene_at(RATE)))
    path.write_bytes(bytes(data[: data.index(b"data") + 8 + RATE * 2]))


def wav_rate(rate: int) -> Callable[[Path], None]:
    """A 1 s 16-bit WAV whose header says ``rate`` Hz."""
    return lambda path: path.write_bytes(bytes(_patch_fmt(_wav_bytes(s16(scene_at(RATE, 1.0))), 4, "<I", rate)))


def wav_channels(channels: int) -> Callable[[Path], None]:
    """A 1 s mono 16-bit WAV whose header says ``channels`` channels."""
    return lambda path: path.write_bytes(
        bytes(_patch_fmt(_wav_bytes(s16(scene_at(RATE, 1.0))), 2, "<H", channels)))  # fmt: skip


def wav(data: Callable[[], np.ndarray], rate: int = RATE, subtype: str = "PCM_16") -> Callable[[Path], None]:
    return lambda path: sf.write(str(path), data(), rate, subtype=subtype, format="WAV")


def as_format(fmt: str, subtype: str) -> Callable[[Path], None]:
    """The scene in ``fmt`` whatever the file's extension says."""
    return lambda path: sf.write(str(path), s16(scene_at(RATE, 2.0)), RATE, subtype=subtype, format=fmt)


def nan_at_half_second() -> np.ndarray:
    data = scene_at(RATE, 1.0).astype(np.float32)
    data[RATE // 2] = np.nan
    return data


def opposite_channels() -> np.ndarray:
    left = s16(scene_at(RATE, 2.0))
    return np.stack([left, -left], axis=1)


@dataclass(frozen=True)
class Case:
    name: str
    write: Callable[[Path], None]
    verdict: str  # "works" | "refused"
    what: str
    expect: tuple[tuple[str, ...], ...] = ()  # works: one tuple of substrings per warning; refused: one tuple


_RE = ("upload the whole file again", "re-export")
_DAMAGED = ("is damaged at", "could not be decoded", "skipped, as ffmpeg does", "the rest is used", "re-export")

CASES: list[Case] = [
    # ---- damage in the middle: the stretch is skipped, the file named with the time
    Case("sc_damaged.mp3", damaged_mp3, "works", "8 KB of garbage in the middle of an mp3",
         (("'sc_damaged.mp3'", "0:01.9", *_DAMAGED),)),
    Case("sc_damaged.m4a", damaged_m4a, "works", "2 KB of garbage in the middle of an m4a's audio",
         (("'sc_damaged.m4a'", "0:02.", *_DAMAGED),)),
    Case("sc_ruined.m4a", ruined_m4a, "refused", "an m4a with nearly all its audio data overwritten",
         (("cannot read 'sc_ruined.m4a'", "its audio track is damaged", "none of it could be decoded", *_RE),)),
    # ---- cut short
    Case("sc_cut_before_index.m4a", m4a_cut_before_index, "refused", "an m4a cut in half, its index lost",
         (("cannot read 'sc_cut_before_index.m4a'", "ends before its index", "cut short", *_RE),)),
    Case("sc_cut_after_index.m4a", m4a_cut_after_index, "works", "a faststart m4a cut in half",
         (("'sc_cut_after_index.m4a' ends at 0:01.9", "its header says 0:04.0", "cut short", "part present is used"),)),
    Case("sc_cut_short.wav", wav_cut_short, "works", "a WAV header announcing 4 s over 1 s of data",
         (("'sc_cut_short.wav' ends at 0:01.00", "its header says 0:04.00", "cut short"),)),
    # ---- headers that lie
    Case("sc_rate_0hz.wav", wav_rate(0), "refused", "a WAV header saying 0 Hz",
         (("cannot read 'sc_rate_0hz.wav'", "its header says 0 hz", "header is damaged", *_RE),)),
    Case("sc_rate_500hz.wav", wav_rate(500), "refused", "a WAV header saying 500 Hz (intact otherwise)",
         (("'sc_rate_500hz.wav'", "its header says 500 hz", "8000 hz or more", "resample it"),)),
    Case("sc_channels_0.wav", wav_channels(0), "refused", "a WAV header saying 0 channels",
         (("cannot read 'sc_channels_0.wav'", "its header says 0 channels", *_RE),)),
    Case("sc_channels_lie.wav", wav_channels(2), "works",
         "mono data under a header saying stereo: read as 0.5 s of two channels, alike on every path"),
    # ---- too little, or nothing to hear
    Case("sc_one_sample.wav", wav(lambda: np.array([0.5]), 44_100), "refused", "one sample",
         (("'sc_one_sample.wav' is only 1 sample long", "too short", "at least 10 ms"),)),
    Case("sc_short.wav", wav(lambda: s16(scene_at(RATE, 0.2))), "works", "0.2 s",
         (("'sc_short.wav' is only 0.20 s long", "repeated"),)),
    Case("sc_silence.wav", wav(lambda: np.zeros(2 * RATE, np.int16)), "works", "2 s of digital silence",
         (("'sc_silence.wav' is silent", "-100 dbfs"),)),
    Case("sc_cancel.wav", wav(opposite_channels), "works", "stereo, the right channel the left inverted",
         (("'sc_cancel.wav'", "channels cancel out", "use one channel"),)),
    Case("sc_nan.wav", wav(nan_at_half_second, subtype="FLOAT"), "refused", "a float WAV with a NaN at 0.5 s",
         (("'sc_nan.wav' holds nan or infinite samples", "the first at 0:00.50", "re-export"),)),
    # ---- wrong extensions, not a sound at all
    Case("sc_flac_named.mp3", as_format("FLAC", "PCM_16"), "works", "FLAC data in a file named .mp3"),
    Case("sc_ogg_named.wav", as_format("OGG", "VORBIS"), "works", "Ogg Vorbis data in a file named .wav"),
    Case("sc_zero_bytes.wav", lambda p: p.write_bytes(b""), "refused", "a zero-byte file",
         (("'sc_zero_bytes.wav' is empty (0 bytes)", "re-upload"),)),
    Case("sc_text.mp3", lambda p: p.write_text("Verse 1: these are the lyrics, not the song.\n" * 30), "refused",
         "a text file named .mp3", (("cannot read 'sc_text.mp3'", "it is a text file", "use a wav, flac, mp3 or ogg"),)),
]  # fmt: skip

BY_NAME = {case.name: case for case in CASES}
