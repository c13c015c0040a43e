"""Every example workflow in the real ComfyUI frontend, in Debian's chromium, end to end.

One browser for the module, on the session's real server (this pack and the random test models
in its folders). For each ``example_workflows/*.json``, as a user would: open it from the
server's template route with ``app.loadGraphData`` (what the template browser does), check that
every node type is known and no dialog or error appears, check that the frontend saves it back
unchanged, point its model and sound widgets at the test files through the graph API, have the
frontend build the API prompt (checked against tools/run_workflow.py, which `make demo` uses),
click Run, wait for the image on the server, wait for the previews on the canvas, and save a
screenshot to test-artifacts/browser/<workflow>.png.

Then the newest comfyui-frontend-package (unpacked by tools/setup.sh into .cache/frontends/), served
by the same ComfyUI 0.3.75 with ``--front-end-root`` on a second server over the same folders:
it starts with the pack, knows every node, lists the examples, builds the same API prompt and
runs a workflow. (The checks above that read its UI, the template dialog, the Run button and the
saved widget values, are those of the pinned frontend: the newest one draws and saves them
differently.)
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from browser_frontend import BENIGN_HTTP_PATHS, Frontend, PageLog, chromium_path, newest_frontend_root
from PIL import Image

from tools import test_models as tm
from tools.comfy_server import ComfyClient, ComfyServer, ExecutionFailed
from tools.run_workflow import FRAME_NODES, QUICK_FRAMES, QUICK_STEPS, ui_to_api

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
MODULE = "clap2diffusion"  # the server lists our templates under the pack's custom_nodes folder name
# Widgets the frontend adds on its own (audio player, upload buttons): in the prompt, never used.
FRONTEND_ONLY_INPUTS = {"audioUI", "upload"}
# The random models on 2 shared cores: the image only has to show that the graph ran.
SIZE, STEPS = 128, QUICK_STEPS
# Nodes whose canvas preview the screenshots must show.
PREVIEW_NODES = {"C2D_HierarchicalDecompose", "C2D_AudioToPrompt", "SaveImage", "PreviewImage"}

_timings: dict[str, float] = {}


def _skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (requirements-dev.txt)"
    if chromium_path() is None:
        return "chromium is not installed (tools/setup.sh installs it as root: apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def playwright_driver():
    """One Playwright driver for the module: its sync API allows one per thread, and the pinned
    and the newest frontend are open at the same time."""
    if (reason := _skip_reason()) is not None:
        if os.environ.get("C2D_REQUIRE_BROWSER"):  # CI: a missing browser is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def frontend(playwright_driver, comfy_server: ComfyServer, tmp_path_factory: pytest.TempPathFactory):
    start = time.monotonic()
    with Frontend.open(comfy_server.url, tmp_path_factory.mktemp("chromium-profile"),
                       playwright=playwright_driver) as fe:
        _timings["browser start"] = time.monotonic() - start
        yield fe
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps(_timings, indent=2) + "\n")


def test_frontend_starts_with_the_pack_and_lists_every_example(frontend: Frontend) -> None:
    assert frontend.page.evaluate("() => app.extensions.some(e => e.name === 'clap2diffusion.LoadAudioPlayer')"), \
        "web/clap2diffusion.js was not loaded"
    startup = frontend.startup or PageLog()
    ours = [m for m in startup.console + startup.exceptions if "clap2diffusion" in m.lower()]
    assert not ours, f"the pack's frontend code logged errors: {ours}"
    assert sorted(frontend.templates().get(MODULE, [])) == sorted(p.stem for p in EXAMPLES)

    # Templates > Extensions > clap2diffusion shows a card per workflow; a click opens it.
    frontend.open_template_browser()
    frontend.page.locator(".p-dialog span", has_text=MODULE).first.click()
    cards = frontend.page.locator("[data-testid^='template-workflow-']")
    cards.first.wait_for()
    names = sorted(c.get_attribute("data-testid").removeprefix("template-workflow-") for c in cards.all())
    assert names == sorted(p.stem for p in EXAMPLES)
    frontend.screenshot(ARTIFACTS / "template_browser.png")
    frontend.page.locator("[data-testid='template-workflow-audio_text_to_image']").click()
    template = json.loads((REPO_ROOT / "example_workflows" / "audio_text_to_image.json").read_text())
    frontend.page.wait_for_function("(n) => app.graph.nodes.length === n && !document.querySelector('.p-dialog')",
                                    arg=len(template["nodes"]))
    assert sorted(n["type"] for n in frontend.serialize()["nodes"]) == sorted(n["type"] for n in template["nodes"])


def test_every_pack_node_can_be_added_to_the_canvas(frontend: Frontend, comfy: ComfyClient) -> None:
    """As from the node library: each node is created with its widgets, no exception.
    (The frontend's own audio upload widget once made Load Audio (CLAP2Diffusion) uncreatable.)"""
    ours = sorted(name for name in comfy.object_info() if name.startswith("C2D_"))
    mark = frontend.log.mark()
    made = frontend.page.evaluate("""(types) => {
        app.graph.clear();
        return types.map((type, i) => {
            const node = LiteGraph.createNode(type);
            if (!node) return [type, null];
            node.pos = [40 + 460 * (i % 5), 40 + 460 * Math.floor(i / 5)];
            app.graph.add(node);
            return [type, (node.widgets ?? []).map(w => w.name)];
        });
    }""", ours)
    assert [t for t, widgets in made if widgets is None] == []
    widgets = dict(made)
    assert widgets["C2D_LoadAudio"][:2] == ["audio", "max_seconds"] and "audioUI" in widgets["C2D_LoadAudio"]
    log = frontend.log.since(mark)
    assert log.exceptions == [] and [m for m in log.console if not m.startswith("Failed to load")] == []
    frontend.fit_view()
    frontend.screenshot(ARTIFACTS / "pack_nodes.png")


# --------------------------------------------------------------------------------------------
# one example workflow, end to end


def values_for_test_models(workflow: dict[str, Any], object_info: dict[str, Any], models: tm.TestModels) -> list[tuple]:
    """(node id, widget, value): the test files for the workflow's model and sound widgets, and a
    small size and few steps for the random models on a CPU."""
    adapter = any(n["type"] == "C2D_ApplyAudioToModel" for n in workflow["nodes"])
    files = {
        ("CheckpointLoaderSimple", "ckpt_name"): models.sd15_checkpoint.name,
        ("C2D_ClapLoader", "clap_name"): models.clap_folder.name,
        ("C2D_Clap2DiffusionLoader", "clap2diffusion_name"):
            (models.clap2diffusion_adapter if adapter else models.clap2diffusion).name,
        ("ControlNetLoader", "control_net_name"): models.controlnet.name,
        ("LoraLoader", "lora_name"): models.lora.name,
    }
    available = object_info["C2D_LoadAudio"]["input"]["required"]["audio"][1]["options"]
    spare_sounds = [s for s in ("thunder.wav", "chirp_stereo.wav", "tone_440hz.wav") if s in available]
    values: list[tuple] = []
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        kind, node_id = node["type"], node["id"]
        for (node_type, widget), value in files.items():
            if kind == node_type:
                values.append((node_id, widget, value))
        if kind == "C2D_LoadAudio":  # keep a sound the server has; a different one per node
            sound = node["widgets_values"][0]
            sound = sound if sound in spare_sounds else spare_sounds[0]
            spare_sounds.remove(sound)
            values.append((node_id, "audio", sound))
        elif kind == "EmptyLatentImage":
            values += [(node_id, "width", SIZE), (node_id, "height", SIZE)]
        elif kind in ("KSampler", "BasicScheduler"):  # BasicScheduler: audio_guidance's custom sampling
            values.append((node_id, "steps", STEPS))
        elif kind == "C2D_FitAudioProjectorFromText":  # the fit's plumbing, not a full fit on a CPU
            values += [(node_id, "corpus_size", 16), (node_id, "steps", 10)]
        elif kind in FRAME_NODES:  # a few frames (latents), not the whole sound's
            values.append((node_id, "frames", QUICK_FRAMES))
        elif kind == "C2D_DistilAudioAdapter":  # likewise: 2 steps at 64 px
            values += [(node_id, w, v) for w, v in {"corpus_size": 16, "steps": 2, "batch_size": 2, "resolution": 64}.items()]
    return values


def saved_graph_differences(saved: dict[str, Any], template: dict[str, Any]) -> list[str]:
    """What the frontend would save differently from the template file."""
    differences = []
    saved_nodes = {n["id"]: n for n in saved["nodes"]}
    for node in template["nodes"]:
        again = saved_nodes.get(node["id"])
        if again is None:
            differences.append(f"node {node['id']} ({node['type']}) is gone")
            continue
        for key in ("type", "inputs", "outputs", "widgets_values", "title", "properties"):
            if node.get(key) != again.get(key):
                differences.append(f"node {node['id']} ({node['type']}) {key}: file {node.get(key)!r}, "
                                   f"frontend {again.get(key)!r}")
    if saved["links"] != template["links"]:
        differences.append(f"links: file {template['links']}, frontend {saved['links']}")
    if [g["title"] for g in saved["groups"]] != [g["title"] for g in template["groups"]]:
        differences.append("groups differ")
    return differences


def prompt_differences(frontend_prompt: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    differences = []
    for node_id in sorted(set(frontend_prompt) | set(ours), key=int):
        a, b = frontend_prompt.get(node_id), ours.get(node_id)
        if a is None or b is None:
            differences.append(f"node {node_id}: only in {'run_workflow' if a is None else 'the frontend'}")
            continue
        inputs = {k: v for k, v in a["inputs"].items() if k not in FRONTEND_ONLY_INPUTS}
        if a["class_type"] != b["class_type"] or inputs != b["inputs"]:
            differences.append(f"node {node_id} ({a['class_type']}): frontend {inputs}, run_workflow {b['inputs']}")
    return differences


def unexpected_problems(log: PageLog, allowed_views: set[str]) -> list[str]:
    """Page errors, console errors and failed requests, minus what is not the pack's business:
    files the frontend probes for, the internet, and sounds the template names that this server
    does not have (the audio player asks for them until the test picks a test sound)."""
    problems = [f"exception: {e}" for e in log.exceptions]
    problems += [f"console: {m}" for m in log.console if not m.startswith("Failed to load resource")]
    for status, url in log.http:
        parsed = urlparse(url)
        if parsed.path.startswith(BENIGN_HTTP_PATHS):
            continue
        if parsed.path == "/api/view" and set(parse_qs(parsed.query).get("filename", [])) <= allowed_views:
            continue
        problems.append(f"HTTP {status}: {url}")
    return problems


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflow_opens_queues_and_runs_in_the_browser(
    frontend: Frontend, comfy: ComfyClient, test_models: tm.TestModels, path: Path
) -> None:
    start = time.monotonic()
    template = json.loads(path.read_text())
    info = comfy.object_info()
    types = sorted({n["type"] for n in template["nodes"]})
    missing = sorted(set(types) - set(frontend.registered(types)))
    assert not missing, f"the frontend does not know {missing}"

    mark = frontend.log.mark()
    loaded = frontend.load_template(MODULE, path.stem)
    assert loaded == template, "the server's template route served another file"
    frontend.page.wait_for_timeout(300)
    assert frontend.dialogs() == [], "a dialog or warning appeared on load"

    # The file is what the frontend itself saves: load + save gives it back.
    assert saved_graph_differences(frontend.serialize(), template) == []

    # Our nodes are wired to core nodes, both ways (Audio to Prompt feeds core nodes only).
    ours = {n["id"]: n["type"].startswith("C2D_") for n in template["nodes"]}
    ours_to_core = [link for link in template["links"] if ours[link[1]] and not ours[link[3]]]
    core_to_ours = [link for link in template["links"] if not ours[link[1]] and ours[link[3]]]
    assert ours_to_core, "no pack node feeds a core node"
    assert core_to_ours or path.stem == "audio_to_prompt", "no core node feeds a pack node"

    frontend.set_widgets(values_for_test_models(template, info, test_models))

    # The frontend's API prompt is the one tools/run_workflow.py (make demo) makes from the graph.
    built = frontend.graph_to_prompt()
    assert prompt_differences(built["output"], ui_to_api(built["workflow"], info)) == []

    answer = frontend.click_run()
    assert answer["http_status"] == 200 and not answer.get("node_errors"), answer
    entry = comfy.wait(answer["prompt_id"], timeout=600)
    saved = [r for r in comfy.files(entry) if r.get("type") == "output"]
    assert saved, f"{path.stem}: no image saved"
    image = Image.open(io.BytesIO(comfy.view(**saved[0])))
    assert image.size == (SIZE, SIZE)

    previews = [n["id"] for n in template["nodes"] if n["type"] in PREVIEW_NODES]
    shown = frontend.wait_for_images(previews)
    assert all(shown.values()), f"previews missing on the canvas: {shown}"
    frontend.fit_view()
    frontend.screenshot(ARTIFACTS / f"{path.stem}.png")

    assert frontend.dialogs() == []
    sounds = {n["widgets_values"][0] for n in template["nodes"] if n["type"] == "C2D_LoadAudio"}
    assert unexpected_problems(frontend.log.since(mark), sounds) == []
    _timings[path.stem] = time.monotonic() - start


# --------------------------------------------------------------------------------------------
# errors reach the user as text they can act on


def test_a_node_error_shows_the_packs_message_in_a_dialog(
    frontend: Frontend, comfy: ComfyClient, test_models: tm.TestModels
) -> None:
    """A stage 1 file on Apply Audio to Model: the run fails and the dialog says why and what to do."""
    template = frontend.load_template(MODULE, "audio_adapter")
    values = [(node, widget, test_models.clap2diffusion.name if widget == "clap2diffusion_name" else value)
              for node, widget, value in values_for_test_models(template, comfy.object_info(), test_models)]
    frontend.set_widgets(values)
    answer = frontend.click_run()
    assert answer["http_status"] == 200, answer
    with pytest.raises(ExecutionFailed, match="no adapter layers"):
        comfy.wait(answer["prompt_id"], timeout=300)
    frontend.page.wait_for_function("() => document.querySelector('.p-dialog')?.innerText?.includes('adapter')",
                                    timeout=30_000)
    text = " ".join(frontend.dialogs())
    assert "Apply Audio to Model" in text and "stage 2/3 file" in text, text
    frontend.screenshot(ARTIFACTS / "error_stage1_on_apply_audio_to_model.png")
    frontend.close_dialogs()


def test_a_missing_sound_is_named_when_the_run_is_refused(
    frontend: Frontend, comfy: ComfyClient, test_models: tm.TestModels
) -> None:
    template = frontend.load_template(MODULE, "audio_text_to_image")
    values = values_for_test_models(template, comfy.object_info(), test_models)
    load_audio = next(n["id"] for n in template["nodes"] if n["type"] == "C2D_LoadAudio")
    frontend.set_widgets([*values, (load_audio, "audio", "not_uploaded.wav")])
    answer = frontend.click_run()
    assert answer["http_status"] == 400
    errors = answer["node_errors"][str(load_audio)]["errors"]
    # Once, on the input at fault (not repeated for every input of the node).
    assert [e["extra_info"]["input_name"] for e in errors] == ["audio"], errors
    assert "not_uploaded.wav" in errors[0]["details"] and "upload it first" in errors[0]["details"], errors
    frontend.page.wait_for_function("() => document.querySelector('.p-dialog')?.innerText?.includes('not_uploaded')",
                                    timeout=30_000)
    frontend.screenshot(ARTIFACTS / "error_missing_sound.png")
    frontend.close_dialogs()


# --------------------------------------------------------------------------------------------
# the newest frontend, served by our ComfyUI with --front-end-root


@pytest.fixture(scope="module")
def newest(playwright_driver, comfy_server: ComfyServer, tmp_path_factory: pytest.TempPathFactory):
    """(Frontend, its server): the newest frontend build on a second server with the session's folders."""
    root = newest_frontend_root(REPO_ROOT)
    reason = _skip_reason() or (None if root else "no newest frontend in .cache/frontends (tools/setup.sh unpacks it)")
    if reason is not None:
        if os.environ.get("C2D_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    server = ComfyServer(comfy_server.base_dir, extra_args=["--front-end-root", str(root)],
                         log_path=comfy_server.base_dir / "server-newest-frontend.log")
    start = time.monotonic()
    with server, Frontend.open(server.url, tmp_path_factory.mktemp("chromium-newest"),
                               playwright=playwright_driver) as fe:
        _timings["newest frontend start"] = time.monotonic() - start
        yield fe, server


def test_the_newest_frontend_starts_with_the_pack_and_knows_every_node(newest) -> None:
    fe, server = newest
    version = fe.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
    assert version == newest_frontend_root(REPO_ROOT).parent.name  # it is the newest build that is served
    assert fe.page.evaluate("() => app.extensions.some(e => e.name === 'clap2diffusion.LoadAudioPlayer')")
    ours = sorted(t for t in server.client.object_info() if t.startswith("C2D_"))
    assert ours and fe.registered(ours) == ours
    assert sorted(fe.templates().get(MODULE, [])) == sorted(p.stem for p in EXAMPLES)
    assert [e for e in (fe.startup or PageLog()).exceptions if "clap2diffusion" in e] == []


def test_the_newest_frontend_builds_the_same_prompt_and_runs_an_example(newest, test_models: tm.TestModels) -> None:
    fe, server = newest
    client = server.client
    info = client.object_info()
    template = fe.load_template(MODULE, "audio_adapter")
    fe.set_widgets(values_for_test_models(template, info, test_models))
    built = fe.graph_to_prompt()
    assert prompt_differences(built["output"], ui_to_api(built["workflow"], info)) == []
    answer = fe.queue()
    assert answer["http_status"] == 200 and not answer.get("node_errors"), answer
    saved = [r for r in client.files(client.wait(answer["prompt_id"], timeout=600)) if r.get("type") == "output"]
    assert saved and Image.open(io.BytesIO(client.view(**saved[0]))).size == (SIZE, SIZE)
