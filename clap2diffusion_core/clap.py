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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ClapConfig, ClapModel

from . import laion_convert
from .audio import CLAP_SAMPLE_RATE, WINDOW_SAMPLES, prepare_windows
from .errors import ClapError

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


class ClapEncoder(nn.Module):
    """CLAP audio and text towers with a deterministic 48 kHz, 10 s log-mel front end."""

    def __init__(self, model: ClapModel, tokenizer=None, mel: MelConfig | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mel = mel or MelConfig()
        self.fused = bool(model.config.audio_config.enable_fusion)
        # Buffers, so the front end follows the model to the GPU; kept float32 at use.
        self.register_buffer("mel_filters", mel_filters(self.mel, self.fused), persistent=False)
        self.register_buffer(
            "stft_window", torch.hann_window(self.mel.n_fft, periodic=True), persistent=False
        )

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def compute_device(self) -> torch.device:
        # Not ``device``: ComfyUI's ModelPatcher keeps its own ``model.device`` bookkeeping attribute.
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ----------------------------------------------------------------------------------------
    def log_mel(self, windows: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` 48 kHz audio -> ``[N, frames, n_mels]`` log-mel in dB (float32).

        Matches ClapFeatureExtractor's ``_np_extract_fbank_features``: centred reflect-padded
        STFT, Hann window, power spectrum, mel floor 1e-10, ``10 * log10``.
        """
        spec = (
            torch.stft(
                windows.float(),
                n_fft=self.mel.n_fft,
                hop_length=self.mel.hop_length,
                window=self.stft_window.to(windows.device, torch.float32),
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )
            .abs()
            .pow(2)
        )  # [N, freq, frames]
        mel = torch.matmul(
            spec.transpose(1, 2), self.mel_filters.to(spec.device, torch.float32)
        )  # [N, frames, mels]
        return 10.0 * torch.log10(mel.clamp(min=1e-10))

    @torch.no_grad()
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
            mel = self.log_mel(chunk.to(self.compute_device)).unsqueeze(1)  # [n, 1, frames, mels]
            # Fused models take four mel views; a window of exactly 10 s is "not longer", so the
            # model reads only the first (laion-clap's inference path): no random crops.
            channels = 4 if self.fused else 1
            mel = mel.expand(-1, channels, -1, -1).to(self.dtype)
            is_longer = torch.zeros(mel.shape[0], 1, dtype=torch.bool, device=mel.device)
            features = self.model.get_audio_features(input_features=mel, is_longer=is_longer)
            out.append(_features(features))
        if on_batch is not None:
            on_batch(done, total)
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``N`` strings -> ``[N, D]`` L2-normalised text embeddings."""
        if self.tokenizer is None:
            raise ClapError(
                "This CLAP model came without a tokenizer, so it cannot encode text (audio works)."
            )
        if isinstance(texts, str):
            texts = [texts]
        max_length = min(getattr(self.tokenizer, "model_max_length", 77) or 77, 77)  # laion-clap: 77 tokens
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.compute_device),
            attention_mask=tokens["attention_mask"].to(self.compute_device),
        )
        return F.normalize(_features(features).float(), dim=-1)

    def embed(
        self,
        waveform: torch.Tensor,
        sample_rate: int,
        mode: EmbedMode = "first",
        on_batch: BatchCallback | None = None,
    ) -> torch.Tensor:
        """ComfyUI AUDIO ``[B, C, T]`` -> ``[B', D]`` L2-normalised.

        ``first``: the first 10 s (B' = B). ``mean``: the normalised mean over all 10 s windows
        (B' = B). ``per_window``: one row per window, batch-major (B' = B * N). ``on_batch``: see
        :meth:`encode_windows`.
        """
        if mode not in EMBED_MODES:
            raise ClapError(f"Unknown window mode {mode!r}; use one of {', '.join(EMBED_MODES)}.")
        if waveform.ndim == 2:
            waveform = waveform.unsqueeze(0)
        if mode == "first":
            # Resample only what the first window needs (plus a margin for the filter).
            keep = int(sample_rate * (WINDOW_SAMPLES / CLAP_SAMPLE_RATE)) + 64
            waveform = waveform[..., :keep]
        windows = prepare_windows(waveform, sample_rate)  # [B, N, 480000]
        b, n = windows.shape[:2]
        if mode == "first":
            return self.encode_windows(windows[:, 0], on_batch=on_batch)
        emb = self.encode_windows(windows.reshape(b * n, -1), on_batch=on_batch)  # [B * N, D]
        if mode == "per_window":
            return emb
        return F.normalize(emb.reshape(b, n, -1).mean(dim=1), dim=-1)


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
    mel = MelConfig()
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pre):
        with open(pre, encoding="utf-8") as f:
            mel = MelConfig.from_preprocessor_config(json.load(f))
    return ClapEncoder(model, _load_tokenizer(path), mel)


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
