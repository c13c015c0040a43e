"""Shared fixtures: random-weight test models and a real ComfyUI server.

- ``test_models``: paths of the cached random-weight models (tools/test_models.py).
- ``comfy_server``: one real ComfyUI (``main.py --cpu``) for the session, with this pack in
  ``custom_nodes`` and the test models in its model folders; tests that use it are marked
  ``slow`` automatically.
- ``comfy``: that server's ComfyClient (``run``, ``queue``, ``wait``, ``upload_file``, ...).

The pack's root ``__init__.py`` is ComfyUI's entry point and only imports inside ComfyUI, so
pytest must never treat the repo root as a Python package (see ``_PackRootIsAFolder``); for the
same reason tests/ has no ``__init__.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools import test_models as tm
from tools.comfy_server import ComfyClient, ComfyServer, make_base_dir

# No hub here: fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SERVER_FIXTURES = {"comfy_server", "comfy"}
REPO_ROOT = Path(__file__).resolve().parents[1]
STANDIN_PACK = REPO_ROOT / "tests" / "interop_standin"  # the interop tests' "other pack"
PROBE_PACK = REPO_ROOT / "tests" / "probe_pack"  # SaveTensorProbe: a socket's exact value to a file


class _PackRootIsAFolder:
    """Collect the repo root as a plain folder, not a Package.

    pytest (8+) builds the collection tree from the ini file's folder down, and a Package
    imports its ``__init__.py`` at setup: ours imports ``folder_paths``, which exists only inside
    a ComfyUI process. Registered as a plugin (not a conftest hook) because conftest hooks do not
    apply to folders above the conftest.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        if path == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_PackRootIsAFolder(), "clap2diffusion-pack-root")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Anything that talks to the real server is an end-to-end test: keep `-m "not slow"` honest.
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def test_models() -> tm.TestModels:
    """Random-weight SD1.5 / ControlNet / LoRA / CLAP / sounds (and CLAP2Diffusion file, when
    the core provides one), built once and cached in .cache/test-models across runs."""
    return tm.build_all()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory, test_models: tm.TestModels) -> Iterator[ComfyServer]:
    """A real ComfyUI server on a free port, base directory in a temp folder:

    custom_nodes/clap2diffusion -> this repo; models/checkpoints/tiny-sd15.safetensors;
    models/controlnet, models/loras, models/clap/tiny-clap-htsat-unfused/, models/clap2diffusion/
    (stage 1 and a stage 3 file with adapters for the tiny UNet);
    input/ holds the test sounds (thunder.wav, ...); custom_nodes/interop_standin -> tests/interop_standin,
    a second pack for the interop tests (one node, InteropStandIn_AttentionPatch); custom_nodes/probe_pack
    -> tests/probe_pack (SaveTensorProbe, which writes a tensor to the output folder).
    """
    models: dict[str, list[Path]] = {
        "checkpoints": [test_models.sd15_checkpoint],
        "controlnet": [test_models.controlnet],
        "loras": [test_models.lora],
        "clap": [test_models.clap_folder],
        "clap2diffusion": [p for p in (test_models.clap2diffusion, test_models.clap2diffusion_adapter) if p],
    }
    base = make_base_dir(tmp_path_factory.mktemp("comfyui"), models, inputs=list(test_models.sounds.values()))
    (base / "custom_nodes" / STANDIN_PACK.name).symlink_to(STANDIN_PACK, target_is_directory=True)
    (base / "custom_nodes" / PROBE_PACK.name).symlink_to(PROBE_PACK, target_is_directory=True)
    # C2D_FRONT_END_ROOT: serve another frontend build (a comfyui-frontend-package's static/).
    front_end = os.environ.get("C2D_FRONT_END_ROOT")
    server = ComfyServer(base, extra_args=["--front-end-root", front_end] if front_end else [])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def comfy(comfy_server: ComfyServer) -> ComfyClient:
    """The session server's client. Fails fast if an earlier test killed the server."""
    if not comfy_server.alive:
        pytest.fail(f"ComfyUI server died earlier:\n{comfy_server.log_tail()}")
    return comfy_server.client


_LOG_OFFSET = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the server log lines a failing end-to-end test produced to its report."""
    outcome = yield
    server = getattr(item, "funcargs", {}).get("comfy_server")  # holds the whole fixture closure
    if not isinstance(server, ComfyServer):
        return
    report = outcome.get_result()
    if call.when == "setup":
        item.stash[_LOG_OFFSET] = len(server.log())
    elif report.failed:
        log = server.log()[item.stash.get(_LOG_OFFSET, 0):]
        report.sections.append(("ComfyUI server log", log[-20000:]))
