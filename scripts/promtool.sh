#!/usr/bin/env bash
# promtool (and the Prometheus server) from Debian's `prometheus` package, unpacked into a
# cache directory. Nothing is installed system-wide: no user, no unit, nothing under /etc.
#
#   bash scripts/promtool.sh [DEST]    (DEST defaults to $NIKA_CACHE/prometheus)
#
# Prints the path of promtool. The tests find it there (or through $PROMTOOL or PATH) to run
# `promtool check metrics`, `promtool check rules` and `promtool test rules`; under CI=true a
# missing promtool fails those tests instead of skipping them.
set -euo pipefail
dest="${1:-${NIKA_CACHE:-$HOME/.cache/nika-supervisor}/prometheus}"
if [[ -x "$dest/usr/bin/promtool" ]]; then
    echo "$dest/usr/bin/promtool"
    exit 0
fi
for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || {
        echo "promtool.sh: needs $tool (Debian/Ubuntu); or put promtool on PATH / set PROMTOOL" >&2
        exit 1
    }
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
# A fresh container may have no package lists yet.
apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }
dpkg-deb -x prometheus_*.deb unpacked
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv unpacked "$dest"
"$dest/usr/bin/promtool" --version >&2
echo "$dest/usr/bin/promtool"
