"""Bad, odd and hostile sounds and file names through the real server (issue 7).

One test per sound of ``bad_inputs.SOUNDS``: the file is written into ComfyUI's input folder at
test time and run through the main graph (Load Audio -> CLAP Encode -> ... -> KSampler, 64 px,
one step). A sound either works, giving the image its twin gives (the twin is what "correct"
means for it), or the node fails with a message that names the problem and what to do; then the
server must keep serving and the good graph must give the reference image again.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from bad_inputs import OTHER, REFERENCE, SOUNDS, TWINS, SoundCase
from graphs import saved_images
from robust_support import (
    NODE,
    Reference,
    assert_message,
    distance,
    fresh,
    graph,
    image_of,
    node_error_text,
    rejected,
    run_failing,
)

from tools.comfy_server import ComfyClient, ComfyServer

pytestmark = pytest.mark.slow

#: A "works" sound may differ from its twin by this fraction of the distance between two
#: different sounds (REFERENCE and OTHER); lossy codecs and an 8 kHz file land well inside it.
TOLERANCE = 0.2


class Corpus:
    """Writes twins into the input folder on first use and keeps their images."""

    def __init__(self, server: ComfyServer):
        self.server = server
        self.images: dict[str, np.ndarray] = {}

    def image(self, name: str) -> np.ndarray:
        if name not in self.images:
            TWINS[name].write(self.server.input_dir / name)
            self.images[name] = image_of(self.server.client, fresh(graph(name).prompt()))
        return self.images[name]

    @property
    def yardstick(self) -> float:
        """Distance between the images of two different sounds of the same kind."""
        return distance(self.image(REFERENCE), self.image(OTHER))


@pytest.fixture(scope="module")
def reference(comfy_server: ComfyServer) -> Reference:
    return Reference(comfy_server.client)


@pytest.fixture(scope="module")
def corpus(comfy_server: ComfyServer) -> Iterator[Corpus]:
    corpus = Corpus(comfy_server)
    yield corpus
    for name in corpus.images:  # leave the input folder as the session found it
        (comfy_server.input_dir / name).unlink(missing_ok=True)


@pytest.fixture
def written(comfy_server: ComfyServer) -> Iterator[list[Path]]:
    """Files a test writes into the input folder; removed after it."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def test_robust_yardstick_two_different_sounds_give_clearly_different_images(corpus: Corpus) -> None:
    # Without this the tolerance below would mean nothing.
    assert corpus.yardstick > 2.0


@pytest.mark.parametrize("case", SOUNDS, ids=lambda case: case.name)
def test_robust_sound(case: SoundCase, comfy: ComfyClient, comfy_server: ComfyServer, corpus: Corpus,
                      reference: Reference, written: list[Path]) -> None:
    path = comfy_server.input_dir / case.name
    written.append(path)
    case.write(path)
    prompt = fresh(graph(case.name, save_audio=case.roundtrip).prompt())

    if case.verdict == "refused":
        err = run_failing(comfy, prompt)
        assert err.node_type == "C2D_LoadAudio", err
        assert_message(err.exception_message, *case.message)
        assert "Traceback" not in err.exception_message
        reference.assert_still_serving()
        return

    with comfy_server.log_since() as log:
        entry = comfy.wait(comfy.queue(prompt), 600)
    images = saved_images(comfy, entry)
    assert len(images) == 1
    image = images[0].astype(np.int16)
    twin = corpus.image(case.twin)
    print(f"\n[robust] {case.name}: distance to {case.twin} {distance(image, twin):.4f} "
          f"(yardstick {corpus.yardstick:.3f})")
    if case.exact:
        assert np.array_equal(image, twin), f"{case.what}: differs from {case.twin} by {distance(image, twin):.4f}"
    else:
        d, limit = distance(image, twin), TOLERANCE * corpus.yardstick
        assert d <= limit, f"{case.what}: distance to {case.twin} {d:.3f} > {limit:.3f}"
    for text in case.log:
        assert any(text in line for line in log), f"server log lacks {text!r}"
    if case.roundtrip:
        saved = comfy.files(entry, "audio", "15")
        decoded, rate = sf.read(io.BytesIO(comfy.view(saved[0]["filename"], saved[0]["subfolder"], "output")),
                                always_2d=True)
        source, source_rate = sf.read(str(path), always_2d=True)  # libsndfile: an independent decoder
        assert rate == source_rate and decoded.shape == source.shape
        # Save Audio writes 16-bit FLAC: equal to within half a 16-bit step plus the rounding.
        assert np.abs(decoded - source).max() <= 1.01 / 32768


# --------------------------------------------------------------------------------------------
# file names: Load Audio reads only from the input folder


@pytest.fixture(scope="module")
def escapes(comfy_server: ComfyServer) -> Iterator[dict[str, tuple[str, tuple[str, ...]]]]:
    """Names that try to leave the input folder, and what the refusal must say. A real sound lies
    next to the input folder, and two symlinks inside it point out (removed afterwards: a link to
    a folder above would loop any recursive listing of the input folder)."""
    outside = comfy_server.base_dir / "robust_outside.wav"
    TWINS[REFERENCE].write(outside)
    inside = comfy_server.input_dir / "thunder.wav"
    links = {comfy_server.input_dir / "robust_link_out.wav": outside,
             comfy_server.input_dir / "robust_link_dir": outside.parent}  # fmt: skip
    for link, target in links.items():
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    yield {
        "dotdot": ("../robust_outside.wav", ("outside comfyui's input folder", "must be a name inside")),
        "dotdot_nested": ("robust_sub/../../robust_outside.wav", ("outside comfyui's input folder",)),
        "absolute_outside": (str(outside), ("full path", "must be a name inside comfyui's input folder")),
        "absolute_inside": (str(inside), ("full path", "must be a name inside comfyui's input folder")),
        "symlink_to_file_outside": ("robust_link_out.wav", ("outside comfyui's input folder",)),
        "symlink_to_folder_outside": ("robust_link_dir/robust_outside.wav", ("outside comfyui's input folder",)),
        "nul_byte": ("robust\x00.wav", ("nul", "robust")),
        "missing": ("robust_never_uploaded.wav", ("not found in comfyui's input folder", "upload it first")),
    }
    for link in links:
        link.unlink(missing_ok=True)
    outside.unlink(missing_ok=True)


ESCAPES = ["dotdot", "dotdot_nested", "absolute_outside", "absolute_inside", "symlink_to_file_outside",
           "symlink_to_folder_outside", "nul_byte", "missing"]  # fmt: skip


@pytest.mark.parametrize("kind", ESCAPES)
def test_robust_load_audio_refuses_names_outside_the_input_folder(kind: str, escapes: dict, comfy: ComfyClient,
                                                                   reference: Reference) -> None:
    name, message = escapes[kind]
    err = rejected(comfy, fresh(graph(name).prompt()))  # HTTP 400 at validation: nothing ran
    assert set(err.node_errors) == {NODE["load_audio"]}, err.node_errors
    assert_message(node_error_text(err, NODE["load_audio"]), *message)
    reference.assert_still_serving()


def test_robust_load_audio_follows_a_symlink_that_stays_inside(comfy: ComfyClient, comfy_server: ComfyServer,
                                                              reference: Reference) -> None:
    link = comfy_server.input_dir / "robust_link_in.wav"
    link.unlink(missing_ok=True)
    link.symlink_to("thunder.wav")  # relative: inside the input folder
    try:
        assert np.array_equal(image_of(comfy, fresh(graph(link.name).prompt())), reference.image)
    finally:
        link.unlink()
