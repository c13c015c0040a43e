"""The sound check in-process (issue 26): every odd file of ``sound_check_cases`` read whole (as
Load Audio and training read it) and streamed in 0.3 s pieces (as CLAP Encode File reads it)
gives the same refusal or the same warnings, and what the case says. The server tests
(test_sound_check_server.py) run the same files through the nodes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from sound_check_cases import CASES, Case

from clap2diffusion_core import errors
from clap2diffusion_core.errors import AudioError
from clap2diffusion_core.sound_check import SoundCheck, check_sound
from clap2diffusion_core.sound_file import open_sound, read_sound


def outcome(read) -> tuple[str, object]:
    try:
        return "works", read()
    except AudioError as err:
        return "refused", str(err)


def streamed(path: Path) -> list[str]:
    stream = open_sound(path, block_seconds=0.3)
    for _ in stream:
        pass
    return stream.finish()


def assert_expected(case: Case, verdict: str, result, folder: Path) -> None:
    assert verdict == case.verdict, f"{case.what}: {verdict}: {result}"
    texts = [result] if verdict == "refused" else result
    assert len(texts) == max(len(case.expect), 1 if verdict == "refused" else 0), texts
    for text, wanted in zip(texts, case.expect):
        lowered = text.lower()
        missing = [w for w in wanted if w.lower() not in lowered]
        assert not missing, f"{case.name}: lacks {missing}: {text}"
        assert "errno" not in lowered and "av.error" not in lowered and str(folder) not in text, text  # nothing raw


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_sound_check_whole_and_streamed_reads_agree(case: Case, tmp_path: Path) -> None:
    path = tmp_path / case.name
    case.write(path)
    whole = outcome(lambda: read_sound(path)[2])
    pieces = outcome(lambda: streamed(path))
    assert whole == pieces
    assert_expected(case, *whole, tmp_path)


def test_sound_check_a_waveform_whole_and_in_pieces_gives_the_same_verdict() -> None:
    t = torch.arange(48_000) / 48_000
    left = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    for sound in (torch.stack([left, -left]), torch.zeros(1, 48_000), left[None, :4800]):
        check = SoundCheck(48_000, "x.wav")
        for piece in sound.split(1000, dim=-1):
            check.piece(piece)
        assert check.finish() == check_sound(sound, 48_000, "x.wav") != []


def test_sound_check_errors_show_a_clean_type_name_in_comfyui() -> None:
    """ComfyUI names an error by ``type(e).__module__``; a pack it loads is named by its path."""
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.Clap2DiffusionError)]
    assert len(classes) > 10 and all(c.__module__ == "clap2diffusion_core.errors" for c in classes)
    assert re.fullmatch(r"[\w.]+", errors.FrameBatchError.__module__)


def test_sound_check_randomly_damaged_files_are_used_or_refused_never_crash(tmp_path: Path) -> None:
    """Skipping damaged packets lets the decoder go on through garbage. 4 formats x 12 seeds of 1-5
    random overwrites: each file works, warns or is refused with a clean message naming it, and
    nothing else is raised. (The garbage frame that once segfaulted numpy, 21 channels in 41 planes,
    comes from sc_ruined.m4a, which the case test above reads.)"""
    import io

    import numpy as np
    import soundfile as sf
    from bad_inputs import RATE, scene_at
    from sound_check_cases import m4a_bytes, mp3_bytes

    def encoded(fmt: str, subtype: str) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, scene_at(RATE, 2.0), RATE, format=fmt, subtype=subtype)
        return buf.getvalue()

    sources = {"m4a": m4a_bytes(2.0), "mp3": mp3_bytes(2.0), "ogg": encoded("OGG", "VORBIS"),
               "flac": encoded("FLAC", "PCM_16")}  # fmt: skip
    verdicts = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        for ext, data in sources.items():
            damaged = bytearray(data)
            for _ in range(int(rng.integers(1, 6))):
                at = int(rng.integers(64, len(damaged) - 1))
                n = min(int(rng.integers(1, 3000)), len(damaged) - at)
                damaged[at : at + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            path = tmp_path / f"fuzz_{seed}.{ext}"
            path.write_bytes(bytes(damaged))
            verdict, result = outcome(lambda path=path: read_sound(path)[2])
            verdicts.append(verdict if verdict == "refused" or not result else "warned")
            for text in [result] if verdict == "refused" else result:
                assert f"'{path.name}'" in text and str(tmp_path) not in text and "errno" not in text.lower(), text
    assert {"refused", "warned"} <= set(verdicts), verdicts
