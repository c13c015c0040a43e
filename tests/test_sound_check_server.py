"""Every path into the pack reads a sound the same way (issue 26), through the real server.

Each file of ``sound_check_cases`` goes through two paths: Load Audio -> CLAP Encode and CLAP
Encode File (streamed), both in 'mean' mode (the files are under 10 s: one window, the same on
both). A file that works must give the same embedding on both (within 1e-5, read exactly through
the test probe node) and the same warnings, in the nodes' UI output and in the server log; a
file that is refused must fail on both with the same AudioError text, which names the file and
says what to do, with nothing raw in it. The damaged mp3, a ruined m4a and a text file then go
through every node that reads a sound.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from graphs import CLAP
from robust_support import run_failing
from safetensors.torch import load_file
from sound_check_cases import BY_NAME, CASES, Case

from tools.comfy_server import ComfyClient, ComfyServer, ExecutionFailed, Graph

pytestmark = pytest.mark.slow

AUDIO_ERROR = "clap2diffusion_core.errors.AudioError"  # as ComfyUI's error panel shows the type


@pytest.fixture(scope="module")
def sounds(comfy_server: ComfyServer) -> Iterator[dict[str, Path]]:
    paths = {}
    for case in CASES:
        paths[case.name] = comfy_server.input_dir / case.name
        case.write(paths[case.name])
    yield paths
    for path in paths.values():
        path.unlink(missing_ok=True)


def load_graph(name: str, tag: str) -> Graph:
    """Load Audio -> CLAP Encode (mean) -> the probe."""
    g = Graph()
    clap = g.node("C2D_ClapLoader", _id="sc_clap", clap_name=CLAP)
    audio = g.node("C2D_LoadAudio", _id="sc_load", audio=name)
    embeds = g.node("C2D_ClapEncode", _id="sc_encode", clap_model=clap.out, audio=audio.out, window_mode="mean")
    g.node("SaveTensorProbe", _id="sc_probe", value=embeds.out, filename_prefix=tag)
    return g


def file_graph(name: str, tag: str, window_mode: str = "mean") -> Graph:
    """CLAP Encode File (streamed) -> the probe."""
    g = Graph()
    clap = g.node("C2D_ClapLoader", _id="sc_clap", clap_name=CLAP)
    embeds = g.node("C2D_ClapEncodeFile", _id="sc_file", clap_model=clap.out, audio=name, window_mode=window_mode,
                    max_seconds=0.0)
    g.node("SaveTensorProbe", _id="sc_probe", value=embeds.out, filename_prefix=tag)
    return g


def every_path_graph(name: str, streamed: bool = True) -> Graph:
    """One Load Audio feeding every node that takes AUDIO, beside CLAP Encode File in each mode
    (``streamed``; without them the graph's first failure can only be Load Audio's)."""
    g = Graph()
    clap = g.node("C2D_ClapLoader", _id="sc_clap", clap_name=CLAP)
    audio = g.node("C2D_LoadAudio", _id="sc_load", audio=name)
    for mode in ("first", "per_window"):
        encode = g.node("C2D_ClapEncode", _id=f"sc_encode_{mode}", clap_model=clap.out, audio=audio.out,
                        window_mode=mode)
        g.node("PreviewAny", source=encode.out)
    frames = g.node("C2D_ClapEncodeFrames", _id="sc_frames", clap_model=clap.out, audio=audio.out, fps=2.0,
                    frames=0, window_seconds=1.0, hop_seconds=0.0, smoothing_seconds=0.0, change_threshold=0.05)
    schedule = g.node("C2D_AudioToPromptSchedule", _id="sc_schedule", clap_model=clap.out, clap_embeds=frames[0],
                      fps=2.0, foreground_count=1, background_count=1, ambience_count=0, threshold=-1.0, margin=0.0,
                      min_frames=0, template="a street, {audio}", audio=audio.out, change_frames=frames[2])
    g.node("PreviewAny", source=schedule[0])
    curves = g.node("C2D_AudioEnergyCurves", _id="sc_energy", audio=audio.out, fps=2.0, frames=0, range_db=60.0)
    g.node("PreviewAny", source=curves[0])
    words = g.node("C2D_AudioToPrompt", _id="sc_prompt", clap_model=clap.out, audio=audio.out, window_mode="mean",
                   foreground_count=1, background_count=1, ambience_count=0, threshold=-1.0, template="{audio}",
                   selection="cosine")
    g.node("PreviewAny", source=words[0])
    for mode in ("first", "mean", "per_window") if streamed else ():
        encoded = g.node("C2D_ClapEncodeFile", _id=f"sc_file_{mode}", clap_model=clap.out, audio=name,
                          window_mode=mode, max_seconds=0.0)
        g.node("PreviewAny", source=encoded.out)
    return g


SOUND_NODES = ["sc_load", "sc_encode_first", "sc_encode_per_window", "sc_frames", "sc_schedule", "sc_energy",
               "sc_prompt", "sc_file_first", "sc_file_mean", "sc_file_per_window"]  # fmt: skip


def nonce(prompt: dict[str, Any]) -> dict[str, Any]:
    """Run every node but the CLAP Loader again (ComfyUI would serve cached outputs otherwise)."""
    import uuid

    mark = uuid.uuid4().hex
    for node in prompt.values():
        if node["class_type"] != "C2D_ClapLoader":
            node["inputs"]["_sc_nonce"] = mark
    return prompt


def assert_text(text: str, wanted: tuple[str, ...], server: ComfyServer) -> None:
    lowered = " ".join(text.lower().split())
    missing = [w for w in wanted if w.lower() not in lowered]
    assert not missing, f"lacks {missing}: {text}"
    for raw in ("errno", "av.error", "invaliddataerror", "libsndfileerror", "traceback", str(server.base_dir).lower()):
        assert raw not in lowered, f"raw {raw!r} in: {text}"


def assert_refusal(err: ExecutionFailed, node_type: str, case: Case, server: ComfyServer) -> None:
    assert err.node_type == node_type, err
    assert err.exception_type == AUDIO_ERROR, err.exception_type
    assert_text(err.exception_message, case.expect[0], server)


def run_ok(comfy: ComfyClient, server: ComfyServer, g: Graph) -> tuple[dict[str, Any], list[str]]:
    with server.log_since() as log:
        entry = comfy.wait(comfy.queue(nonce(g.prompt())), 300)
    return entry["outputs"], log


def probe(server: ComfyServer, outputs: dict[str, Any]) -> torch.Tensor:
    [name] = outputs["sc_probe"]["probe"]
    return load_file(str(server.output_dir / name))["value"]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_sound_check_same_outcome_through_load_audio_and_the_streamed_encode(
        case: Case, comfy: ComfyClient, comfy_server: ComfyServer, sounds: dict[str, Path]) -> None:  # fmt: skip
    tag = case.name.replace(".", "_")
    loaded, streamed = load_graph(case.name, f"{tag}_load"), file_graph(case.name, f"{tag}_file")
    if case.verdict == "refused":
        first = run_failing(comfy, nonce(loaded.prompt()))
        second = run_failing(comfy, nonce(streamed.prompt()))
        assert_refusal(first, "C2D_LoadAudio", case, comfy_server)
        assert_refusal(second, "C2D_ClapEncodeFile", case, comfy_server)
        assert first.exception_message == second.exception_message
        return
    out_load, log_load = run_ok(comfy, comfy_server, loaded)
    out_file, log_file = run_ok(comfy, comfy_server, streamed)
    a, b = probe(comfy_server, out_load), probe(comfy_server, out_file)
    assert a.shape == b.shape == (1, 512)
    diff = float((a - b).abs().max())
    print(f"\n[sound_check] {case.name}: max |load - streamed| = {diff:.2e}")
    assert diff <= 1e-5, f"{case.what}: embeddings differ by {diff:.2e}"
    shown = [out_load.get(node, {}).get("sound_warnings", []) for node in ("sc_load", "sc_encode")]
    shown.append(out_file.get("sc_file", {}).get("sound_warnings", []))
    assert shown[0] == shown[1] == shown[2], shown
    assert len(shown[0]) == len(case.expect), shown[0]
    for warning, wanted in zip(shown[0], case.expect):
        assert_text(warning, wanted, comfy_server)
        assert any(warning in line for line in log_load), f"the log of Load Audio's run lacks: {warning}"
        assert any(warning in line for line in log_file), f"the log of CLAP Encode File's run lacks: {warning}"


def test_sound_check_the_damaged_mp3_reads_the_same_on_every_path(
        comfy: ComfyClient, comfy_server: ComfyServer, sounds: dict[str, Path]) -> None:  # fmt: skip
    """The file issue 26 found failing raw in the streamed node: every node that reads it uses what
    decodes, and says where it is damaged, in the same words."""
    case = BY_NAME["sc_damaged.mp3"]
    outputs, log = run_ok(comfy, comfy_server, every_path_graph(case.name))
    shown = {node: outputs.get(node, {}).get("sound_warnings") for node in SOUND_NODES}
    [warning] = shown["sc_load"]
    assert_text(warning, case.expect[0], comfy_server)
    assert all(w == [warning] for w in shown.values()), shown
    assert any(warning in line for line in log)


@pytest.mark.parametrize("name", ["sc_ruined.m4a", "sc_text.mp3", "sc_rate_0hz.wav"])
def test_sound_check_a_refused_file_gets_the_same_audio_error_on_every_path(
        name: str, comfy: ComfyClient, comfy_server: ComfyServer, sounds: dict[str, Path]) -> None:  # fmt: skip
    case = BY_NAME[name]
    errors = [run_failing(comfy, nonce(every_path_graph(name, streamed=False).prompt()))]
    assert_refusal(errors[0], "C2D_LoadAudio", case, comfy_server)
    for mode in ("first", "mean", "per_window"):
        errors.append(run_failing(comfy, nonce(file_graph(name, f"sc_every_{mode}", mode).prompt())))
        assert_refusal(errors[-1], "C2D_ClapEncodeFile", case, comfy_server)
    assert len({err.exception_message for err in errors}) == 1, [err.exception_message for err in errors]
