"""Audio to Prompt picks the same words on CLAP models whose cosine ranges differ (issue 16).

Two stand-in CLAP encoders hear the same sounds with the same ranking of labels, but the second
one's cosines are twice as spread (as an unfused and a music CLAP differ). The default,
``relative`` selection must pick the same labels on both; the raw ``cosine`` threshold keeps its
old meaning (and so picks differently, which is why it is no longer the default).
"""

from __future__ import annotations

import comfy_pack
import pytest
import torch

from clap2diffusion_core.prompt import LabelBank, describe_audio, relative_scores
from clap2diffusion_core.vocabulary import VocabularyError, parse_label_list

LABELS = """
# a user's own list, as typed into the node's 'labels' box
foreground: thunder = thunderstorm
foreground: dog bark = dog barking
foreground: siren
foreground: engine = car engine
background: rain = heavy rain
background: crowd
background: wind
background: waves = ocean waves
ambience: eerie = eerie mood
ambience: quiet room
ambience: jazz = jazz club
ambience: reverberant hall = large hall
foreground: bird song = songbirds
foreground: footsteps
foreground: bell = church bell
foreground: train
background: traffic = busy traffic
background: birds = birds in the trees
background: stream = a stream
background: applause
ambience: tense = tense mood
ambience: calm
ambience: rock = rock concert
ambience: outdoors = open air
"""
VOCABULARY = parse_label_list(LABELS)
DIM = 32  # embedding width of the stand-ins: labels are basis vectors, one spare axis
# Cosine of each of the two sounds with each label (label order above) on the narrow model.
PROFILES = torch.tensor(
    [
        # thunder .19 and rain .17 stand out; eerie .12 is the best ambience, but ordinary
        [0.19, 0.05, 0.03, 0.09, 0.17, 0.02, 0.08, 0.04, 0.12, 0.01, 0.03, 0.06,
         0.02, 0.03, 0.04, 0.01, 0.05, 0.02, 0.06, 0.01, 0.04, 0.02, 0.03, 0.05],  # a storm
        # dog bark .16 and crowd .18 stand out; jazz .13 a little less
        [0.02, 0.16, 0.07, 0.01, 0.03, 0.18, 0.04, 0.01, 0.02, 0.05, 0.13, 0.03,
         0.01, 0.04, 0.02, 0.03, 0.06, 0.01, 0.02, 0.05, 0.01, 0.03, 0.04, 0.02],  # a street party
    ]
)


def stand_in_embeddings(spread: float) -> torch.Tensor:
    """``[2, DIM]`` unit audio embeddings whose cosines with the label axes are ``spread * PROFILES``."""
    cos = spread * PROFILES
    rest = (1 - cos.pow(2).sum(1, keepdim=True)).sqrt()  # on the spare axis, to make unit vectors
    embeds = torch.zeros(2, DIM)
    embeds[:, : len(VOCABULARY)] = cos
    embeds[:, len(VOCABULARY)] = rest[:, 0]
    return embeds


class StandInText(torch.nn.Module):
    """A text tower: label text ``the sound of <label>`` -> that label's basis vector."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))  # something for ModelPatcher to move

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), DIM)
        for row, text in enumerate(texts):
            out[row, VOCABULARY.labels.index(VOCABULARY.find(text.removeprefix("the sound of ")))] = 1.0
        return out

    def fingerprint(self) -> str:
        return "stand-in-text"


class StandInAudio(torch.nn.Module):
    """An audio tower that hears the batch's sounds with the given cosine spread."""

    def __init__(self, spread: float) -> None:
        super().__init__()
        self.spread = spread
        self.register_buffer("anchor", torch.zeros(1))

    def embed(self, waveform, sample_rate, mode="first", on_batch=None):
        if on_batch is not None:
            on_batch(0, 1)
            on_batch(1, 1)
        return stand_in_embeddings(self.spread)[: waveform.shape[0]]


def bank() -> LabelBank:
    return LabelBank(VOCABULARY, StandInText().encode_text([f"the sound of {e.label}" for e in VOCABULARY]))


def chosen(prompts) -> list[dict[str, list[str]]]:
    return [{level: [s.label.label for s in picked] for level, picked in p.selected.items()} for p in prompts]


def test_calibrated_selection_picks_the_same_labels_when_cosines_spread_twice_as_wide():
    narrow, wide = stand_in_embeddings(1.0), stand_in_embeddings(2.0)
    # The stand-ins really differ by 2x in cosine range, with the same ranking.
    cos_narrow, cos_wide = bank().scores(narrow), bank().scores(wide)
    assert torch.allclose(cos_wide, 2 * cos_narrow, atol=1e-6)
    assert torch.equal(cos_narrow.argsort(dim=1), cos_wide.argsort(dim=1))

    counts = (2, 2, 2)
    default_narrow = chosen(describe_audio(narrow, bank(), counts))
    default_wide = chosen(describe_audio(wide, bank(), counts))
    assert default_narrow == default_wide
    # And it picks what stands out, not merely the top of each level: the storm's strong labels.
    assert default_narrow[0] == {"foreground": ["thunder"], "background": ["rain"], "ambience": []}

    # The raw cosine threshold keeps today's meaning: the same 0.15 picks more on the wide model.
    raw_narrow = chosen(describe_audio(narrow, bank(), counts, threshold=0.15, selection="cosine"))
    raw_wide = chosen(describe_audio(wide, bank(), counts, threshold=0.15, selection="cosine"))
    assert raw_narrow != raw_wide
    assert raw_narrow[0] == {"foreground": ["thunder"], "background": ["rain"], "ambience": []}
    assert raw_wide[0]["ambience"] == ["eerie"]  # 2 * 0.12 passes 0.15, 0.12 does not


def test_calibrated_scores_ignore_any_positive_affine_change_of_the_cosines():
    cos = torch.rand(3, 40, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(relative_scores(cos), relative_scores(0.2 + 2.0 * cos), atol=1e-5)
    z = relative_scores(cos)
    assert torch.allclose(z.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(1), torch.ones(3), atol=1e-5)


def test_calibrated_cut_off_is_in_standard_deviations_above_the_vocabulary_mean():
    embeds = stand_in_embeddings(1.0)
    cos = bank().scores(embeds)[0]
    z_thunder = float((cos[0] - cos.mean()) / cos.std())
    [just_below] = describe_audio(embeds[:1], bank(), (1, 0, 0), threshold=z_thunder - 1e-3)
    [just_above] = describe_audio(embeds[:1], bank(), (1, 0, 0), threshold=z_thunder + 1e-3)
    assert [s.label.label for s in just_below.selected["foreground"]] == ["thunder"]
    assert just_below.selected["foreground"][0].score == pytest.approx(z_thunder, abs=1e-4)
    assert just_below.selected["foreground"][0].cosine == pytest.approx(0.19, abs=1e-6)
    assert just_above.selected["foreground"] == ()


def test_user_label_lists_parse_levels_and_phrases_and_refuse_mistakes():
    assert len(VOCABULARY) == 24
    assert VOCABULARY.find("thunder").phrase == "thunderstorm"
    assert VOCABULARY.find("siren").phrase == "siren"  # no phrase: the label itself
    assert [e.label for e in VOCABULARY.by_level("ambience")][:4] == ["eerie", "quiet room", "jazz", "reverberant hall"]
    with pytest.raises(VocabularyError, match="line 1: expected 'level: label'"):
        parse_label_list("thunder")
    with pytest.raises(VocabularyError, match="line 2: expected .* found 'sky: blue'"):
        parse_label_list("foreground: dog\nsky: blue")
    with pytest.raises(VocabularyError, match="no labels"):
        parse_label_list("# nothing\n\n")
    with pytest.raises(VocabularyError, match="duplicates"):
        parse_label_list("foreground: rain\nbackground: Rain")


# --------------------------------------------------------------------------------------------
# Through the node: stand-in towers in a CLAP_MODEL, labels typed into the node


@pytest.fixture
def nodes(tmp_path, monkeypatch):
    prompt_nodes = comfy_pack.load("nodes.prompt_nodes")
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path / "temp"))
    monkeypatch.setattr(prompt_nodes, "_label_cache", prompt_nodes.LabelEmbeddingCache(tmp_path / "labels"))
    return prompt_nodes, comfy_pack.load("nodes.clap_nodes")


def run(nodes, spread: float, **options):
    prompt_nodes, clap_nodes = nodes
    handle = clap_nodes.ClapModelHandle(
        name=f"stand-in x{spread}", path="",
        patchers={"audio": clap_nodes.wrap_tower(StandInAudio(spread)), "text": clap_nodes.wrap_tower(StandInText())},
    )
    audio = {"waveform": torch.zeros(2, 1, 48_000), "sample_rate": 48_000}
    settings = dict(window_mode="first", foreground_count=2, background_count=2, ambience_count=2, threshold=0.15,
                    template="", labels=LABELS)
    return prompt_nodes.AudioToPrompt.execute(handle, audio, **settings | options).args


def test_calibrated_audio_to_prompt_node_gives_the_same_words_on_both_stand_in_models(nodes):
    narrow, wide = run(nodes, 1.0), run(nodes, 2.0)
    assert narrow == wide
    assert narrow[0] == ["thunderstorm, heavy rain", "dog barking, crowd"]
    # The raw threshold, asked for, behaves as before: more words from the wider model.
    raw_narrow, raw_wide = run(nodes, 1.0, selection="cosine"), run(nodes, 2.0, selection="cosine")
    assert raw_narrow[0] == ["thunderstorm, heavy rain", "dog barking, crowd"]
    assert raw_wide[0] != raw_narrow[0]


def test_audio_to_prompt_reads_a_label_file_from_the_input_folder(nodes, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    (tmp_path / "storm.labels.txt").write_text(LABELS, encoding="utf-8")
    assert "storm.labels.txt" in nodes[0].label_files()
    from_file = run(nodes, 1.0, labels="", label_file="storm.labels.txt")
    assert from_file == run(nodes, 1.0)
    assert "'gone.labels.txt' not found in ComfyUI's input folder" in nodes[0].AudioToPrompt.validate_inputs("gone.labels.txt")
