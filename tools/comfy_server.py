"""A real ComfyUI server for end-to-end tests (and the demo runner), and a small client for it.

    server = ComfyServer(base_dir).start()      # main.py --cpu --base-directory base_dir
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="tiny-sd15.safetensors")
    pos = g.node("CLIPTextEncode", clip=ckpt[1], text="a beach")
    ...
    pngs = server.client.run(g.prompt())

Only the standard library plus ``requests`` and ``aiohttp`` (both ComfyUI dependencies): the
module must not import ComfyUI, which runs in its own process exactly as users run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "clap2diffusion"

Link = list  # [node_id: str, output_index: int], ComfyUI's API-format link


# --------------------------------------------------------------------------------------------
# errors


class ComfyError(RuntimeError):
    """Base class for everything this module raises about the server."""


class ServerDied(ComfyError):
    """The server process exited or never answered; the message carries the end of its log."""


class PromptRejected(ComfyError):
    """POST /prompt answered 400: the graph failed validation."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any]):
        self.error = error
        self.node_errors = node_errors
        details = "; ".join(
            f"node {nid} ({info.get('class_type')}): "
            + ", ".join(f"{e.get('message')}: {e.get('details')}" for e in info.get("errors", []))
            for nid, info in node_errors.items()
        )
        super().__init__(f"prompt rejected: {error.get('message')} {error.get('details', '')} {details}".strip())


class ExecutionFailed(ComfyError):
    """The graph was accepted but a node raised (or the run was interrupted)."""

    def __init__(self, message: dict[str, Any], interrupted: bool = False):
        self.message = message
        self.interrupted = interrupted
        self.node_id: str | None = message.get("node_id")
        self.node_type: str | None = message.get("node_type")
        self.exception_type: str = message.get("exception_type", "Interrupted" if interrupted else "")
        self.exception_message: str = message.get("exception_message", "").strip()
        self.traceback: str = "".join(message.get("traceback", []))
        what = "interrupted" if interrupted else f"{self.exception_type}: {self.exception_message}"
        super().__init__(f"node {self.node_id} ({self.node_type}) failed: {what}")


# --------------------------------------------------------------------------------------------
# graphs


@dataclass(frozen=True)
class NodeRef:
    """A node in a Graph; ``ref[i]`` is the link to its i-th output."""

    id: str
    class_type: str

    def __getitem__(self, output: int) -> Link:
        return [self.id, output]

    @property
    def out(self) -> Link:
        """The first output: ``ckpt.out`` reads better than ``ckpt[0]`` for one-output nodes."""
        return [self.id, 0]


@dataclass
class Graph:
    """Builds an API-format prompt: ``{"1": {"class_type": ..., "inputs": {...}}, ...}``."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def node(self, class_type: str, /, _id: str | None = None, **inputs: Any) -> NodeRef:
        """Add a node; values are widget values or links (``other[i]``). Ids count up from 1."""
        node_id = _id or str(len(self.nodes) + 1)
        if node_id in self.nodes:
            raise ValueError(f"node id {node_id} already used")
        self.nodes[node_id] = {"class_type": class_type, "inputs": dict(inputs)}
        return NodeRef(node_id, class_type)

    def set(self, ref: NodeRef | str, **inputs: Any) -> None:
        """Change inputs of an existing node (e.g. a second run with another seed)."""
        self.nodes[ref.id if isinstance(ref, NodeRef) else ref]["inputs"].update(inputs)

    def prompt(self) -> dict[str, dict[str, Any]]:
        """A deep copy, safe to mutate or send."""
        return json.loads(json.dumps(self.nodes))


def uncached(prompt: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``prompt`` that ComfyUI will execute again from scratch.

    ComfyUI's output cache keys every node on all the inputs in the prompt, while execution only
    passes the inputs a node declares, so one undeclared input per node defeats the cache
    without changing what any node computes.
    """
    nonce = uuid.uuid4().hex
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        node["inputs"]["_uncached"] = nonce
    return out


# --------------------------------------------------------------------------------------------
# websocket events


@dataclass(frozen=True)
class Event:
    time: float  # time.monotonic() at arrival
    type: str
    data: dict[str, Any]


class EventStream:
    """The server's websocket messages for one client id, collected by a background thread.

    Connect before queueing: ComfyUI only sends per-node ``executing`` messages to the client
    whose id came with the prompt.
    """

    def __init__(self, ws_url: str):
        self.ws_url = ws_url
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="comfy-ws", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> EventStream:
        self._thread.start()
        if not self._connected.wait(15) or self._error:
            raise ComfyError(f"websocket {self.ws_url} did not connect: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def _run(self) -> None:
        try:
            asyncio.run(self._listen())
        except BaseException as err:  # surfaced through __enter__ / ignored after
            self._error = err
            self._connected.set()

    async def _listen(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(self.ws_url, heartbeat=30) as ws:
            self._connected.set()
            stop = asyncio.ensure_future(self._stop.wait())
            while not self._stop.is_set():
                receive = asyncio.ensure_future(ws.receive())
                done, _ = await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    receive.cancel()
                    break
                msg = receive.result()
                if msg.type == aiohttp.WSMsgType.TEXT:  # binary frames are previews: not needed
                    payload = json.loads(msg.data)
                    with self._lock:
                        self.events.append(Event(time.monotonic(), payload["type"], payload.get("data", {})))
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def for_prompt(self, prompt_id: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.data.get("prompt_id") == prompt_id]

    def node_times(self, prompt_id: str) -> dict[str, float]:
        """Seconds each executed node took: from its ``executing`` message to the next one."""
        events = [e for e in self.for_prompt(prompt_id)
                  if e.type in ("executing", "execution_success", "execution_error", "execution_interrupted")]
        times: dict[str, float] = {}
        for current, following in zip(events, events[1:]):
            node = current.data.get("node") if current.type == "executing" else None
            if node is not None:
                times[node] = times.get(node, 0.0) + following.time - current.time
        return times


# --------------------------------------------------------------------------------------------
# client


@dataclass
class Execution:
    """One finished run: the history entry, the PNGs and (when watched) per-node seconds."""

    prompt_id: str
    entry: dict[str, Any]
    images: list[bytes]
    seconds: float
    node_times: dict[str, float] = field(default_factory=dict)

    @property
    def cached_nodes(self) -> list[str]:
        for kind, data in self.entry.get("status", {}).get("messages", []):
            if kind == "execution_cached":
                return list(data.get("nodes", []))
        return []


class ComfyClient:
    """HTTP client for ComfyUI's API (the same calls the frontend makes)."""

    def __init__(self, url: str, client_id: str | None = None, request_timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.request_timeout = request_timeout
        self.session = requests.Session()
        self._object_info: dict[str, Any] | None = None

    def _get(self, path: str, **params: Any) -> requests.Response:
        response = self.session.get(self.url + path, params=params, timeout=self.request_timeout)
        response.raise_for_status()
        return response

    def system_stats(self) -> dict[str, Any]:
        """``/system_stats``: ``{"system": {"comfyui_version": ..., "python_version": ...}, "devices": [...]}``."""
        return self._get("/system_stats").json()

    def object_info(self, node_class: str | None = None, refresh: bool = False) -> dict[str, Any]:
        """``/object_info`` (all node classes, cached) or one class's entry."""
        if node_class is not None:
            return self._get(f"/object_info/{node_class}").json()[node_class]
        if self._object_info is None or refresh:
            self._object_info = self._get("/object_info").json()
        return self._object_info

    def queue(self, prompt: Mapping[str, Any], extra_data: dict[str, Any] | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected with ComfyUI's node_errors."""
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        response = self.session.post(self.url + "/prompt", json=body, timeout=self.request_timeout)
        if response.status_code == 400:
            data = response.json()
            raise PromptRejected(data.get("error", {}), data.get("node_errors", {}))
        response.raise_for_status()
        return response.json()["prompt_id"]

    def running(self) -> list[str]:
        """Ids of the prompts executing now (``/queue``'s ``queue_running``)."""
        return [item[1] for item in self._get("/queue").json().get("queue_running", [])]

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry once the prompt finished (success or error), else None."""
        return self._get(f"/history/{prompt_id}").json().get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.1) -> dict[str, Any]:
        """Poll /history until the prompt finishes; raise ExecutionFailed if it failed."""
        deadline = time.monotonic() + timeout
        while (entry := self.history(prompt_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")
            time.sleep(poll)
        status = entry.get("status", {})
        if status.get("status_str") == "error" or not status.get("completed", True):
            for kind, data in status.get("messages", []):
                if kind in ("execution_error", "execution_interrupted"):
                    raise ExecutionFailed(data, interrupted=kind == "execution_interrupted")
            raise ExecutionFailed({"exception_message": f"unknown failure: {status}"})
        return entry

    @staticmethod
    def files(entry: Mapping[str, Any], kind: str = "images", node_id: str | None = None) -> list[dict[str, str]]:
        """File records (``filename``, ``subfolder``, ``type``) a finished prompt produced."""
        outputs = entry.get("outputs", {})
        selected = [outputs[node_id]] if node_id is not None else list(outputs.values())
        return [record for output in selected for record in output.get(kind, [])]

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        return self._get("/view", filename=filename, subfolder=subfolder, type=type).content

    def images(self, entry: Mapping[str, Any], node_id: str | None = None) -> list[bytes]:
        """The bytes of every image in a history entry (``type`` output or temp), via /view."""
        return [self.view(r["filename"], r.get("subfolder", ""), r.get("type", "output"))
                for r in self.files(entry, "images", node_id)]

    def run(self, prompt: Mapping[str, Any], timeout: float = 300.0) -> list[bytes]:
        """Queue, wait, return the images (PNG bytes). Raises PromptRejected / ExecutionFailed."""
        return self.images(self.wait(self.queue(prompt), timeout))

    def execute(self, prompt: Mapping[str, Any], timeout: float = 300.0) -> Execution:
        """Like run(), watching the websocket for per-node execution times."""
        start = time.monotonic()
        with EventStream(self.ws_url) as events:
            prompt_id = self.queue(prompt)
            entry = self.wait(prompt_id, timeout)
            # The last `executing` message can trail the history entry by a moment.
            settle = time.monotonic() + 2.0
            while time.monotonic() < settle and not any(
                    e.type == "executing" and e.data.get("node") is None for e in events.for_prompt(prompt_id)):
                time.sleep(0.02)
            node_times = events.node_times(prompt_id)
        return Execution(prompt_id, entry, self.images(entry), time.monotonic() - start, node_times)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Interrupt the running prompt (only ``prompt_id`` if given)."""
        body = {"prompt_id": prompt_id} if prompt_id else {}
        self.session.post(self.url + "/interrupt", json=body, timeout=self.request_timeout).raise_for_status()

    def free(self, unload_models: bool = True, free_memory: bool = False) -> None:
        """Ask the server to unload models (and drop its caches) when it is next idle."""
        body = {"unload_models": unload_models, "free_memory": free_memory}
        self.session.post(self.url + "/free", json=body, timeout=self.request_timeout).raise_for_status()

    def upload_file(self, path: str | os.PathLike[str], name: str | None = None, subfolder: str = "",
                    type: str = "input", overwrite: bool = True) -> str:
        """Upload a file (image, sound, ...) as the frontend's upload widgets do.

        Returns the value a file widget takes: ``name`` or ``subfolder/name``.
        """
        path = Path(path)
        with path.open("rb") as handle:
            response = self.session.post(
                self.url + "/upload/image",
                files={"image": (name or path.name, handle)},
                data={"type": type, "subfolder": subfolder, "overwrite": "true" if overwrite else "false"},
                timeout=self.request_timeout,
            )
        response.raise_for_status()
        data = response.json()
        return f"{data['subfolder']}/{data['name']}" if data.get("subfolder") else data["name"]


# --------------------------------------------------------------------------------------------
# server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def comfyui_path() -> Path:
    """``$COMFYUI_PATH`` if set, else the pack's ``.comfyui`` (what tools/setup.sh makes)."""
    return Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui").resolve()


def make_base_dir(base: Path, models: Mapping[str, Sequence[Path] | Path] = (),
                  inputs: Sequence[Path] = (), pack_dir: Path = REPO_ROOT) -> Path:
    """Lay out a ComfyUI base directory: our pack linked in, model files linked into folders.

    ``models`` maps a ComfyUI model folder name (``checkpoints``, ``clap``, ...) to files or
    folders to link there; ``inputs`` are copied into ``input/`` (ComfyUI may write there).
    """
    base.mkdir(parents=True, exist_ok=True)
    for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
        (base / sub).mkdir(exist_ok=True)
    pack_link = base / "custom_nodes" / PACK_NAME
    if not pack_link.exists():
        pack_link.symlink_to(pack_dir, target_is_directory=True)
    for folder, paths in dict(models).items():
        target_dir = base / "models" / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        for path in [paths] if isinstance(paths, Path) else paths:
            link = target_dir / Path(path).name
            if not link.exists():
                link.symlink_to(Path(path).resolve(), target_is_directory=Path(path).is_dir())
    for path in inputs:
        target = base / "input" / Path(path).name
        if not target.exists():
            target.write_bytes(Path(path).read_bytes())
    return base


class ComfyServer:
    """``python main.py --cpu`` in a subprocess, logging to ``<base_dir>/server.log``.

    With ``base_dir``, ComfyUI takes models, custom_nodes, input, output, temp and user from
    there (``--base-directory``); ``extra_args`` go to main.py as they are.
    """

    def __init__(self, base_dir: Path | None = None, *, comfyui: Path | None = None,
                 port: int | None = None, input_dir: Path | None = None, output_dir: Path | None = None,
                 extra_args: Sequence[str] = (), log_path: Path | None = None,
                 python: str = sys.executable, env: Mapping[str, str] | None = None):
        self.comfyui = Path(comfyui) if comfyui else comfyui_path()
        self.base_dir = Path(base_dir) if base_dir else None
        root = self.base_dir or self.comfyui
        self.input_dir = Path(input_dir) if input_dir else root / "input"
        self.output_dir = Path(output_dir) if output_dir else root / "output"
        self._dir_args = bool(input_dir or output_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else (
            self.base_dir / "server.log" if self.base_dir else Path(tempfile.gettempdir()) / f"comfyui-{self.port}.log")
        self.extra_args = list(extra_args)
        self.python = python
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.client = ComfyClient(self.url)
        self.startup_seconds: float | None = None

    def command(self) -> list[str]:
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port)]
        if self.base_dir is not None:
            cmd += ["--base-directory", str(self.base_dir)]
        if self._dir_args:
            cmd += ["--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir)]
        return cmd + self.extra_args

    def start(self, timeout: float = 180.0) -> ComfyServer:
        """Start and wait for /object_info; fail fast with the log if it dies or our pack fails."""
        env = {**os.environ,
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # no hub here; fail, don't hang
               "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **self.env}
        env.pop("PYTHONPATH", None)  # pytest's path must not leak in: the pack's nodes/ shadows ComfyUI's
        start = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(self.command(), cwd=self.comfyui, env=env, stdout=log_file,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = start + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerDied(f"ComfyUI exited with {self.process.returncode}\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerDied(f"ComfyUI did not answer within {timeout:.0f}s\n{self.log_tail()}")
            time.sleep(0.25)
        # The server listens only after every custom node loaded: object_info is complete now.
        self.client.object_info(refresh=True)
        self.startup_seconds = time.monotonic() - start
        failures = [line for line in self.log().splitlines()
                    if "IMPORT FAILED" in line and PACK_NAME in line
                    or f"Cannot import {PACK_NAME}" in line
                    or (line.startswith("Cannot import") and f"custom_nodes/{PACK_NAME}" in line)]
        if failures:
            log = self.log()
            self.stop()
            raise ServerDied("our pack failed to import:\n" + "\n".join(failures) + "\n" + log[-8000:])
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def __enter__(self) -> ComfyServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """The whole server log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 8000) -> str:
        return self.log()[-chars:]

    @contextlib.contextmanager
    def log_since(self) -> Iterator[list[str]]:
        """Collect the log lines written inside the ``with`` block (into the yielded list)."""
        offset = len(self.log())
        lines: list[str] = []
        try:
            yield lines
        finally:
            lines.extend(self.log()[offset:].splitlines())
