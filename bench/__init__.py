"""dpop-signer benchmarks, run with ``python -m bench [name ...]`` (``make bench``)."""
