#!/usr/bin/env bash
# Make sure SoftHSM2 (and p11-kit's proxy module, which the tests also load SoftHSM2 through) is
# installed, with what the signer fault tests use (OpenSC's pkcs11-spy.so and pkcs11-tool,
# p11-kit's server) and the software TPM stack the tpm2-pkcs11 tests run on (swtpm,
# tpm2-pkcs11 and tpm2_ptool, tpm2-tools, tpm2-abrmd with its client TCTI and dbus-daemon), and
# the Redis server the shared token store tests start on a loopback port (redis-server):
# install Debian's packages when we are root and something is missing, otherwise say exactly
# what to install. Idempotent; prints nothing when all is there. Missing test tools alone do
# not fail (those tests then skip, and fail under CI); missing SoftHSM2 does.
set -euo pipefail

first_existing() {
  for f in "$@"; do [ -e "$f" ] && return 0; done
  return 1
}

have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
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
softhsm_missing=${#missing[@]}

# The fault tools of the signer lifecycle tests: pkcs11-spy.so and pkcs11-tool (OpenSC) count
# and make module calls, p11-kit server stands in for a network HSM.
first_existing /usr/lib/*-linux-gnu/pkcs11/pkcs11-spy.so /usr/lib64/pkcs11/pkcs11-spy.so \
  || missing+=(opensc)
have p11-kit || missing+=(p11-kit)

# The TPM stack. "a|b": the package is named a in Debian 12 and b in later releases.
have swtpm || missing+=(swtpm)
have swtpm_setup || missing+=(swtpm-tools)
first_existing /usr/lib/*-linux-gnu/pkcs11/libtpm2_pkcs11.so /usr/lib64/pkcs11/libtpm2_pkcs11.so \
  || missing+=(libtpm2-pkcs11-1)
have tpm2_ptool || missing+=("libtpm2-pkcs11-tools|tpm2-pkcs11-tools")
have tpm2_dictionarylockout || missing+=(tpm2-tools)
have tpm2-abrmd || missing+=(tpm2-abrmd)
first_existing /usr/lib/*-linux-gnu/libtss2-tcti-tabrmd.so.0 /usr/lib64/libtss2-tcti-tabrmd.so.0 \
  || missing+=(libtss2-tcti-tabrmd0)
have dbus-daemon || missing+=("dbus-daemon|dbus")

# The shared token store tests (tests/redis_fixtures.py) start their own redis-server.
have redis-server || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  packages=()
  for choice in "${missing[@]}"; do
    IFS='|' read -r -a names <<<"$choice"
    picked=${names[0]}
    for name in "${names[@]}"; do
      if apt-cache show "$name" >/dev/null 2>&1; then picked=$name; break; fi
    done
    packages+=("$picked")
  done
  echo "Installing from Debian's packages: ${packages[*]}..."
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  exit 0
fi

debian=("${missing[@]%%|*}")
if [ "$softhsm_missing" -eq 0 ]; then
  cat >&2 <<MSG
Missing for the tpm2-pkcs11, signer fault and Redis token store tests: ${debian[*]};
this user cannot install packages. Those tests skip until they are installed (and fail under CI):
  Debian/Ubuntu:  sudo apt-get install ${debian[*]}
  Fedora/RHEL:    sudo dnf install opensc p11-kit-server swtpm swtpm-tools tpm2-pkcs11 tpm2-pkcs11-tools tpm2-tools tpm2-abrmd redis
MSG
  exit 0
fi

cat >&2 <<MSG
Missing: ${debian[*]}; this user cannot install packages.
Install them, then run make again:
  Debian/Ubuntu:  sudo apt-get install ${debian[*]}
  Fedora/RHEL:    sudo dnf install softhsm p11-kit swtpm swtpm-tools tpm2-pkcs11 tpm2-pkcs11-tools tpm2-tools tpm2-abrmd redis
  macOS:          brew install softhsm p11-kit redis   (the tpm2-pkcs11 tests need Linux)
MSG
exit 1
