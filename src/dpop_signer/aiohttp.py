"""`DPoPMiddleware`: DPoP (RFC 9449) for ``aiohttp`` clients, the flow of `dpop_signer.DPoPAuth`.

>>> import aiohttp
>>> dpop = DPoPMiddleware(signer, token_url="https://as.example/token", client_id="svc",
...                       client_secret=secret)  # doctest: +SKIP
>>> async with aiohttp.ClientSession(middlewares=(dpop,)) as session:  # doctest: +SKIP
...     async with session.get("https://api.example/v1/things") as response:
...         print(await response.json())

Needs the ``aiohttp`` extra (``pip install 'dpop-signer[aiohttp]'``, aiohttp 3.12 or later for
client middlewares). It takes the keyword arguments of `dpop_signer.DPoPAuth` and behaves the
same (the protocol is `dpop_signer.flow`): a token cache with one fetch at a time per event
loop, failures shared and backed off, renewal ahead of expiry, nonce retries at the token
endpoint and the API, one renewal on ``invalid_token``, Bearer refused unless
``accept_bearer=True``, clock offset from ``Date``, ``max_in_flight`` slots, `rotate`, and the
same errors (a token endpoint that cannot be reached is `ServerUnreachableError`, chained from
the aiohttp exception). Signing goes through `dpop_signer.signers.sign_async`, so a PKCS#11
key never blocks the event loop.

Token requests go through the same session with no middleware (``middlewares=()``), so they
use its connector, proxies and timeouts but never come back through this one. A retry calls
the next handler again with new headers; the response it replaces is released first. A body
that is a stream (an async generator, a file) is never re-sent: the retry it would need
raises instead.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Unpack

import aiohttp
from aiohttp.client_middlewares import ClientHandlerType
from aiohttp.payload import BytesPayload

from dpop_signer.flow import (
    Answer,
    DPoPFlow,
    DPoPOptions,
    Exchange,
    FlowClient,
    SendApi,
    SendToken,
    drive_async,
    token_response,
)
from dpop_signer.signers.base import Signer
from dpop_signer.tokens import AccessToken

__all__ = ["DPoPMiddleware"]

_DROPPED_FOR_AIOHTTP = frozenset({"host", "content-length"})  # aiohttp sets its own


class DPoPMiddleware(FlowClient):
    """An aiohttp client middleware that sends each request with a DPoP-bound token and proof.

    Args:
        signer: The DPoP key (PKCS#11 or PEM).
        **options: The keyword arguments of `dpop_signer.DPoPAuth` (``token_url``,
            ``client_id``, ``client_secret``, ``scope``, ``client_auth``, ``token_store``,
            ...).

    Raises:
        ConfigError: missing or contradictory settings.
    """

    def __init__(self, signer: Signer, **options: Unpack[DPoPOptions]) -> None:
        self._flow = DPoPFlow(signer, **options)

    async def get_token(self, session: aiohttp.ClientSession) -> AccessToken:
        """The current token: cached, or fetched through ``session`` (one fetch at a time).

        Raises:
            OAuthError: the token could not be obtained (see `dpop_signer.DPoPAuth.get_token`).
        """
        result: list[Any] = []
        flow = self._flow.token_flow(None, None)
        runner = drive_async(flow, self._flow.async_gate(), result)
        try:
            step = await anext(runner)
            await self._until_api(session, runner, step)
        except StopAsyncIteration:
            return result[0].token  # type: ignore[no-any-return]
        finally:
            await runner.aclose()
        raise AssertionError("a token flow sends no API request")  # pragma: no cover

    async def __call__(
        self, request: aiohttp.ClientRequest, handler: ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Send ``request`` through ``handler`` with DPoP, retrying as the flow says."""
        flow = self._flow.request_flow(
            request.method, str(request.url), lambda: _rewindable(request)
        )
        runner = drive_async(flow, self._flow.async_gate())
        response: aiohttp.ClientResponse | None = None
        try:
            step = await self._until_api(request.session, runner, await anext(runner))
            for _ in range(3):  # the flow sends the request at most three times
                if response is not None:
                    response.release()  # the retry replaces it
                request.headers["Authorization"] = step.authorization
                request.headers["DPoP"] = step.proof
                response = await handler(request)
                step = await self._until_api(
                    request.session, runner, await runner.asend(_answer(response))
                )
            raise AssertionError("the flow sent more requests than it may")  # pragma: no cover
        except StopAsyncIteration:
            assert response is not None  # a request flow ends only after a send
            return response
        except BaseException:
            if response is not None:
                response.release()
            raise
        finally:
            await runner.aclose()

    async def _until_api(
        self,
        session: aiohttp.ClientSession,
        runner: AsyncGenerator[Exchange, Any],
        step: Exchange,
    ) -> SendApi:
        """Send token requests until the flow asks for the API request (or ends)."""
        for _ in range(8):  # a fetch sends at most two token requests; bound it anyway
            if isinstance(step, SendApi):
                return step
            step = await self._send_token(session, runner, step)
        raise AssertionError("the flow sent more token requests than it may")  # pragma: no cover

    async def _send_token(
        self,
        session: aiohttp.ClientSession,
        runner: AsyncGenerator[Exchange, Any],
        step: SendToken,
    ) -> Exchange:
        token_request = step.request
        headers = {
            name: value
            for name, value in token_request.headers.items()
            if name.lower() not in _DROPPED_FOR_AIOHTTP
        }
        try:
            async with session.request(
                token_request.method,
                str(token_request.url),
                headers=headers,
                data=token_request.content,
                allow_redirects=False,
                middlewares=(),  # not through this middleware again
            ) as answer:
                content = await answer.read()
                status, items = answer.status, list(answer.headers.items())
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Into the flow: it records the failure for everyone and may still answer with a
            # token that has not expired.
            return await runner.athrow(self._flow.unreachable(exc))
        return await runner.asend(token_response(status, items, content))


def _answer(response: aiohttp.ClientResponse) -> Answer:
    headers = response.headers
    return Answer(
        response.status,
        headers.get("dpop-nonce"),
        headers.get("date"),
        "age" in headers,
        tuple(headers.getall("www-authenticate", ())),
    )


def _rewindable(request: aiohttp.ClientRequest) -> bool:
    # No body (aiohttp says b""), bytes, str and JSON bodies are in memory and aiohttp sends
    # them again as they are; streams and files may be consumed.
    body = request.body
    return body == b"" or isinstance(body, BytesPayload)
