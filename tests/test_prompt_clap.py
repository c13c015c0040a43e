"""Audio to Prompt through a real transformers ClapModel whose weights make the answer known.

A small CLAP (the real HTS-AT + RoBERTa architecture, shrunk) is given an audio projection solved
so that sound A (a rumble) lands exactly on the text embedding of "the sound of thunder" and
sound B (a hiss) on "the sound of rain". Everything else (log-mel front end, both towers, the
tokenizer, label caching) is the real path the node takes.
"""

from __future__ import annotations

import copy

import comfy_pack
import pytest
import torch
from clap_support import word_tokenizer
from transformers import ClapConfig, ClapModel

from clap2diffusion_core.clap import ClapEncoder
from clap2diffusion_core.prompt import LabelEmbeddingCache, describe_audio, model_fingerprint
from clap2diffusion_core.vocabulary import SoundLabel, Vocabulary

VOCABULARY = Vocabulary(
    (
        SoundLabel("thunder", "foreground", "thunderstorm, lightning"),
        SoundLabel("dog bark", "foreground", "dog barking"),
        SoundLabel("rain", "background", "rain, wet streets"),
        SoundLabel("crowd", "background", "crowd of people"),
        SoundLabel("quiet room", "ambience", "quiet room, stillness"),
        SoundLabel("jazz", "ambience", "jazz club"),
    )
)
WORDS = "<s> <pad> </s> <unk> the sound of thunder dog bark rain crowd quiet room jazz".split()
RATE = 48_000


def small_clap() -> ClapModel:
    audio = dict(depths=[1, 1, 1, 1], patch_embeds_hidden_size=32, num_attention_heads=[1, 2, 4, 8], hidden_size=256)
    text = dict(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
    return ClapModel(ClapConfig(audio_config=audio, text_config=text, projection_dim=512)).eval()


def sounds() -> torch.Tensor:
    """``[2, 1, 10 s]``: A a low rumble (brown noise), B a hiss (white noise)."""
    generator = torch.Generator().manual_seed(0)
    white = torch.randn(2, RATE * 10, generator=generator)
    rumble = white[0].cumsum(0)
    rumble = rumble - rumble.mean()
    return torch.stack([rumble / rumble.abs().max(), 0.3 * white[1]]).unsqueeze(1)


@pytest.fixture(scope="module")
def encoder() -> ClapEncoder:
    """A CLAP that hears sound A as thunder and sound B as rain, by construction."""
    torch.manual_seed(0)
    encoder = ClapEncoder(small_clap(), word_tokenizer(WORDS))
    # A random text tower maps every text to nearly one direction (cosines above 0.99): centre its
    # projection on the vocabulary, so the labels spread out as a trained CLAP's do.
    text_projection = encoder.model.text_projection.linear2
    outputs: list[torch.Tensor] = []
    hook = text_projection.register_forward_hook(lambda module, args, out: outputs.append(out))
    encoder.encode_text([f"the sound of {entry.label}" for entry in VOCABULARY])
    hook.remove()
    with torch.no_grad():
        text_projection.bias.sub_(outputs[0].mean(dim=0))

    targets = encoder.encode_text(["the sound of thunder", "the sound of rain"])  # [2, 512]
    # What the last projection layer sees for each sound: [2, 512].
    projection = encoder.model.audio_projection.linear2
    seen: list[torch.Tensor] = []
    hook = projection.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    encoder.embed(sounds(), RATE, "first")
    hook.remove()
    hidden = torch.cat(seen).double()
    # Least-norm W with W @ hidden[i] = targets[i]: the two sounds map exactly onto the two texts.
    weight = targets.double().T @ torch.linalg.pinv(hidden.T)
    with torch.no_grad():
        projection.weight.copy_(weight.float())
        projection.bias.zero_()
    return encoder


def test_sound_a_is_heard_as_thunder_and_sound_b_as_rain(encoder):
    embeds = encoder.embed(sounds(), RATE, "first")  # [2, 512]
    bank = LabelEmbeddingCache().get(encoder, VOCABULARY)
    a, b = describe_audio(embeds, bank, counts=(1, 1, 1), threshold=-1.0, selection="cosine")
    assert a.selected["foreground"][0].label.label == "thunder"
    assert b.selected["background"][0].label.label == "rain"
    assert a.selected["foreground"][0].score == pytest.approx(1.0, abs=1e-3)
    assert b.selected["background"][0].score == pytest.approx(1.0, abs=1e-3)
    # The threshold keeps only what was built in: each sound names its own label and nothing else.
    a, b = describe_audio(embeds, bank, counts=(1, 1, 1), threshold=0.99, selection="cosine")
    assert (a.text, b.text) == ("thunderstorm, lightning", "rain, wet streets")


def test_windows_of_a_long_sound_each_get_their_prompt(encoder):
    storyboard = torch.cat([sounds()[0], sounds()[1], sounds()[0]], dim=-1)[None]  # A, B, A: 30 s
    embeds = encoder.embed(storyboard, RATE, "per_window")
    assert embeds.shape == (3, 512)
    bank = LabelEmbeddingCache().get(encoder, VOCABULARY)
    prompts = describe_audio(embeds, bank, counts=(1, 1, 0), threshold=0.99, template="a harbour, {audio}",
                             selection="cosine")
    assert [p.text for p in prompts] == [
        "a harbour, thunderstorm, lightning",
        "a harbour, rain, wet streets",
        "a harbour, thunderstorm, lightning",
    ]


def test_the_disk_cache_knows_the_same_weights_after_a_reload(encoder, tmp_path):
    LabelEmbeddingCache(tmp_path).get(encoder, VOCABULARY)
    reloaded = copy.deepcopy(encoder)  # as if loaded again from the same file
    calls = []
    reloaded.encode_text = lambda texts: calls.append(texts) or encoder.encode_text(texts)
    LabelEmbeddingCache(tmp_path).get(reloaded, VOCABULARY)
    assert calls == []

    assert model_fingerprint(reloaded) == model_fingerprint(encoder)
    with torch.no_grad():
        reloaded.model.text_projection.linear2.bias.add_(0.1)
    assert model_fingerprint(reloaded) != model_fingerprint(encoder)
    LabelEmbeddingCache(tmp_path).get(reloaded, VOCABULARY)
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# The Audio to Prompt node, in-process (the real-server run is in test_prompt_server.py)


@pytest.fixture
def prompt_nodes(tmp_path, monkeypatch):
    """The node module, with previews and the label cache in ``tmp_path`` and VOCABULARY as the
    labels (the small CLAP's tokenizer knows only its words)."""
    nodes = comfy_pack.load("nodes.prompt_nodes")
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path / "temp"))

    class SmallVocabularyCache(nodes.LabelEmbeddingCache):
        def get(self, encoder, vocabulary=None, model_key=None):
            return super().get(encoder, VOCABULARY, model_key)

    monkeypatch.setattr(nodes, "_label_cache", SmallVocabularyCache(tmp_path / "labels"))
    return nodes


def run_node(nodes, encoder: ClapEncoder, waveform: torch.Tensor, **options):
    handle = comfy_pack.load("nodes.clap_nodes").wrap_encoder(encoder, "known-clap")
    settings = dict(window_mode="first", foreground_count=1, background_count=1, ambience_count=0,
                    threshold=0.99, template="", selection="cosine")
    return nodes.AudioToPrompt.execute(handle, {"waveform": waveform, "sample_rate": RATE}, **settings | options)


def test_the_node_gives_one_prompt_per_sound_with_the_template_filled(prompt_nodes, encoder, tmp_path):
    out = run_node(prompt_nodes, encoder, sounds(), template="a harbour at night, {audio}")
    prompt, foreground, background, ambience = out.args
    assert prompt == ["a harbour at night, thunderstorm, lightning", "a harbour at night, rain, wet streets"]
    assert foreground == ["thunderstorm, lightning", ""]
    assert background == ["", "rain, wet streets"]
    assert ambience == ["", ""]
    # The score chart of each sound is previewed; the words are in the history too.
    assert [image["type"] for image in out.ui["images"]] == ["temp", "temp"]
    assert len(list((tmp_path / "temp").glob("*.png"))) == 2
    assert out.ui["text"] == prompt


def test_the_node_gives_one_prompt_per_window_of_a_long_sound(prompt_nodes, encoder):
    storyboard = torch.cat([sounds()[0], sounds()[1]], dim=-1)[None]  # A then B: 20 s
    prompt = run_node(prompt_nodes, encoder, storyboard, window_mode="per_window").args[0]
    assert prompt == ["thunderstorm, lightning", "rain, wet streets"]


def test_the_node_refuses_empty_audio_clearly(prompt_nodes, encoder):
    with pytest.raises(ValueError, match="empty"):
        run_node(prompt_nodes, encoder, torch.zeros(1, 1, 0))


def test_every_node_input_and_output_explains_itself(prompt_nodes):
    schema = prompt_nodes.AudioToPrompt.define_schema()
    assert schema.node_id == "C2D_AudioToPrompt"
    assert all(item.tooltip for item in [*schema.inputs, *schema.outputs])
    # Lists, so core nodes downstream (CLIP Text Encode, KSampler, ...) run once per window.
    assert all(output.is_output_list for output in schema.outputs)
    assert [output.id for output in schema.outputs] == ["prompt", "foreground", "background", "ambience"]
