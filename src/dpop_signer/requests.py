"""`DPoPRequestsAuth`: DPoP (RFC 9449) for ``requests``, the same flow as `dpop_signer.DPoPAuth`.

>>> import requests
>>> auth = DPoPRequestsAuth(signer, token_url="https://as.example/token", client_id="svc",
...                         client_secret=secret)  # doctest: +SKIP
>>> with requests.Session() as session:  # doctest: +SKIP
...     session.auth = auth
...     session.get("https://api.example/v1/things", timeout=10)

Needs the ``requests`` extra (``pip install 'dpop-signer[requests]'``). It takes the keyword
arguments of `dpop_signer.DPoPAuth`, plus ``session`` and ``timeout`` for the token requests,
and behaves the same (the protocol is `dpop_signer.flow`): a token cache with one fetch at a
time across threads, failures shared and backed off, renewal ahead of expiry, nonce retries at
the token endpoint and the API, one renewal on ``invalid_token``, Bearer refused unless
``accept_bearer=True``, clock offset from ``Date``, ``max_in_flight`` slots, `rotate`, and the
same errors (a token endpoint that cannot be reached is `ServerUnreachableError`, chained from
the ``requests`` exception).

How it plugs into ``requests``: ``__call__`` gets the token (sending token requests itself,
through ``session``, never through this auth) and signs the first proof; a ``response`` hook
reads the answer and, when the flow asks for a retry, re-sends a copy of the request on the
same connection adapter with new headers, as ``requests``' own digest auth does. The first
response stays in ``response.history``. A body that is a generator or a file without ``seek``
is never re-sent: the retry it would need raises instead.

A request that fails to connect leaves its slot to the garbage collector: ``requests`` does
not tell an auth that its request failed, so the flow is closed (and its slot freed) when the
request object is dropped, at once in CPython unless the caller keeps the exception.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import Any, Unpack

import requests
from requests.auth import AuthBase
from requests.cookies import extract_cookies_to_jar
from requests.utils import rewind_body

from dpop_signer.flow import (
    Answer,
    DPoPFlow,
    DPoPOptions,
    Exchange,
    FlowClient,
    SendApi,
    SendToken,
    drive_sync,
    token_response,
)
from dpop_signer.signers.base import Signer
from dpop_signer.tokens import AccessToken

__all__ = ["DPoPRequestsAuth"]

_DROPPED_FOR_REQUESTS = frozenset({"host", "content-length"})  # requests sets its own


class DPoPRequestsAuth(FlowClient, AuthBase):
    """A ``requests`` auth that sends every request with a DPoP-bound token and a fresh proof.

    Args:
        signer: The DPoP key (PKCS#11 or PEM).
        session: Sends the token requests (default: a private `requests.Session`); it may be
            the session this auth is set on.
        timeout: The ``requests`` timeout of token requests (seconds, or (connect, read)).
        **options: The keyword arguments of `dpop_signer.DPoPAuth` (``token_url``,
            ``client_id``, ``client_secret``, ``scope``, ``client_auth``, ``token_store``,
            ...).

    Raises:
        ConfigError: missing or contradictory settings.
    """

    def __init__(
        self,
        signer: Signer,
        *,
        session: requests.Session | None = None,
        timeout: float | tuple[float, float] = 30.0,
        **options: Unpack[DPoPOptions],
    ) -> None:
        self._flow = DPoPFlow(signer, **options)
        self._session = session
        self._own_session: requests.Session | None = None
        self._session_guard = threading.Lock()
        self._timeout = timeout

    def get_token(self) -> AccessToken:
        """The current token: cached, or fetched (one fetch at a time).

        Raises:
            OAuthError: the token could not be obtained (see `dpop_signer.DPoPAuth.get_token`).
        """
        runner = drive_sync(self._flow.token_flow(None, None), self._flow.sync_gate)
        try:
            self._until_api(runner, next(runner))
        except StopIteration as stop:
            return stop.value.token  # type: ignore[no-any-return]
        finally:
            runner.close()
        raise AssertionError("a token flow sends no API request")  # pragma: no cover

    def headers(self, htm: str, htu: str, *, nonce: str | None = None) -> dict[str, str]:
        """``Authorization`` and ``DPoP`` headers for a request someone else sends.

        ``nonce`` goes into this proof only; by default the nonce known for ``htu``'s origin.
        """
        flow = self._flow.headers_flow(htm, htu, None, nonce)
        runner = drive_sync(flow, self._flow.sync_gate)
        try:
            self._until_api(runner, next(runner))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            runner.close()
        raise AssertionError("a headers flow sends no API request")  # pragma: no cover

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """Get the token, sign the first proof and hook the retries onto the response."""
        method = request.method or "GET"
        flow = self._flow.request_flow(method, request.url or "", lambda: _rewindable(request))
        runner = drive_sync(flow, self._flow.sync_gate)
        try:
            step = self._until_api(runner, next(runner))
        except BaseException:
            runner.close()
            raise
        _apply(request, step)
        request.register_hook("response", _Exchange(self, runner).on_response)  # type: ignore[no-untyped-call]
        return request

    # -- the driver ------------------------------------------------------------------------

    def _until_api(self, runner: Generator[Exchange, Any, Any], step: Exchange) -> SendApi:
        """Send token requests until the flow asks for the API request (or ends)."""
        for _ in range(8):  # a fetch sends at most two token requests; bound it anyway
            if isinstance(step, SendApi):
                return step
            step = self._send_token(runner, step)
        raise AssertionError("the flow sent more token requests than it may")  # pragma: no cover

    def _send_token(self, runner: Generator[Exchange, Any, Any], step: SendToken) -> Exchange:
        token_request = step.request
        headers = {
            name: value
            for name, value in token_request.headers.items()
            if name.lower() not in _DROPPED_FOR_REQUESTS
        }
        prepared = requests.Request(
            token_request.method,
            str(token_request.url),
            headers=headers,
            data=token_request.content,
        ).prepare()
        try:
            # send(), not request(): the session's own auth (maybe this one) must not apply.
            response = self._token_session().send(
                prepared, timeout=self._timeout, allow_redirects=False
            )
            content = response.content
        except requests.RequestException as exc:
            # Into the flow: it records the failure for everyone and may still answer with a
            # token that has not expired.
            return runner.throw(self._flow.unreachable(exc))
        return runner.send(token_response(response.status_code, response.headers.items(), content))

    def _token_session(self) -> requests.Session:
        if self._session is not None:
            return self._session
        with self._session_guard:
            if self._own_session is None:
                self._own_session = requests.Session()
            return self._own_session


class _Exchange:
    """One request's flow between ``__call__`` and its response hook."""

    def __init__(self, auth: DPoPRequestsAuth, runner: Generator[Exchange, Any, None]) -> None:
        self._auth = auth
        self._runner: Generator[Exchange, Any, None] | None = runner

    def on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        runner = self._runner
        if runner is None:
            # A redirect's request is a copy of ours, hooks included: the flow is over.
            return response
        try:
            for _ in range(3):  # the flow sends the request at most three times
                try:
                    step = self._auth._until_api(runner, runner.send(_answer(response)))
                except StopIteration:
                    return response
                response = _resend(response, step, kwargs)
            raise AssertionError("the flow sent more requests than it may")  # pragma: no cover
        finally:
            self._runner = None
            runner.close()


def _resend(
    response: requests.Response, step: SendApi, kwargs: dict[str, Any]
) -> requests.Response:
    """Send the request of ``response`` again with new headers, as digest auth does."""
    response.content  # noqa: B018 - read the body so the connection goes back to the pool
    response.close()
    prepared = response.request.copy()
    cookies = getattr(prepared, "_cookies", None)
    if cookies is not None:
        extract_cookies_to_jar(cookies, response.request, response.raw)  # type: ignore[no-untyped-call]
        prepared.prepare_cookies(cookies)
    if not isinstance(prepared.body, bytes | str | None):
        rewind_body(prepared)  # a seekable file: back to where it started
    _apply(prepared, step)
    connection = getattr(response, "connection", None)
    if connection is None:  # pragma: no cover - requests sets it on every response
        raise AssertionError("requests gave a response without its connection adapter")
    again: requests.Response = connection.send(prepared, **kwargs)
    again.history.append(response)
    again.request = prepared
    return again


def _apply(request: requests.PreparedRequest, step: SendApi) -> None:
    request.headers["Authorization"] = step.authorization
    request.headers["DPoP"] = step.proof


def _answer(response: requests.Response) -> Answer:
    headers = response.headers
    challenge = headers.get("www-authenticate")
    return Answer(
        response.status_code,
        headers.get("dpop-nonce"),
        headers.get("date"),
        "age" in headers,
        () if challenge is None else (challenge,),  # urllib3 joins repeated lines with ", "
    )


def _rewindable(request: requests.PreparedRequest) -> bool:
    body = request.body
    if body is None or isinstance(body, bytes | str):
        return True
    # A file can be sent again if it can go back to where it started; requests records that
    # position when it prepares the body.
    position = getattr(request, "_body_position", None)
    return isinstance(position, int) and callable(getattr(body, "seek", None))
