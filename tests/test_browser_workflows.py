"""Every example workflow in the real ComfyUI frontend, in Debian's chromium, end to end, on
every frontend a user may run: the one the server's ComfyUI pins (1.32.9 for ComfyUI 0.3.75 in CI,
1.49.6 for 0.33 in `make test-newer`) and the builds tools/setup.sh unpacks into .cache/frontends/
(:data:`FRONTENDS`), each on a server of its own (``--front-end-root``) over the session's folders.

On each frontend, as a user would: list the pack's templates in the template browser and open one
from its card; then for each workflow of :data:`WORKFLOWS`, open it from the server's template
route with ``app.loadGraphData`` (what the template browser does), check that every node type is
known and no dialog or error appears, check that what the frontend saves converts to the same API
prompt as the file (tools/run_workflow.py's conversion: frontends differ in how they write
``widgets_values``, not in what they queue), point its model and sound widgets at the test files
through the graph API, have the frontend build the API prompt (checked against
tools/run_workflow.py, which `make demo` uses), click Run, wait for the image on the server and
the previews on the canvas, and save a screenshot. Two bad runs show the pack's error text where
that frontend shows errors. Elements are found through ``browser_frontend.UI``, in one place.

Screenshots: test-artifacts/browser/<name>.png for the pinned frontend (stable names: the README's
pictures come from there), test-artifacts/browser/frontend-<version>/<name>.png for the others, and
test-artifacts/browser/newest/audio_text_to_image.png: the example graph, run, on the newest frontend.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from browser_frontend import BENIGN_HTTP_PATHS, Frontend, PageLog, benign_console, chromium_path
from PIL import Image

from tools import test_models as tm
from tools.comfy_server import ComfyClient, ComfyServer, ExecutionFailed
from tools.run_workflow import FRAME_NODES, QUICK_FRAMES, QUICK_STEPS, map_widget_values, ui_to_api

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
MODULE = "clap2diffusion"  # the server lists our templates under the pack's custom_nodes folder name

#: The example workflows (example_workflows/<name>.json) run on every frontend. One per line.
WORKFLOWS = [
    "audio_adapter",
    "audio_adapter_from_text",
    "audio_controlnet",
    "audio_from_text_fit",
    "audio_guidance",
    "audio_lora",
    "audio_text_to_image",
    "audio_to_prompt",
    "sound_to_frames",
    "two_sounds",
]
#: Frontend builds served beside the pinned one (tools/setup.sh unpacks each into
#: .cache/frontends/<version>/static). The last is the newest.
FRONTENDS = ["1.49.6", "1.58.1"]
#: What the other frontends run too (Run, image, previews): one graph per injection. Every frontend
#: opens, saves back and builds the prompt of every workflow; the pinned one runs them all.
RUN_ON_EVERY_FRONTEND = ["audio_text_to_image", "audio_adapter"]
PINNED = "pinned"  # the frontend the server's ComfyUI requirements pin (installed in its venv)

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


class Session:
    """One frontend in chromium, on its server."""

    def __init__(self, fe: Frontend, server: ComfyServer, label: str):
        self.fe, self.server, self.label = fe, server, label
        self.version = fe.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        newest = label == FRONTENDS[-1]
        self.artifacts = ARTIFACTS if label == PINNED else ARTIFACTS / f"frontend-{label}"
        self.newest_artifacts = ARTIFACTS / "newest" if newest else None

    @property
    def client(self) -> ComfyClient:
        if not self.server.alive:
            pytest.fail(f"ComfyUI server ({self.label} frontend) died earlier:\n{self.server.log_tail()}")
        return self.server.client

    def screenshot(self, name: str) -> Path:
        path = self.fe.screenshot(self.artifacts / f"{name}.png")
        if self.newest_artifacts is not None and name == "audio_text_to_image":
            self.newest_artifacts.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, self.newest_artifacts / path.name)
        return path


def pinned_frontend_version() -> str | None:
    try:
        return importlib.metadata.version("comfyui-frontend-package")
    except importlib.metadata.PackageNotFoundError:
        return None


def _require(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("C2D_REQUIRE_BROWSER"):  # CI: a missing browser or frontend is a failure
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def playwright_driver():
    """One Playwright driver for the module: its sync API allows one per thread."""
    _require(_skip_reason())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def template_files(comfy_server: ComfyServer, test_models: tm.TestModels):
    """The model files and sounds the templates name, in the server's folders under those names
    (links to the test models, copies of a test sound), as a user who has them sees a template:
    frontends 1.49+ check a loaded workflow's files and report those missing on load. Removed
    afterwards, so the other modules see the session's folders as they were."""
    base = comfy_server.base_dir
    made: list[Path] = []
    for target, source in files_the_templates_name(comfy_server.client.object_info(), test_models).items():
        path = base / target
        if path.exists() or path.is_symlink():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if target.startswith("input/"):
            shutil.copyfile(source, path)
        else:
            path.symlink_to(source.resolve(), target_is_directory=source.is_dir())
        made.append(path)
    yield made
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module", params=[PINNED, *FRONTENDS])
def session(request, playwright_driver, comfy_server: ComfyServer, template_files,
            tmp_path_factory: pytest.TempPathFactory):
    """Each frontend in turn: the pinned one on the session's server, every other on a server of
    its own over the same folders (one at a time; each is stopped before the next starts)."""
    label = request.param
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        if label == PINNED:
            server = comfy_server
        else:
            if pinned_frontend_version() == label:
                pytest.skip(f"frontend {label} is this ComfyUI's pinned one: tested as '{PINNED}'")
            root = REPO_ROOT / ".cache" / "frontends" / label / "static"
            _require(None if (root / "index.html").is_file() else
                     f"no frontend {label} in {root.parent} (tools/setup.sh unpacks it)")
            server = stack.enter_context(ComfyServer(
                comfy_server.base_dir, extra_args=["--front-end-root", str(root)],
                log_path=comfy_server.base_dir / f"server-frontend-{label}.log"))
        fe = stack.enter_context(Frontend.open(server.url, tmp_path_factory.mktemp(f"chromium-{label}"),
                                               playwright=playwright_driver))
        current = Session(fe, server, label)
        _timings[f"{label}: start"] = time.monotonic() - start
        yield current
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps(_timings, indent=2) + "\n")


def test_browser_workflow_list_is_every_example() -> None:
    assert sorted(WORKFLOWS) == sorted(p.stem for p in (REPO_ROOT / "example_workflows").glob("*.json"))


def test_browser_each_frontend_is_the_one_asked_for(session: Session) -> None:
    want = pinned_frontend_version() if session.label == PINNED else session.label
    assert session.version == want


def test_browser_frontend_starts_with_the_pack_and_lists_every_example(session: Session) -> None:
    frontend = session.fe
    assert frontend.page.evaluate("() => app.extensions.some(e => e.name === 'clap2diffusion.LoadAudioPlayer')"), \
        "web/clap2diffusion.js was not loaded"
    startup = frontend.startup or PageLog()
    ours = [m for m in startup.console + startup.exceptions if "clap2diffusion" in m.lower()]
    assert not ours, f"the pack's frontend code logged errors: {ours}"
    assert sorted(frontend.templates().get(MODULE, [])) == sorted(WORKFLOWS)

    # Templates > Extensions > clap2diffusion shows a card per workflow; a click opens it.
    frontend.open_template_browser()
    assert sorted(frontend.open_pack_templates(MODULE)) == sorted(WORKFLOWS)
    session.screenshot("template_browser")
    template = json.loads((REPO_ROOT / "example_workflows" / "audio_text_to_image.json").read_text())
    frontend.open_template_card("audio_text_to_image", len(template["nodes"]))
    assert sorted(n["type"] for n in frontend.serialize()["nodes"]) == sorted(n["type"] for n in template["nodes"])


def test_browser_every_pack_node_can_be_added_to_the_canvas(session: Session) -> None:
    """As from the node library: each node is created with its widgets, no exception.
    (The frontend's own audio upload widget once made Load Audio (CLAP2Diffusion) uncreatable.)"""
    frontend = session.fe
    ours = sorted(name for name in session.client.object_info() if name.startswith("C2D_"))
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
    assert log.exceptions == [] and [m for m in log.console if not benign_console(m)] == []
    frontend.fit_view()
    session.screenshot("pack_nodes")


# --------------------------------------------------------------------------------------------
# one example workflow, end to end


#: (node type, widget) -> the model folder of the file it names.
MODEL_WIDGETS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("C2D_ClapLoader", "clap_name"): "clap",
    ("C2D_Clap2DiffusionLoader", "clap2diffusion_name"): "clap2diffusion",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("LoraLoader", "lora_name"): "loras",
}


def stand_in_file(node_type: str, widget: str, workflow: dict[str, Any], models: tm.TestModels) -> Path:
    """The test model that stands in for what a workflow's model widget names."""
    adapter = any(n["type"] == "C2D_ApplyAudioToModel" for n in workflow["nodes"])
    return {
        ("CheckpointLoaderSimple", "ckpt_name"): models.sd15_checkpoint,
        ("C2D_ClapLoader", "clap_name"): models.clap_folder,
        ("C2D_Clap2DiffusionLoader", "clap2diffusion_name"): models.clap2diffusion_adapter if adapter
        else models.clap2diffusion,
        ("ControlNetLoader", "control_net_name"): models.controlnet,
        ("LoraLoader", "lora_name"): models.lora,
    }[node_type, widget]


def values_for_test_models(workflow: dict[str, Any], object_info: dict[str, Any], models: tm.TestModels) -> list[tuple]:
    """(node id, widget, value): the test files for the workflow's model and sound widgets, and a
    small size and few steps for the random models on a CPU."""
    available = object_info["C2D_LoadAudio"]["input"]["required"]["audio"][1]["options"]
    spare_sounds = [s for s in ("thunder.wav", "chirp_stereo.wav", "tone_440hz.wav") if s in available]
    values: list[tuple] = []
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        kind, node_id = node["type"], node["id"]
        for node_type, widget in MODEL_WIDGETS:
            if kind == node_type:
                values.append((node_id, widget, stand_in_file(node_type, widget, workflow, models).name))
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


def files_the_templates_name(object_info: dict[str, Any], models: tm.TestModels) -> dict[str, Path]:
    """``"models/<folder>/<name>"`` / ``"input/<name>"`` -> the test file to put there, for every
    model file and sound the workflows of :data:`WORKFLOWS` name."""
    files: dict[str, Path] = {}
    for name in WORKFLOWS:
        workflow = json.loads((REPO_ROOT / "example_workflows" / f"{name}.json").read_text())
        for node in workflow["nodes"]:
            widgets = map_widget_values(object_info[node["type"]], node.get("widgets_values")) \
                if node["type"] in object_info else {}
            for (node_type, widget), folder in MODEL_WIDGETS.items():
                if node["type"] == node_type and widgets.get(widget):
                    files.setdefault(f"models/{folder}/{widgets[widget]}",
                                     stand_in_file(node_type, widget, workflow, models))
            if node["type"] == "C2D_LoadAudio" and widgets.get("audio"):
                files.setdefault(f"input/{widgets['audio']}", models.sounds["thunder.wav"])
    return files


def saved_graph_differences(saved: dict[str, Any], template: dict[str, Any], object_info: dict[str, Any]) -> list[str]:
    """What the frontend would save differently from the template file: its nodes, titles, links
    and groups, and the API prompt each converts to (frontends write ``widgets_values`` their own
    way: 1.49 drops an empty list, 1.58 drops the audio player's value; the prompt is what runs)."""
    differences = []
    saved_nodes = {n["id"]: n for n in saved["nodes"]}
    for node in template["nodes"]:
        again = saved_nodes.get(node["id"])
        if again is None:
            differences.append(f"node {node['id']} ({node['type']}) is gone")
            continue
        for key in ("type", "title"):
            if node.get(key) != again.get(key):
                differences.append(f"node {node['id']} ({node['type']}) {key}: file {node.get(key)!r}, "
                                   f"frontend {again.get(key)!r}")
    if len(saved_nodes) != len(template["nodes"]):
        differences.append(f"{len(saved_nodes)} nodes saved, {len(template['nodes'])} in the file")
    if saved["links"] != template["links"]:
        differences.append(f"links: file {template['links']}, frontend {saved['links']}")
    if [g["title"] for g in saved["groups"]] != [g["title"] for g in template["groups"]]:
        differences.append("groups differ")
    if not differences:
        ours, theirs = ui_to_api(template, object_info), ui_to_api(saved, object_info)
        differences += [f"prompt {d}" for d in prompt_differences(theirs, ours)]
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
    problems += [f"console: {m}" for m in log.console if not benign_console(m)]
    for status, url in log.http:
        parsed = urlparse(url)
        if parsed.path.startswith(BENIGN_HTTP_PATHS):
            continue
        if parsed.path == "/api/view" and set(parse_qs(parsed.query).get("filename", [])) <= allowed_views:
            continue
        problems.append(f"HTTP {status}: {url}")
    return problems


@pytest.mark.parametrize("name", WORKFLOWS)
def test_browser_example_workflow_opens_queues_and_runs(session: Session, test_models: tm.TestModels, name: str) -> None:
    start = time.monotonic()
    frontend, comfy = session.fe, session.client
    template = json.loads((REPO_ROOT / "example_workflows" / f"{name}.json").read_text())
    info = comfy.object_info()
    types = sorted({n["type"] for n in template["nodes"]})
    missing = sorted(set(types) - set(frontend.registered(types)))
    assert not missing, f"the frontend does not know {missing}"

    mark = frontend.log.mark()
    loaded = frontend.load_template(MODULE, name)
    assert loaded == template, "the server's template route served another file"
    frontend.page.wait_for_timeout(300)
    assert frontend.dialogs() == [], "a dialog or warning appeared on load"

    # What the frontend saves runs as the file does: load + save gives the same prompt back.
    assert saved_graph_differences(frontend.serialize(), template, info) == []

    # Our nodes are wired to core nodes, both ways (Audio to Prompt feeds core nodes only).
    ours = {n["id"]: n["type"].startswith("C2D_") for n in template["nodes"]}
    ours_to_core = [link for link in template["links"] if ours[link[1]] and not ours[link[3]]]
    core_to_ours = [link for link in template["links"] if not ours[link[1]] and ours[link[3]]]
    assert ours_to_core, "no pack node feeds a core node"
    assert core_to_ours or name == "audio_to_prompt", "no core node feeds a pack node"

    frontend.set_widgets(values_for_test_models(template, info, test_models))

    # The frontend's API prompt is the one tools/run_workflow.py (make demo) makes from the graph.
    built = frontend.graph_to_prompt()
    assert prompt_differences(built["output"], ui_to_api(built["workflow"], info)) == []
    if session.label != PINNED and name not in RUN_ON_EVERY_FRONTEND:
        frontend.fit_view()
        session.screenshot(name)
        assert frontend.dialogs() == []
        return

    answer = frontend.click_run()
    assert answer["http_status"] == 200 and not answer.get("node_errors"), answer
    entry = comfy.wait(answer["prompt_id"], timeout=600)
    saved = [r for r in comfy.files(entry) if r.get("type") == "output"]
    assert saved, f"{name}: no image saved"
    image = Image.open(io.BytesIO(comfy.view(**saved[0])))
    assert image.size == (SIZE, SIZE)

    previews = [n["id"] for n in template["nodes"] if n["type"] in PREVIEW_NODES]
    shown = frontend.wait_for_images(previews)
    assert all(shown.values()), f"previews missing on the canvas: {shown}"
    frontend.fit_view()
    session.screenshot(name)

    assert frontend.dialogs() == []
    sounds = {n["widgets_values"][0] for n in template["nodes"] if n["type"] == "C2D_LoadAudio"}
    assert unexpected_problems(frontend.log.since(mark), sounds) == []
    _timings[f"{session.label}: {name}"] = time.monotonic() - start


# --------------------------------------------------------------------------------------------
# errors reach the user as text they can act on


def test_browser_a_node_error_shows_the_packs_message(session: Session, test_models: tm.TestModels) -> None:
    """A stage 1 file on Apply Audio to Model: the run fails and the frontend says why and what to do."""
    frontend, comfy = session.fe, session.client
    template = frontend.load_template(MODULE, "audio_adapter")
    values = [(node, widget, test_models.clap2diffusion.name if widget == "clap2diffusion_name" else value)
              for node, widget, value in values_for_test_models(template, comfy.object_info(), test_models)]
    frontend.set_widgets(values)
    answer = frontend.click_run()
    assert answer["http_status"] == 200, answer
    with pytest.raises(ExecutionFailed, match="no adapter layers"):
        comfy.wait(answer["prompt_id"], timeout=300)
    text = frontend.error_text("stage 2/3 file")
    assert "Apply Audio to Model" in text or "C2D_ApplyAudioToModel" in text, text
    session.screenshot("error_stage1_on_apply_audio_to_model")
    frontend.close_dialogs()


def test_browser_a_missing_sound_is_named_when_the_run_is_refused(session: Session, test_models: tm.TestModels) -> None:
    frontend, comfy = session.fe, session.client
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
    frontend.error_text("not_uploaded.wav")
    session.screenshot("error_missing_sound")
    frontend.close_dialogs()
