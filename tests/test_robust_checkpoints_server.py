"""Hostile and broken model files dropped into the server's model folders (issue 7).

One test per case of ``bad_inputs.CHECKPOINTS``: the file (or model folder) is written into
``models/clap`` or ``models/clap2diffusion`` of the running server (ComfyUI re-lists a folder
when its mtime changes, so no restart or refresh is needed), a graph names it, and the node must
fail with a message that names what was expected and what was found. Pickles that would run code
when unpickled must be refused without running: their marker file must not appear. Afterwards the
server must still give the reference image.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from bad_inputs import CHECKPOINTS, CheckpointCase, Sources, write_hostile_pickle
from graphs import CLAP, CLAP2DIFFUSION
from robust_support import (
    NODE,
    Reference,
    assert_message,
    fresh,
    graph,
    node_error_text,
    rejected,
    run_failing,
)

from tools import test_models as tm
from tools.comfy_server import ComfyClient, ComfyServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(comfy_server: ComfyServer) -> Reference:
    return Reference(comfy_server.client)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    for side in (path.with_suffix(".json"),):  # a config written beside a single file
        side.unlink(missing_ok=True)


def _assert_really_hostile(kind: str, tmp_path: Path) -> None:
    """The same payload, unpickled the unsafe way here, does run code: the test is not vacuous."""
    marker = tmp_path / "sanity-marker"
    twin = tmp_path / "sanity.bin"
    write_hostile_pickle(twin, marker, kind)
    if kind == "zip":
        torch.load(twin, weights_only=False)
    else:
        pickle.loads(twin.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("case", CHECKPOINTS, ids=lambda case: f"{case.folder}-{case.name}")
def test_robust_checkpoint(case: CheckpointCase, comfy: ComfyClient, comfy_server: ComfyServer,
                           test_models: tm.TestModels, reference: Reference, tmp_path: Path) -> None:
    sources = Sources(test_models.clap_folder, test_models.clap2diffusion, test_models.sd15_checkpoint,
                      tmp_path / "pwned")
    path = comfy_server.base_dir / "models" / case.folder / case.name
    _remove(path)
    case.write(path, sources)
    try:
        names = {"clap": {"clap": case.name}, "clap2diffusion": {"clap2diffusion": case.name}}[case.folder]
        err = run_failing(comfy, fresh(graph(**names, **case.graph).prompt()))
    finally:
        _remove(path)

    assert err.node_type == case.node, err
    assert_message(err.exception_message, *case.message)
    if case.hostile:
        assert not sources.marker.exists(), "the pickle ran code inside the server"
        _assert_really_hostile(case.hostile, tmp_path)
    reference.assert_still_serving()


# --------------------------------------------------------------------------------------------
# loader names that leave the model folders


@pytest.mark.parametrize(
    "inputs, node, message",
    [
        ({"clap": "../checkpoints/" + Path(tm.SD15_CHECKPOINT).name}, NODE["clap_loader"],
         ("must be a name inside models/clap",)),
        ({"clap": "/etc/hostname"}, NODE["clap_loader"], ("must be a name inside models/clap",)),
        ({"clap": "robust-never-installed"}, NODE["clap_loader"], ("not found in models/clap",)),
        ({"clap2diffusion": "../checkpoints/" + Path(tm.SD15_CHECKPOINT).name}, NODE["c2d_loader"],
         ("must be a name inside models/clap2diffusion",)),
        ({"clap2diffusion": str(Path(tm.DEFAULT_CACHE, tm.CLAP2DIFFUSION))}, NODE["c2d_loader"],
         ("must be a name inside models/clap2diffusion",)),
        ({"clap2diffusion": "robust-never-installed.safetensors"}, NODE["c2d_loader"],
         ("not found in models/clap2diffusion",)),
    ],
    ids=["clap_dotdot", "clap_absolute", "clap_missing", "clap2diffusion_dotdot", "clap2diffusion_absolute",
         "clap2diffusion_missing"],
)
def test_robust_model_loaders_refuse_names_outside_their_folders_at_validation(inputs: dict, node: str, message: tuple,
                                                                 comfy: ComfyClient, reference: Reference) -> None:
    err = rejected(comfy, fresh(graph(**inputs).prompt()))
    assert set(err.node_errors) == {node}, err.node_errors
    assert_message(node_error_text(err, node), *message)
    reference.assert_still_serving()


def test_robust_the_good_files_still_load(comfy: ComfyClient, reference: Reference) -> None:
    """After every refusal above, the real files by their names give the reference image."""
    from robust_support import image_of

    assert (image_of(comfy, fresh(graph(clap=CLAP, clap2diffusion=CLAP2DIFFUSION).prompt())) == reference.image).all()
