"""clap2diffusion_core.audio: decoding, validation, mono, 48 kHz, 10 s windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from clap2diffusion_core import audio, sound_file
from clap2diffusion_core.audio import (
    WINDOW_SAMPLES,
    AudioError,
    load_audio_file,
    prepare_windows,
    resample,
    to_mono,
    validate_waveform,
)


def tone(freq: float, sr: int, seconds: float, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    """A sine, ``[T, C]`` float32 (soundfile's layout)."""
    t = np.arange(int(sr * seconds)) / sr
    wave = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1)


def peak_hz(waveform: torch.Tensor, sr: int) -> float:
    """Frequency of the strongest FFT bin of a mono ``[T]`` signal."""
    spectrum = torch.fft.rfft(
        waveform.double() * torch.hann_window(waveform.shape[-1], dtype=torch.float64)
    ).abs()
    return float(spectrum.argmax()) * sr / waveform.shape[-1]


def write_mp4(path, sr: int = 44100, seconds: float = 1.0, with_audio: bool = True) -> None:
    """A tiny mp4: 16x16 mpeg4 video (+ a 440 Hz AAC track)."""
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width = video.height = 16
        video.pix_fmt = "yuv420p"
        sound = out.add_stream("aac", rate=sr) if with_audio else None
        if sound is not None:
            sound.layout = "stereo"
        for _ in range(int(seconds * 10)):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if sound is not None:
            pcm = tone(440, sr, seconds, channels=2).T.copy()  # planar [C, T]
            for start in range(0, pcm.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(
                    pcm[:, start : start + 1024], format="fltp", layout="stereo"
                )
                frame.sample_rate = sr
                out.mux(sound.encode(frame))
            out.mux(sound.encode())


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ext, fmt, subtype",
    [
        ("wav", "WAV", "PCM_16"),
        ("flac", "FLAC", "PCM_16"),
        ("ogg", "OGG", "VORBIS"),
        ("mp3", "MP3", "MPEG_LAYER_III"),
    ],
)
def test_decodes_each_format_to_float_channels_first(tmp_path, ext, fmt, subtype):
    path = tmp_path / f"tone.{ext}"
    sf.write(path, tone(1000, 44100, 1.0, channels=2), 44100, format=fmt, subtype=subtype)

    waveform, sr = load_audio_file(path)

    assert sr == 44100
    assert waveform.dtype == torch.float32 and waveform.shape[0] == 2
    assert abs(waveform.shape[1] - 44100) < 0.1 * 44100  # mp3/ogg add codec padding
    assert abs(peak_hz(waveform[0], sr) - 1000) < 5
    assert 0.3 < waveform.abs().max() <= 1.0


def test_decodes_the_audio_track_of_a_video(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(path)

    waveform, sr = load_audio_file(path)

    assert sr == 44100 and waveform.shape[0] == 2
    assert abs(peak_hz(waveform[0], sr) - 440) < 5


def test_video_without_audio_track_is_refused(tmp_path):
    path = tmp_path / "silent_film.mp4"
    write_mp4(path, with_audio=False)

    with pytest.raises(AudioError, match="no audio track.*video.*or a video with sound"):
        load_audio_file(path)


def test_max_seconds_stops_decoding_early(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, tone(440, 16000, 60.0), 16000)

    waveform, sr = load_audio_file(path, max_seconds=2.5)

    assert waveform.shape == (1, 40000) and sr == 16000


def test_soundfile_is_the_fallback_decoder(tmp_path, monkeypatch):
    path = tmp_path / "tone.wav"
    sf.write(path, tone(440, 22050, 0.5), 22050)
    monkeypatch.setattr(sound_file, "_open_pyav", lambda *a: (_ for _ in ()).throw(RuntimeError("no ffmpeg")))

    waveform, sr = load_audio_file(path, max_seconds=0.25)

    assert sr == 22050 and waveform.shape == (1, 5513)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "looks like a PNG image"),
        (b"just some notes, not a sound\n" * 4, "it is a text file"),
        (bytes(range(256)), "starts with bytes 00 01 02"),
    ],
)
def test_unreadable_file_says_what_it_looked_like_and_what_to_do(tmp_path, content, expected):
    path = tmp_path / "thunder.wav"
    path.write_bytes(content)

    with pytest.raises(AudioError) as err:
        load_audio_file(path)

    message = str(err.value)
    assert "thunder.wav" in message and expected in message
    assert "wav, flac, mp3 or ogg" in message


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio_file(tmp_path / "nope.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio_file(tmp_path / "empty.wav")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def test_valid_audio_has_no_warnings():
    assert validate_waveform(torch.rand(1, 2, 48000) - 0.5, 48000) == []


def test_silence_is_a_warning_not_an_error():
    warnings = validate_waveform(torch.zeros(1, 1, 48000), 48000)
    assert any("silent" in w for w in warnings)


def test_very_short_audio_is_a_warning():
    warnings = validate_waveform(torch.rand(1, 4800) - 0.5, 48000)
    assert any("0.10 s" in w for w in warnings)


@pytest.mark.parametrize(
    "waveform, sr, match",
    [
        (torch.zeros(1, 2, 0), 48000, "empty"),
        (torch.tensor([[[0.0, float("nan"), 0.1]]]), 48000, r"NaN or infinite samples \(the first at 0:00.00\)"),
        (torch.tensor([[[0.0, float("inf")]]]), 48000, "NaN or infinite"),
        (torch.zeros(4), 48000, r"\[C, T\] or \[B, C, T\]"),
        (torch.zeros(1, 100), 0, "sample rate is 0 Hz"),
        (torch.zeros(1, 100, dtype=torch.int16), 48000, "float samples"),
    ],
)
def test_unusable_waveforms_raise_audio_error(waveform, sr, match):
    with pytest.raises(AudioError, match=match):
        validate_waveform(waveform, sr)


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)


# --------------------------------------------------------------------------------------------
# Mono and resampling
# --------------------------------------------------------------------------------------------


def test_to_mono_averages_channels():
    stereo = torch.stack([torch.ones(10), -torch.ones(10) * 0.5]).unsqueeze(0)  # [1, 2, 10]
    mono = to_mono(stereo)
    assert mono.shape == (1, 1, 10)
    assert torch.allclose(mono, torch.full((1, 1, 10), 0.25))


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 192000])
def test_resample_to_48k_keeps_length_and_pitch(sr):
    wave = torch.from_numpy(tone(1000, sr, 2.0)[:, 0])

    out = resample(wave, sr, 48000)

    assert out.shape == (96000,)
    assert abs(peak_hz(out, 48000) - 1000) < 1
    assert abs(out.abs().max() - 0.5) < 0.02  # no gain change


def test_resample_matches_torchaudio():
    torchaudio = pytest.importorskip("torchaudio")
    wave = torch.randn(2, 44100)
    ours = resample(wave, 44100, 48000)
    ref = torchaudio.functional.resample(wave, 44100, 48000)
    assert torch.allclose(ours, ref, atol=1e-4)


def test_resample_handles_odd_rates_with_a_small_kernel():
    out = resample(torch.randn(1, 44099), 44099, 48000)  # reduced ratio would be 48000/44099
    assert abs(out.shape[-1] - 48000) <= 1


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def test_short_clip_is_repeat_padded_into_one_window():
    clip = torch.rand(1, 1, 3 * 48000) - 0.5  # 3 s

    windows = prepare_windows(clip, 48000)

    assert windows.shape == (1, 1, WINDOW_SAMPLES)
    w = windows[0, 0]
    for k in range(3):  # three whole copies fit in 10 s ...
        assert torch.equal(w[k * 144000 : (k + 1) * 144000], clip[0, 0])
    assert torch.all(w[432000:] == 0)  # ... then zeros


def test_exactly_ten_seconds_is_one_untouched_window():
    clip = torch.rand(2, 1, WINDOW_SAMPLES) - 0.5
    windows = prepare_windows(clip, 48000)
    assert windows.shape == (2, 1, WINDOW_SAMPLES)
    assert torch.equal(windows[:, 0], clip[:, 0])


@pytest.mark.parametrize("seconds, n", [(25.0, 3), (20.5, 2), (21.5, 3), (10.01, 1)])
def test_long_audio_is_cut_into_ten_second_windows(seconds, n):
    clip = torch.rand(1, 2, int(seconds * 16000)) - 0.5  # 16 kHz stereo

    windows = prepare_windows(clip, 16000)

    # A last piece under 1 s is dropped when a full window exists; the rest is repeat-padded.
    assert windows.shape == (1, n, WINDOW_SAMPLES)


def test_windows_accept_a_single_clip_without_batch_dim():
    assert prepare_windows(torch.rand(2, 48000) - 0.5, 48000).shape == (1, 1, WINDOW_SAMPLES)


def test_windows_refuse_nan():
    with pytest.raises(AudioError, match="NaN"):
        prepare_windows(torch.full((1, 1, 100), math.nan), 48000)


# --------------------------------------------------------------------------------------------
# Load Audio (CLAP2Diffusion) node
# --------------------------------------------------------------------------------------------


@pytest.fixture
def load_audio_node(tmp_path, monkeypatch):
    """The node module, with ComfyUI's input folder pointed at ``tmp_path / "input"``."""
    import comfy_pack

    nodes = comfy_pack.load("nodes.audio_nodes")
    import folder_paths

    input_dir = tmp_path / "input"
    (input_dir / "sub").mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(input_dir))
    sf.write(input_dir / "thunder.wav", tone(100, 16000, 1.0, channels=2), 16000)
    sf.write(input_dir / "sub" / "rain.flac", tone(3000, 22050, 0.5), 22050)
    (input_dir / "notes.txt").write_text("not audio")
    return nodes


def test_load_audio_node_lists_audio_and_video_files(load_audio_node):
    assert load_audio_node.input_audio_files() == ["thunder.wav"]
    schema = load_audio_node.LoadAudio.define_schema()
    combo = schema.inputs[0]
    assert combo.options == ["thunder.wav"] and combo.upload.value == "audio_upload"
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)


def test_load_audio_node_outputs_core_audio_and_a_preview(load_audio_node):
    out = load_audio_node.LoadAudio.execute("sub/rain.flac")

    audio_out = out.args[0]
    assert audio_out["sample_rate"] == 22050
    assert audio_out["waveform"].shape == (1, 1, 11025) and audio_out["waveform"].dtype == torch.float32
    assert out.ui == {"audio": [{"filename": "rain.flac", "subfolder": "sub", "type": "input"}]}  # no warnings


def test_load_audio_node_output_is_not_validated_again_downstream(load_audio_node, monkeypatch):
    """Load Audio checks the sound as it decodes it and records the very [1, C, T] tensor it outputs
    as checked, so CLAP Encode's check is free (no second scan)."""
    import comfy_pack

    audio_module = comfy_pack.load("clap2diffusion_core.audio")  # the copy the nodes import
    scans = []
    real = audio_module.validate_waveform
    monkeypatch.setattr(audio_module, "validate_waveform", lambda *a: scans.append(1) or real(*a))

    out = load_audio_node.LoadAudio.execute("thunder.wav").args[0]
    assert len(scans) == 0  # checked piece by piece while decoding, not scanned afterwards
    _, first_time = audio_module.check_waveform(out["waveform"], out["sample_rate"])  # as encode_audio does
    assert not first_time and len(scans) == 0


def test_load_audio_node_max_seconds(load_audio_node):
    out = load_audio_node.LoadAudio.execute("thunder.wav", max_seconds=0.25)
    assert out.args[0]["waveform"].shape == (1, 2, 4000)


def test_load_audio_node_fingerprint_follows_file_content(load_audio_node, tmp_path):
    node = load_audio_node.LoadAudio
    before = node.fingerprint_inputs("thunder.wav")
    assert node.fingerprint_inputs("thunder.wav") == before
    sf.write(tmp_path / "input" / "thunder.wav", tone(200, 16000, 1.0), 16000)
    assert node.fingerprint_inputs("thunder.wav") != before


def test_load_audio_node_refuses_paths_outside_the_input_folder(load_audio_node, tmp_path):
    secret = tmp_path / "secret.wav"
    sf.write(secret, tone(100, 8000, 0.1), 8000)
    (tmp_path / "input" / "link.wav").symlink_to(secret)
    node = load_audio_node.LoadAudio

    assert node.validate_inputs("thunder.wav") is True
    assert node.validate_inputs("sub/rain.flac") is True
    assert "outside" in node.validate_inputs("../secret.wav")
    assert "outside" in node.validate_inputs("link.wav")
    assert "inside ComfyUI's input folder" in node.validate_inputs(str(secret))
    assert "upload it" in node.validate_inputs("missing.wav")
    with pytest.raises(ValueError, match="outside"):
        node.execute("../secret.wav")


def test_load_audio_node_reports_unreadable_files(load_audio_node):
    # The pack's own copy of AudioError (nodes import the core relatively): match its base class.
    with pytest.raises(ValueError, match="notes.txt.*text file"):
        load_audio_node.LoadAudio.execute("notes.txt")


# --------------------------------------------------------------------------------------------
# In a real ComfyUI server (slow: uses the session's server)
# --------------------------------------------------------------------------------------------


def test_server_load_audio_feeds_core_save_audio_and_refuses_escapes(comfy, tmp_path):
    from tools.comfy_server import Graph, PromptRejected, uncached

    sound = tmp_path / "c2d_tone.flac"
    sf.write(sound, tone(440, 22050, 1.0, channels=2), 22050)
    name = comfy.upload_file(sound)

    g = Graph()
    audio_node = g.node("C2D_LoadAudio", audio=name)
    g.node("SaveAudio", audio=audio_node.out, filename_prefix="c2d_audio_test")
    entry = comfy.wait(comfy.queue(uncached(g.prompt())))

    assert comfy.files(entry, "audio", audio_node.id) == [
        {"filename": name, "subfolder": "", "type": "input"}
    ]
    saved = [r for r in comfy.files(entry, "audio") if r["type"] == "output"]
    out = tmp_path / "saved.flac"
    out.write_bytes(comfy.view(saved[0]["filename"], saved[0]["subfolder"]))
    data, sr = sf.read(out, always_2d=True)
    assert sr == 22050 and data.shape[1] == 2 and abs(len(data) - 22050) < 100

    g.set(audio_node, audio="../../etc/passwd")
    with pytest.raises(PromptRejected, match="outside ComfyUI's input folder"):
        comfy.queue(g.prompt())


# --------------------------------------------------------------------------------------------
# Streaming: windows of a long sound, a few at a time
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sr", "seconds"), [(16_000, 37.3), (44_100, 20.5), (48_000, 25.0), (22_050, 3.0),
                                             (16_000, 20.5), (8_000, 0.3)])
def test_streamed_windows_equal_the_whole_sound_windows(sr, seconds):
    """Resampling piece by piece with the filter's context carried over gives the very windows
    of resampling the whole sound; the tail rule (drop under 1 s after a full window) holds."""
    sound = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 2, int(sr * seconds))).astype(np.float32)) * 0.3
    whole = audio.prepare_windows(sound, sr)  # [2, N, 480000]
    pieces = audio.waveform_pieces(sound, sr, block=77_777)  # pieces that do not line up with windows
    streamed = torch.stack(list(audio.stream_windows(pieces, sr)), dim=1)
    assert streamed.shape == whole.shape
    assert (streamed - whole).abs().max() < 1e-5
    assert audio.count_windows(sound.shape[-1], sr) == whole.shape[1]


def test_streaming_reads_only_what_the_first_window_needs():
    read = []

    def pieces():
        for i in range(100):  # 100 s at 16 kHz, in 1 s pieces
            read.append(i)
            yield torch.full((1, 1, 16_000), 0.1 * ((i % 7) - 3) / 3)

    [first] = list(audio.stream_windows(pieces(), 16_000, first_only=True))
    assert first.shape == (1, WINDOW_SAMPLES)
    assert len(read) <= 12  # 10 s and the resampler's context, not the 100 s


def test_a_file_streams_in_pieces_and_gives_the_whole_file_windows(tmp_path):
    path = tmp_path / "long.flac"
    data = (np.random.default_rng(5).standard_normal((int(44_100 * 23.4), 2)) * 0.2).astype(np.float32)
    sf.write(path, data, 44_100)
    rate, estimate, pieces = audio.stream_audio_file(path, block_seconds=3.0)
    pieces = list(pieces)
    assert rate == 44_100 and abs(estimate - data.shape[0]) < 44_100 * 0.05
    assert max(p.shape[-1] for p in pieces) < 44_100 * 3.2  # never the whole file at once
    whole, _ = audio.load_audio_file(path)
    assert torch.equal(torch.cat(pieces, dim=-1)[0], whole)
    _, _, limited = audio.stream_audio_file(path, max_seconds=5.0)
    assert sum(p.shape[-1] for p in limited) == 5 * 44_100


def test_a_comfyui_node_output_an_inference_tensor_is_checked_once(monkeypatch):
    """ComfyUI runs nodes under inference mode; such tensors have no version counter to read."""
    calls = []
    real = audio.validate_waveform
    monkeypatch.setattr(audio, "validate_waveform", lambda w, sr: calls.append(sr) or real(w, sr))
    with torch.inference_mode():
        sound = torch.rand(1, 1, 48_000) - 0.5
        assert audio.check_waveform(sound, 48_000) == ([], True)
        assert audio.check_waveform(sound, 48_000) == ([], False)
    assert len(calls) == 1


def test_a_waveform_is_validated_once_per_sound(monkeypatch):
    calls = []
    real = audio.validate_waveform
    monkeypatch.setattr(audio, "validate_waveform", lambda w, sr: calls.append(sr) or real(w, sr))
    sound = torch.zeros(1, 1, 48_000)  # silent: a warning, reported the first time only
    warnings, first = audio.check_waveform(sound, 48_000)
    again, first_again = audio.check_waveform(sound, 48_000)
    assert warnings == again and "silent" in warnings[0] and (first, first_again) == (True, False)
    assert len(calls) == 1
    audio.prepare_windows(sound, 48_000)  # the window step finds it checked too
    assert len(calls) == 1
    sound.add_(0.5)  # changed in place: a new sound, checked again
    audio.check_waveform(sound, 48_000)
    audio.check_waveform(sound.clone(), 48_000)  # another tensor: checked
    assert len(calls) == 3
