"""laion-clap checkpoints (630k-audioset-best.pt & co.) -> transformers ClapModel weights + config.

laion-clap pairs an HTS-AT (Swin) audio branch with a RoBERTa text branch. transformers' ClapModel
holds the same networks under other names, with the Swin ``qkv`` projection split in three.
The config is read off the tensor shapes, so HTSAT-tiny and -base, and the fused (``aff_2d``)
variants, convert without guessing from file names.

Only what inference needs is kept: the spectrogram layers (recomputed by our feature code), the
AudioSet classification head and the contrastive-training MLPs (``*_transform``) are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import ClapConfig

from .errors import LaionConversionError

_AUDIO = "audio_model.audio_encoder."
_TEXT = "text_model."

# Keys laion-clap stores that ClapModel has no place for (training heads, fixed STFT/mel layers,
# Swin shift masks that ClapModel recomputes).
_DROP = re.compile(
    r"^(audio_branch\.(spectrogram_extractor|logmel_extractor|tscam_conv|head)\."
    r"|audio_branch\.layers\.\d+\.blocks\.\d+\.attn_mask$"
    r"|(audio|text)_transform\.)"
)

# Renames inside a Swin block: laion (timm-style) -> transformers.
_BLOCK_RENAMES = (
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.proj.", "attention.output.dense."),
    ("attn.relative_position", "attention.self.relative_position"),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)

_BLOCK = re.compile(r"^(layers\.\d+\.blocks\.\d+\.)(.*)$")
_PROJECTION = re.compile(r"^(audio|text)_projection\.(0|2)\.(weight|bias)$")


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of a laion-clap ``.pt``: under ``state_dict`` (or not), ``module.`` prefixes removed."""
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(sd, Mapping):
        raise LaionConversionError("The checkpoint holds no state dict (expected a dict of tensors).")
    out = {}
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            out[key[len("module.") :] if key.startswith("module.") else key] = value
    return out


def is_laion_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for laion-clap key names (``audio_branch.*``, ``text_branch.*``), ``module.`` or not."""
    return any(k.removeprefix("module.").startswith(("audio_branch.", "text_branch.")) for k in sd)


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split) laion-clap weights to transformers ClapModel keys."""
    sd = unwrap_state_dict(sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _DROP.match(key):
            continue
        if key.startswith("audio_branch."):
            out.update(_convert_audio_key(key[len("audio_branch.") :], value))
        elif key.startswith("text_branch."):
            out[_TEXT + key[len("text_branch.") :]] = value
        elif m := _PROJECTION.match(key):
            out[f"{m[1]}_projection.linear{1 if m[2] == '0' else 2}.{m[3]}"] = value
        elif key in ("logit_scale_a", "logit_scale_t"):
            out[key] = value
        else:
            raise LaionConversionError(f"Unexpected key in a laion-clap checkpoint: {key!r}.")
    _add_text_buffers(out)
    return out


def _convert_audio_key(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    if key.startswith("bn0."):
        return {_AUDIO + "batch_norm." + key[len("bn0.") :]: value}
    if key.startswith(("fusion_model.", "mel_conv1d.")):
        raise LaionConversionError(
            "This laion-clap checkpoint uses 1-d feature fusion (daf_1d/aff_1d/iaff_1d); transformers' "
            "ClapModel, and so this pack, supports only the 'aff_2d' fused models and unfused ones."
        )
    m = _BLOCK.match(key)
    if m is None:  # patch_embed.*, layers.N.downsample.*, norm.*: same names
        return {_AUDIO + key: value}
    prefix, rest = m[1], m[2]
    if rest.startswith("attn.qkv."):
        # Swin's fused projection: rows are [query; key; value].
        suffix = rest[len("attn.qkv.") :]
        q, k, v = value.chunk(3, dim=0)
        base = _AUDIO + prefix + "attention.self."
        return {base + f"query.{suffix}": q, base + f"key.{suffix}": k, base + f"value.{suffix}": v}
    for old, new in _BLOCK_RENAMES:
        if rest.startswith(old):
            return {_AUDIO + prefix + new + rest[len(old) :]: value}
    raise LaionConversionError(f"Unexpected audio key in a laion-clap checkpoint: audio_branch.{key!r}.")


def _add_text_buffers(out: dict[str, torch.Tensor]) -> None:
    """RoBERTa's index buffers: older transformers saved ``position_ids``, none saved ``token_type_ids``."""
    table = out.get(_TEXT + "embeddings.position_embeddings.weight")
    if table is None:  # not a RoBERTa text branch: infer_config says so
        return
    positions = table.shape[0]
    ids = torch.arange(positions).unsqueeze(0)
    out.setdefault(_TEXT + "embeddings.position_ids", ids)
    out[_TEXT + "embeddings.position_ids"] = out[_TEXT + "embeddings.position_ids"].long()
    out.setdefault(_TEXT + "embeddings.token_type_ids", torch.zeros_like(ids))


def infer_config(sd: Mapping[str, torch.Tensor]) -> ClapConfig:
    """A ClapConfig that fits the tensors of a laion-clap state dict (laion or converted keys)."""
    sd = unwrap_state_dict(sd)
    if is_laion_state_dict(sd):
        sd = convert_state_dict(sd)
    try:
        return ClapConfig(
            audio_config=_audio_config(sd), text_config=_text_config(sd), projection_dim=_proj_dim(sd)
        )
    except KeyError as err:
        raise LaionConversionError(
            f"Not a laion-clap HTSAT + RoBERTa checkpoint: missing {err.args[0]!r}. "
            "PANN audio branches and CLIP-style text branches are not supported."
        ) from None


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m[1] for k in sd if (m := regex.match(k))})


def _proj_dim(sd: Mapping[str, torch.Tensor]) -> int:
    return sd["audio_projection.linear2.weight"].shape[0]


def _audio_config(sd: Mapping[str, torch.Tensor]) -> dict:
    patch = sd[_AUDIO + "patch_embed.proj.weight"]  # [embed, in_channels, p, p]
    n_layers = _count(sd, re.escape(_AUDIO) + r"layers\.(\d+)\.")
    depths = [_count(sd, re.escape(_AUDIO) + rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(n_layers)]
    heads = [
        sd[_AUDIO + f"layers.{i}.blocks.0.attention.self.relative_position_bias_table"].shape[1]
        for i in range(n_layers)
    ]
    table = sd[_AUDIO + "layers.0.blocks.0.attention.self.relative_position_bias_table"].shape[0]
    window = (int(round(table**0.5)) + 1) // 2  # table has (2w - 1)^2 rows
    fusion = (_AUDIO + "patch_embed.mel_conv2d.weight") in sd  # aff_2d: the only fusion ClapModel has
    return dict(
        patch_embeds_hidden_size=patch.shape[0],
        patch_embed_input_channels=patch.shape[1],
        patch_size=patch.shape[-1],
        patch_stride=[patch.shape[-1], patch.shape[-1]],
        depths=depths,
        num_attention_heads=heads,
        window_size=window,
        hidden_size=sd[_AUDIO + "norm.weight"].shape[0],
        num_mel_bins=sd[_AUDIO + "batch_norm.weight"].shape[0],
        projection_dim=_proj_dim(sd),
        enable_fusion=fusion,
        fusion_type="aff_2d" if fusion else None,
    )


def _text_config(sd: Mapping[str, torch.Tensor]) -> dict:
    vocab, hidden = sd[_TEXT + "embeddings.word_embeddings.weight"].shape
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=_count(sd, re.escape(_TEXT) + r"encoder\.layer\.(\d+)\."),
        num_attention_heads=hidden // 64,  # RoBERTa's head size; not recoverable from shapes
        intermediate_size=sd[_TEXT + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd[_TEXT + "embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd[_TEXT + "embeddings.token_type_embeddings.weight"].shape[0],
        layer_norm_eps=1e-5,  # roberta-base, which laion-clap's text branch is
        projection_dim=_proj_dim(sd),
    )


def convert_laion_checkpoint(checkpoint: Mapping) -> tuple[dict[str, torch.Tensor], ClapConfig]:
    """laion-clap checkpoint (as ``torch.load`` returns it) -> (ClapModel state dict, ClapConfig)."""
    sd = unwrap_state_dict(checkpoint)
    if not is_laion_state_dict(sd):
        raise LaionConversionError(
            "Not a laion-clap checkpoint: no 'audio_branch.*' / 'text_branch.*' weights found."
        )
    converted = convert_state_dict(sd)
    return converted, infer_config(converted)
