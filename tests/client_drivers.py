"""One face for the four DPoP drivers, so one test suite runs them all.

``httpx_sync`` (`httpx.Client` + `DPoPAuth`), ``httpx_async`` (`httpx.AsyncClient` +
`DPoPAuth`), ``requests`` (`requests.Session` + `DPoPRequestsAuth`) and ``aiohttp``
(`aiohttp.ClientSession` + `DPoPMiddleware`). `open_driver` builds one with the keyword
arguments of `DPoPAuth`; `Driver.call` sends one request and returns status and JSON body,
`Driver.gather` sends many at once (threads for the sync clients, tasks for the async ones).
Async clients run on one event loop per driver (`asyncio.Runner`), kept across calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import requests

from dpop_signer import DPoPAuth
from dpop_signer.aiohttp import DPoPMiddleware
from dpop_signer.requests import DPoPRequestsAuth
from dpop_signer.signers.base import Signer

DRIVERS = ("httpx_sync", "httpx_async", "requests", "aiohttp")
TIMEOUT = 30.0


@dataclass(frozen=True)
class Result:
    status: int
    body: Any  # parsed JSON, or the byte count of a streamed body, or None
    history: int  # responses the driver replaced by retries (requests and aiohttp show them)


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


class Driver:
    """One HTTP client with its DPoP auth; `close` it."""

    name: str
    auth: DPoPAuth | DPoPRequestsAuth | DPoPMiddleware

    def call(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        chunks: Sequence[bytes] | None = None,
        stream: bool = False,
    ) -> Result:
        raise NotImplementedError

    def gather(self, urls: Sequence[str]) -> list[Result]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _HttpxSync(Driver):
    def __init__(self, auth: DPoPAuth) -> None:
        self.name = "httpx_sync"
        self.auth = auth
        self.client = httpx.Client(auth=auth, timeout=TIMEOUT, trust_env=False)

    def call(self, method, url, *, content=None, chunks=None, stream=False):
        body: Any = iter(chunks) if chunks is not None else content
        with self.client.stream(method, url, content=body) as response:
            data = b"".join(response.iter_bytes())
        return Result(response.status_code, len(data) if stream else _json(data), 0)

    def gather(self, urls):
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(lambda url: self.call("GET", url), urls))

    def close(self):
        self.client.close()


class _Requests(Driver):
    def __init__(self, auth: DPoPRequestsAuth) -> None:
        self.name = "requests"
        self.auth = auth
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.auth = auth

    def call(self, method, url, *, content=None, chunks=None, stream=False):
        body: Any = iter(chunks) if chunks is not None else content
        response = self.session.request(method, url, data=body, stream=stream, timeout=TIMEOUT)
        with response:
            data = b"".join(response.iter_content(65536))
        return Result(
            response.status_code, len(data) if stream else _json(data), len(response.history)
        )

    def gather(self, urls):
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(lambda url: self.call("GET", url), urls))

    def close(self):
        self.session.close()


class _Async(Driver):
    def __init__(self) -> None:
        self.runner = asyncio.Runner()

    async def acall(self, method, url, *, content=None, chunks=None, stream=False) -> Result:
        raise NotImplementedError

    def call(self, method, url, *, content=None, chunks=None, stream=False):
        return self.runner.run(
            self.acall(method, url, content=content, chunks=chunks, stream=stream)
        )

    def gather(self, urls):
        async def all_of() -> list[Result]:
            return list(await asyncio.gather(*(self.acall("GET", url) for url in urls)))

        return self.runner.run(all_of())


async def _agen(chunks: Sequence[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class _HttpxAsync(_Async):
    def __init__(self, auth: DPoPAuth) -> None:
        super().__init__()
        self.name = "httpx_async"
        self.auth = auth
        self.client = httpx.AsyncClient(
            auth=auth, timeout=TIMEOUT, trust_env=False, limits=httpx.Limits(max_connections=100)
        )

    async def acall(self, method, url, *, content=None, chunks=None, stream=False):
        body: Any = _agen(chunks) if chunks is not None else content
        async with self.client.stream(method, url, content=body) as response:
            data = b"".join([part async for part in response.aiter_bytes()])
        return Result(response.status_code, len(data) if stream else _json(data), 0)

    def close(self):
        self.runner.run(self.client.aclose())
        self.runner.close()


class _Aiohttp(_Async):
    def __init__(self, auth: DPoPMiddleware) -> None:
        super().__init__()
        self.name = "aiohttp"
        self.auth = auth

        async def make() -> aiohttp.ClientSession:
            return aiohttp.ClientSession(
                middlewares=(auth,), timeout=aiohttp.ClientTimeout(total=TIMEOUT)
            )

        self.session = self.runner.run(make())

    async def acall(self, method, url, *, content=None, chunks=None, stream=False):
        body: Any = _agen(chunks) if chunks is not None else content
        async with self.session.request(method, url, data=body) as response:
            data = b""
            async for part in response.content.iter_chunked(65536):
                data += part
        return Result(response.status, len(data) if stream else _json(data), len(response.history))

    def close(self):
        self.runner.run(self.session.close())
        self.runner.close()


def open_driver(name: str, signer: Signer, **options: Any) -> Driver:
    """A driver of kind ``name`` (one of `DRIVERS`) with `DPoPAuth`'s keyword arguments."""
    if name == "httpx_sync":
        return _HttpxSync(DPoPAuth(signer, **options))
    if name == "httpx_async":
        return _HttpxAsync(DPoPAuth(signer, **options))
    if name == "requests":
        return _Requests(DPoPRequestsAuth(signer, timeout=TIMEOUT, **options))
    if name == "aiohttp":
        return _Aiohttp(DPoPMiddleware(signer, **options))
    raise ValueError(name)


def driver_for(
    name: str, signer: Signer, servers: Any, **options: Any
) -> Generator[Driver, None, None]:
    """`open_driver` for the local servers' demo client; closes it after (a fixture body)."""
    if servers.client_secret is not None:
        options.setdefault("client_secret", servers.client_secret)
    driver = open_driver(
        name, signer, token_url=servers.token_url, client_id=servers.client_id, **options
    )
    try:
        yield driver
    finally:
        driver.close()
