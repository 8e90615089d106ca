#!/usr/bin/env bash
# Makes sure headless Chromium can run for the browser test of the flower UI (tests/interop/test_flower_ui.py):
# uses the installed one ($CELERIAC_CHROMIUM, default Debian's /usr/bin/chromium), else installs Debian's
# `chromium` package with apt-get when running as root, else says exactly what is missing. The test drives it
# through Playwright for Python (pinned in tests/interop/requirements.txt); it never downloads a browser.
set -euo pipefail

CHROMIUM="${CELERIAC_CHROMIUM:-/usr/bin/chromium}"

works() {
  [[ -x "$CHROMIUM" ]] && "$CHROMIUM" --headless --no-sandbox --disable-gpu --version >/dev/null 2>&1
}

if works; then
  exit 0
fi
if [[ -e "$CHROMIUM" && ! -x "$CHROMIUM" ]]; then
  echo "missing: $CHROMIUM exists but is not executable" >&2
  exit 1
fi
if [[ "$CHROMIUM" != /usr/bin/chromium ]]; then
  echo "missing: CELERIAC_CHROMIUM=$CHROMIUM does not run ('$CHROMIUM --version' failed); unset it to use Debian's /usr/bin/chromium" >&2
  exit 1
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "chromium not installed; installing Debian's chromium package with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  if works; then
    exit 0
  fi
  echo "missing: chromium was installed but '$CHROMIUM --version' still fails" >&2
  exit 1
fi
echo "missing: Chromium at $CHROMIUM for the flower UI browser test (as root: apt-get install chromium;" \
  "or point CELERIAC_CHROMIUM at a Chromium binary)" >&2
exit 1
