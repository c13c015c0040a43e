"""The CLAP2Diffusion file: round trip, metadata, and errors that name expected and found."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clap2diffusion_core.checkpoint import (
    CheckpointError,
    check_context_dim,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from clap2diffusion_core.testing import random_checkpoint, random_model


@pytest.fixture
def stage1(tmp_path):
    return random_checkpoint(tmp_path / "stage1.safetensors", seed=3)


def test_round_trip_gives_the_same_weights_and_tokens(stage1):
    original = random_model(seed=3)
    loaded = load_checkpoint(stage1)
    for key, value in original.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    e = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
    assert torch.equal(
        original.project(original.encode(e)).tokens,
        loaded.project(loaded.encode(e)).tokens,
    )


def test_metadata_describes_the_file(stage1):
    meta = read_metadata(stage1)
    assert meta["format"] == "clap2diffusion"
    assert meta["base_family"] == "sd15"
    assert (
        meta["context_dim"],
        meta["clap_dim"],
        meta["num_tokens"],
        meta["stage"],
    ) == ("768", "512", "77", "1")
    assert float(meta["norm_target"]) == 60.0
    assert json.loads(meta["config"])["projector"]["context_dim"] == 768


def test_wrong_shapes_are_listed_with_expected_and_found(stage1, tmp_path):
    state = load_file(stage1)
    state["projector.out_proj.weight"] = torch.zeros(1024, 208)
    del state["decomposer.token_pos"]
    state["projector.extra"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad, metadata=read_metadata(stage1))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    message = str(err.value)
    assert (
        "projector.out_proj.weight: expected (768, 208), found (1024, 208)" in message
    )
    assert "missing: decomposer.token_pos" in message
    assert "unexpected: projector.extra" in message


def test_missing_metadata_is_named(stage1, tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(stage1), bare)
    with pytest.raises(
        CheckpointError, match=r"missing CLAP2Diffusion metadata \['format'"
    ):
        load_checkpoint(bare)


def test_truncated_file_is_refused(stage1, tmp_path):
    data = Path(stage1).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    for name, payload in (("evil.pt", pickle.dumps(Boom())), ("zip.pt", None)):
        path = tmp_path / name
        if payload is None:
            torch.save({"x": torch.zeros(1)}, path)
        else:
            path.write_bytes(payload)
        with pytest.raises(CheckpointError, match="PyTorch pickle"):
            load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_empty_and_text_files_are_refused(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "text.safetensors").write_text("hello, I am not a model at all")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(tmp_path / "text.safetensors")


def test_a_file_for_another_base_model_names_both_context_sizes(tmp_path):
    sdxl = load_checkpoint(
        random_checkpoint(tmp_path / "sdxl.safetensors", context_dim=2048)
    )
    assert sdxl.config.base_family == "sdxl"
    with pytest.raises(
        CheckpointError,
        match=r"made for sdxl \(context_dim 2048\).*expects context_dim 768 \(sd15\)",
    ):
        check_context_dim(sdxl.config.context_dim, 768, "the SD1.5 MODEL")


def test_save_then_load_preserves_a_changed_config(tmp_path):
    model = random_model(context_dim=1024, seed=5)
    save_checkpoint(model, tmp_path / "m.safetensors")
    assert load_checkpoint(tmp_path / "m.safetensors").config == model.config


def test_a_safetensors_header_length_starting_with_byte_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A header of 128 + 256 k bytes makes the file's first byte 0x80, a pickle's first byte (an SDXL
    text-fit file's metadata hit it): the '{' at byte 8 says safetensors."""
    import json
    import struct

    from safetensors.torch import save_file

    from clap2diffusion_core.checkpoint import refuse_non_safetensors

    path = tmp_path / "x.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    padded = json.dumps(header).encode()
    padded += b" " * ((0x80 - len(padded)) % 256)  # safetensors allows trailing spaces in the header
    path.write_bytes(struct.pack("<Q", len(padded)) + padded + data[8 + length:])
    assert path.read_bytes()[0] == 0x80
    refuse_non_safetensors(str(path))  # no error
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["x"], torch.zeros(2))
