#!/usr/bin/env bash
# The whole test suite, as the README runs it: `. .venv/bin/activate && tools/test.sh [pytest arguments]`.
#
# The chat-page test drives a real headless Chromium: $LLAVA_LITE_CHROMIUM, by default Debian's package at
# /usr/bin/chromium. When it is missing this script installs Debian's `chromium` with apt-get (as root, or through
# `sudo -n`); when it cannot, it says in one line how to get it and exits 2 - the test is never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

chromium="${LLAVA_LITE_CHROMIUM:-/usr/bin/chromium}"
how="install Debian's chromium (sudo apt-get install chromium) or set LLAVA_LITE_CHROMIUM to a Chromium binary"

fail() {
    echo "tools/test.sh: error: $1" >&2
    exit 2
}

if [ ! -x "$chromium" ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        fail "the chat-page test needs Chromium at $chromium and there is no apt-get here to install it; $how"
    fi
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        fail "the chat-page test needs Chromium at $chromium; installing it takes root (or password-less sudo): $how"
    fi
    log="${TMPDIR:-/tmp}/llava-lite-chromium-install.log"
    echo "tools/test.sh: the chat-page test needs Chromium at $chromium; installing Debian's chromium (log: $log)"
    if ! { ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$log" 2>&1; then
        fail "apt-get could not install chromium (see $log: $(tail -n 1 "$log")); $how"
    fi
    if [ ! -x "$chromium" ]; then
        fail "apt-get installed chromium, but there is still no Chromium at $chromium; $how"
    fi
fi

exec python -m pytest -q "$@"
