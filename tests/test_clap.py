"""clap2diffusion_core.clap: the CLAP encoder's front end, embedding modes and model loading."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from clap_support import WORDS, small_config, word_tokenizer
from safetensors.torch import save_file
from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

from clap2diffusion_core.audio import WINDOW_SAMPLES, AudioError, prepare_windows
from clap2diffusion_core.clap import (
    ClapEncoder,
    ClapError,
    MelConfig,
    _features,
    load_clap,
    load_clap_tower,
    mel_filters,
    read_mel_config,
)


@pytest.fixture(scope="module")
def encoder() -> ClapEncoder:
    torch.manual_seed(0)
    return ClapEncoder(ClapModel(small_config()).eval(), word_tokenizer(WORDS))


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) - 0.5) * 0.5


# --------------------------------------------------------------------------------------------
# Front end
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused, truncation", [(False, "rand_trunc"), (True, "fusion")])
def test_log_mel_matches_transformers_feature_extractor(fused, truncation):
    """Same mel filters (Slaney unfused, HTK fused) and dB scale as ClapFeatureExtractor."""
    torch.manual_seed(0)
    enc = ClapEncoder(ClapModel(small_config(fused)))
    windows = noise(2, WINDOW_SAMPLES)
    extractor = ClapFeatureExtractor(truncation=truncation, frequency_min=50, frequency_max=14000)

    ref = extractor(list(windows.numpy()), sampling_rate=48000, return_tensors="pt")["input_features"][:, 0]
    ours = enc.log_mel(windows)

    assert ours.shape == ref.shape == (2, 1001, 64)
    assert torch.allclose(ours, ref.float(), atol=1e-3)


def test_mel_config_reads_preprocessor_config():
    cfg = MelConfig.from_preprocessor_config({"frequency_min": 0, "frequency_max": 8000, "feature_size": 64})
    assert (cfg.f_min, cfg.f_max, cfg.n_mels, cfg.hop_length) == (0.0, 8000.0, 64, 480)


@pytest.mark.parametrize(
    "files, f_min",
    [
        ({}, 50.0),  # nothing saved: laion-clap's band
        ({"preprocessor_config.json": {"frequency_min": 20}}, 20.0),  # hub folders
        ({"processor_config.json": {"feature_extractor": {"frequency_min": 0}}}, 0.0),  # transformers 5
        (
            {
                "preprocessor_config.json": {"frequency_min": 20},
                "processor_config.json": {"feature_extractor": {"frequency_min": 0}},
            },
            20.0,
        ),
    ],
    ids=["none", "preprocessor_config", "processor_config", "both"],
)
def test_mel_settings_are_read_from_either_config_file_a_folder_may_hold(tmp_path, files, f_min):
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    assert read_mel_config(str(tmp_path)).f_min == f_min


def test_a_folder_saved_by_transformers_5_keeps_its_own_mel_band(tmp_path, encoder):
    """save_pretrained of a ClapProcessor writes processor_config.json only: its band must be used."""
    encoder.model.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"feature_extractor": {"frequency_min": 0, "frequency_max": 14000}})
    )
    assert load_clap(tmp_path).mel.f_min == 0.0
    assert load_clap_tower(tmp_path, "audio").mel.f_min == 0.0


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def test_encode_windows_gives_unit_vectors(encoder):
    emb = encoder.encode_windows(noise(3, WINDOW_SAMPLES))
    assert emb.shape == (3, 512) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_encode_windows_refuses_wrong_length(encoder):
    with pytest.raises(ClapError, match=r"\[N, 480000\]"):
        encoder.encode_windows(torch.zeros(1, 1000))


def test_embedding_is_deterministic_and_batch_independent(encoder):
    windows = noise(2, WINDOW_SAMPLES, seed=1)
    a = encoder.encode_windows(windows)
    b = encoder.encode_windows(windows)
    one_by_one = torch.cat([encoder.encode_windows(windows[i : i + 1], batch_size=1) for i in range(2)])
    assert torch.equal(a, b)
    assert torch.allclose(a, one_by_one, atol=1e-5)


def test_exactly_ten_seconds_is_encoded_whole_not_cropped(encoder):
    clip = noise(1, 1, WINDOW_SAMPLES, seed=2)  # [B, C, T] at 48 kHz
    assert torch.equal(encoder.embed(clip, 48000, "first"), encoder.encode_windows(clip[:, 0]))


@pytest.fixture(scope="module")
def long_stereo() -> torch.Tensor:
    """Two 25 s stereo clips at 16 kHz: three 10 s windows each."""
    return noise(2, 2, 25 * 16000, seed=3)


@pytest.fixture(scope="module")
def per_window(encoder, long_stereo) -> torch.Tensor:
    return encoder.embed(long_stereo, 16000, "per_window")


def test_per_window_mode_gives_one_row_per_window_batch_major(encoder, per_window):
    assert per_window.shape == (6, 512)
    assert torch.allclose(per_window.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert not torch.allclose(per_window[0], per_window[1])  # different windows, different rows


def test_first_mode_is_the_first_window(encoder, long_stereo, per_window):
    first = encoder.embed(long_stereo, 16000, "first")
    assert first.shape == (2, 512)
    assert torch.allclose(first, per_window[[0, 3]], atol=1e-4)


def test_mean_mode_is_the_normalised_mean_of_windows(encoder, long_stereo, per_window):
    mean = encoder.embed(long_stereo, 16000, "mean")
    expected = torch.nn.functional.normalize(per_window.reshape(2, 3, 512).mean(1), dim=-1)
    assert mean.shape == (2, 512)
    assert torch.allclose(mean, expected, atol=1e-5)


def test_short_clip_modes_agree(encoder):
    clip = noise(1, 1, 3 * 44100, seed=4)  # 3 s: one repeat-padded window
    first = encoder.embed(clip, 44100, "first")
    assert torch.allclose(first, encoder.embed(clip, 44100, "mean"), atol=1e-5)
    assert torch.allclose(first, encoder.embed(clip, 44100, "per_window"), atol=1e-5)


def test_embed_rejects_bad_mode_and_bad_audio(encoder):
    with pytest.raises(ClapError, match="first, mean, per_window"):
        encoder.embed(noise(1, 1, 48000), 48000, "median")
    with pytest.raises(AudioError, match="NaN"):
        encoder.embed(torch.full((1, 1, 48000), float("nan")), 48000)


def test_fused_model_encodes_deterministically():
    torch.manual_seed(0)
    enc = ClapEncoder(ClapModel(small_config(fused=True)).eval())
    windows = noise(2, WINDOW_SAMPLES, seed=5)
    a, b = enc.encode_windows(windows), enc.encode_windows(windows)
    assert a.shape == (2, 512) and torch.equal(a, b)


def test_encode_text(encoder):
    emb = encoder.encode_text(["the sound of thunder", "a dog barking on the beach"])
    assert emb.shape == (2, 512)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(encoder.encode_text(["the sound of thunder"]), emb[:1], atol=1e-5)  # padding-free


def test_encode_text_without_tokenizer_says_so():
    enc = ClapEncoder(ClapModel(small_config()))
    with pytest.raises(ClapError, match="without a tokenizer"):
        enc.encode_text(["rain"])


def test_features_accept_transformers_4_tensor_and_5_output_object():
    t = torch.randn(2, 512)
    assert _features(t) is t  # transformers 4.x
    assert _features(SimpleNamespace(pooler_output=t)) is t  # transformers 5.x
    with pytest.raises(ClapError, match="Unexpected CLAP output"):
        _features(SimpleNamespace(last_hidden_state=t))


def test_audio_tower_moves_like_a_module(saved_folder):
    """ModelPatcher moves the audio tower with .to(); the mel front end must follow."""
    tower = load_clap_tower(saved_folder, "audio")
    buffers = dict(tower.named_buffers())
    assert "mel_filters" in buffers and "stft_window" in buffers
    assert tower.compute_device == torch.device("cpu") and tower.dtype == torch.float32


def todays_embed(model: ClapModel, waveform: torch.Tensor, sample_rate: int, mode: str) -> torch.Tensor:
    """The encode path before streaming (kept here as the reference): the whole sound resampled
    and windowed at once, |STFT|^2 mel, ClapModel.get_audio_features on all windows."""
    windows = prepare_windows(waveform, sample_rate)  # [B, N, 480000]
    b, n = windows.shape[:2]
    flat = windows[:, :1].reshape(b, -1) if mode == "first" else windows.reshape(b * n, -1)
    spec = torch.stft(flat, 1024, 480, window=torch.hann_window(1024), center=True, pad_mode="reflect",
                      return_complex=True).abs().pow(2)
    mel = 10 * torch.log10(torch.matmul(spec.transpose(1, 2), mel_filters(MelConfig(), False)).clamp(min=1e-10))
    with torch.no_grad():
        out = model.get_audio_features(input_features=mel.unsqueeze(1), is_longer=torch.zeros(len(mel), 1, dtype=torch.bool))
    emb = torch.nn.functional.normalize(_features(out), dim=-1)
    if mode == "mean":
        return torch.nn.functional.normalize(emb.reshape(b, n, -1).mean(1), dim=-1)
    return emb


@pytest.mark.parametrize("mode", ["first", "mean", "per_window"])
def test_streamed_audio_tower_matches_todays_embeddings_within_1e_4(saved_folder, encoder, mode):
    """The audio tower alone, streaming 10 s windows from a 2-sound batch of 34 s at 22.05 kHz,
    gives the embeddings of the whole-sound path within 1e-4."""
    tower = load_clap_tower(saved_folder, "audio")
    sound = noise(2, 2, 34 * 22050, seed=12)
    expected = todays_embed(encoder.model, sound, 22050, mode)
    got = tower.embed(sound, 22050, mode, batch_size=3)  # batches that straddle the sounds' windows
    assert got.shape == expected.shape == ((8 if mode == "per_window" else 2), 512)
    assert (got - expected).abs().max() < 1e-4


def test_each_tower_loads_alone_and_encodes_like_the_whole_model(saved_folder, encoder):
    audio = load_clap_tower(saved_folder, "audio")
    text = load_clap_tower(saved_folder, "text")
    names = lambda module: {n.split(".")[0] for n, _ in module.named_parameters()}  # noqa: E731
    assert names(audio) == {"audio_model", "audio_projection"}
    assert names(text) == {"text_model", "text_projection"}
    windows = noise(2, WINDOW_SAMPLES, seed=4)
    assert torch.allclose(audio.encode_windows(windows), encoder.encode_windows(windows), atol=1e-6)
    assert torch.allclose(text.encode_text(["rain", "a dog barking"]), encoder.encode_text(["rain", "a dog barking"]),
                          atol=1e-6)
    with pytest.raises(ClapError, match="tower"):
        load_clap_tower(saved_folder, "video")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, encoder):
    folder = tmp_path_factory.mktemp("clap") / "tiny-clap"
    encoder.model.save_pretrained(folder)
    encoder.tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {"feature_extractor_type": "ClapFeatureExtractor", "frequency_min": 50, "frequency_max": 14000}
        )
    )
    return folder


def test_load_transformers_folder_with_tokenizer(saved_folder, encoder):
    loaded = load_clap(saved_folder)
    windows = noise(1, WINDOW_SAMPLES, seed=6)
    assert torch.allclose(loaded.encode_windows(windows), encoder.encode_windows(windows), atol=1e-5)
    assert torch.allclose(loaded.encode_text(["rain"]), encoder.encode_text(["rain"]), atol=1e-5)


def test_load_single_safetensors_with_config_beside_it(tmp_path, saved_folder, encoder):
    from safetensors.torch import load_file

    weights = tmp_path / "my_clap.safetensors"
    save_file(load_file(saved_folder / "model.safetensors"), weights)
    (tmp_path / "my_clap.json").write_text((saved_folder / "config.json").read_text())

    loaded = load_clap(weights)

    windows = noise(1, WINDOW_SAMPLES, seed=7)
    assert torch.allclose(loaded.encode_windows(windows), encoder.encode_windows(windows), atol=1e-5)


def test_safetensors_without_config_is_refused_with_a_hint(tmp_path):
    weights = tmp_path / "lonely.safetensors"
    save_file({"audio_model.x": torch.zeros(1)}, weights)
    with pytest.raises(ClapError, match="no config.*lonely.json"):
        load_clap(weights)


def test_pickle_that_needs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "args": SimpleNamespace(lr=1)}, path)  # needs a class to unpickle
    with pytest.raises(ClapError, match="Refusing.*unsafe"):
        load_clap(path)


def test_garbage_checkpoint_and_unknown_files_are_refused(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00 not a checkpoint")
    with pytest.raises(ClapError, match="broken.pt"):
        load_clap(bad)
    other = tmp_path / "weights.pt"
    torch.save({"unet.weight": torch.zeros(1)}, other)
    with pytest.raises(ClapError, match="no CLAP weights"):
        load_clap(other)
    with pytest.raises(ClapError, match="not found"):
        load_clap(tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ClapError, match="expected a folder"):
        load_clap(tmp_path / "notes.txt")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ClapError, match="no config.json"):
        load_clap(tmp_path)


# --------------------------------------------------------------------------------------------
# Real size
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_htsat_tiny_encodes_a_ten_second_clip():
    """ClapModel(ClapConfig()) is the laion/clap-htsat-unfused architecture."""
    torch.manual_seed(0)
    enc = ClapEncoder(ClapModel(ClapConfig()).eval())
    clip = torch.from_numpy(np.sin(np.linspace(0, 2e4, WINDOW_SAMPLES, dtype=np.float32)))[None, None]
    enc.embed(clip, 48000)  # warm-up
    start = time.perf_counter()
    emb = enc.embed(clip, 48000)
    elapsed = time.perf_counter() - start
    assert emb.shape == (1, 512)
    print(f"CLAP HTSAT-tiny, one 10 s clip on CPU: {elapsed:.2f} s")


# --------------------------------------------------------------------------------------------
# CLAP Loader / CLAP Encode nodes
# --------------------------------------------------------------------------------------------


@pytest.fixture
def clap_nodes(tmp_path, monkeypatch, saved_folder):
    """The node module, with models/clap at ``tmp_path / "clap"`` holding a folder and loose files."""
    import comfy_pack

    nodes = comfy_pack.load("nodes.clap_nodes")
    import folder_paths

    clap_dir = tmp_path / "clap"
    (clap_dir / "music").mkdir(parents=True)
    (clap_dir / "tiny-clap").symlink_to(saved_folder, target_is_directory=True)
    torch.save({"state_dict": {}}, clap_dir / "music" / "630k-audioset-best.pt")
    (clap_dir / "readme.txt").write_text("not a model")
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, "clap", ([str(clap_dir)], {".pt", ".safetensors"})
    )
    return nodes


def test_clap_loader_lists_model_folders_and_files(clap_nodes):
    # The folder is one entry; its model.safetensors is not listed on its own.
    assert clap_nodes.list_clap_models() == ["music/630k-audioset-best.pt", "tiny-clap"]
    schema = clap_nodes.ClapLoader.define_schema()
    assert schema.inputs[0].options == ["music/630k-audioset-best.pt", "tiny-clap"]


def test_clap_loader_and_encode_run_through_model_management(clap_nodes, encoder):
    handle = clap_nodes.ClapLoader.execute("tiny-clap").args[0]
    # The loader checks the whole file and keeps the audio tower; the text tower is not kept.
    assert handle.name == "tiny-clap" and set(handle.patchers) == {"audio"}

    audio = {"waveform": noise(2, 2, 3 * 44100, seed=8), "sample_rate": 44100}  # core AUDIO, batch of 2
    embeds = clap_nodes.ClapEncode.execute(handle, audio, "first").args[0]
    # Encoding sound loaded the audio tower only, inside a ModelPatcher.
    assert set(handle.patchers) == {"audio"}
    assert type(handle.audio_patcher().model).__name__ == "ClapAudioTower"

    assert embeds.shape == (2, 512) and embeds.device == torch.device("cpu")
    assert torch.allclose(embeds, encoder.embed(audio["waveform"], 44100, "first"), atol=1e-5)
    long_audio = {"waveform": noise(1, 1, 21 * 16000, seed=9), "sample_rate": 16000}
    assert clap_nodes.ClapEncode.execute(handle, long_audio, "per_window").args[0].shape == (3, 512)


def test_clap_encode_reports_bad_audio_clearly(clap_nodes):
    handle = clap_nodes.ClapLoader.execute("tiny-clap").args[0]
    with pytest.raises(ValueError, match="empty"):
        clap_nodes.ClapEncode.execute(
            handle, {"waveform": torch.zeros(1, 1, 0), "sample_rate": 48000}, "first"
        )


def test_clap_loader_refuses_names_outside_the_clap_folders(clap_nodes):
    assert clap_nodes.ClapLoader.validate_inputs("tiny-clap") is True
    assert "inside models/clap" in clap_nodes.ClapLoader.validate_inputs("../input/thunder.wav")
    assert "inside models/clap" in clap_nodes.ClapLoader.validate_inputs("/etc/passwd")
    assert "not found" in clap_nodes.ClapLoader.validate_inputs("missing.pt")


def test_clap_node_schemas_have_tooltips(clap_nodes):
    for node in (clap_nodes.ClapLoader, clap_nodes.ClapEncode, clap_nodes.ClapEncodeFile):
        schema = node.define_schema()
        assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
