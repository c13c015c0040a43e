"""laion-clap checkpoints -> transformers ClapModel, checked against the real laion-clap code.

A real ``laion_clap`` CLAP module (HTSAT audio branch, RoBERTa text branch) is built with random
weights, saved as a ``.pt`` the way laion-clap saves (``{"state_dict": {"module.*": ...}}``),
converted, and loaded into ClapModel with ``strict=True``. The strongest check: both models give
the same audio and text embeddings for the same input.

laion-clap pins numpy<2, so it is installed with ``--no-deps`` plus what its model code imports
(see requirements-dev.txt); these tests skip where it is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import ClapModel, RobertaConfig, RobertaModel

from clap2diffusion_core.clap import load_clap, load_clap_tower
from clap2diffusion_core.laion_convert import (
    LaionConversionError,
    convert_laion_checkpoint,
    infer_config,
    is_laion_state_dict,
)

HTSAT_TINY = dict(
    audio_length=1024,
    clip_samples=480000,
    mel_bins=64,
    sample_rate=48000,
    window_size=1024,
    hop_size=480,
    fmin=50,
    fmax=14000,
    class_num=527,
    model_type="HTSAT",
    model_name="tiny",
)


def laion_model_module():
    """laion_clap's ``clap_module.model`` without its package ``__init__`` (which pulls in the
    training stack: webdataset, wandb, sklearn, ...)."""
    if importlib.util.find_spec("laion_clap") is None:
        pytest.skip(
            "laion-clap is not installed (pip install --no-deps laion-clap; see requirements-dev.txt)"
        )
    pytest.importorskip("torchlibrosa")
    pytest.importorskip("h5py")
    if "clap_module.model" not in sys.modules:
        root = Path(importlib.util.find_spec("laion_clap").submodule_search_locations[0]) / "clap_module"
        package = types.ModuleType("clap_module")
        package.__path__ = [str(root)]
        sys.modules["clap_module"] = package
    return importlib.import_module("clap_module.model")


def build_laion_clap(monkeypatch, roberta: RobertaConfig, fused: bool = False, model_name: str = "tiny"):
    """A real laion-clap CLAP with random weights; RoBERTa built offline from ``roberta``."""
    model_module = laion_model_module()
    # laion-clap downloads roberta-base here; build the same architecture from a config instead.
    monkeypatch.setattr(
        model_module.RobertaModel,
        "from_pretrained",
        classmethod(lambda cls, name, **kw: RobertaModel(roberta)),
    )
    torch.manual_seed(0)
    text_cfg = dict(
        context_length=77, vocab_size=roberta.vocab_size, width=512, heads=8, layers=12, model_type="roberta"
    )
    clap = model_module.CLAP(
        embed_dim=768 if model_name == "tiny" else 1024,
        audio_cfg=dict(HTSAT_TINY, model_name=model_name),
        text_cfg=text_cfg,
        enable_fusion=fused,
        fusion_type="aff_2d" if fused else "None",
        joint_embed_shape=512,
        mlp_act="relu",
    )
    return clap.eval()


def small_roberta() -> RobertaConfig:
    """roberta-base's shape conventions (514 positions, one token type, eps 1e-5), 2 layers."""
    return RobertaConfig(
        vocab_size=1000,
        hidden_size=768,  # laion-clap's text projection is hard-wired to 768 inputs
        num_hidden_layers=2,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
    )


def save_like_laion(clap, path: Path) -> Path:
    """laion-clap's training saves DDP weights: ``module.``-prefixed keys under ``state_dict``."""
    state = {"module." + k: v for k, v in clap.state_dict().items()}
    torch.save({"epoch": 45, "state_dict": state}, path)
    return path


def laion_audio_embedding(clap, mel: torch.Tensor, fused: bool) -> torch.Tensor:
    """laion-clap's audio path from a log-mel ``[B, 1, T, 64]`` (its own STFT/mel layers bypassed)."""
    branch = clap.audio_branch
    if fused:
        batch = {
            "mel_fusion": mel.expand(-1, 4, -1, -1),
            "longer": torch.zeros(mel.shape[0], 1, dtype=torch.bool),
        }
    else:
        batch = {"waveform": mel}
    front_end = branch.spectrogram_extractor, branch.logmel_extractor
    branch.spectrogram_extractor = branch.logmel_extractor = torch.nn.Identity()
    try:
        with torch.no_grad():
            return F.normalize(clap.audio_projection(branch(batch, device=mel.device)["embedding"]), dim=-1)
    finally:
        branch.spectrogram_extractor, branch.logmel_extractor = front_end


def hf_audio_embedding(model: ClapModel, mel: torch.Tensor, fused: bool) -> torch.Tensor:
    features = mel.expand(-1, 4 if fused else 1, -1, -1)
    with torch.no_grad():
        out = model.get_audio_features(
            input_features=features, is_longer=torch.zeros(mel.shape[0], 1, dtype=torch.bool)
        )
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(out, dim=-1)


def convert_and_load_strict(path: Path) -> tuple[ClapModel, dict]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict, config = convert_laion_checkpoint(checkpoint)
    model = ClapModel(config).eval()
    model.load_state_dict(state_dict, strict=True)  # no missing, no unexpected key
    return model, state_dict


@pytest.fixture(scope="module")
def laion_unfused():
    """One real laion-clap model (small RoBERTa), shared: building it is the slow part."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return build_laion_clap(monkeypatch, small_roberta())


@pytest.fixture(scope="module")
def mel() -> torch.Tensor:
    """A batch of two random log-mel inputs, ``[2, 1, 1001, 64]`` in dB."""
    return torch.randn(2, 1, 1001, 64, generator=torch.Generator().manual_seed(0)) * 20 - 40


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused-aff_2d"])
def test_laion_checkpoint_converts_loads_strictly_and_matches(
    tmp_path, monkeypatch, laion_unfused, mel, fused
):
    clap = build_laion_clap(monkeypatch, small_roberta(), fused=True) if fused else laion_unfused
    path = save_like_laion(clap, tmp_path / "630k-audioset-best.pt")

    model, _ = convert_and_load_strict(path)

    config = model.config
    assert list(config.audio_config.depths) == [2, 2, 6, 2]
    assert list(config.audio_config.num_attention_heads) == [4, 8, 16, 32]
    assert config.audio_config.enable_fusion is fused
    assert (config.text_config.num_hidden_layers, config.text_config.vocab_size) == (2, 1000)
    assert config.text_config.max_position_embeddings == 514
    # Same audio embedding from the same mel input: the mapping (and the qkv split) is right.
    assert torch.allclose(
        hf_audio_embedding(model, mel, fused), laion_audio_embedding(clap, mel, fused), atol=1e-4
    )


def test_text_embeddings_match(tmp_path, laion_unfused):
    clap = laion_unfused
    model, _ = convert_and_load_strict(save_like_laion(clap, tmp_path / "ckpt.pt"))
    ids = torch.tensor([[0, 5, 17, 99, 2, 1, 1], [0, 42, 7, 8, 9, 10, 2]])
    mask = (ids != 1).long()

    with torch.no_grad():
        theirs = F.normalize(
            clap.encode_text({"input_ids": ids, "attention_mask": mask}, device="cpu"), dim=-1
        )
        ours = model.get_text_features(input_ids=ids, attention_mask=mask)
    ours = F.normalize(ours if isinstance(ours, torch.Tensor) else ours.pooler_output, dim=-1)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_load_clap_converts_a_laion_pt_on_load(tmp_path, laion_unfused, mel):
    clap = laion_unfused
    encoder = load_clap(save_like_laion(clap, tmp_path / "630k-audioset-best.pt"))

    assert not encoder.fused and encoder.tokenizer is None
    features = encoder.model.get_audio_features(input_features=mel)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    assert torch.allclose(F.normalize(features, dim=-1), laion_audio_embedding(clap, mel, False), atol=1e-4)


def test_the_audio_tower_alone_loads_from_a_laion_pt_and_matches_laion(tmp_path, laion_unfused, mel):
    clap = laion_unfused
    tower = load_clap_tower(save_like_laion(clap, tmp_path / "630k-audioset-best.pt"), "audio")

    assert {name.split(".")[0] for name, _ in tower.named_parameters()} == {"audio_model", "audio_projection"}
    pooled = tower.audio_model(input_features=mel).pooler_output
    ours = F.normalize(tower.audio_projection(pooled), dim=-1)
    assert torch.allclose(ours, laion_audio_embedding(clap, mel, False), atol=1e-4)


def test_only_training_heads_and_spectrogram_layers_are_dropped(tmp_path, laion_unfused):
    clap = laion_unfused
    checkpoint = torch.load(
        save_like_laion(clap, tmp_path / "ckpt.pt"), map_location="cpu", weights_only=True
    )
    laion = checkpoint["state_dict"]

    converted, _ = convert_laion_checkpoint(checkpoint)

    kept = {id(v) for v in converted.values()}
    split = {v.untyped_storage().data_ptr() for k, v in converted.items() if ".attention.self." in k}
    dropped = {
        _part(k.removeprefix("module."))
        for k, v in laion.items()
        if id(v) not in kept and not (".attn.qkv." in k and v.untyped_storage().data_ptr() in split)
    }
    assert dropped == {
        "spectrogram_extractor",  # fixed STFT: ClapEncoder computes the mel itself
        "logmel_extractor",
        "tscam_conv",  # AudioSet classification head
        "head",
        "audio_transform",  # contrastive-training MLPs
        "text_transform",
        "attn_mask",  # Swin shifted-window masks: ClapModel recomputes them
    }


def _part(key: str) -> str:
    """``audio_branch.head.weight`` -> ``head``; ``text_transform.x`` -> ``text_transform``."""
    if key.endswith(".attn_mask"):
        return "attn_mask"
    return key.split(".")[1] if key.startswith("audio_branch.") else key.split(".")[0]


def test_is_laion_state_dict():
    assert is_laion_state_dict({"module.audio_branch.bn0.weight": torch.zeros(1)})
    assert is_laion_state_dict({"text_branch.pooler.dense.bias": torch.zeros(1)})
    assert not is_laion_state_dict({"audio_model.audio_encoder.norm.weight": torch.zeros(1)})


def test_non_laion_and_unsupported_checkpoints_are_refused():
    with pytest.raises(LaionConversionError, match="Not a laion-clap checkpoint"):
        convert_laion_checkpoint({"state_dict": {"unet.weight": torch.zeros(1)}})
    with pytest.raises(LaionConversionError, match="1-d feature fusion"):
        convert_laion_checkpoint({"audio_branch.fusion_model.local_att.0.weight": torch.zeros(1)})
    with pytest.raises(LaionConversionError, match="Unexpected key"):
        convert_laion_checkpoint(
            {"audio_branch.bn0.weight": torch.zeros(1), "text_branch_extra": torch.zeros(1)}
        )
    with pytest.raises(LaionConversionError, match="PANN"):
        infer_config(
            {"audio_branch.conv_block1.conv1.weight": torch.zeros(1), "text_branch.x": torch.zeros(1)}
        )


@pytest.mark.slow
def test_full_size_630k_architecture_converts_strictly(tmp_path, monkeypatch, mel):
    """630k-audioset-best.pt's architecture: HTSAT-tiny + the full roberta-base text branch."""
    roberta = RobertaConfig(
        max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1
    )
    clap = build_laion_clap(monkeypatch, roberta)
    model, _ = convert_and_load_strict(save_like_laion(clap, tmp_path / "630k-audioset-best.pt"))
    assert model.config.text_config.num_hidden_layers == 12
    assert torch.allclose(
        hf_audio_embedding(model, mel, False), laion_audio_embedding(clap, mel, False), atol=1e-4
    )


@pytest.mark.slow
def test_htsat_base_converts_strictly(tmp_path, monkeypatch, mel):
    """music_speech_audioset_epoch_15_esc_89.98.pt's architecture: HTSAT-base (width 128, 12 blocks)."""
    clap = build_laion_clap(monkeypatch, small_roberta(), model_name="base")
    model, _ = convert_and_load_strict(save_like_laion(clap, tmp_path / "music_speech.pt"))
    assert list(model.config.audio_config.depths) == [2, 2, 12, 2]
    assert model.config.audio_config.hidden_size == 1024
    assert torch.allclose(
        hf_audio_embedding(model, mel, False), laion_audio_embedding(clap, mel, False), atol=1e-4
    )
