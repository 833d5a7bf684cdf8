"""dpop-signer benchmarks: ``python -m bench [name ...]`` (``make bench``); never part of the tests."""
