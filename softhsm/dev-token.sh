#!/usr/bin/env bash
# Create the repo-local SoftHSM2 DEVELOPMENT token (`make softhsm`), idempotently:
#   .softhsm/softhsm2.conf   SoftHSM2 config, token directory .softhsm/tokens
#   token "dpop-dev"         user PIN 1234, SO PIN 12345678
#   key "dpop-es256"         EC P-256, made by dpop-signer's own generate_key
#   .softhsm/dev.env         SOFTHSM2_CONF, DPOP_KEY (pkcs11: URI), DPOP_PIN, for `make demo`/`bench`
# The PINs are well known and live in a plain file: this token is for development only. Never
# put a key that matters in it; production keys live in an HSM with PINs from a secret store.
# A second run only says the token is there (after checking that it really is: dev.env left
# behind without .softhsm/tokens is set up again); `rm -rf .softhsm` starts again.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=${BIN:-.venv/bin}
DIR=$ROOT/.softhsm
CONF=$DIR/softhsm2.conf
ENV_FILE=$DIR/dev.env
TOKEN_LABEL=dpop-dev
KEY_LABEL=dpop-es256
USER_PIN=1234        # development only
SO_PIN=12345678      # development only

token_present() {
  [ -d "$DIR/tokens" ] && [ -f "$CONF" ] && command -v softhsm2-util >/dev/null &&
    SOFTHSM2_CONF=$CONF softhsm2-util --show-slots 2>/dev/null |
      grep -Eq "^[[:space:]]*Label:[[:space:]]+$TOKEN_LABEL[[:space:]]*$"
}

if [ -f "$ENV_FILE" ]; then
  if token_present; then
    echo "SoftHSM2 development token '$TOKEN_LABEL' with key '$KEY_LABEL' is already set up in .softhsm/ (load it with: set -a; . .softhsm/dev.env; set +a)"
    exit 0
  fi
  echo "found .softhsm/dev.env but not the token '$TOKEN_LABEL' it names (.softhsm/tokens or softhsm2.conf was removed): setting it up again"
  rm -f "$ENV_FILE"
fi

command -v softhsm2-util >/dev/null || { echo "softhsm2-util is missing: run 'make system-deps' or apt-get install softhsm2" >&2; exit 1; }
[ -x "$BIN/python" ] || { echo "$BIN/python is missing: run 'make install' first" >&2; exit 1; }

MODULE=$("$BIN/python" -c 'from dpop_signer.signers.pkcs11_uri import find_softhsm2_module as f; print(f() or "")')
[ -n "$MODULE" ] || { echo "the SoftHSM2 module libsofthsm2.so was not found: apt-get install softhsm2" >&2; exit 1; }

mkdir -p "$DIR/tokens"
chmod 700 "$DIR"
sed "s|@TOKENDIR@|$DIR/tokens|" softhsm/softhsm2.conf.in > "$CONF"
export SOFTHSM2_CONF=$CONF

if softhsm2-util --show-slots | grep -Eq "^[[:space:]]*Label:[[:space:]]+$TOKEN_LABEL[[:space:]]*$"; then
  echo "token '$TOKEN_LABEL' exists"
else
  softhsm2-util --init-token --free --label "$TOKEN_LABEL" --pin "$USER_PIN" --so-pin "$SO_PIN" >/dev/null
  echo "created SoftHSM2 token '$TOKEN_LABEL' in .softhsm/tokens (user PIN $USER_PIN, SO PIN $SO_PIN: development only)"
fi

URI="pkcs11:token=$TOKEN_LABEL;object=$KEY_LABEL?module-path=$MODULE"
# Our own generate_key makes the key (sensitive, never extractable); an existing one is kept.
"$BIN/python" - "$URI" "$USER_PIN" <<'PY'
import sys

from dpop_signer import KeyNotFoundError, generate_key, jwk_thumbprint, load_signer

uri, pin = sys.argv[1], sys.argv[2]
try:
    signer = load_signer(uri, pin=pin)
    made = "found"
except KeyNotFoundError:
    signer = generate_key(uri, pin=pin)
    made = "generated"
# The URI dev.env will hold: one key, shown with one URI everywhere.
print(f"{made} P-256 key {uri} (jkt {jwk_thumbprint(signer.public_jwk)})")
signer.close()
PY

# dev.env last, written atomically: its presence means everything above is done.
cat > "$ENV_FILE.tmp" <<ENV
# SoftHSM2 development token (softhsm/dev-token.sh). Development only: the PIN is well known.
SOFTHSM2_CONF='$CONF'
DPOP_KEY='$URI'
DPOP_PIN='$USER_PIN'
ENV
chmod 600 "$ENV_FILE.tmp"
mv "$ENV_FILE.tmp" "$ENV_FILE"
echo "wrote .softhsm/dev.env (SOFTHSM2_CONF, DPOP_KEY, DPOP_PIN); load it with: set -a; . .softhsm/dev.env; set +a"
