"""Reading a sound file, the one way every path reads it (issue 26).

:func:`open_sound` decodes a file piece by piece (PyAV, i.e. FFmpeg; soundfile when FFmpeg
cannot open it) and checks each piece as it comes with :class:`~.sound_check.SoundCheck`; at the
end of the file it checks the whole. Load Audio reads every piece and joins them, CLAP Encode
File (streamed) encodes them as they come: the same refusals and warnings either way.

Damaged stretches: a packet the decoder rejects partway through a file is skipped, as the
``ffmpeg`` command does, and a warning names the file and the time. A file damaged through more
than half of its packets, or one where nothing decodes, is refused. A file shorter than its
header says (an interrupted copy or upload) is used as far as it goes, with a warning.

Messages name the file by its name, never the server's path, and carry no decoder error text:
what is wrong is read off the file's own header (``_diagnose``).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator

import numpy as np
import torch

from .errors import AudioError
from .sound_check import SoundCheck, clock

#: Seconds of audio per piece by default (one CLAP window).
BLOCK_SECONDS = 10.0
# Consecutive rejected packets closer than this (in the file's time) are one damaged stretch.
_STRETCH_GAP = 1.0
# Stretches named in a warning; more are counted.
_STRETCHES_SHOWN = 3

_USE_AUDIO = "Use a wav, flac, mp3 or ogg file, or a video with sound."
_RE_UPLOAD = "Upload the whole file again, or re-export it from the program that made it."


class SoundStream:
    """An open sound file: ``sample_rate``, ``estimated_samples`` (None when unknown) and its
    pieces ``[1, C, n]`` float32, checked, in order (iterate once).

    ``finish()`` returns the warnings (and raises the refusals that need the whole, such as too
    short) over what was read; it also closes the file. A caller that stops early (CLAP's
    'first' mode reads 10 s) gets the checks of what it read.
    """

    def __init__(self, name: str, sample_rate: int, estimated_samples: int | None, check: SoundCheck,
                 pieces: Iterator[torch.Tensor]) -> None:  # fmt: skip
        self.name = name
        self.sample_rate = sample_rate
        self.estimated_samples = estimated_samples
        self.check = check
        self._pieces = pieces

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._pieces

    def finish(self) -> list[str]:
        self.close()
        return self.check.finish()

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


def open_sound(path: str | os.PathLike, max_seconds: float | None = None,
               block_seconds: float = BLOCK_SECONDS) -> SoundStream:  # fmt: skip
    """Open ``path`` for reading in pieces of about ``block_seconds``; at most ``max_seconds``.

    Raises ``AudioError`` at once for a missing, empty or unreadable file, one without an audio
    track, or one whose header gives an unusable sample rate.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise AudioError(f"Audio file {name!r} not found. Put it in ComfyUI's input folder or upload it.")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{name!r} is empty (0 bytes). Re-export or re-upload the file.")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    try:
        opened = _open_pyav(path)
    except AudioError:
        raise
    except Exception:  # noqa: BLE001 - FFmpeg cannot open it: perhaps libsndfile can
        opened = _open_soundfile(path)
    sample_rate, estimate, frames, declared = opened
    check = SoundCheck(sample_rate, name)  # refuses a rate no sound has
    limit = None if not max_seconds else math.ceil(max_seconds * sample_rate)
    if limit is not None and estimate is not None:
        estimate = min(estimate, limit)
    return SoundStream(name, sample_rate, estimate, check,
                       _pieces(path, frames, check, limit, max(1, int(block_seconds * sample_rate)), declared))


def read_sound(path: str | os.PathLike, max_seconds: float | None = None) -> tuple[torch.Tensor, int, list[str]]:
    """A whole file: ``([C, T] float32, sample_rate, warnings)``, checked as :func:`open_sound` checks it."""
    stream = open_sound(path, max_seconds)
    pieces = [piece[0] for piece in stream]
    warnings = stream.finish()
    waveform = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    return waveform.contiguous(), stream.sample_rate, warnings


# --------------------------------------------------------------------------------------------
# Decoders: each yields ("audio", [C, n]) and ("bad", (time, seconds)) events, and ends with
# ("end", seconds the file claims, or None).


def _open_pyav(path: str):
    import av

    container = av.open(path)
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise AudioError(f"{os.path.basename(path)!r} has no audio track (found: {', '.join(kinds)}); "
                         f"{_looks(path)}. {_USE_AUDIO}")
    stream = container.streams.audio[0]
    sample_rate = int(stream.codec_context.sample_rate or 0)
    if sample_rate <= 0 or not stream.codec_context.channels:
        container.close()
        raise AudioError(_unreadable(path))
    estimate = None
    if stream.duration is not None and stream.time_base is not None:
        estimate = int(stream.duration * stream.time_base * sample_rate)
    # Containers whose index gives the exact length; an mp3's or ogg's length is a guess.
    fmt = container.format.name
    exact = estimate if any(k in fmt for k in ("mov", "mp4", "flac", "aiff")) else None
    declared = _wav_declared_seconds(path) if "wav" in fmt else (exact / sample_rate if exact else None)
    if fmt == "mp3" and estimate:  # a guess from the bitrate and the file's size: only far off counts
        declared = -estimate / sample_rate
    return sample_rate, estimate, _pyav_frames(container, stream, stream.codec_context.channels), declared


def _pyav_frames(container, stream, channels: int) -> Iterator[tuple[str, object]]:
    import av

    try:
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError:  # the container itself is broken from here on
                yield "broken", None
                return
            if packet.size == 0:  # the flush packet at the end
                continue
            try:
                frames = [_frame_to_float(frame, channels) for frame in packet.decode()]
            except av.error.FFmpegError:
                frames = [None]
            if any(frame is None for frame in frames):  # rejected, or decoded into nonsense
                at = float(packet.pts * packet.time_base) if packet.pts is not None and packet.time_base else None
                length = float(packet.duration * packet.time_base) if packet.duration and packet.time_base else 0.0
                yield "bad", (at, length)
                continue
            for frame in frames:
                yield "audio", frame
    finally:
        container.close()


def _open_soundfile(path: str):
    import soundfile as sf

    try:
        f = sf.SoundFile(path)
    except Exception:  # noqa: BLE001 - neither decoder can read it: say why from the bytes
        raise AudioError(_unreadable(path)) from None

    def frames() -> Iterator[tuple[str, object]]:
        with f:
            while True:
                data = f.read(frames=65536, dtype="float32", always_2d=True)  # [n, C]
                if not len(data):
                    return
                yield "audio", torch.from_numpy(data.T.copy())

    return int(f.samplerate), int(f.frames), frames(), None


def _pieces(path: str, frames: Iterator[tuple[str, object]], check: SoundCheck, limit: int | None, block: int,
            declared: float | None) -> Iterator[torch.Tensor]:  # fmt: skip
    """Events -> checked pieces ``[1, C, block]`` (the last one shorter); notes damage and cut files.

    ``declared``: the length in seconds the file's header states (negative: a guess, as an mp3's).
    """
    name, rate = os.path.basename(path), check.sample_rate
    held: list[torch.Tensor] = []
    held_len = total = good = 0
    stretches: list[list[float]] = []  # [start, end, lost seconds, count]
    broken_at = None
    stopped = False
    try:
        for kind, value in frames:
            if kind == "bad":
                at, length = value
                at = total / rate if at is None else at
                if stretches and at - stretches[-1][1] <= _STRETCH_GAP:
                    stretches[-1][1] = at + length
                    stretches[-1][2] += length
                    stretches[-1][3] += 1
                else:
                    stretches.append([at, at + length, length, 1])
                continue
            if kind == "broken":
                broken_at = total / rate
                break
            good += 1
            data = value
            if limit is not None:
                data = data[:, : max(limit - total, 0)]
            held.append(data)
            held_len += data.shape[-1]
            total += data.shape[-1]
            if held_len >= block:
                yield _checked(torch.cat(held, dim=-1), check)
                held, held_len = [], 0
            if limit is not None and total >= limit:
                stopped = True  # at max_seconds: the rest of the file is not read, nor judged
                break
        if held_len:
            yield _checked(torch.cat(held, dim=-1), check)
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
    bad = sum(int(s[3]) for s in stretches)
    if (bad or broken_at is not None) and total == 0:
        raise AudioError(_unreadable(path, decoded_nothing=True))
    if bad > good:
        raise AudioError(
            f"{name!r} is damaged through most of its length ({bad} of {bad + good} pieces of audio could not "
            f"be decoded, from {clock(stretches[0][0])}). {_RE_UPLOAD}"
        )
    if stopped:
        check.finish()
        return
    seconds = total / rate
    guessed = declared is not None and declared < 0  # an mp3's length from its bitrate
    if guessed:
        declared, guess = None, -declared
        if seconds + sum(s[2] for s in stretches) < 0.5 * guess:
            check.note(
                f"{name!r} decodes to {clock(seconds)} of audio, but its size suggests about {clock(guess)}: "
                "much of it is damaged or is not audio, and was skipped. Re-export or re-download the file "
                "for a clean result."
            )
    cut = declared is not None and seconds + sum(s[2] for s in stretches) < 0.95 * declared - 0.05
    if cut:
        # A file cut inside its last packet fails to decode there: that is the cut, not damage.
        stretches = [s for s in stretches if s[0] < seconds - 0.05]
    if stretches:
        where = ", ".join(_span(s) for s in stretches[:_STRETCHES_SHOWN])
        more = len(stretches) - _STRETCHES_SHOWN
        lost = sum(s[2] for s in stretches)
        check.note(
            f"{name!r} is damaged at {where}{f' and {more} more places' if more > 0 else ''}: "
            f"{'that stretch' if len(stretches) == 1 else 'those stretches'}"
            f"{f' ({lost:.2f} s)' if lost else ''} could not be decoded and "
            f"{'was' if len(stretches) == 1 else 'were'} skipped, as ffmpeg does; the rest is used. "
            "Re-export or re-download the file for a clean result."
        )
    if broken_at is not None:
        check.note(f"{name!r} cannot be read past {clock(broken_at)}: the file is damaged there; the part "
                   f"before it is used. {_RE_UPLOAD}")
    elif cut:
        check.note(
            f"{name!r} ends at {clock(seconds)} but its header says {clock(declared)}: it was probably cut short "
            f"(an interrupted copy, upload or recording). The part present is used; {_RE_UPLOAD[0].lower()}"
            f"{_RE_UPLOAD[1:]}"
        )
    check.finish()  # the whole-sound rules (too short, silent), before the caller uses the last piece


def _span(stretch: list[float]) -> str:
    start, end = stretch[0], stretch[1]
    return clock(start) if end - start < 0.05 else f"{clock(start)}-{clock(end)}"


def _checked(piece: torch.Tensor, check: SoundCheck) -> torch.Tensor:
    piece = piece.unsqueeze(0)  # [1, C, n]
    check.piece(piece)
    return piece


# Sample formats FFmpeg decodes to (planar or packed) -> (offset, scale) to float in [-1, 1].
_PCM_SCALE = {"u8": (128.0, 128.0), "s16": (0.0, 2.0**15), "s32": (0.0, 2.0**31), "s64": (0.0, 2.0**63),
              "flt": (0.0, 1.0), "dbl": (0.0, 1.0)}  # fmt: skip


def _frame_to_float(frame, channels: int) -> torch.Tensor | None:
    """One decoded frame -> float32 ``[C, n]``, converted here rather than by PyAV's AudioResampler:
    the resampler crashes the process (segfault) on layouts without a channel order, such as an
    8-channel WAV that has no channel mask.

    None for a frame that does not match the stream's ``channels`` or whose planes hold fewer
    bytes than its sample count needs: garbage an AAC decoder accepted (seen: 21 channels in 41
    planes), which ``to_ndarray`` would read past its buffers, crashing the server.
    """
    fmt = frame.format
    name = fmt.name.removesuffix("p")
    if name not in _PCM_SCALE:
        raise AudioError(f"The decoder gave samples in a format the pack does not read ({fmt.name}). "
                         "Convert the file to wav or flac.")
    if (len(frame.layout.channels) or 1) != channels:
        return None
    planes = frame.planes
    need = frame.samples * fmt.bytes * (1 if fmt.is_planar else channels)
    if len(planes) != (channels if fmt.is_planar else 1) or any(plane.buffer_size < need for plane in planes):
        return None
    data = frame.to_ndarray()  # planar: [C, n]; packed: [1, n * C], interleaved
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    offset, scale = _PCM_SCALE[name]
    if offset == 0.0 and scale == 1.0:
        return torch.from_numpy(data.astype(np.float32, copy=True))
    return torch.from_numpy(((data.astype(np.float64) - offset) / scale).astype(np.float32))


# --------------------------------------------------------------------------------------------
# Why a file cannot be read, from its own bytes


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
    (b"\xff\xfb", "an MP3 file"),
    (b"{", "a JSON/text file"),
    (b"<", "an HTML/XML file"),
)


def _kind(head: bytes) -> str | None:
    looks = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
    if looks is None and head[4:8] == b"ftyp":
        looks = "an MP4/M4A file"
    if looks is None and head and all(32 <= b < 127 or b in b"\r\n\t" for b in head):
        looks = "a text file"
    return looks


def _looks(path: str) -> str:
    """What a file looks like from its first bytes, so a wrong file reads differently from a broken one."""
    with open(path, "rb") as f:
        head = f.read(16)
    looks = _kind(head)
    return f"it looks like {looks}" if looks else f"it starts with bytes {head[:8].hex(' ')}"


def _unreadable(path: str, decoded_nothing: bool = False) -> str:
    """The refusal for a file no decoder reads: its name, size, the cause, and what to do."""
    name, size = os.path.basename(path), os.path.getsize(path)
    cause, todo = _diagnose(path, decoded_nothing)
    return f"Cannot read {name!r} as audio ({size} bytes): {cause}. {todo}"


def _diagnose(path: str, decoded_nothing: bool) -> tuple[str, str]:
    with open(path, "rb") as f:
        head = f.read(16)
    looks = _kind(head)
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        wav = _wav_header(path)
        if wav.get("fmt") is None:
            return "the WAV file ends inside its header, so it was cut short", _RE_UPLOAD
        tag, channels, rate = wav["fmt"][:3]
        if rate == 0:
            return "its header says 0 Hz, which is no sample rate: the header is damaged", _RE_UPLOAD
        if channels == 0:
            return "its header says 0 channels: the header is damaged", _RE_UPLOAD
        if wav.get("data") is None:
            return "the WAV file holds no sound data after its header (cut short?)", _RE_UPLOAD
        return f"its header names a kind of WAV data the decoders do not know (format tag {tag:#06x})", \
            "Convert it to 16-bit PCM wav or flac in an audio editor."  # fmt: skip
    if head[4:8] == b"ftyp":
        boxes, cut = _mp4_boxes(path)
        if "moov" not in boxes and cut:
            return ("the file ends before its index (the 'moov' part an MP4/M4A needs is missing): it was "
                    "probably cut short while copying, uploading or recording"), _RE_UPLOAD  # fmt: skip
        if "moov" not in boxes:
            return "its index (the 'moov' part an MP4/M4A needs) is missing or damaged", _RE_UPLOAD
        return "its audio track is damaged: none of it could be decoded", _RE_UPLOAD
    if looks == "a text file" or looks == "a JSON/text file":
        return "it is a text file, not a sound", _USE_AUDIO
    if looks in ("an MP3 file", "a FLAC file", "an Ogg file", "an AIFF file"):
        what = "none of its audio could be decoded" if decoded_nothing else "the decoder finds no valid audio in it"
        return f"it looks like {looks}, but {what}: it is damaged", _RE_UPLOAD
    if looks:
        return f"it looks like {looks}, not a sound", _USE_AUDIO
    if decoded_nothing:
        return "none of its audio could be decoded: the file is damaged", _RE_UPLOAD
    return f"no decoder recognises it as audio (it starts with bytes {head[:8].hex(' ')})", _USE_AUDIO


def _wav_header(path: str) -> dict:
    """``{"fmt": (format tag, channels, rate, block align), "data": (declared bytes, present bytes)}``,
    each key present when its chunk is whole; the chunks a RIFF/WAVE file declares before its data."""
    out: dict = {}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(12)
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return out
            cid, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                out["data"] = (length, size - f.tell())
                return out
            body = f.read(min(length, 64))
            if cid == b"fmt ":
                if len(body) < 16:
                    return out
                tag, channels, rate, _, align = struct.unpack("<HHIIH", body[:14])
                out["fmt"] = (tag, channels, rate, align)
            f.seek(length + (length & 1) - len(body), os.SEEK_CUR)


def _wav_declared_seconds(path: str) -> float | None:
    """How long the WAV header says the sound is, when that is more than the file holds (else None):
    a WAV cut short keeps the header of the whole."""
    wav = _wav_header(path)
    if "fmt" not in wav or "data" not in wav:
        return None
    (_, _, rate, align), (declared, present) = wav["fmt"], wav["data"]
    if declared in (0, 0xFFFFFFFF) or declared <= present or not rate or not align:  # streaming writers' placeholders
        return None
    return declared / align / rate


def _mp4_boxes(path: str) -> tuple[list[str], bool]:
    """The top-level box names of an MP4/M4A/MOV file, as far as they make sense, and whether the
    last one runs past the end of the file (the file was cut inside it)."""
    names: list[str] = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        while pos + 8 <= size and len(names) < 1000:
            f.seek(pos)
            head = f.read(16)
            length, kind = struct.unpack(">I", head[:4])[0], head[4:8].decode("latin-1")
            if length == 1 and len(head) >= 16:
                length = struct.unpack(">Q", head[8:16])[0]
            elif length == 0:
                length = size - pos
            if length < 8 or not kind.isalnum():
                return names, False  # garbage where a box should start: damaged, not cut
            names.append(kind)
            pos += length
    return names, pos > size
