"""Swapping the service's key and secrets on ``SIGHUP`` without dropping requests in flight.

Everything bound to one key travels together in a `KeyBundle`: the `ServiceSigner`, the proof
builder whose header carries that key's JWK, and the `DPoPAuth` whose cached tokens are bound to
that key's thumbprint (RFC 9449 §6). A request takes the bundle once, at its start, and uses
nothing else, so no proof is ever signed by one key with another key's ``jwk`` header, and no
token bound to one key is ever sent with another key's proof.

`Reloader` re-reads the configuration (the key reference, the PIN or PIN file, the client secret
file, the API key file), opens the new key in a worker thread, and only then swaps: requests
that started before finish with the old bundle, which is closed when the last of them ends. A
configuration that cannot be loaded (a missing file, a refused PIN, a key that is not there)
leaves the running one in place and logs one ``reload_failed`` line saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from dpop_signer.errors import DPoPSignerError
from dpop_signer.proof import DPoPProofBuilder
from dpop_signer.service.logs import log_event

if TYPE_CHECKING:
    from dpop_signer.auth import DPoPAuth
    from dpop_signer.service.security import ApiKeys
    from dpop_signer.service.signer import ServiceSigner

__all__ = ["KeyBundle", "Reloader"]


class KeyBundle:
    """One key and what is bound to it; shared by the requests that started while it was current."""

    def __init__(self, signer: ServiceSigner, auth: DPoPAuth | None = None) -> None:
        """Bundle ``signer`` with a proof builder on it and the ``auth`` built on it."""
        self.signer = signer
        self.proofs = DPoPProofBuilder(signer)
        self.auth = auth
        self.jkt = self.proofs.jkt
        self._users = 0
        self._retired = False

    @contextlib.contextmanager
    def in_use(self) -> Iterator[KeyBundle]:
        """Hold the bundle for one request; a retired bundle closes when its last user leaves."""
        self._users += 1
        try:
            yield self
        finally:
            self._users -= 1
            if self._retired and not self._users:
                self._close()

    def retire(self) -> None:
        """No new request takes this bundle; close it once the current ones are done."""
        self._retired = True
        if not self._users:
            self._close()

    def close(self) -> None:
        """Close the key and the auth's token store now (at shutdown)."""
        if self.auth is not None:
            self.auth.close()
        self.signer.close()

    def _close(self) -> None:
        # Closing a PKCS#11 signer takes the module's lock, and a store may do I/O: not on
        # the event loop.
        try:
            asyncio.get_running_loop().run_in_executor(None, self.close)
        except RuntimeError:  # no running loop (tests, shutdown)
            self.close()


class Reloader:
    """Runs one reload at a time; a ``SIGHUP`` during a reload runs one more after it."""

    def __init__(
        self,
        load: Callable[[], tuple[KeyBundle, ApiKeys | None]],
        install: Callable[[KeyBundle, ApiKeys | None], KeyBundle],
    ) -> None:
        """Reload with ``load`` (blocking: run in a thread) and ``install``.

        ``install`` swaps the new bundle and API keys in and returns the bundle it replaced.
        """
        self._load = load
        self._install = install
        self._running: asyncio.Task[None] | None = None
        self._again = False
        self.reloads = 0
        self.failures = 0

    def request(self) -> None:
        """Start a reload (the ``SIGHUP`` handler); called on the event loop."""
        if self._running is not None and not self._running.done():
            self._again = True
            return
        self._running = asyncio.get_running_loop().create_task(self._run())

    async def wait(self) -> None:
        """Return once no reload is running (for tests and shutdown)."""
        while self._running is not None and not self._running.done():
            await self._running

    async def _run(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def reload(self) -> bool:
        """Load the configuration again and swap it in; False (old one kept) when it fails."""
        log_event("reloading")
        try:
            bundle, api_keys = await asyncio.get_running_loop().run_in_executor(None, self._load)
        except DPoPSignerError as exc:
            self.failures += 1
            log_event("reload_failed", logging.ERROR, error=exc.message)
            return False
        except Exception as exc:
            self.failures += 1
            log_event("reload_failed", logging.ERROR, error=f"unexpected {type(exc).__name__}")
            return False
        old = self._install(bundle, api_keys)
        self.reloads += 1
        log_event(
            "reloaded",
            jkt=bundle.jkt,
            key_changed=bundle.jkt != old.jkt,
            api_key=api_keys is not None,
        )
        old.retire()
        return True
