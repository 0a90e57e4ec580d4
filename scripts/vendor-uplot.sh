#!/usr/bin/env bash
# Refreshes the vendored uPlot (the dashboard's charting library) in static/vendor/.
#
# The files are committed, so building, running and testing Sluice never needs
# npm; only refreshing them does. Usage:
#
#   scripts/vendor-uplot.sh [VERSION]     # default: the version in static/vendor/README.md
#
# It runs `npm pack uplot@VERSION` in a temporary directory, copies the minified
# IIFE build, its stylesheet and the licence, and rewrites the version line of
# static/vendor/README.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vendor="$root/static/vendor"
current="$(sed -n 's/^Version: *//p' "$vendor/README.md" 2>/dev/null | head -n1)"
version="${1:-${current:-latest}}"

command -v npm >/dev/null || { echo "npm is needed to refresh the vendored uPlot (apt-get install npm)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "uplot@$version" >/dev/null)
tar -xzf "$work"/uplot-*.tgz -C "$work"
resolved="$(node -p "require('$work/package/package.json').version" 2>/dev/null || echo "$version")"

cp "$work/package/dist/uPlot.iife.min.js" "$vendor/uPlot.iife.min.js"
cp "$work/package/dist/uPlot.min.css" "$vendor/uPlot.min.css"
cp "$work/package/LICENSE" "$vendor/LICENSE"
sed -i "s/^Version: .*/Version: $resolved/" "$vendor/README.md"
echo "vendored uPlot $resolved into $vendor"
