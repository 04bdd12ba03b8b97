#!/usr/bin/env bash
# Headless Chromium for the documentation site's browser check (scripts/check_site.py), from
# Debian's package. Idempotent: does nothing when a Chromium is already there.
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
  echo "chromium.sh: Chromium is missing and this user cannot install packages" >&2
  exit 1
fi
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive
as_root apt-get install -y -q chromium >/dev/null || {
  as_root apt-get update -q >/dev/null
  as_root apt-get install -y -q chromium >/dev/null
}
echo "chromium.sh: installed $(chromium --version)"
