#!/bin/sh
# Chromium for tests/test_web_browser.py: Debian's package, installed only when missing and only as
# root with apt-get. Otherwise that test skips and says why.
[ -x /usr/bin/chromium ] && exit 0
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is missing and cannot be installed here (needs root and apt-get): the browser test will skip" >&2
    exit 0
fi
echo "installing chromium with apt-get for the browser test" >&2
{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null \
    || echo "could not install chromium: the browser test will skip" >&2
exit 0
