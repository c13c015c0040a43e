"""The one check every loader makes on a file name that comes from a graph.

A shared workflow can name anything, so a loader accepts only a relative name that stays inside
its folders: no absolute path, no drive, no ``..``, no NUL. Model folders follow symlinks placed in
them (users link model folders); the input folder also refuses links that lead outside it.
Every refusal is a :class:`FileNameError` that names the file, the folder and what to do.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import folder_paths

from ..clap2diffusion_core.errors import FileNameError


def resolve_in_folders(name: str, folders: Sequence[str], what: str, where: str, fix: str,
                       contained: bool = False) -> str:
    """The path of ``name`` in the first of ``folders`` that has it.

    ``what`` names the file ("CLAP model"), ``where`` the folder as users know it ("models/clap"),
    ``fix`` what to do when it is missing. ``contained``: the real path (links resolved) must stay
    inside the folder too.
    """
    outside = FileNameError(f"{what} {name!r} lies outside {where}; it must be a name inside {where}.")
    if not name:
        raise FileNameError(f"No {what} named; pick one from the list ({where}).")
    if os.path.isabs(name) or os.path.splitdrive(name)[0]:  # even one that points inside: names only
        raise FileNameError(f"{what} {name!r} is a full path; it must be a name inside {where}, "
                            "as the list shows it.")
    if "\x00" in name:  # os.path would only say "embedded null byte"
        raise FileNameError(f"{what} {name!r} contains a NUL character; pick a file from the list.")
    if os.path.normpath(name).replace("\\", "/").split("/")[0] == "..":
        raise outside
    for folder in folders:
        path = os.path.join(folder, os.path.normpath(name))
        if contained:
            real_folder, path = os.path.realpath(folder), os.path.realpath(path)
            if os.path.commonpath([path, real_folder]) != real_folder:
                raise outside
        if os.path.exists(path):
            return path
    raise FileNameError(f"{what} {name!r} not found in {where}; {fix}.")


def resolve_input_file(name: str, what: str = "Audio file") -> str:
    """A file in ComfyUI's input folder (Load Audio, Load Audio Tokens)."""
    path = resolve_in_folders(name, [folder_paths.get_input_directory()], what, "ComfyUI's input folder",
                              "upload it first", contained=True)
    if not os.path.isfile(path):
        raise FileNameError(f"{what} {name!r} is not a file in ComfyUI's input folder; upload it first.")
    return path


def resolve_model_file(folder: str, name: str, what: str, where: str = "",
                       fix: str = "put it there and refresh the page") -> str:
    """A file or model folder in one of the ``models/<folder>`` paths ComfyUI knows."""
    try:
        folders = list(folder_paths.get_folder_paths(folder))
    except KeyError:  # the pack's __init__ registers it; absent when the nodes are imported bare
        folders = []
    return resolve_in_folders(name, folders, what, where or f"models/{folder}", fix)


def validation_message(resolve, *args) -> bool | str:  # noqa: ANN001
    """For ``validate_inputs``: True, or the refusal's message (ComfyUI shows it before running)."""
    try:
        resolve(*args)
    except FileNameError as err:
        return str(err)
    return True


def file_fingerprint(name: str, what: str = "Audio file") -> str:
    """For ``fingerprint_inputs`` of input-folder loaders: the file's SHA-256, so the node re-runs when
    the bytes change, not only the name (as core LoadAudio does); ``missing:<name>`` when it cannot be
    read (``validate_inputs`` reports why)."""
    digest = hashlib.sha256()
    try:
        with open(resolve_input_file(name, what), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (OSError, ValueError):
        return f"missing:{name}"
    return digest.hexdigest()
