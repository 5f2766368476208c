#!/bin/bash
# The shipped unit, hardening and all, under a real systemd 252 on a GPU machine (issue 13).
#
#   scripts/gpu-systemd-check.sh --fetch     # once, on a machine with Debian's apt and PyPI:
#                                            # .sysdebs/ (systemd's .debs) and .whl/ (wheels)
#   scripts/gpu-systemd-check.sh [--out DIR] [--python PY] [--no-gpu] [--budget SECONDS]
#                                            # as root on the GPU machine (no systemd needed,
#                                            # no network): bench/gpu_systemd.py does the run
#   scripts/gpu-systemd-check.sh --selftest-bisect [--out DIR]
#                                            # the workload calls personality(2): the shipped
#                                            # unit must refuse it and the hardening bisection
#                                            # must name exactly LockPersonality
#
# The GPU machine needs: root, unshare/nsenter, a writable cgroup2, dpkg, and a python3 with
# torch (CUDA), triton, nvidia-ml-py and pyyaml. Exit 0 only when every check passed; the
# summary is OUT/gpu_systemd.json (docs/GPU-VALIDATION.md explains it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${1:-}" = --fetch ]; then
    # Debian 12's systemd and every library it links (ldd of systemd, systemctl, journalctl,
    # systemd-journald and libsystemd-shared-252.so); the host's own copies win where present.
    mkdir -p .sysdebs .whl
    (cd .sysdebs && apt-get download systemd libsystemd-shared libacl1 libapparmor1 libaudit1 \
        libaudit-common libblkid1 libcap-ng0 libcap2 libcrypt1 libssl3 libgcrypt20 \
        libgpg-error0 libip4tc2 libkmod2 liblz4-1 liblzma5 libmount1 libpam0g libpcre2-8-0 \
        libseccomp2 libselinux1 libzstd1)
    # The supervisor's dependencies and its build backend, for Python 3.12 (the GPU image's).
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl pyyaml requests urllib3 certifi \
        charset-normalizer idna nvidia-ml-py structlog setuptools wheel packaging pip
    python3 -m pip wheel -q --no-deps -w .whl sdnotify   # sdist only on PyPI: pure Python
    for d in .sysdebs .whl; do
        grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
    done
    ls .sysdebs .whl
    exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "gpu-systemd-check: run as root" >&2; exit 1; }
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_systemd.py "$@"
