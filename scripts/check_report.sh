#!/usr/bin/env bash
# Render `clearing report --html` for a fresh demo database in headless Chromium and take a
# screenshot, to look at (issue 6 point 5).
#
#   scripts/check_report.sh [SCREENSHOT.png]        (default /tmp/report.png)
#
# The page itself is left beside the screenshot (SCREENSHOT.html). Environment:
#   CHECK_REPORT_DEMO_ARGS  arguments for `clearing demo` (default: none, the full demo)
#   CHECK_REPORT_HEIGHT     window height in pixels (default 4400: the whole demo page)
#   CHECK_REPORT_BYTES_MAX  largest acceptable page (default 2 MiB)
#
# Installs Debian's chromium when it is missing (needs root and apt). Exits non-zero when a
# step fails, the page is too large, refers to anything remote, or has no inline plot.
set -euo pipefail
cd "$(dirname "$0")/.."

shot="${1:-/tmp/report.png}"
case "$shot" in /*) ;; *) shot="$PWD/$shot" ;; esac
page="${shot%.png}.html"
height="${CHECK_REPORT_HEIGHT:-4400}"
bytes_max="${CHECK_REPORT_BYTES_MAX:-2097152}"
read -r -a demo_args <<< "${CHECK_REPORT_DEMO_ARGS:-}"
chromium_timeout_s=120

if ! command -v chromium >/dev/null 2>&1; then
    echo "chromium is missing: installing Debian's package"
    apt-get update
    apt-get install -y chromium
fi

work="$(mktemp -d)"
profile="$(mktemp -d)"
trap 'rm -rf "$work" "$profile"' EXIT

echo "clearing demo${CHECK_REPORT_DEMO_ARGS:+ $CHECK_REPORT_DEMO_ARGS} in $work"
(cd "$work" && clearing demo "${demo_args[@]}" --json > demo.json)

started="$(date +%s.%N)"
clearing report --html "$page" --db "sqlite:///$work/clearing-demo.db"
finished="$(date +%s.%N)"
size="$(stat -c %s "$page")"

if [ "$size" -gt "$bytes_max" ]; then
    echo "FAIL: the page is $size bytes, more than $bytes_max"; exit 1
fi
remote='(src|href)[[:space:]]*=[[:space:]]*["'"'"']?[[:space:]]*([a-z]+:)?//'
if grep -Eiq "$remote|https?://|@import|<link|<script" "$page"; then
    echo "FAIL: the page refers to something outside itself"; exit 1
fi
plots="$(grep -o '<svg class="plot"' "$page" | wc -l)"
if [ "$plots" -lt 4 ]; then
    echo "FAIL: only $plots inline SVG plots"; exit 1
fi

rm -f "$shot"
timeout "$chromium_timeout_s" chromium --headless --no-sandbox --disable-gpu --disable-quic \
    --no-first-run --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" --window-size="1400,$height" \
    --screenshot="$shot" "file://$page" 2>/dev/null
if [ ! -s "$shot" ]; then
    echo "FAIL: chromium wrote no screenshot"; exit 1
fi

seconds="$(awk -v a="$started" -v b="$finished" 'BEGIN { printf "%.1f", b - a }')"
echo "page $page: $size bytes, $plots inline plots, written in $seconds s"
echo "screenshot $shot: $(stat -c %s "$shot") bytes (1400x$height)"
