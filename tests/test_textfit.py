"""Stage 1 from text alone (issue 12): the caption corpus, the fit, its file, the transfer to audio.

The transfer test uses an aligned test CLAP (tests/textfit_support.py) whose sounds land near their
captions' text embeddings across a modality gap, and the tiny SD1.5's real (random) CLIP-L for the
targets.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from training_support import one_thread  # noqa: F401 (module-wide fixture)

from clap2diffusion_core.checkpoint import load_checkpoint
from clap2diffusion_core.levels import LEVELS
from clap2diffusion_core.training.captions import (
    CorpusError,
    build_corpus,
    check_corpus,
    corpus_hash,
    parse_captions,
)
from clap2diffusion_core.training.textfit import (
    Provenance,
    TextFitConfig,
    fingerprint,
    fit_text,
    read_provenance,
    save_text_fit,
    tensors_in,
)

SMALL = {"width": 64, "num_layers": 2, "num_heads": 4}


# ------------------------------------------------------------------------------------------------
# corpus


def test_textfit_corpus_is_a_function_of_size_seed_and_extra_captions():
    a = build_corpus(600, seed=3, extra=["my own  sound", "my own sound"])
    assert [c.text for c in a] == [c.text for c in build_corpus(600, seed=3, extra=["my own  sound", "my own sound"])]
    assert [c.text for c in a] != [c.text for c in build_corpus(600, seed=4)]
    assert len(a) == 600 and len({c.text.casefold() for c in a}) == 600
    assert a[0].text == "my own sound" and a[0].source == "user"  # whitespace folded, duplicate dropped
    # Every label of the vocabulary once as a single, then scenes that name their levels.
    singles = [c for c in a if len(c.levels) == 1]
    scenes = [c for c in a if len(c.levels) >= 2]
    assert len(singles) == 434 and len(scenes) == 600 - 1 - 434
    assert {lvl for c in singles for lvl, _ in c.levels} == set(LEVELS)
    for caption in scenes[:50]:
        levels = dict(caption.levels)
        assert levels["foreground"] in caption.text and levels["background"] in caption.text
    assert any("ambience" in dict(c.levels) for c in scenes) and any("ambience" not in dict(c.levels) for c in scenes)


def test_textfit_corpus_smaller_than_the_vocabulary_samples_it():
    small = build_corpus(12, seed=0)
    assert len(small) == 12 and all(len(c.levels) == 1 for c in small)
    assert corpus_hash([c.text for c in small]) != corpus_hash([c.text for c in build_corpus(12, seed=1)])


def test_textfit_refuses_zero_or_one_caption_with_what_to_do():
    for captions in ([], ["rain"], ["rain", " Rain "]):
        with pytest.raises(CorpusError, match="at least 2 different captions") as err:
            check_corpus(captions)
        assert "one per line" in str(err.value) and "corpus size" in str(err.value)
    with pytest.raises(CorpusError, match="one caption"):
        build_corpus(1, extra=["a dog barking"])
    assert parse_captions("# mine\n a dog \n\nrain\n") == ["a dog", "rain"]


# ------------------------------------------------------------------------------------------------
# the file


def _provenance(config: TextFitConfig, corpus: str = "c" * 64) -> Provenance:
    return Provenance(corpus, 4, "clapfp", "clipfp", "sd15 CLIP-L (test)", config)


def test_textfit_file_is_a_normal_stage1_file_that_says_how_it_was_made(tmp_path):
    gen = torch.Generator().manual_seed(0)
    clap = torch.nn.functional.normalize(torch.randn(4, 512, generator=gen), dim=-1)
    config = TextFitConfig(steps=3, batch_size=4, projector=SMALL)
    with torch.inference_mode():  # as ComfyUI runs its nodes
        model = fit_text(clap, torch.randn(4, 768, generator=gen), config)
    path = save_text_fit(model, tmp_path / "fit.safetensors", _provenance(config))
    loaded = load_checkpoint(path)  # the ordinary loader takes it
    assert loaded.config.stage == 1 and loaded.config.context_dim == 768 and loaded.config.base_family == "sd15"
    assert loaded.config.decomposer.temperature == pytest.approx(config.final_temperature)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    meta = read_provenance(path)
    assert meta["training"] == "text-only" and meta["corpus_sha256"] == "c" * 64
    assert meta["clap_fingerprint"] == "clapfp" and meta["text_encoder_fingerprint"] == "clipfp"
    assert json.loads(meta["text_fit"])["steps"] == 3
    assert meta["textfit_recipe"] == "2"  # issue 23: files of the first recipe have no such key
    assert [p.name for p in tmp_path.iterdir()] == ["fit.safetensors"]  # no temporary left


def test_textfit_name_follows_every_input():
    base = _provenance(TextFitConfig())
    names = {base.file_stem("sd15"), _provenance(TextFitConfig()).file_stem("sd15")}
    assert len(names) == 1 and next(iter(names)).startswith("textfit-sd15-")
    others = [
        _provenance(TextFitConfig(seed=1)), _provenance(TextFitConfig(steps=7)),
        _provenance(TextFitConfig(noise=0.0)), _provenance(TextFitConfig(), corpus="d" * 64),
        _provenance(TextFitConfig(recipe=1)),  # a new recipe: the node fits again instead of reusing
    ]
    assert len({p.file_stem("sd15") for p in others} | names) == 6


def test_textfit_stopping_during_the_fit_writes_nothing(tmp_path):
    class Cancelled(Exception):
        pass

    def cancel_at_2(step: int, total: int) -> None:
        if step == 2:
            raise Cancelled

    gen = torch.Generator().manual_seed(0)
    clap = torch.nn.functional.normalize(torch.randn(4, 512, generator=gen), dim=-1)
    with pytest.raises(Cancelled):
        fit_text(clap, torch.randn(4, 768, generator=gen), TextFitConfig(steps=5, projector=SMALL), cancel_at_2)
    assert list(tmp_path.iterdir()) == []


def test_textfit_fingerprint_follows_weights_patches_and_settings():
    gen = torch.Generator().manual_seed(0)
    weights = {"a.weight": torch.randn(64, 32, generator=gen), "b.bias": torch.randn(5000, generator=gen)}
    same = fingerprint(weights.items())
    assert same == fingerprint({k: v.clone() for k, v in weights.items()}.items())
    changed = dict(weights, **{"b.bias": weights["b.bias"].clone().index_fill_(0, torch.tensor([0]), 9.0)})
    assert fingerprint(changed.items()) != same  # one sampled value differs
    assert fingerprint(weights.items(), extra="layer_idx=-2") != same  # a clip skip

    class Lora:  # ComfyUI's LoRAAdapter keeps its tensors in .weights
        def __init__(self, scale: float) -> None:
            self.weights = (torch.ones(4, 2) * scale, torch.ones(2, 4), None)

    patches = {"x.weight": [(1.0, Lora(1.0), 1.0, None, None)]}
    found = list(tensors_in(patches, "patches"))
    assert [name for name, _ in found] == ["patches.x.weight.0.1.weights.0", "patches.x.weight.0.1.weights.1"]
    other = list(tensors_in({"x.weight": [(1.0, Lora(2.0), 1.0, None, None)]}, "patches"))
    assert fingerprint([*weights.items(), *found]) != fingerprint([*weights.items(), *other])


# ------------------------------------------------------------------------------------------------
# transfer from text to audio


@pytest.fixture(scope="module")
def clip_l(test_models):
    from clap2diffusion_core.training.encoders import load_text_encoder

    return load_text_encoder(test_models.sd15_checkpoint)


def test_textfit_pooled_targets_equal_the_full_77_token_encoding(clip_l):
    captions = ["a dog barking", "heavy rain on a tin roof with thunder in the distance", "x"]
    _, pooled = clip_l(captions)
    torch.testing.assert_close(clip_l.pooled(captions), pooled, rtol=1e-4, atol=1e-4)


def test_textfit_command_line_writes_a_named_text_only_file(test_models, tmp_path, capsys):
    from clap2diffusion_core.training.cli import main

    (tmp_path / "mine.txt").write_text("# extra\na kettle whistling\n")
    argv = ["fit-text", "--clap", str(test_models.clap_folder), "--checkpoint", str(test_models.sd15_checkpoint),
            "--out", str(tmp_path / "models"), "--captions", str(tmp_path / "mine.txt"), "--corpus-size", "6",
            "--steps", "2", "--no-progress"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    path = tmp_path / "models" / report["file"].rsplit("/", 1)[-1]
    assert path.name.startswith("textfit-sd15-") and path.is_file() and report["captions"] == 6
    meta = read_provenance(path)
    assert meta["training"] == "text-only" and meta["corpus_size"] == "6"
    first = [c.text for c in build_corpus(6, 0, ["a kettle whistling"])]
    assert meta["corpus_sha256"] == corpus_hash(first) and first[0] == "a kettle whistling"
    assert load_checkpoint(path).config.context_dim == 768
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["text_encoder"].startswith("sd15 CLIP-L")
