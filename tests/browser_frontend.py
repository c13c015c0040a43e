"""The real ComfyUI frontend in Debian's chromium, driven through playwright.

    with Frontend.open(server.url, user_data_dir) as fe:
        fe.load_template("clap2diffusion", "audio_text_to_image")
        fe.set_widgets([(1, "ckpt_name", "tiny-sd15.safetensors")])
        prompt_id = fe.click_run()
        ...
        fe.screenshot(path)

Playwright only drives the browser: it never downloads one (no ``playwright install``); the
browser is the system's chromium (``apt-get install chromium``, done by tools/setup.sh as root).
Everything happens in the page the way a user's clicks would do it: the template JSON comes from
the server's template route, ``app.loadGraphData`` opens it (as the template browser does), widget
values change through the LiteGraph node API, and the Run button queues the graph.

Frontends draw their UI differently (1.32 PrimeVue dialogs; 1.49 and 1.58 a ``div[role=dialog]``,
an "N errors found" overlay and an Issues panel). :data:`UI` holds every element the tests look
for, found by what the versions expose (test ids and roles), so a new frontend means one place to
read and change.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 2400, "height": 1350}

# Frontend settings for a headless test run (they live in the test server's user folder):
SETTINGS = {
    # A returning user: a first start opens the template browser over the canvas.
    "Comfy.TutorialCompleted": True,
    # Templates name the real model files (v1-5-pruned-emaonly-fp16, ...), which the test server
    # does not have: the frontend would offer to download them in a dialog before every run.
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    # The frontend validates (and repairs) every workflow it loads: keep it on, repairs are toasts.
    "Comfy.Validation.Workflows": True,
    # Screenshots of a whole graph are zoomed out; draw the text anyway.
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
}

# Failed requests that are not the pack's business: files the frontend probes for on start, the
# internet (there is none here; the frontend asks api.comfy.org for releases and nodes), and routes
# a newer frontend asks an older server for (1.49+ polls /api/jobs, which ComfyUI 0.3.75 lacks).
BENIGN_HTTP_PATHS = ("/api/userdata", "/user.css", "/favicon.ico", "/api/jobs")
# Console errors of the same kind (the frontend's log lines for such requests), matched anywhere in
# the message: 1.58 logs the missing /api/jobs as "Failed to fetch queue: JobsApiError: Failed to
# fetch jobs: 404" and "[Jobs API] Error fetching jobs: ...".
BENIGN_CONSOLE = ("Failed to load resource", "Failed to fetch jobs", "ComfyApp graph accessed before initialization")


def benign_console(message: str) -> bool:
    return any(part in message for part in BENIGN_CONSOLE)


@dataclass(frozen=True)
class Elements:
    """Every element of the frontend the tests look for, as CSS selectors that hold across the
    frontends tested (1.32.9, 1.49.6, 1.58.1). Test ids and roles first; a class only where a
    version exposes nothing else."""

    #: Modal dialogs: 1.32's PrimeVue ``.p-dialog`` carries role=dialog too; 1.49+ reka-ui dialogs.
    dialog: str = "[role=dialog], [role=alertdialog]"
    #: Warning and error toasts (PrimeVue in every version).
    toast: str = ".p-toast-message-error, .p-toast-message-warn"
    #: One card per template in the template browser, ``template-workflow-<name>``.
    template_card: str = "[data-testid^='template-workflow-']"
    #: The Run button. (1.49+ also label the queue-mode menu trigger beside it "Run".)
    run_button: str = "[data-testid='queue-button']"
    #: 1.49+: a run's errors first show as "N errors found" with "View details" ...
    error_overlay: str = "[data-testid='error-overlay']"
    error_overlay_details: str = "[data-testid='error-overlay-see-errors']"
    error_overlay_dismiss: str = "[data-testid='error-overlay-dismiss']"
    #: ... which opens the Issues tab of the right-side panel, one section per kind of error.
    error_panel: str = "[data-testid='properties-panel']"
    error_sections: str = "[data-testid^='error-group-']"
    #: In a section, the button that shows one input's message (1.49+: "Info for <node> - <input>").
    error_info_button: str = "[data-testid^='error-group-'] button[aria-label^='Info for']"


UI = Elements()

# What a page reports as "on screen": visible, or fixed (overlays report no offsetParent).
_VISIBLE_TEXTS = """(selector) => [...document.querySelectorAll(selector)]
    .filter(e => e.offsetParent !== null || getComputedStyle(e).position === 'fixed')
    .map(e => e.innerText.trim()).filter(Boolean)"""


def chromium_path() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageLog:
    """What the page reported: console errors, uncaught exceptions, failed requests."""

    console: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    http: list[tuple[int, str]] = field(default_factory=list)  # (status, url) of 4xx/5xx answers

    def mark(self) -> tuple[int, int, int]:
        return len(self.console), len(self.exceptions), len(self.http)

    def since(self, mark: tuple[int, int, int]) -> PageLog:
        c, e, h = mark
        return PageLog(self.console[c:], self.exceptions[e:], self.http[h:])


class Frontend:
    def __init__(self, page: Any, url: str):
        self.page = page
        self.url = url.rstrip("/")
        self.log = PageLog()
        self.startup: PageLog | None = None  # what the page logged while it started
        host = urlparse(self.url).netloc

        def on_console(message: Any) -> None:
            if message.type == "error":
                self.log.console.append(message.text)

        def on_response(response: Any) -> None:
            if response.status >= 400:
                self.log.http.append((response.status, response.url))

        def on_failed(request: Any) -> None:
            if urlparse(request.url).netloc == host and request.failure != "net::ERR_ABORTED":
                self.log.http.append((0, f"{request.url} ({request.failure})"))

        page.on("console", on_console)
        page.on("pageerror", lambda error: self.log.exceptions.append(str(error)))
        page.on("response", on_response)
        page.on("requestfailed", on_failed)

    # -- lifecycle

    @classmethod
    @contextlib.contextmanager
    def open(cls, url: str, user_data_dir: Path, timeout: float = 180.0,
             playwright: Any = None) -> Iterator[Frontend]:
        """Start chromium (fresh profile), open the frontend and wait until the app is ready.

        ``playwright``: a running ``sync_playwright()`` to launch from. Playwright's sync API runs
        one driver per thread, so two frontends open at once (two servers) must share it.
        """
        from playwright.sync_api import sync_playwright

        executable = chromium_path()
        if executable is None:
            raise FileNotFoundError("chromium is not installed (tools/setup.sh installs it: apt-get install chromium)")
        with contextlib.ExitStack() as stack:
            if playwright is None:
                playwright = stack.enter_context(sync_playwright())
            context = playwright.chromium.launch_persistent_context(
                str(user_data_dir), executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
                viewport=VIEWPORT, timeout=timeout * 1000)
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(timeout * 1000)
                # The "Nodes 2.0" announcement banner would cover the top of every screenshot.
                page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
                frontend = cls(page, url)
                # Settings are the server's (per user): in place before the page reads them.
                requests.post(f"{frontend.url}/settings", json=SETTINGS, timeout=30).raise_for_status()
                page.goto(frontend.url)
                page.wait_for_function(
                    "() => window.app?.graph && window.app.extensionManager?.setting"
                    " && Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 100")
                page.wait_for_timeout(500)  # late start-up requests
                frontend.startup = frontend.log.since((0, 0, 0))
                yield frontend
            finally:
                context.close()

    # -- queries

    def registered(self, node_types: list[str]) -> list[str]:
        """The subset of ``node_types`` the frontend knows (from the server's /object_info)."""
        return self.page.evaluate("(types) => types.filter(t => t in LiteGraph.registered_node_types)",
                                  node_types)

    def open_template_browser(self) -> str:
        """Open Templates (as the sidebar button does); returns the dialog's text."""
        self.page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        self.page.locator(UI.dialog, has_text="Templates").first.wait_for()
        self.page.wait_for_timeout(500)
        return "\n".join(self.dialogs())

    def open_pack_templates(self, module: str) -> list[str]:
        """In the open template browser, click the pack's entry; returns the template names shown."""
        self.page.locator(UI.dialog).get_by_text(module, exact=True).first.click()
        cards = self.page.locator(UI.template_card)
        cards.first.wait_for()
        self.page.wait_for_timeout(300)
        return [c.get_attribute("data-testid").removeprefix("template-workflow-") for c in cards.all()]

    def open_template_card(self, name: str, node_count: int) -> None:
        """Click a template's card; waits until its graph is open and the dialog has closed."""
        self.page.locator(f"[data-testid='template-workflow-{name}']").click()
        self.page.wait_for_function(
            "([n, selector]) => app.graph.nodes.length === n && !document.querySelector(selector)",
            arg=[node_count, UI.dialog])

    def close_dialogs(self) -> None:
        """Escape closes a dialog; the 1.49+ error overlay and Issues panel have their own close."""
        self.page.keyboard.press("Escape")
        dismiss = self.page.locator(UI.error_overlay_dismiss)
        if dismiss.count() and dismiss.first.is_visible():
            dismiss.first.click()
        if self.page.locator(UI.error_panel).count():  # 1.49+: the panel's open state is a setting
            self.page.evaluate("() => app.extensionManager.setting.set('Comfy.RightSidePanel.IsOpen', false)")
        self.page.wait_for_timeout(300)

    def templates(self) -> dict[str, list[str]]:
        """The custom-node templates the server lists for the template browser."""
        return self.page.evaluate("async () => (await fetch('/api/workflow_templates')).json()")

    def dialogs(self) -> list[str]:
        """The text of every dialog, warning/error toast and error overlay on screen."""
        return self.page.evaluate(_VISIBLE_TEXTS, f"{UI.dialog}, {UI.toast}, {UI.error_overlay}")

    def error_text(self, needle: str, timeout: float = 30.0) -> str:
        """Wait until the frontend shows an error whose text contains ``needle``; returns that text.

        1.32 opens a dialog with the message. 1.49+ show an "N errors found" overlay: its "View
        details" opens the Issues panel, whose sections hold the node and the server's error report.
        """
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        opened: set[str] = set()
        while time.monotonic() < deadline:
            seen = self.page.evaluate(_VISIBLE_TEXTS, f"{UI.dialog}, {UI.error_sections}")
            found = [text for text in seen if needle in text]
            if found:
                return "\n".join(found)
            details = self.page.locator(UI.error_overlay_details)
            if details.count() and details.first.is_visible():
                details.first.click()
            # An input's message sits behind its "Info for <node> - <input>" button.
            for info in self.page.locator(UI.error_info_button).all():
                label = info.get_attribute("aria-label")
                if label not in opened and info.is_visible():
                    info.click()
                    opened.add(label)
            self.page.wait_for_timeout(250)
        raise AssertionError(f"no error containing {needle!r} on screen within {timeout:.0f} s; shown: {seen}")

    # -- actions

    def load_template(self, module: str, name: str) -> dict[str, Any]:
        """Open a pack's template as the template browser does; returns the template JSON."""
        return self.page.evaluate("""async ([module, name]) => {
            const response = await fetch(`/api/workflow_templates/${module}/${name}.json`);
            if (!response.ok) throw new Error(`template ${module}/${name}: HTTP ${response.status}`);
            const workflow = await response.json();
            await app.loadGraphData(workflow, true, true, name);
            return workflow;
        }""", [module, name])

    def serialize(self) -> dict[str, Any]:
        """The open graph as the frontend saves it (Workflow > Save writes this JSON)."""
        return self.page.evaluate("() => JSON.parse(JSON.stringify(app.graph.serialize()))")

    def set_widgets(self, values: list[tuple[int, str, Any]]) -> None:
        """Set widget values through the graph API, as editing them on the canvas does."""
        self.page.evaluate("""(values) => {
            for (const [id, name, value] of values) {
                const node = app.graph.getNodeById(id);
                const widget = node?.widgets?.find(w => w.name === name);
                if (!widget) throw new Error(`node ${id} has no widget ${name}`);
                widget.value = value;
                widget.callback?.(value, app.canvas, node);
            }
            app.graph.setDirtyCanvas(true, true);
        }""", values)

    def graph_to_prompt(self) -> dict[str, Any]:
        """``app.graphToPrompt()``: {"output": API prompt, "workflow": the graph}."""
        return self.page.evaluate("async () => JSON.parse(JSON.stringify(await app.graphToPrompt()))")

    def click_run(self) -> dict[str, Any]:
        """Click the Run button; returns the server's answer to the POST /api/prompt it sends."""
        with self.page.expect_response(
                lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as answer:
            self.page.locator(UI.run_button).first.click()
        response = answer.value
        body = response.json()
        body["http_status"] = response.status
        return body

    def queue(self) -> dict[str, Any]:
        """Queue the graph through the frontend's own command (what Run and Ctrl+Enter do, whatever
        the toolbar looks like in this frontend version); returns the server's answer."""
        with self.page.expect_response(
                lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as answer:
            self.page.evaluate("() => app.extensionManager.command.execute('Comfy.QueuePrompt')")
        response = answer.value
        body = response.json()
        body["http_status"] = response.status
        return body

    def wait_for_images(self, node_ids: list[int], timeout: float = 120.0) -> dict[int, int]:
        """Wait until each node shows an image preview on the canvas; returns the image counts."""
        deadline = time.monotonic() + timeout
        counts: dict[int, int] = {}
        while time.monotonic() < deadline:
            counts = {int(k): v for k, v in self.page.evaluate("""(ids) => Object.fromEntries(ids.map(id => {
                const imgs = app.graph.getNodeById(id)?.imgs ?? [];
                return [id, imgs.filter(i => i.complete && i.naturalWidth > 0).length];
            }))""", node_ids).items()}
            if all(counts.values()):
                break
            self.page.wait_for_timeout(250)
        return counts

    def fit_view(self) -> None:
        """Zoom to the whole graph, groups included (the frontend's Fit View uses nodes only)."""
        self.page.evaluate("""() => {
            const boxes = [...app.graph.nodes.map(n => n.boundingRect), ...app.graph.groups.map(g => g._bounding)];
            let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
            for (const [x, y, w, h] of boxes) {
                x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
            }
            app.canvas.ds.fitToBounds([x0 - 20, y0 - 20, x1 - x0 + 40, y1 - y0 + 40]);
            app.canvas.setDirty(true, true);
        }""")
        self.page.wait_for_timeout(300)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path
