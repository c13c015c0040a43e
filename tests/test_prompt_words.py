"""Sound -> prompt words: label embeddings, cache, selection per level, templates, windows."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from clap2diffusion_core.prompt import (
    LabelBank,
    LabelEmbeddingCache,
    describe_audio,
    encode_labels,
    fill_template,
    join_phrases,
    model_fingerprint,
    render_scores,
)
from clap2diffusion_core.vocabulary import SoundLabel, Vocabulary, load_vocabulary


class KnownClap:
    """A CLAP stand-in whose embeddings are known: every text maps to its own fixed random unit
    vector (nearly orthogonal to all others in 512 dimensions), and a "sound" is built as the sum
    of the texts it should sound like."""

    dim = 512

    def __init__(self) -> None:
        self.texts_encoded = 0
        self.calls = 0

    def text_vector(self, text: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        return F.normalize(torch.randn(self.dim, generator=generator), dim=0)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        self.texts_encoded += len(texts)
        return torch.stack([self.text_vector(text) for text in texts])

    def sound(self, *labels: str) -> torch.Tensor:
        """``[512]`` the embedding of a sound that is all of ``labels`` at once."""
        mix = sum(self.text_vector(f"the sound of {label}") for label in labels)
        return F.normalize(mix, dim=0)


@pytest.fixture(scope="module")
def clap() -> KnownClap:
    return KnownClap()


@pytest.fixture(scope="module")
def bank(clap: KnownClap) -> LabelBank:
    return LabelEmbeddingCache().get(clap)


def labels(prompt, level: str) -> list[str]:
    return [s.label.label for s in prompt.selected[level]]


def test_sound_a_is_named_thunder_and_sound_b_rain_each_in_its_level(clap, bank):
    sound_a, sound_b = clap.sound("thunder"), clap.sound("rain")
    a, b = describe_audio(torch.stack([sound_a, sound_b]), bank, counts=(1, 1, 1), threshold=0.5, selection="cosine")
    assert labels(a, "foreground") == ["thunder"]
    assert labels(b, "background") == ["rain"]
    # Nothing else is close enough: the other levels stay empty.
    assert labels(a, "background") == labels(a, "ambience") == []
    assert labels(b, "foreground") == labels(b, "ambience") == []
    assert a.text == "thunderstorm, lightning"
    assert b.text == "rain, wet streets"


def test_a_mixed_sound_is_decomposed_into_the_three_levels(clap, bank):
    mix = clap.sound("dog bark", "traffic", "jazz")
    [prompt] = describe_audio(mix[None], bank, counts=(1, 1, 1), threshold=0.3, selection="cosine")
    assert prompt.levels == {
        "foreground": "dog barking",
        "background": "traffic, busy road",
        "ambience": "jazz club, smoky",
    }
    assert prompt.fragment == "dog barking, traffic, busy road, jazz club, smoky"


def test_labels_come_best_first_and_are_cut_at_the_count(clap, bank):
    mix = 3 * clap.sound("thunder") + 2 * clap.sound("siren") + clap.sound("gunshot")
    [prompt] = describe_audio(mix[None], bank, counts=(2, 1, 1), threshold=0.1, selection="cosine")
    assert labels(prompt, "foreground") == ["thunder", "siren"]
    assert [s.label.label for s in prompt.candidates["foreground"][:3]] == [
        "thunder",
        "siren",
        "gunshot",
    ]
    scores = [s.score for s in prompt.candidates["foreground"]]
    assert scores == sorted(scores, reverse=True)


def test_the_threshold_drops_labels_that_score_below_it(clap, bank):
    mix = 3 * clap.sound("thunder") + clap.sound("siren")
    [prompt] = describe_audio(mix[None], bank, counts=(3, 0, 0), threshold=0.0, selection="cosine")
    thunder, siren = prompt.candidates["foreground"][:2]
    between = (thunder.score + siren.score) / 2
    [strict] = describe_audio(mix[None], bank, counts=(3, 0, 0), threshold=between, selection="cosine")
    assert labels(strict, "foreground") == ["thunder"]
    [none] = describe_audio(mix[None], bank, counts=(3, 0, 0), threshold=thunder.score + 0.01, selection="cosine")
    assert none.text == none.fragment == ""


def test_a_count_of_zero_turns_a_level_off(clap, bank):
    mix = clap.sound("thunder", "rain")
    [prompt] = describe_audio(mix[None], bank, counts={"background": 1}, threshold=0.3, selection="cosine")
    assert labels(prompt, "foreground") == []
    assert prompt.text == "rain, wet streets"


def test_a_batch_of_windows_gives_one_prompt_per_window(clap, bank):
    storyboard = ["dog bark", "car engine", "applause", "thunder"]
    windows = torch.stack([clap.sound(label) for label in storyboard])  # [4, 512]
    prompts = describe_audio(
        windows, bank, counts=(1, 0, 0), threshold=0.5, template="a street, {audio}",
        selection="cosine",
    )
    assert [p.text for p in prompts] == [
        "a street, dog barking",
        "a street, car",
        "a street, audience applauding",
        "a street, thunderstorm, lightning",
    ]


def test_scores_are_cosine_similarities_whatever_the_input_scale(clap, bank):
    sound = clap.sound("thunder")
    assert torch.allclose(bank.scores(sound[None] * 7), bank.scores(sound[None]))
    thunder = load_vocabulary().labels.index(load_vocabulary().find("thunder"))
    assert bank.scores(sound[None])[0, thunder] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"expected audio embeddings \[B, 512\], found \[1, 256\]"):
        bank.scores(torch.zeros(1, 256))


def test_the_score_preview_is_one_comfy_image_per_window(clap, bank):
    windows = torch.stack([clap.sound("thunder"), clap.sound("rain")])
    prompts = describe_audio(windows, bank, threshold=0.2, selection="cosine")
    images = render_scores(prompts, threshold=0.2)
    assert images.shape[0] == 2 and images.shape[-1] == 3 and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert not torch.equal(images[0], images[1])
    assert render_scores(prompts * 20, threshold=0.2).shape[0] == 16  # a long sound: capped


# Templates -----------------------------------------------------------------------------------

LEVEL_TEXTS = {"foreground": "dog", "background": "rain", "ambience": "jazz"}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("", "dog, rain"),
        ("a beach at dusk, {audio}, photo", "a beach at dusk, dog, rain, photo"),
        ("{foreground} on a {background} night", "dog on a rain night"),
        ("a beach", "a beach, dog, rain"),  # no placeholder: appended
        ("a beach,", "a beach, dog, rain"),
        ("{red|blue} car, {audio}", "{red|blue} car, dog, rain"),  # wildcard braces survive
        ("{audio}\n{ambience} mood", "dog, rain\njazz mood"),
    ],
)
def test_template_substitution(template, expected):
    assert fill_template(template, "dog, rain", LEVEL_TEXTS) == expected


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("a beach, {audio}, photo", "a beach, photo"),
        ("{audio}, a beach", "a beach"),
        ("a beach, {audio}", "a beach"),
        ("a beach", "a beach"),
        ("", ""),
    ],
)
def test_an_empty_sound_leaves_no_stray_separators(template, expected):
    assert fill_template(template, "", {}) == expected


def test_repeated_phrase_items_are_joined_once():
    assert join_phrases(["rain, storm", "Storm", "wind, rain", ""]) == "rain, storm, wind"


# Label embeddings and their cache -----------------------------------------------------------


def tiny_vocabulary() -> Vocabulary:
    return Vocabulary(
        (
            SoundLabel("thunder", "foreground", "lightning"),
            SoundLabel("rain", "background", "rain"),
            SoundLabel("eerie atmosphere", "ambience", "eerie"),
        )
    )


def test_labels_are_encoded_through_the_text_template_in_batches():
    clap = KnownClap()
    embeddings = encode_labels(clap, tiny_vocabulary(), batch_size=2)
    assert clap.calls == 2 and clap.texts_encoded == 3
    assert torch.allclose(embeddings[1], clap.text_vector("the sound of rain"))


def test_several_templates_are_averaged_and_renormalised():
    clap = KnownClap()
    templates = ("the sound of {label}", "{label}")
    embeddings = encode_labels(clap, tiny_vocabulary(), templates)
    expected = F.normalize(clap.text_vector("the sound of rain") + clap.text_vector("rain"), dim=0)
    assert torch.allclose(embeddings[1], expected, atol=1e-6)


def test_a_second_request_for_the_same_model_does_not_reencode_the_labels():
    clap, cache = KnownClap(), LabelEmbeddingCache()
    first = cache.get(clap, tiny_vocabulary())
    encoded = clap.texts_encoded
    second = cache.get(clap, tiny_vocabulary())
    assert clap.texts_encoded == encoded == 3
    assert second.embeddings is first.embeddings
    # Another model, or another vocabulary, is encoded anew.
    cache.get(KnownClap(), tiny_vocabulary())
    cache.get(clap, load_vocabulary())
    assert clap.texts_encoded == 3 + len(load_vocabulary())


def test_the_disk_cache_serves_a_fresh_process_for_the_same_weights(tmp_path):
    first = LabelEmbeddingCache(tmp_path).get(KnownClap(), tiny_vocabulary(), model_key="clap-a")
    reloaded = KnownClap()  # same weights, new object: as after a restart
    again = LabelEmbeddingCache(tmp_path).get(reloaded, tiny_vocabulary(), model_key="clap-a")
    assert reloaded.calls == 0
    assert torch.equal(again.embeddings, first.embeddings)
    other = KnownClap()
    LabelEmbeddingCache(tmp_path).get(other, tiny_vocabulary(), model_key="clap-b")
    assert other.calls == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_torn_cache_file_is_recomputed_and_replaced(tmp_path):
    LabelEmbeddingCache(tmp_path).get(KnownClap(), tiny_vocabulary(), model_key="clap-a")
    [path] = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    clap = KnownClap()
    bank = LabelEmbeddingCache(tmp_path).get(clap, tiny_vocabulary(), model_key="clap-a")
    assert clap.calls == 1 and bank.embeddings.shape == (3, 512)
    fresh = KnownClap()
    LabelEmbeddingCache(tmp_path).get(fresh, tiny_vocabulary(), model_key="clap-a")
    assert fresh.calls == 0


def test_an_unwritable_cache_dir_costs_only_the_speed_up(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    bank = LabelEmbeddingCache(blocker / "cache").get(KnownClap(), tiny_vocabulary(), model_key="x")
    assert bank.embeddings.shape == (3, 512)


def test_the_model_fingerprint_follows_the_text_tower_weights():
    class Projection(torch.nn.Module):  # a weight is all the fingerprint reads
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 4))

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_projection = Projection()
            self.audio_projection = Projection()

    class Encoder(torch.nn.Module):  # like clap.ClapEncoder: a module around the ClapModel
        def __init__(self) -> None:
            super().__init__()
            self.model = Tower()

    encoder = Encoder()
    before = model_fingerprint(encoder)
    with torch.no_grad():
        encoder.model.audio_projection.weight.add_(1)
    assert model_fingerprint(encoder) == before  # label embeddings do not depend on audio weights
    with torch.no_grad():
        encoder.model.text_projection.weight.add_(1)
    assert model_fingerprint(encoder) != before
    assert model_fingerprint(KnownClap()) is None  # no weights to hash: no disk cache
