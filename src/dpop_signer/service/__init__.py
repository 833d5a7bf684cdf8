"""The local service: ``dpop serve`` and ``dpop proxy``.

Programs that cannot use the library (shell scripts with curl, Java or Go services, tools nobody
can change) borrow the key through one small local process that holds the PIN and the HSM
session, so the key never leaves the token and the PIN never spreads:

- `create_signer_app` (``dpop serve``): ``/v1/jwk``, ``/v1/proof``, ``/v1/headers``,
  ``/healthz``, ``/metrics`` and ``/openapi.json``. It mints DPoP proofs only; no endpoint signs
  arbitrary bytes.
- `create_proxy_app` (``dpop proxy``): a reverse proxy that adds the access token and a fresh
  proof to every request on its way to one upstream API.

Both only assemble objects from the layers below (signer, `DPoPAuth`) and speak HTTP; the
click commands live in `dpop_signer.service.commands`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpop_signer.service.app import create_signer_app
    from dpop_signer.service.proxy import create_proxy_app

__all__ = ["create_proxy_app", "create_signer_app"]


def __getattr__(name: str) -> object:
    # Lazy: `dpop --help` must not import Starlette.
    if name == "create_signer_app":
        from dpop_signer.service.app import create_signer_app

        return create_signer_app
    if name == "create_proxy_app":
        from dpop_signer.service.proxy import create_proxy_app

        return create_proxy_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
