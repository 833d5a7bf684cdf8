"""Token requests per hour and HSM signatures per second for N = 1 ... 1,000 replicas.

A model fed with rates measured here, not guessed (issue 12).

Measured first, in one process (each `DPoPAuth` keeps its own cache unless it shares a store,
so N auths stand for N replicas): `REPLICAS` auths x 2 threads call the local resource server
for `SECONDS` s with `LIFETIME` s tokens, once with ``token_store=memory`` and once sharing a
``sqlite:`` store. The authorization server's own count gives, per token lifetime, how many
token requests one replica makes alone (``per_replica``) and the whole group makes sharing
(``per_group``). The model then scales them to real tokens (``--lifetime``, default 3600 s,
renewed ``--leeway`` 30 s early) and N replicas:

    without a store:  N x per_replica x 3600 / renew_period   token requests per hour
    with a store:         per_group   x 3600 / renew_period

and HSM signatures per second for an API request rate R (requests/s across all replicas):
one proof per request, plus one per token request (two with ``private_key_jwt``), plus one per
nonce retry (the measured share of requests that paid a ``use_dpop_nonce`` 401).

    python -m bench.scale_model --lifetime=3600 --rates=100,1000,10000
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPLICAS = 4
SECONDS = 6.0
LIFETIME = 2.0
COUNTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def measure(store: str, key: str) -> tuple[int, int, int]:
    """(token requests, API requests, 401s) for `REPLICAS` auths on ``store``."""
    from dpop_signer import DPoPAuth, load_signer
    from dpop_signer.testing.servers import start_local_servers

    with start_local_servers(token_lifetime=LIFETIME, require_nonce=True) as servers:
        auths = [
            DPoPAuth(
                load_signer(key),
                token_url=servers.token_url,
                client_id=servers.client_id,
                client_secret=servers.client_secret,
                token_store=store,
            )
            for _ in range(REPLICAS)
        ]
        deadline = time.monotonic() + SECONDS

        def run(auth: DPoPAuth) -> None:
            with httpx.Client(auth=auth, timeout=10.0) as client:
                for _ in range(100_000):
                    if time.monotonic() >= deadline:
                        return
                    client.get(servers.api_url + "/x")
                    time.sleep(0.005)

        threads = [threading.Thread(target=run, args=(a,)) for a in auths for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SECONDS + 30)
        for auth in auths:
            auth.close()
        rs = servers.resource_server
        return servers.authorization_server.token_requests, rs.api_requests, rs.statuses[401]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_model")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="token lifetime, s")
    parser.add_argument("--leeway", type=float, default=30.0, help="renewal lead, s")
    parser.add_argument("--rates", default="100,1000,10000", help="API requests/s, comma-separated")
    parser.add_argument("--private-key-jwt", action="store_true", help="assertions signed too")
    args = parser.parse_args(argv)

    from dpop_signer import generate_key

    with tempfile.TemporaryDirectory() as tmp:
        key = str(Path(tmp) / "key.pem")
        generate_key(key)
        alone, api_alone, nonce_401 = measure("memory", key)
        shared, _api, _ = measure(f"sqlite:{Path(tmp) / 'tokens.db'}", key)

    periods = SECONDS / (LIFETIME / 2) + 1  # the first fetch, then one per renewal
    per_replica = alone / REPLICAS / periods  # nonce retries at the AS included
    per_group = shared / periods
    nonce_share = nonce_401 / max(1, api_alone)
    renew = args.lifetime - min(args.leeway, args.lifetime / 2)
    per_hour = 3600.0 / renew
    print(f"measured: {REPLICAS} replicas x {SECONDS:.0f} s, {LIFETIME:.0f} s tokens: "
          f"{alone} token requests alone, {shared} sharing a store; "
          f"{nonce_401} nonce 401s in {api_alone} API requests")  # fmt: skip
    print(f"per token lifetime: {per_replica:.2f} requests per replica alone, "
          f"{per_group:.2f} per group sharing\n")  # fmt: skip
    print(f"token requests per hour at the AS ({args.lifetime:.0f} s tokens, renewed every "
          f"{renew:.0f} s)\n")  # fmt: skip
    print("| replicas | without a store | with a shared store |")
    print("|---:|---:|---:|")
    for n in COUNTS:
        print(f"| {n:,} | {n * per_replica * per_hour:,.0f} | {per_group * per_hour:,.0f} |")
    signatures_per_token = 2 if args.private_key_jwt else 1
    print("\nHSM signatures per second (all replicas, one key object)\n")
    print("| API requests/s | proofs | nonce retries | token requests (1,000 replicas, no store) |")
    print("|---:|---:|---:|---:|")
    for rate in (float(r) for r in args.rates.split(",")):
        tokens = 1000 * per_replica * per_hour / 3600 * signatures_per_token
        print(f"| {rate:,.0f} | {rate:,.0f} | {rate * nonce_share:,.1f} | {tokens:,.2f} |")


if __name__ == "__main__":
    main()
