"""NonceCache: per-origin, bounded LRU, thread-safe, learned from any response's DPoP-Nonce."""

from __future__ import annotations

import logging
import threading

import httpx
import pytest

from dpop_signer.errors import ConfigError, ProofError
from dpop_signer.nonces import NonceCache


def test_nonce_is_shared_by_every_path_of_one_origin() -> None:
    cache = NonceCache()
    cache.remember("https://as.example/token", "n-1")
    assert cache.get("https://AS.example:443/other/path?x=1") == "n-1"
    assert cache.get(httpx.URL("https://as.example/token")) == "n-1"


@pytest.mark.parametrize(
    "other",
    ["http://as.example/token", "https://as.example:8443/token", "https://api.as.example/token"],
)
def test_other_origins_do_not_see_the_nonce(other: str) -> None:
    cache = NonceCache()
    cache.remember("https://as.example/token", "n-1")
    assert cache.get(other) is None


def test_explicit_default_port_is_the_same_origin() -> None:
    cache = NonceCache()
    cache.remember("http://api.example:80/a", "n-1")
    assert cache.get("http://api.example/b") == "n-1"
    assert cache.get("HTTP://API.example:80/c") == "n-1"


def test_least_recently_used_origin_is_dropped_first() -> None:
    cache = NonceCache(max_entries=3)
    for name in ("a", "b", "c"):
        cache.remember(f"https://{name}.example/", f"n-{name}")
    assert cache.get("https://a.example/") == "n-a"  # a is now the most recently used
    cache.remember("https://d.example/", "n-d")
    assert len(cache) == 3
    assert cache.get("https://b.example/") is None
    assert [cache.get(f"https://{n}.example/") for n in "acd"] == ["n-a", "n-c", "n-d"]


def test_newer_nonce_replaces_older() -> None:
    cache = NonceCache()
    cache.remember("https://a.example/", "n-1")
    cache.remember("https://a.example/", "n-2")
    assert cache.get("https://a.example/") == "n-2"
    assert len(cache) == 1


def test_learn_from_headers_of_any_response() -> None:
    cache = NonceCache()
    response = httpx.Response(200, headers={"DPoP-Nonce": "eyJ7S_zG.eyJH0-Z.HX4w-7v"})
    assert cache.learn("https://api.example/x", response.headers) == "eyJ7S_zG.eyJH0-Z.HX4w-7v"
    assert cache.get("https://api.example/") == "eyJ7S_zG.eyJH0-Z.HX4w-7v"
    # A plain dict with another spelling of the header name works too.
    assert cache.learn("https://b.example/", {"dpop-nonce": "n-b"}) == "n-b"
    assert cache.learn("https://c.example/", {"DPOP-NONCE": "n-c"}) == "n-c"
    assert cache.learn("https://d.example/", {"Content-Type": "text/plain"}) is None
    assert cache.get("https://d.example/") is None


def test_invalid_nonce_from_a_server_is_ignored_and_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = NonceCache()
    cache.remember("https://a.example/", "good")
    with caplog.at_level(logging.WARNING, logger="dpop_signer"):
        assert cache.learn("https://a.example/", {"DPoP-Nonce": 'bad "nonce"'}) is None
    assert cache.get("https://a.example/") == "good"
    assert "1*NQCHAR" in caplog.text
    assert "bad" not in caplog.text


@pytest.mark.parametrize("nonce", ["", "a b", 'a"b', "a\\b", "é", 42])
def test_remember_refuses_invalid_nonces(nonce: object) -> None:
    with pytest.raises(ProofError, match="NQCHAR"):
        NonceCache().remember("https://a.example/", nonce)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "10"])
def test_max_entries_must_be_a_positive_integer(size: object) -> None:
    with pytest.raises(ConfigError, match="max_entries"):
        NonceCache(max_entries=size)  # type: ignore[arg-type]


def test_url_must_be_absolute_http() -> None:
    with pytest.raises(ProofError):
        NonceCache().get("/relative")


def test_forget_clear_contains_and_repr_hides_nonces() -> None:
    cache = NonceCache(max_entries=7)
    cache.remember("https://a.example/", "secret-nonce-a")
    cache.remember("https://b.example/", "secret-nonce-b")
    assert "https://a.example/x" in cache
    assert "secret-nonce" not in repr(cache)
    assert repr(cache) == "NonceCache(2/7 origins)"
    cache.forget("https://a.example/")
    cache.forget("https://never.example/")
    assert "https://a.example/x" not in cache
    assert 42 not in cache
    cache.clear()
    assert len(cache) == 0


def test_threads_share_one_cache_safely() -> None:
    cache = NonceCache(max_entries=10)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(500):
                url = f"https://h{(worker + i) % 25}.example/"
                cache.remember(url, f"n-{worker}-{i}")
                got = cache.get(url)
                assert got is None or got.startswith("n-")
                assert len(cache) <= 10
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(cache) == 10
