"""Audio to Prompt in a real ComfyUI graph: sound -> words -> core CLIP Text Encode -> image.

The random test CLAP scores every label about the same, so these tests check the wiring (lists,
previews, core nodes downstream), not which words come out; test_prompt_clap.py checks the words.
"""

from __future__ import annotations

from graphs import CHECKPOINT, CLAP, pixels, sample

from tools.comfy_server import ComfyClient, Graph, NodeRef


def sound_to_words(g: Graph, sound: str, window_mode: str, template: str = "a beach at dusk, {audio}") -> NodeRef:
    """Core Load Audio -> CLAP Loader -> Audio to Prompt (cosine threshold -1: every level gets words)."""
    audio = g.node("LoadAudio", audio=sound)
    clap = g.node("C2D_ClapLoader", clap_name=CLAP)
    return g.node("C2D_AudioToPrompt", clap_model=clap.out, audio=audio.out, window_mode=window_mode,
                  foreground_count=2, background_count=1, ambience_count=1, threshold=-1.0, template=template,
                  selection="cosine")


def test_audio_to_prompt_words_feed_clip_text_encode_and_give_an_image_per_window(comfy: ComfyClient) -> None:
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    words = sound_to_words(g, "thunder_44k_stereo.wav", window_mode="per_window")  # 12 s: two windows
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text=words[0])
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="blurry, low quality")
    save = sample(g, ckpt[0], ckpt, positive.out, negative.out, prefix="audio-to-prompt")

    # The first use of a CLAP model encodes its 434 labels (about a minute on two CPU cores).
    run = comfy.execute(g.prompt(), timeout=600)

    node_output = run.entry["outputs"][words.id]
    texts = node_output["text"]
    assert len(texts) == 2, "one prompt per 10 s window"
    for text in texts:
        assert text.startswith("a beach at dusk, ") and len(text.split(", ")) >= 4
    assert len(node_output["images"]) == 2, "one score chart per window"
    # CLIP Text Encode and everything after it ran once per window: two images.
    images = [pixels(png) for png in comfy.images(run.entry, node_id=save.id)]
    assert len(images) == 2
    assert all(image.shape == (256, 256, 3) and image.std() > 1.0 for image in images)


def test_a_whole_sound_gives_one_prompt_and_one_image(comfy: ComfyClient) -> None:
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    words = sound_to_words(g, "thunder_44k_stereo.wav", window_mode="mean", template="")
    # The level outputs are strings like the prompt: the foreground words alone drive this image.
    positive = g.node("CLIPTextEncode", clip=ckpt[1], text=words[1])
    negative = g.node("CLIPTextEncode", clip=ckpt[1], text="")
    save = sample(g, ckpt[0], ckpt, positive.out, negative.out, prefix="audio-to-prompt-mean")

    run = comfy.execute(g.prompt(), timeout=600)

    [text] = run.entry["outputs"][words.id]["text"]
    assert text and "{audio}" not in text
    assert len(comfy.images(run.entry, node_id=save.id)) == 1
