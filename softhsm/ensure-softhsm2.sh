#!/usr/bin/env bash
# Make sure SoftHSM2 (and p11-kit's proxy module, which the tests also load SoftHSM2 through) is
# installed: install Debian's packages when we are root and something is missing, otherwise say
# exactly what to install. Idempotent; prints nothing when all is there.
set -euo pipefail

first_existing() {
  for f in "$@"; do [ -e "$f" ] && return 0; done
  return 1
}

missing=()
if ! command -v softhsm2-util >/dev/null 2>&1 || ! first_existing \
    /usr/lib/softhsm/libsofthsm2.so /usr/lib/*-linux-gnu/softhsm/libsofthsm2.so \
    /usr/local/lib/softhsm/libsofthsm2.so /opt/homebrew/lib/softhsm/libsofthsm2.so; then
  missing+=(softhsm2)
fi
if ! first_existing /usr/lib/*-linux-gnu/p11-kit-proxy.so /usr/lib64/p11-kit-proxy.so \
    /usr/lib/p11-kit-proxy.so; then
  missing+=(p11-kit-modules)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing from Debian's packages: ${missing[*]}..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi

cat >&2 <<MSG
Missing: ${missing[*]}; this user cannot install packages.
Install them, then run make again:
  Debian/Ubuntu:  sudo apt-get install ${missing[*]}
  Fedora/RHEL:    sudo dnf install softhsm p11-kit
  macOS:          brew install softhsm p11-kit
MSG
exit 1
