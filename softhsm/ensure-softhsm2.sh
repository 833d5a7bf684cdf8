#!/usr/bin/env bash
# Make sure SoftHSM2 is installed: install Debian's package when we are root and it is missing,
# otherwise say exactly what to install. Idempotent; prints nothing when all is there.
set -euo pipefail

module_found() {
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so \
           /usr/local/lib/softhsm/libsofthsm2.so /opt/homebrew/lib/softhsm/libsofthsm2.so; do
    [ -e "$m" ] && return 0
  done
  return 1
}

if command -v softhsm2-util >/dev/null 2>&1 && module_found; then
  exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing SoftHSM2 from Debian's packages (softhsm2)..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends softhsm2 >/dev/null
  exit 0
fi

cat >&2 <<'MSG'
SoftHSM2 is missing and this user cannot install it.
Install it, then run make again:
  Debian/Ubuntu:  sudo apt-get install softhsm2
  Fedora/RHEL:    sudo dnf install softhsm
  macOS:          brew install softhsm
MSG
exit 1
