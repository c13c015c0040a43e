"""CLAP audio/text embeddings: a transformers ClapModel behind one small, deterministic interface.

``ClapEncoder`` is an ``nn.Module`` (so ComfyUI's ModelPatcher can move and offload it) that
owns its log-mel front end. The mel spectrogram is the one transformers' ClapFeatureExtractor
computes (same filters, equal within 1e-4 dB), done batched in torch on the model's device instead
of per clip in float64 numpy, and with no random cropping: every window is exactly 10 s, so the
same audio always gives the same embedding.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ClapConfig, ClapModel

from . import laion_convert
from .audio import (
    CLAP_SAMPLE_RATE,
    WINDOW_SAMPLES,
    check_waveform,
    count_windows,
    stream_windows,
    waveform_pieces,
)
from .errors import ClapError
from .htsat import pooled_audio_features

log = logging.getLogger(__name__)

EmbedMode = Literal["first", "mean", "per_window"]
#: ``(windows_done, windows_total)``, called between batches of windows.
BatchCallback = Callable[[int, int], None]
EMBED_MODES: tuple[str, ...] = ("first", "mean", "per_window")
CHECKPOINT_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")


@dataclass(frozen=True)
class MelConfig:
    """Log-mel front end of CLAP (laion-clap's values; ClapFeatureExtractor's preprocessor_config)."""

    sample_rate: int = CLAP_SAMPLE_RATE
    n_fft: int = 1024
    hop_length: int = 480
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 14_000.0

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping) -> MelConfig:
        return cls(
            sample_rate=int(cfg.get("sampling_rate", cls.sample_rate)),
            n_fft=int(cfg.get("fft_window_size", cls.n_fft)),
            hop_length=int(cfg.get("hop_length", cls.hop_length)),
            n_mels=int(cfg.get("feature_size", cls.n_mels)),
            f_min=float(cfg.get("frequency_min", cls.f_min)),
            f_max=float(cfg.get("frequency_max", cls.f_max)),
        )


def read_mel_config(folder: str) -> MelConfig:
    """The mel settings saved in a transformers CLAP folder (laion-clap's values if none).

    Hub folders keep them in ``preprocessor_config.json``; transformers 5's ``save_pretrained`` writes
    ``processor_config.json`` with the feature extractor nested under ``"feature_extractor"``. Reading
    only the first would silently give a transformers-5 folder the default mel band (50 Hz, not its own).
    """
    for name, nested in (("preprocessor_config.json", False), ("processor_config.json", True)):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
        if nested:
            cfg = cfg.get("feature_extractor")
        if isinstance(cfg, Mapping):
            return MelConfig.from_preprocessor_config(cfg)
    return MelConfig()


def mel_filters(cfg: MelConfig, fused: bool) -> torch.Tensor:
    """``[n_fft // 2 + 1, n_mels]`` filter bank, as ClapFeatureExtractor picks it.

    Unfused models were trained on librosa's Slaney mels, fused ones on torchaudio's HTK mels.
    """
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=cfg.n_fft // 2 + 1,
        num_mel_filters=cfg.n_mels,
        min_frequency=cfg.f_min,
        max_frequency=cfg.f_max,
        sampling_rate=cfg.sample_rate,
        norm=None if fused else "slaney",
        mel_scale="htk" if fused else "slaney",
    )
    return torch.from_numpy(bank).float()


class ClapAudioTower(nn.Module):
    """CLAP's audio side alone: HTS-AT, its projection and the deterministic log-mel front end.

    ``[N, 480000]`` 48 kHz windows -> ``[N, D]`` L2-normalised embeddings. About a fifth of a
    whole ClapModel (the RoBERTa text tower is the rest), so encoding sound never holds text weights.
    """

    def __init__(self, audio_model: nn.Module, audio_projection: nn.Module, config, mel: MelConfig | None = None):
        super().__init__()
        self.audio_model = audio_model.eval().requires_grad_(False)
        self.audio_projection = audio_projection.eval().requires_grad_(False)
        self.config = config  # transformers ClapAudioConfig
        self.mel = mel or MelConfig()
        self.fused = bool(config.enable_fusion)
        # Buffers, so the front end follows the model to the GPU; kept float32 at use.
        self.register_buffer("mel_filters", mel_filters(self.mel, self.fused), persistent=False)
        self.register_buffer(
            "stft_window", torch.hann_window(self.mel.n_fft, periodic=True), persistent=False
        )

    @property
    def embed_dim(self) -> int:
        return int(self.config.projection_dim)

    @property
    def compute_device(self) -> torch.device:
        # Not ``device``: ComfyUI's ModelPatcher keeps its own ``model.device`` bookkeeping attribute.
        return next(self.audio_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.audio_model.parameters()).dtype

    def log_mel(self, windows: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` 48 kHz audio -> ``[N, frames, n_mels]`` log-mel in dB (float32).

        Matches ClapFeatureExtractor's ``_np_extract_fbank_features``: centred reflect-padded
        STFT, Hann window, power spectrum, mel floor 1e-10, ``10 * log10``.
        """
        spec = torch.stft(
            windows.float(),
            n_fft=self.mel.n_fft,
            hop_length=self.mel.hop_length,
            window=self.stft_window.to(windows.device, torch.float32),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        # |z|^2 as re^2 + im^2 (5x cheaper than abs().pow(2), which takes a square root first),
        # and the filter bank applied as [mels, freq] @ [freq, frames]: no transposed copy.
        power = spec.real.square() + spec.imag.square()  # [N, freq, frames]
        mel = torch.matmul(
            self.mel_filters.to(spec.device, torch.float32).T, power
        ).transpose(1, 2)  # [N, frames, mels]
        return 10.0 * torch.log10(mel.clamp(min=1e-10))

    @torch.inference_mode()
    def encode_windows(
        self, windows: torch.Tensor, batch_size: int = 8, on_batch: BatchCallback | None = None
    ) -> torch.Tensor:
        """``[N, 480000]`` mono 48 kHz windows -> ``[N, D]`` (D = 512) L2-normalised embeddings.

        ``on_batch(done, total)`` is called before each batch and once at the end (windows done so
        far, N): a caller can report progress there, or raise to stop a long file early.
        """
        if windows.ndim != 2 or windows.shape[-1] != WINDOW_SAMPLES:
            raise ClapError(f"Expected windows shaped [N, {WINDOW_SAMPLES}], got {list(windows.shape)}.")
        out = []
        done, total = 0, windows.shape[0]
        for chunk in windows.split(batch_size):
            if on_batch is not None:
                on_batch(done, total)
            done += chunk.shape[0]
            out.append(self._encode_batch(chunk))
        if on_batch is not None:
            on_batch(done, total)
        return torch.cat(out)

    def _encode_batch(self, chunk: torch.Tensor) -> torch.Tensor:
        """``[n, 480000]`` -> ``[n, D]`` normalised float32 (one forward pass)."""
        # The mel one window at a time: a batch's complex STFT is 33 MB per 8 windows, and copies of
        # it were most of what a batch held in memory, for no speed gained.
        mel = torch.cat([self.log_mel(w[None].to(self.compute_device)) for w in chunk]).unsqueeze(1)  # [n, 1, frames, mels]
        # Fused models take four mel views; a window of exactly 10 s is "not longer", so the
        # model reads only the first (laion-clap's inference path): no random crops.
        channels = 4 if self.fused else 1
        mel = mel.expand(-1, channels, -1, -1).to(self.dtype)
        # transformers' HTS-AT forward, reordered for speed and cache (clap2diffusion_core.htsat).
        pooled = pooled_audio_features(self.audio_model, mel)  # [n, 768]
        return F.normalize(self.audio_projection(pooled).float(), dim=-1)

    def embed(
        self,
        waveform: torch.Tensor,
        sample_rate: int,
        mode: EmbedMode = "first",
        on_batch: BatchCallback | None = None,
        batch_size: int = 8,
    ) -> torch.Tensor:
        """ComfyUI AUDIO ``[B, C, T]`` -> ``[B', D]`` L2-normalised, streamed window by window.

        ``first``: the first 10 s (B' = B). ``mean``: the normalised mean over all 10 s windows
        (B' = B). ``per_window``: one row per window, batch-major (B' = B * N). Memory holds a
        batch of windows, not the resampled sound. ``on_batch``: see :meth:`encode_windows`.
        """
        if waveform.ndim == 2:
            waveform = waveform.unsqueeze(0)
        check_waveform(waveform, sample_rate)  # once per sound (Load Audio may have done it)
        total = 1 if mode == "first" else count_windows(waveform.shape[-1], sample_rate)
        limit = None
        if mode == "first":
            # Resample only what the first window needs (plus a margin for the filter).
            limit = int(sample_rate * (WINDOW_SAMPLES / CLAP_SAMPLE_RATE)) + 64
        pieces = waveform_pieces(waveform, sample_rate, max_samples=limit)
        return self.embed_stream(pieces, sample_rate, mode, total, on_batch, batch_size)

    @torch.inference_mode()
    def embed_stream(
        self,
        pieces: Iterable[torch.Tensor],
        sample_rate: int,
        mode: EmbedMode = "first",
        total_windows: int | None = None,
        on_batch: BatchCallback | None = None,
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Pieces of a sound ``[B, C, n]``, in order -> ``[B', D]`` as :meth:`embed`.

        Windows are encoded ``batch_size`` at a time as they fill; ``mean`` keeps a running sum,
        so memory is a batch of windows whatever the length. ``on_batch(done, total)`` runs
        before each batch and at the end (``total`` is ``total_windows``, or ``done`` if unknown).
        """
        if mode not in EMBED_MODES:
            raise ClapError(f"Unknown window mode {mode!r}; use one of {', '.join(EMBED_MODES)}.")
        windows = stream_windows(pieces, sample_rate, first_only=mode == "first")
        rows: list[torch.Tensor] = []  # per batch: [B, n, D]
        running: torch.Tensor | None = None  # mean: the sum so far, [B, D]
        done = 0
        batch: list[torch.Tensor] = []

        def flush() -> None:
            nonlocal running, done
            if on_batch is not None:
                on_batch(done, max(total_windows or 0, done))
            stacked = torch.stack(batch, dim=1)  # [B, n, 480000]
            b, n = stacked.shape[:2]
            emb = self._encode_batch(stacked.reshape(b * n, -1)).reshape(b, n, -1).cpu()  # [B, n, D]
            done += n
            batch.clear()
            if mode == "mean":
                running = emb.sum(1) if running is None else running + emb.sum(1)
            else:
                rows.append(emb)

        for window in windows:  # [B, 480000]
            batch.append(window)
            if sum(w.shape[0] for w in batch) >= batch_size:
                flush()
        if batch:
            flush()
        if on_batch is not None:
            on_batch(done, max(total_windows or 0, done))
        if mode == "mean":
            assert running is not None
            return F.normalize(running / done, dim=-1)
        emb = torch.cat(rows, dim=1)  # [B, N, D]
        return emb[:, 0] if mode == "first" else emb.reshape(-1, emb.shape[-1])


class ClapTextTower(nn.Module):
    """CLAP's text side alone: RoBERTa, its projection and the tokenizer. ``N`` strings -> ``[N, D]``.

    What Audio to Prompt (label embeddings) and the text fit need; sound encoding never loads it.
    """

    def __init__(self, text_model: nn.Module, text_projection: nn.Module, config, tokenizer=None):
        super().__init__()
        self.text_model = text_model.eval().requires_grad_(False)
        self.text_projection = text_projection.eval().requires_grad_(False)
        self.config = config  # transformers ClapTextConfig
        self.tokenizer = tokenizer

    @property
    def embed_dim(self) -> int:
        return int(self.config.projection_dim)

    @property
    def compute_device(self) -> torch.device:
        return next(self.text_model.parameters()).device

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``N`` strings -> ``[N, D]`` L2-normalised text embeddings."""
        if self.tokenizer is None:
            raise ClapError(
                "This CLAP model came without a tokenizer, so it cannot encode text (audio works). "
                "Use the whole transformers folder (with tokenizer.json), or put the tokenizer files "
                "beside the .pt/.safetensors file."
            )
        if isinstance(texts, str):
            texts = [texts]
        max_length = min(getattr(self.tokenizer, "model_max_length", 77) or 77, 77)  # laion-clap: 77 tokens
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out = self.text_model(
            input_ids=tokens["input_ids"].to(self.compute_device),
            attention_mask=tokens["attention_mask"].to(self.compute_device),
        )
        return F.normalize(self.text_projection(_pooled(out)).float(), dim=-1)


class ClapEncoder(nn.Module):
    """A whole transformers ClapModel with both towers (training, tools, tests).

    The nodes load the towers apart (:class:`ClapTowers`); this keeps one object for code that
    wants both. :attr:`audio` and :attr:`text` are tower views sharing this model's weights.
    """

    def __init__(self, model: ClapModel, tokenizer=None, mel: MelConfig | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mel = mel or MelConfig()
        self.fused = bool(model.config.audio_config.enable_fusion)
        # Views, not submodules: the weights are registered once, under ``model``.
        object.__setattr__(
            self, "audio", ClapAudioTower(model.audio_model, model.audio_projection, model.config.audio_config, self.mel)
        )
        object.__setattr__(
            self, "text", ClapTextTower(model.text_model, model.text_projection, model.config.text_config, tokenizer)
        )

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def compute_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def log_mel(self, windows: torch.Tensor) -> torch.Tensor:
        return self.audio.log_mel(windows)

    def encode_windows(self, windows: torch.Tensor, batch_size: int = 8,
                       on_batch: BatchCallback | None = None) -> torch.Tensor:  # fmt: skip
        return self.audio.encode_windows(windows, batch_size, on_batch)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.text.encode_text(texts)

    def embed(self, waveform: torch.Tensor, sample_rate: int, mode: EmbedMode = "first",
              on_batch: BatchCallback | None = None) -> torch.Tensor:  # fmt: skip
        return self.audio.embed(waveform, sample_rate, mode, on_batch)


def _pooled(output) -> torch.Tensor:
    """The pooled output of a transformers tower (an output object, or a tuple in 4.x)."""
    value = getattr(output, "pooler_output", None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]
    raise ClapError(f"Unexpected CLAP output type {type(output).__name__} from transformers.")


def _features(output) -> torch.Tensor:
    """transformers 4.x returns the projected features; 5.x an output object holding them."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("audio_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise ClapError(f"Unexpected CLAP output type {type(output).__name__} from transformers.")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_clap(path: str | os.PathLike) -> ClapEncoder:
    """A CLAP model from disk, on the CPU in float32.

    - a transformers folder (``config.json`` + weights; tokenizer and ``preprocessor_config.json``
      used when present),
    - a ``.safetensors`` file with a config json beside it (``<name>.json`` or ``config.json``),
      or one holding laion-clap keys,
    - a laion-clap ``.pt``/``.pth`` checkpoint (converted on load; read with
      ``weights_only=True``, never unpickling code).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_folder(path)
    if not os.path.isfile(path):
        raise ClapError(f"CLAP model not found: {path!r}. Put it in ComfyUI's models/clap folder.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        _check_safetensors(path)
        return _from_state_dict(load_file(path), path)
    if path.endswith(CHECKPOINT_EXTENSIONS):
        return _from_state_dict(_torch_load(path), path)
    raise ClapError(
        f"Cannot load {os.path.basename(path)!r} as CLAP: expected a folder with config.json, "
        f"a .safetensors file or a laion-clap .pt/.pth checkpoint."
    )


def _load_folder(path: str) -> ClapEncoder:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ClapError(f"{path!r} has no config.json: not a transformers CLAP folder.")
    config = ClapConfig.from_pretrained(path)
    if config.model_type != "clap":
        raise ClapError(f"{path!r} holds a {config.model_type!r} model, not CLAP.")
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            _check_safetensors(os.path.join(path, name))
    # transformers only logs weights that do not fit the config and fills missing ones with random
    # values: ask what happened and refuse, naming expected and found.
    model, info = ClapModel.from_pretrained(
        path, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True
    )
    _check_loading_info(model, info, path)
    model = model.float()
    return ClapEncoder(model, _load_tokenizer(path), read_mel_config(path))


def _check_safetensors(path: str) -> None:
    from .checkpoint import safetensors_damage

    damage = safetensors_damage(path)
    if damage:
        raise ClapError(f"{os.path.basename(path)!r} is not a whole safetensors file: {damage}. Download or copy it again.")


def _check_loading_info(model: ClapModel, info: Mapping, path: str) -> None:
    """Refuse weights that do not fit the config (transformers would re-initialise them randomly)."""
    wrong = [f"{key}: expected {tuple(expected)}, found {tuple(found)}"
             for key, found, expected in info.get("mismatched_keys") or ()]  # fmt: skip
    params = dict(model.named_parameters())
    missing = sorted(k for k in info.get("missing_keys") or () if k in params)
    if wrong:
        raise ClapError(
            f"{os.path.basename(path)!r}: weights do not fit its config.json ({len(wrong)} tensors): "
            f"{_sample(wrong)}. Use the config.json that came with these weights."
        )
    if missing:
        raise ClapError(
            f"{os.path.basename(path)!r}: {len(missing)} weights its config.json expects are missing from the "
            f"weights file ({_sample(missing)}): the download is incomplete or the config belongs to another "
            "CLAP model. Download the whole model folder again."
        )


def _load_tokenizer(path: str):
    names = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - audio still works without text
        log.warning("CLAP tokenizer in %s could not be loaded (%s); text encoding disabled.", path, err)
        return None


def _torch_load(path: str) -> Mapping:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message goes on to explain how to load it unsafely: keep only what it found.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        detail = f"it asks for {found.group(1)}" if found else str(err).splitlines()[0]
        raise ClapError(
            f"Refusing to load {os.path.basename(path)!r}: it is a pickle that needs Python code to "
            f"load ({detail}), and running code from a model file is unsafe. Re-save only its weights "
            f"(torch.save(ckpt['state_dict'], ...)) or use a safetensors file."
        ) from None
    except Exception as err:  # noqa: BLE001 - zip/pickle corruption
        raise ClapError(f"Cannot read {os.path.basename(path)!r} as a PyTorch checkpoint: {err}") from None


def _from_state_dict(checkpoint: Mapping, path: str) -> ClapEncoder:
    sd = laion_convert.unwrap_state_dict(checkpoint)
    if laion_convert.is_laion_state_dict(sd):
        try:
            sd, config = laion_convert.convert_laion_checkpoint(sd)
        except laion_convert.LaionConversionError as err:
            raise ClapError(f"{os.path.basename(path)!r}: {err}") from None
        tokenizer = _load_tokenizer(os.path.dirname(path)) if _has_side_tokenizer(path) else None
        return ClapEncoder(build_model(config, sd, path), tokenizer)
    if not any(k.startswith(("audio_model.", "text_model.")) for k in sd):
        raise ClapError(
            f"{os.path.basename(path)!r} holds no CLAP weights (neither laion-clap nor transformers keys)."
        )
    config = _side_config(path)
    return ClapEncoder(build_model(config, sd, path), None)


def _has_side_tokenizer(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.dirname(path), "tokenizer.json"))


def _side_config(path: str) -> ClapConfig:
    stem = os.path.splitext(path)[0]
    for candidate in (
        stem + ".json",
        stem + ".config.json",
        os.path.join(os.path.dirname(path), "config.json"),
    ):
        if os.path.isfile(candidate):
            return ClapConfig.from_json_file(candidate)
    raise ClapError(
        f"{os.path.basename(path)!r} holds transformers CLAP weights but no config: put its config.json "
        f"beside it as {os.path.basename(stem)}.json, or use the whole model folder."
    )


def build_model(config: ClapConfig, state_dict: Mapping[str, torch.Tensor], source: str = "") -> ClapModel:
    """A ClapModel holding exactly ``state_dict``; built on the meta device (no random init)."""
    with torch.device("meta"):
        model = ClapModel(config)
    expected = model.state_dict()
    wrong = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
             for k, v in state_dict.items() if k in expected and expected[k].shape != v.shape]  # fmt: skip
    if wrong:
        raise ClapError(
            f"{os.path.basename(source) or 'CLAP weights'} do not fit the CLAP config ({len(wrong)} tensors): "
            f"{_sample(wrong)}. Use the config that came with these weights."
        )
    result = model.load_state_dict(dict(state_dict), strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ClapError(
            f"{os.path.basename(source) or 'CLAP weights'} do not fit the CLAP config: "
            f"missing {_sample(result.missing_keys)}, unexpected {_sample(result.unexpected_keys)}."
        )
    return model.float().eval()


# --------------------------------------------------------------------------------------------
# One tower at a time
# --------------------------------------------------------------------------------------------

Tower = Literal["audio", "text"]
_TOWER_PREFIXES: dict[str, tuple[str, ...]] = {
    "audio": ("audio_model.", "audio_projection."),
    "text": ("text_model.", "text_projection."),
}


def load_clap_tower(path: str | os.PathLike, tower: Tower) -> ClapAudioTower | ClapTextTower:
    """One CLAP tower from the same files :func:`load_clap` reads, the other tower's weights never
    built: ``"audio"`` -> :class:`ClapAudioTower` (what encoding sound needs, ~120 MB float32 for
    HTSAT-tiny), ``"text"`` -> :class:`ClapTextTower` (label embeddings, the text fit; ~480 MB).

    A safetensors source is read key by key, so only the tower's tensors are ever in memory; a
    laion ``.pt`` is a pickle and is read whole, converted, and the other tower dropped at once.
    """
    if tower not in _TOWER_PREFIXES:
        raise ClapError(f"Unknown CLAP tower {tower!r}; expected 'audio' or 'text'.")
    path = os.fspath(path)
    config, state_dict, mel, tokenizer_dir = _tower_source(path, _TOWER_PREFIXES[tower])
    if tower == "audio":
        from transformers import ClapAudioModelWithProjection

        module = _build(ClapAudioModelWithProjection, config.audio_config, state_dict, path)
        return ClapAudioTower(module.audio_model, module.audio_projection, config.audio_config, mel).float()
    from transformers import ClapTextModelWithProjection

    module = _build(ClapTextModelWithProjection, config.text_config, state_dict, path)
    tokenizer = _load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    return ClapTextTower(module.text_model, module.text_projection, config.text_config, tokenizer).float()


def _tower_source(path: str, prefixes: tuple[str, ...]) -> tuple[ClapConfig, dict, MelConfig, str | None]:
    """(config, the tower's tensors, mel settings, folder holding a tokenizer or None)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ClapError(f"{path!r} has no config.json: not a transformers CLAP folder.")
        config = ClapConfig.from_pretrained(path)
        if config.model_type != "clap":
            raise ClapError(f"{path!r} holds a {config.model_type!r} model, not CLAP.")
        names = sorted(os.listdir(path))
        weights = [os.path.join(path, n) for n in names if n.endswith(".safetensors")]
        state: dict[str, torch.Tensor] = {}
        if weights:
            for file in weights:
                state.update(_read_safetensors(file, prefixes))
        else:
            bins = [os.path.join(path, n) for n in names if n.endswith(".bin")]
            if not bins:
                raise ClapError(f"{path!r} holds no weights (model.safetensors or pytorch_model.bin).")
            for file in bins:
                state.update({k: v for k, v in _torch_load(file).items() if k.startswith(prefixes)})
        return config, state, read_mel_config(path), path
    if not os.path.isfile(path):
        raise ClapError(f"CLAP model not found: {path!r}. Put it in ComfyUI's models/clap folder.")
    side_tokenizer = os.path.dirname(path) if _has_side_tokenizer(path) else None
    if path.endswith(".safetensors"):
        state = _read_safetensors(path, prefixes)
        if state:  # transformers keys
            return _side_config(path), state, MelConfig(), None
        from safetensors.torch import load_file

        checkpoint: Mapping = load_file(path)  # laion keys: converted whole
    elif path.endswith(CHECKPOINT_EXTENSIONS):
        checkpoint = _torch_load(path)
    else:
        raise ClapError(
            f"Cannot load {os.path.basename(path)!r} as CLAP: expected a folder with config.json, "
            f"a .safetensors file or a laion-clap .pt/.pth checkpoint."
        )
    sd = laion_convert.unwrap_state_dict(checkpoint)
    del checkpoint
    if laion_convert.is_laion_state_dict(sd):
        try:
            sd, config = laion_convert.convert_laion_checkpoint(sd)
        except laion_convert.LaionConversionError as err:
            raise ClapError(f"{os.path.basename(path)!r}: {err}") from None
        return config, {k: v for k, v in sd.items() if k.startswith(prefixes)}, MelConfig(), side_tokenizer
    if not any(k.startswith(("audio_model.", "text_model.")) for k in sd):
        raise ClapError(
            f"{os.path.basename(path)!r} holds no CLAP weights (neither laion-clap nor transformers keys)."
        )
    return _side_config(path), {k: v for k, v in sd.items() if k.startswith(prefixes)}, MelConfig(), None


def _read_safetensors(path: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    _check_safetensors(path)
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefixes)}


def _build(cls, config, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """``cls(config)`` holding exactly ``state_dict``; built on the meta device (no random init)."""
    with torch.device("meta"):
        module = cls(config)
    expected = module.state_dict()
    name = os.path.basename(source) or "CLAP weights"
    # Name the config the user can replace: a folder's config.json, else the one given with the file.
    config_name = "its config.json" if os.path.isdir(source) else "the CLAP config"
    wrong = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
             for k, v in state_dict.items() if k in expected and expected[k].shape != v.shape]  # fmt: skip
    if wrong:
        raise ClapError(
            f"{name!r}: weights do not fit {config_name} ({len(wrong)} tensors): {_sample(wrong)}. "
            f"Use the {'config.json' if os.path.isdir(source) else 'config'} that came with these weights."
        )
    result = module.load_state_dict(dict(state_dict), strict=False, assign=True)
    if result.missing_keys:
        raise ClapError(
            f"{name!r}: {len(result.missing_keys)} weights {config_name} expects are missing from the weights "
            f"({_sample(result.missing_keys)}): the download is incomplete or the config belongs to another "
            "CLAP model. Download the whole model again."
        )
    return module.float().eval()


def _sample(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def describe(encoder: ClapEncoder) -> dict:
    """Summary for logs and UI: architecture, fusion, text support, mel front end."""
    audio = encoder.model.config.audio_config
    return {
        "audio": f"HTSAT depths={list(audio.depths)} width={audio.patch_embeds_hidden_size}",
        "fused": encoder.fused,
        "text": encoder.tokenizer is not None,
        "embed_dim": encoder.embed_dim,
        "mel": asdict(encoder.mel),
    }
