#!/usr/bin/env bash
# Debian's chromium for the leaderboard's browser test (tests/test_leaderboard_browser.py), which
# drives it with playwright-python (a dev dependency). Part of the README's test command; it never
# fails that command: where chromium cannot be installed it says why, and the browser test skips.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-browser: no apt-get on this machine; install chromium yourself or the browser test skips" >&2
    exit 0
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo -n"
install() { DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }
install || { $sudo apt-get update -q >/dev/null 2>&1 && install; } ||
    echo "setup-browser: could not install Debian's chromium (needs root or sudo, and the Debian registry); the browser test skips" >&2
exit 0
