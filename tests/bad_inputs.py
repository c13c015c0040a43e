"""A corpus of bad, odd and hostile inputs, every file generated at test time (nothing committed).

Sounds (``SOUNDS``): each :class:`SoundCase` writes one file into ComfyUI's input folder and says
what the pack must do with it:

- ``works``: the graph gives an image, and ``twin`` names a second file (written by the same
  module) that must give the *same* image: ``exact`` pixel for pixel, or within ``tolerance``
  of the distance between two different sounds. The twin is how the test states what correct
  is: "192 kHz is resampled" means the 192 kHz file sounds like the 48 kHz file of the same
  signal; "8 channels are mixed to mono" means the 8-channel file sounds like its mono mix.
- ``refused``: the node fails and ComfyUI's ``execution_error`` carries ``message`` (substrings,
  case-insensitive), which name the problem and what to do.

Checkpoint writers (hostile pickles, truncated or reshaped safetensors, files for another base
model) are at the end; the checkpoint tests drop them into the server's model folders.

The reference signal is band-limited to 2.9 kHz and written from the same continuous-time
function at every sample rate, so files at 8 kHz, 44.1 kHz, 48 kHz and 192 kHz hold the same
sound, not resamplings of one another made with the code under test.
"""

from __future__ import annotations

import io
import pickle
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 48_000
SCENE_SECONDS = 4.0
#: The reference sound every approximate twin is compared with (float32, 48 kHz, mono).
REFERENCE = "robust_ref_scene_48k.wav"
#: A different sound of the same kind: the yardstick for "nearly the same image".
OTHER = "robust_ref_other_48k.wav"


# --------------------------------------------------------------------------------------------
# signals


def scene(t: np.ndarray, seed: int = 1234) -> np.ndarray:
    """A tonal texture (24 partials between 150 Hz and 2.8 kHz, slowly modulated), float64.

    Everything stays below 2.9 kHz, so an 8 kHz file holds the same sound as a 192 kHz one (and
    stays clear of the resampler's transition band below 4 kHz). Peak below 0.9.
    """
    rng = np.random.default_rng(seed)
    n = 24
    freqs = rng.uniform(150.0, 2800.0, n)
    phases = rng.uniform(0, 2 * np.pi, n)
    mods = rng.uniform(0.5, 4.0, n)
    mod_phases = rng.uniform(0, 2 * np.pi, n)
    amps = rng.uniform(0.2, 1.0, n)
    out = np.zeros_like(t, dtype=np.float64)
    for f, p, m, q, a in zip(freqs, phases, mods, mod_phases, amps):
        out += a * np.sin(2 * np.pi * f * t + p) * (0.55 + 0.45 * np.sin(2 * np.pi * m * t + q))
    return out * (0.9 / amps.sum())


def scene_at(rate: int, seconds: float = SCENE_SECONDS, seed: int = 1234) -> np.ndarray:
    """The scene sampled at ``rate``: float64 ``[T]``."""
    return scene(np.arange(int(round(rate * seconds))) / rate, seed)


def _write(path: Path, data: np.ndarray, rate: int, subtype: str, fmt: str | None = None) -> None:
    sf.write(str(path), data, rate, subtype=subtype, format=fmt)


def _writer(data: Callable[[], np.ndarray], rate: int, subtype: str, fmt: str | None = None):
    return lambda path: _write(path, data(), rate, subtype, fmt)


def write_float_wav(path: Path, data: np.ndarray, rate: int) -> None:
    """float32 WAV; NaN and Inf survive (soundfile writes IEEE floats as they are)."""
    _write(path, data.astype(np.float32), rate, "FLOAT", "WAV")


def write_truncated_header(path: Path) -> None:
    """The first 30 bytes of a valid WAV: 'RIFF....WAVEfmt ' and half a format chunk."""
    buf = io.BytesIO()
    sf.write(buf, scene_at(RATE, 1.0), RATE, subtype="PCM_16", format="WAV")
    path.write_bytes(buf.getvalue()[:30])


def write_truncated_data(path: Path) -> None:
    """A WAV whose header announces 4 s of 16-bit audio but holds only the first 1 s."""
    buf = io.BytesIO()
    sf.write(buf, s16(scene_at(RATE)), RATE, subtype="PCM_16", format="WAV")
    data = buf.getvalue()
    header = data.index(b"data") + 8
    path.write_bytes(data[: header + RATE * 2])


def write_rate_header(path: Path, rate: int, frames: int = 48_000) -> None:
    """A 16-bit mono WAV that claims ``rate`` Hz (the stdlib writes any rate the header can hold)."""
    samples = (scene_at(RATE, frames / RATE) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def write_png(path: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def eight_channels() -> np.ndarray:
    """``[T, 8]``: the scene plus eight different signals that sum to zero, so the mono mix is the scene."""
    base = scene_at(RATE)
    t = np.arange(base.shape[0]) / RATE
    others = np.stack([0.05 * np.sin(2 * np.pi * (300 + 250 * c) * t + c) for c in range(8)], axis=1)
    others -= others.mean(axis=1, keepdims=True)
    return base[:, None] + others


def clipped() -> np.ndarray:
    """The scene 8x too loud, hard-clipped to int16 full scale (-32768 and 32767 both occur)."""
    loud = np.clip(np.round(scene_at(RATE) * 8 * 32768), -32768, 32767)
    return loud.astype(np.int16)


def write_clipped_float_twin(path: Path) -> None:
    """The very samples of :func:`clipped`, as float32 (what a correct decoder must produce)."""
    write_float_wav(path, clipped().astype(np.float32) / 32768.0, RATE)


def s16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)


def short_clip() -> np.ndarray:
    """0.1 s: 4800 samples of a 1 kHz burst with a decay."""
    t = np.arange(4800) / RATE
    return 0.6 * np.sin(2 * np.pi * 1000 * t) * np.exp(-t / 0.03)


def write_video(path: Path, with_audio: bool, seconds: float = SCENE_SECONDS) -> None:
    """A 16x16 mpeg4 mp4 (10 fps), with the scene as an AAC track or with no audio at all."""
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width = video.height = 16
        video.pix_fmt = "yuv420p"
        sound = out.add_stream("aac", rate=RATE) if with_audio else None
        if sound is not None:
            sound.layout = "mono"
            sound.bit_rate = 128_000
        for i in range(int(seconds * 10)):
            pixels = np.full((16, 16, 3), (i * 20) % 255, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(video.encode())
        if sound is not None:
            pcm = scene_at(RATE, seconds).astype(np.float32)[None]
            for start in range(0, pcm.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start : start + 1024]),
                                                   format="fltp", layout="mono")
                frame.sample_rate = RATE
                out.mux(sound.encode(frame))
            out.mux(sound.encode())


def write_flac_bytes_as_wav(path: Path) -> None:
    buf = io.BytesIO()
    sf.write(buf, s16(scene_at(RATE)), RATE, subtype="PCM_16", format="FLAC")
    path.write_bytes(buf.getvalue())


def write_long_noise(path: Path, seconds: float, rate: int = 16_000, chunk_seconds: float = 60.0) -> None:
    """Low-amplitude noise, 16-bit mono: one ``chunk_seconds`` block of noise written again and
    again (an hour in about a second; memory stays small). Files of any length share their start."""
    block = (np.random.default_rng(7).standard_normal(int(rate * chunk_seconds)) * 300).astype(np.int16)
    left = int(rate * seconds)
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype="PCM_16", format="WAV") as f:
        while left > 0:
            n = min(len(block), left)
            f.write(block[:n])
            left -= n


# --------------------------------------------------------------------------------------------
# the sound corpus


@dataclass(frozen=True)
class SoundCase:
    name: str
    write: Callable[[Path], None]
    verdict: str  # "works" | "refused"
    what: str  # what is odd about it / what correct is
    message: tuple[str, ...] = ()  # refused: substrings of the node's error
    twin: str | None = None  # works: the file that must give the same image
    exact: bool = False  # works: pixel-identical to the twin (else: within tolerance)
    log: tuple[str, ...] = ()  # substrings the server log must show (warnings)
    #: works: also wire Load Audio into core Save Audio (FLAC) and check the decoded samples equal
    #: what libsndfile reads from the file (mono/stereo only: Save Audio writes no other layouts).
    roundtrip: bool = False


@dataclass(frozen=True)
class Twin:
    name: str
    write: Callable[[Path], None]


def _f32(rate: int, seconds: float = SCENE_SECONDS):
    return lambda: scene_at(rate, seconds).astype(np.float32)


TWINS: dict[str, Twin] = {t.name: t for t in (
    Twin(REFERENCE, lambda p: write_float_wav(p, scene_at(RATE), RATE)),
    Twin(OTHER, lambda p: write_float_wav(p, scene_at(RATE, seed=99), RATE)),
    Twin("robust_twin_silence_22k.wav", lambda p: write_float_wav(p, np.zeros(22_050), 22_050)),
    Twin("robust_twin_short_tiled_10s.wav", lambda p: write_float_wav(p, np.tile(short_clip(), 100), RATE)),
    Twin("robust_twin_s16.wav", _writer(lambda: s16(scene_at(RATE)), RATE, "PCM_16", "WAV")),
    Twin("robust_twin_s16_1s.wav", _writer(lambda: s16(scene_at(RATE, 1.0)), RATE, "PCM_16", "WAV")),
    Twin("robust_twin_clipped_float.wav", write_clipped_float_twin),
)}  # fmt: skip


SOUNDS: list[SoundCase] = [
    # ---- refused: not audio, or audio that cannot mean anything
    SoundCase("robust_empty.wav", lambda p: p.write_bytes(b""), "refused",
              "0-byte file", ("empty (0 bytes)", "re-export or re-upload")),
    SoundCase("robust_truncated_header.wav", write_truncated_header, "refused",
              "a WAV cut off inside its header (30 bytes)",
              ("cannot read", "30 bytes", "wav file", "re-export")),
    SoundCase("robust_text.wav", lambda p: p.write_text("These are the lyrics, not the song.\n" * 20), "refused",
              "a text file named .wav", ("cannot read", "text file", "use a wav, flac, mp3 or ogg")),
    SoundCase("robust_png.wav", write_png, "refused",
              "a PNG image named .wav", ("no audio track", "png image", "use a wav, flac, mp3 or ogg")),
    SoundCase("robust_nan.wav",
              lambda p: write_float_wav(p, np.where(np.arange(RATE) % 1000 == 0, np.nan, scene_at(RATE, 1.0)), RATE),
              "refused", "float WAV with 48 NaN samples", ("nan or infinite samples", "the first at 0:00.00", "re-export")),
    SoundCase("robust_inf.wav",
              lambda p: write_float_wav(p, np.where(np.arange(RATE) == 100, np.inf, scene_at(RATE, 1.0)), RATE),
              "refused", "float WAV with one +Inf sample", ("nan or infinite samples (the first at 0:00.00)", "re-export")),
    SoundCase("robust_one_sample.wav", _writer(lambda: np.array([0.5]), 44_100, "PCM_16", "WAV"), "refused",
              "a single sample (0.02 ms)", ("1 sample", "too short", "at least")),
    SoundCase("robust_rate_1hz.wav", lambda p: write_rate_header(p, 1), "refused",
              "a WAV header claiming 1 Hz (48000 samples = 13 hours)", ("header says 1 hz", "8000 hz or more", "re-export")),
    SoundCase("robust_video_no_audio.mp4", lambda p: write_video(p, with_audio=False), "refused",
              "an mp4 with only a video track", ("no audio track", "found: video", "video with sound")),
    # ---- works: the twin states what correct is
    SoundCase("robust_silence.wav", _writer(lambda: np.zeros(3 * RATE), RATE, "PCM_16", "WAV"), "works",
              "3 s of digital silence: the silent CLAP embedding, as any silence (1 s at 22.05 kHz float)",
              twin="robust_twin_silence_22k.wav", exact=True, log=("silent",)),
    SoundCase("robust_short_0.1s.wav", lambda p: write_float_wav(p, short_clip(), RATE), "works",
              "0.1 s: repeated 100 times to fill the 10 s window (same as the tiled 10 s file)",
              twin="robust_twin_short_tiled_10s.wav", exact=True, log=("0.10 s long",)),
    SoundCase("robust_8k.wav", _writer(_f32(8_000), 8_000, "FLOAT", "WAV"), "works",
              "8 kHz: resampled to 48 kHz (sounds like the 48 kHz file of the same signal)", twin=REFERENCE),
    SoundCase("robust_192k.wav", _writer(_f32(192_000), 192_000, "FLOAT", "WAV"), "works",
              "192 kHz: resampled to 48 kHz (sounds like the 48 kHz file of the same signal)", twin=REFERENCE,
              roundtrip=True),
    SoundCase("robust_44k1.wav", _writer(_f32(44_100), 44_100, "FLOAT", "WAV"), "works",
              "44.1 kHz (a ratio of 160/147): resampled to 48 kHz", twin=REFERENCE),
    SoundCase("robust_8ch.wav", _writer(lambda: eight_channels().astype(np.float32), RATE, "FLOAT", "WAV"), "works",
              "8 channels whose mean is the scene: averaged to mono (sounds like the mono scene)", twin=REFERENCE),
    SoundCase("robust_u8.wav", _writer(lambda: scene_at(RATE), RATE, "PCM_U8", "WAV"), "works",
              "8-bit PCM (WAV stores 8 bits unsigned): decoded to [-1, 1], -48 dB quantisation", twin=REFERENCE,
              roundtrip=True),
    SoundCase("robust_s8.aiff", _writer(lambda: scene_at(RATE), RATE, "PCM_S8", "AIFF"), "works",
              "signed 8-bit PCM (AIFF)", twin=REFERENCE, roundtrip=True),
    SoundCase("robust_s16.wav", _writer(lambda: scene_at(RATE), RATE, "PCM_16", "WAV"), "works",
              "16-bit PCM", twin=REFERENCE, roundtrip=True),
    SoundCase("robust_s24.wav", _writer(lambda: scene_at(RATE), RATE, "PCM_24", "WAV"), "works",
              "24-bit PCM", twin=REFERENCE),
    SoundCase("robust_s32.wav", _writer(lambda: scene_at(RATE), RATE, "PCM_32", "WAV"), "works",
              "32-bit integer PCM", twin=REFERENCE, roundtrip=True),
    SoundCase("robust_f64.wav", _writer(lambda: scene_at(RATE), RATE, "DOUBLE", "WAV"), "works",
              "64-bit float PCM: exactly the float32 reference once decoded", twin=REFERENCE, exact=True),
    SoundCase("robust_flac.flac", _writer(lambda: s16(scene_at(RATE)), RATE, "PCM_16", "FLAC"), "works",
              "FLAC 16-bit: lossless, pixel-identical to the same samples in a 16-bit WAV",
              twin="robust_twin_s16.wav", exact=True),
    SoundCase("robust_flac_inside.wav", write_flac_bytes_as_wav, "works",
              "FLAC data in a file named .wav: read by content, identical to the 16-bit WAV",
              twin="robust_twin_s16.wav", exact=True),
    SoundCase("robust_mp3.mp3", _writer(lambda: scene_at(RATE), RATE, "MPEG_LAYER_III", "MP3"), "works",
              "MP3 (lossy, encoder delay)", twin=REFERENCE),
    SoundCase("robust_vorbis.ogg", _writer(lambda: scene_at(RATE), RATE, "VORBIS", "OGG"), "works",
              "Ogg Vorbis (lossy)", twin=REFERENCE),
    SoundCase("robust_opus.opus", _writer(lambda: scene_at(RATE), RATE, "OPUS", "OGG"), "works",
              "Ogg Opus (lossy)", twin=REFERENCE),
    SoundCase("robust_video_with_audio.mp4", lambda p: write_video(p, with_audio=True), "works",
              "an mp4 with an mpeg4 video and an AAC track: the audio track is used", twin=REFERENCE),
    SoundCase("robust_clipped.wav", _writer(clipped, RATE, "PCM_16", "WAV"), "works",
              "hard clipping at int16 full scale: -32768 reads as -1.0, no wrap-around; same image as the "
              "same samples stored as float", twin="robust_twin_clipped_float.wav", exact=True,
              roundtrip=True),
    SoundCase("robust_dc_offset.wav", lambda p: write_float_wav(p, scene_at(RATE) + 0.3, RATE), "works",
              "DC offset of +0.3: below CLAP's 50 Hz lowest band, so it sounds like the scene", twin=REFERENCE,
              roundtrip=True),
    SoundCase("robust_truncated_data.wav", write_truncated_data, "works",
              "header announces 4 s, data stops after 1 s: the samples present are used "
              "(same as a proper 1 s file), and the log says it was cut short", twin="robust_twin_s16_1s.wav",
              exact=True, log=("cut short",)),
    SoundCase("robust_opposite_phase.wav",
              _writer(lambda: np.stack([s16(scene_at(RATE)), -s16(scene_at(RATE))], axis=1), RATE, "PCM_16", "WAV"),
              "works", "stereo with the right channel inverted: the mono mix is silence, and CLAP Encode "
              "says so", twin="robust_twin_silence_22k.wav", exact=True, log=("cancel",)),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# hostile and broken checkpoints


class RunsCode:
    """Unpickling this runs ``exec(source)``: here, writing a marker file."""

    def __init__(self, marker: Path):
        self.source = f"open({str(marker)!r}, 'w').write('this pickle ran code')"

    def __reduce__(self):
        import builtins

        return (builtins.exec, (self.source,))


def write_hostile_pickle(path: Path, marker: Path, kind: str = "zip") -> None:
    """A checkpoint that runs code when unpickled.

    ``zip``: ``torch.save`` (the .pt/.pth/.ckpt format since torch 1.6); ``legacy``: a raw
    protocol-2 pickle (old .pth files); ``protocol0``: a text pickle (no ``\\x80`` magic).
    The payload sits where a state dict would be.
    """
    import torch

    payload = {"state_dict": {"weight": torch.zeros(2)}, "hook": RunsCode(marker)}
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "legacy":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    elif kind == "protocol0":
        path.write_bytes(pickle.dumps(RunsCode(marker), protocol=0))
    else:
        raise ValueError(kind)


@dataclass(frozen=True)
class Sources:
    """What checkpoint writers copy from: the session's test models and the marker of this test."""

    clap_folder: Path  # the tiny transformers CLAP folder
    stage1: Path  # the tiny stage-1 CLAP2Diffusion file
    sd15_checkpoint: Path
    marker: Path  # hostile pickles write here if they ever run


def truncate(src: Path, dst: Path, keep: int | float) -> None:
    """The first ``keep`` bytes (or that fraction) of ``src`` as ``dst``."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])


def small_clap_safetensors(path: Path, projection: int = 512, metadata: dict[str, str] | None = None) -> None:
    """A few tensors under transformers ClapModel names (a partial file is enough to be refused)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "audio_projection.linear1.weight": torch.randn(projection, 768, generator=gen),
        "audio_projection.linear1.bias": torch.zeros(projection),
        "text_projection.linear1.weight": torch.randn(projection, 768, generator=gen),
        "logit_scale_a": torch.zeros(()),
        "audio_model.robust_probe": torch.zeros(1),  # marks the file as transformers CLAP weights
    }
    save_file(tensors, str(path), metadata=metadata)


def clap_config(src_folder: Path, change) -> dict:
    import json

    config = json.loads((src_folder / "config.json").read_text())
    change(config)
    return config


def clap_folder_variant(path: Path, src_folder: Path, change) -> None:
    """A CLAP model folder: the test model's weights (linked, not copied) and a changed config.json."""
    import json

    path.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if (src_folder / name).exists():
            (path / name).symlink_to((src_folder / name).resolve())
    (path / "config.json").write_text(json.dumps(clap_config(src_folder, change)))


def _projection_256(config: dict) -> None:
    config["projection_dim"] = 256
    for sub in ("audio_config", "text_config"):
        if "projection_dim" in config.get(sub, {}):
            config[sub]["projection_dim"] = 256


def _one_more_text_layer(config: dict) -> None:
    config["text_config"]["num_hidden_layers"] = config["text_config"].get("num_hidden_layers", 12) + 1


def single_file_wrong_shapes(path: Path, src: Sources) -> None:
    """A .safetensors of CLAP weights with a config beside it (``<name>.json``) that wants other shapes."""
    import json

    small_clap_safetensors(path)
    path.with_suffix(".json").write_text(json.dumps(clap_config(src.clap_folder, _projection_256)))


def c2d_state(src: Path) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def c2d_variant(path: Path, src: Path, tensors=None, metadata=None) -> None:
    """The stage-1 test file rewritten with changed tensors and/or metadata."""
    from safetensors.torch import save_file

    state, meta = c2d_state(src)
    if tensors is not None:
        state = tensors(state)
    if metadata is not None:
        meta = metadata(meta)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)


def _reshape_first_projector_weight(state: dict) -> dict:
    key = next(k for k in sorted(state) if k.startswith("projector.") and state[k].ndim == 2)
    state[key] = state[key][:, :-16].clone()  # 16 input features short
    return state


def random_c2d(path: Path, **kwargs) -> None:
    from clap2diffusion_core.testing import random_checkpoint

    random_checkpoint(path, **kwargs)


@dataclass(frozen=True)
class CheckpointCase:
    name: str  # file or folder dropped into models/<folder>
    folder: str  # "clap" | "clap2diffusion"
    write: Callable[[Path, Sources], None]
    what: str
    message: tuple[str, ...]  # substrings of the failing node's error (case-insensitive)
    node: str  # the node that must fail
    hostile: str | None = None  # pickle kind for a sanity check that the file really runs code
    graph: dict = field(default_factory=dict)  # robust_support.graph() arguments besides the file


_PICKLE = ("refusing to load", "pickle", "run", "safetensors")
_C2D_PICKLE = ("pytorch pickle", "can run code", "only reads .safetensors")
_MODEL = {"model_strength": 1.0, "conditioning": False}

CHECKPOINTS: list[CheckpointCase] = [
    # ---- CLAP Loader (models/clap)
    CheckpointCase("robust_hostile.pt", "clap", lambda p, s: write_hostile_pickle(p, s.marker, "zip"),
                   "torch.save'd pickle whose __reduce__ runs exec()", _PICKLE, "C2D_ClapLoader", hostile="zip"),
    CheckpointCase("robust_hostile.pth", "clap", lambda p, s: write_hostile_pickle(p, s.marker, "legacy"),
                   "raw protocol-2 pickle (old .pth) that runs exec()", _PICKLE, "C2D_ClapLoader",
                   hostile="legacy"),
    CheckpointCase("robust_hostile.bin", "clap", lambda p, s: write_hostile_pickle(p, s.marker, "protocol0"),
                   "text (protocol 0) pickle named .bin that runs exec()", _PICKLE, "C2D_ClapLoader",
                   hostile="protocol0"),
    CheckpointCase("robust_truncated.safetensors", "clap",
                   lambda p, s: (small_clap_safetensors(p.with_suffix(".full")), truncate(p.with_suffix(".full"), p, 0.6),
                                 p.with_suffix(".full").unlink()),
                   "safetensors cut at 60% (in the tensor data)",
                   ("not a whole safetensors file", "truncated: expected", "found", "download"), "C2D_ClapLoader"),
    CheckpointCase("robust_truncated_header.safetensors", "clap",
                   lambda p, s: (small_clap_safetensors(p.with_suffix(".full")), truncate(p.with_suffix(".full"), p, 100),
                                 p.with_suffix(".full").unlink()),
                   "safetensors cut inside its header (100 bytes)",
                   ("truncated", "header alone should be", "bytes", "download"), "C2D_ClapLoader"),
    CheckpointCase("robust_wrong_shapes", "clap", lambda p, s: clap_folder_variant(p, s.clap_folder, _projection_256),
                   "model folder whose config.json says projection_dim 256, weights are 512",
                   ("do not fit its config.json", "expected (256", "found (512", "config.json that came with"),
                   "C2D_ClapLoader"),
    CheckpointCase("robust_wrong_shapes.safetensors", "clap", single_file_wrong_shapes,
                   "single safetensors with a config beside it that wants other shapes",
                   ("do not fit the clap config", "expected (256, 768), found (512, 768)"), "C2D_ClapLoader"),
    CheckpointCase("robust_missing_weights", "clap",
                   lambda p, s: clap_folder_variant(p, s.clap_folder, _one_more_text_layer),
                   "model folder whose config.json has one more text layer than the weights",
                   ("weights its config.json expects are missing", "text_model.encoder.layer.", "download"),
                   "C2D_ClapLoader"),
    CheckpointCase("robust_no_config.safetensors", "clap", lambda p, s: small_clap_safetensors(p),
                   "transformers CLAP weights with no config (the metadata it needs)",
                   ("no config", "config.json beside it"), "C2D_ClapLoader"),
    CheckpointCase("robust_sd15_in_clap.safetensors", "clap",
                   lambda p, s: p.symlink_to(s.sd15_checkpoint.resolve()),
                   "an SD1.5 checkpoint dropped into models/clap", ("holds no clap weights",), "C2D_ClapLoader"),
    # ---- CLAP2Diffusion Loader (models/clap2diffusion: ComfyUI lists every .pt/.pth/.ckpt/.pkl there too)
    CheckpointCase("robust_hostile.pt", "clap2diffusion", lambda p, s: write_hostile_pickle(p, s.marker, "zip"),
                   "torch.save'd pickle whose __reduce__ runs exec()", _C2D_PICKLE, "C2D_Clap2DiffusionLoader",
                   hostile="zip"),
    CheckpointCase("robust_hostile.pth", "clap2diffusion", lambda p, s: write_hostile_pickle(p, s.marker, "legacy"),
                   "raw protocol-2 pickle (old .pth)", _C2D_PICKLE, "C2D_Clap2DiffusionLoader", hostile="legacy"),
    CheckpointCase("robust_hostile.ckpt", "clap2diffusion", lambda p, s: write_hostile_pickle(p, s.marker, "zip"),
                   "torch.save'd pickle named .ckpt", _C2D_PICKLE, "C2D_Clap2DiffusionLoader", hostile="zip"),
    CheckpointCase("robust_hostile.pkl", "clap2diffusion",
                   lambda p, s: write_hostile_pickle(p, s.marker, "protocol0"),
                   "text (protocol 0) pickle, no \\x80 magic",
                   ("not a safetensors file", "it starts with bytes", "never pickles"), "C2D_Clap2DiffusionLoader",
                   hostile="protocol0"),
    CheckpointCase("robust_empty.safetensors", "clap2diffusion", lambda p, s: p.write_bytes(b""),
                   "0 bytes", ("empty or truncated (0 bytes)", "download it again"), "C2D_Clap2DiffusionLoader"),
    CheckpointCase("robust_truncated.safetensors", "clap2diffusion", lambda p, s: truncate(s.stage1, p, 0.6),
                   "stage-1 file cut at 60% (in the tensor data)",
                   ("truncated: expected", "bytes, found", "download"), "C2D_Clap2DiffusionLoader"),
    CheckpointCase("robust_truncated_header.safetensors", "clap2diffusion", lambda p, s: truncate(s.stage1, p, 200),
                   "stage-1 file cut inside its header (200 bytes)",
                   ("truncated", "header alone should be", "download"), "C2D_Clap2DiffusionLoader"),
    CheckpointCase("robust_wrong_shapes.safetensors", "clap2diffusion",
                   lambda p, s: c2d_variant(p, s.stage1, tensors=_reshape_first_projector_weight),
                   "right format and metadata, one projector weight 16 columns short",
                   ("weights do not match the config", "wrong shape", "expected (", "found ("),
                   "C2D_Clap2DiffusionLoader"),
    CheckpointCase("robust_no_metadata.safetensors", "clap2diffusion",
                   lambda p, s: c2d_variant(p, s.stage1, metadata=lambda m: {}),
                   "the right tensors without metadata", ("missing clap2diffusion metadata", "format_version",
                                                          "save_checkpoint"), "C2D_Clap2DiffusionLoader"),
    CheckpointCase("robust_future_version.safetensors", "clap2diffusion",
                   lambda p, s: c2d_variant(p, s.stage1, metadata=lambda m: {**m, "format_version": "99"}),
                   "format_version 99", ("format_version 99 is newer", "update the pack"),
                   "C2D_Clap2DiffusionLoader"),
    CheckpointCase("robust_sd2.safetensors", "clap2diffusion", lambda p, s: random_c2d(p, context_dim=1024),
                   "stage-1 file for SD2 (context 1024) on the SD1.5 conditioning",
                   ("made for sd2 (context_dim 1024)", "expects context_dim 768 (sd15)", "trained for this base model"),
                   "C2D_ApplyAudioToConditioning"),
    CheckpointCase("robust_sdxl.safetensors", "clap2diffusion", lambda p, s: random_c2d(p, context_dim=2048),
                   "stage-1 file for SDXL (context 2048) on the SD1.5 conditioning",
                   ("made for sdxl (context_dim 2048)", "expects context_dim 768 (sd15)"),
                   "C2D_ApplyAudioToConditioning"),
    CheckpointCase("robust_sd2_stage2.safetensors", "clap2diffusion",
                   lambda p, s: random_c2d(p, context_dim=1024, stage=2, layout="tiny"),
                   "stage-2 file for SD2 (context 1024) on the SD1.5 MODEL",
                   ("context_dim: expected 1024, found 768",), "C2D_ApplyAudioToModel", graph=_MODEL),
    CheckpointCase("robust_full_sd15_stage2.safetensors", "clap2diffusion",
                   lambda p, s: random_c2d(p, stage=2, layout="sd15"),
                   "stage-2 file for the full SD1.5 UNet (16 layers) on the tiny test UNet (4 layers)",
                   ("made for a unet with 16 cross-attention layers", "layers missing from this model"),
                   "C2D_ApplyAudioToModel", graph=_MODEL),
    CheckpointCase("robust_stage1_on_model.safetensors", "clap2diffusion", lambda p, s: random_c2d(p),
                   "stage-1 file (no adapter) on Apply Audio to Model",
                   ("stage 1", "no adapter layers", "apply audio to conditioning"), "C2D_ApplyAudioToModel",
                   graph=_MODEL),
]  # fmt: skip
