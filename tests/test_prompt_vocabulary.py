"""The shipped sound-label vocabulary, and what the loader refuses."""

import json

import pytest

from clap2diffusion_core.levels import LEVELS
from clap2diffusion_core.vocabulary import (
    DEFAULT_VOCABULARY_PATH,
    SoundLabel,
    Vocabulary,
    VocabularyError,
    load_vocabulary,
)


def _file(levels: dict, tmp_path, raw: str | None = None):
    path = tmp_path / "labels.json"
    data = {"format": "clap2diffusion-sound-labels", "format_version": 1, "levels": levels}
    path.write_text(raw if raw is not None else json.dumps(data), encoding="utf-8")
    return path


def test_the_shipped_vocabulary_has_hundreds_of_labels_in_all_three_levels():
    vocabulary = load_vocabulary()
    assert len(vocabulary) >= 300
    for level in LEVELS:
        assert len(vocabulary.by_level(level)) >= 50, level


def test_every_shipped_label_has_exactly_one_level_and_no_duplicates():
    vocabulary = load_vocabulary()
    assert all(entry.level in LEVELS for entry in vocabulary)
    names = [entry.label.casefold() for entry in vocabulary]
    assert len(set(names)) == len(names)
    # The file itself, read without the loader: no label is listed under two levels or twice.
    with open(DEFAULT_VOCABULARY_PATH, encoding="utf-8") as file:
        raw = json.load(file, object_pairs_hook=lambda pairs: pairs)
    levels = dict(dict(raw)["levels"])
    listed = [label.casefold() for level in LEVELS for label, _ in levels[level]]
    assert len(listed) == len(set(listed)) == len(vocabulary)


def test_every_shipped_label_has_a_prompt_phrase():
    assert all(entry.phrase and entry.phrase == entry.phrase.strip() for entry in load_vocabulary())


def test_the_acceptance_sounds_sit_in_their_levels():
    vocabulary = load_vocabulary()
    assert vocabulary.find("thunder").level == "foreground"
    assert vocabulary.find("dog bark").level == "foreground"
    assert vocabulary.find("Rain").level == "background"
    assert vocabulary.find("crowd").level == "background"
    assert vocabulary.find("quiet room").level == "ambience"
    assert vocabulary.find("jazz").level == "ambience"


def test_a_label_under_two_levels_is_refused_naming_both(tmp_path):
    path = _file({"foreground": {"Rain": "rain"}, "background": {"rain": "rain"}}, tmp_path)
    message = r"'rain' \(background\) duplicates 'Rain' \(foreground\)"
    with pytest.raises(VocabularyError, match=message):
        load_vocabulary(path)


def test_a_label_written_twice_in_one_level_is_refused(tmp_path):
    raw = (
        '{"format": "clap2diffusion-sound-labels", "format_version": 1,'
        ' "levels": {"foreground": {"thunder": "a", "thunder": "b"}}}'
    )
    with pytest.raises(VocabularyError, match="'thunder' appears twice"):
        load_vocabulary(_file({}, tmp_path, raw=raw))


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ({"midground": {"x": "x"}}, "unknown level"),
        ({"foreground": {"": "x"}}, "non-empty"),
        ({"foreground": {"thunder": " "}}, "non-empty"),
        ({"foreground": {" thunder": "x"}}, "surrounding whitespace"),
        ({"foreground": {"thunder": None}}, "must be a string"),
        ({"foreground": ["thunder"]}, "object of label -> phrase"),
        ({}, "no labels"),
    ],
)
def test_malformed_entries_are_refused(tmp_path, levels, message):
    with pytest.raises(VocabularyError, match=message):
        load_vocabulary(_file(levels, tmp_path))


def test_a_foreign_file_is_refused_with_its_format(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"format": "something-else"}')
    with pytest.raises(VocabularyError, match="expected format 'clap2diffusion-sound-labels'"):
        load_vocabulary(path)


def test_levels_come_out_in_canonical_order_whatever_the_file_order(tmp_path):
    path = _file({"ambience": {"jazz": "jazz"}, "foreground": {"thunder": "storm"}}, tmp_path)
    vocabulary = load_vocabulary(path)
    assert [entry.label for entry in vocabulary] == ["thunder", "jazz"]
    assert vocabulary.level_indices == (0, 2)


def test_the_embedding_key_depends_on_label_texts_only():
    a = Vocabulary((SoundLabel("thunder", "foreground", "storm"),))
    b = Vocabulary((SoundLabel("thunder", "background", "lightning"),))
    c = Vocabulary((SoundLabel("rain", "foreground", "storm"),))
    assert a.text_fingerprint == b.text_fingerprint != c.text_fingerprint
