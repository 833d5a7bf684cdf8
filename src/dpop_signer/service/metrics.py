"""Prometheus metrics for the service, hand-written and small.

Seven families, rendered in the Prometheus text exposition format (version 0.0.4):

- ``dpop_signatures_total``: signatures made with the key (one per proof, token requests and
  health probes included);
- ``dpop_proofs_total{endpoint}``: proofs handed out, by endpoint;
- ``dpop_sign_seconds``: signing latency histogram, as the event loop sees it (HSM round trip
  included, and for a PKCS#11 key the hop to its module's worker thread);
- ``dpop_token_requests_total{status}``: requests to the token endpoint by HTTP status;
- ``dpop_errors_total{kind}``: errors answered to callers, by kind;
- ``dpop_signer_failures_total{reason}``: signatures and reopen attempts that reached the key
  and failed, by the state they put the key
  in (``pin_refused``, ``key_changed``, ``key_missing``, ``stalled``, ``unavailable``);
- ``dpop_signer_state{state}``: one sample, 1, labelled with the key's state now (as at
  ``/healthz``).

Counters live in one event loop thread, so plain integers suffice. With ``--workers``, each
process's counters are summed across processes (`dpop_signer.service.workers.SharedMetrics`).
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: an in-memory key signs in ~25 µs, SoftHSM2 in ~80 µs, a network HSM in milliseconds.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The service's counters and the signing latency histogram."""

    def __init__(self) -> None:
        self.signatures = 0
        self.proofs: Counter[str] = Counter()
        self.token_requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.signer_failures: Counter[str] = Counter()
        self.signer_state = "available"
        self._bucket_counts = [0] * len(_BUCKETS)
        self._sign_count = 0
        self._sign_sum = 0.0

    def observe_signature(self, seconds: float) -> None:
        """Count one signature that took ``seconds``."""
        self.signatures += 1
        self._sign_count += 1
        self._sign_sum += seconds
        index = bisect.bisect_left(_BUCKETS, seconds)
        if index < len(_BUCKETS):
            self._bucket_counts[index] += 1

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain JSON data (for `merge` in another process)."""
        return {
            "signatures": self.signatures,
            "proofs": dict(self.proofs),
            "token_requests": dict(self.token_requests),
            "errors": dict(self.errors),
            "signer_failures": dict(self.signer_failures),
            "buckets": list(self._bucket_counts),
            "sign_count": self._sign_count,
            "sign_sum": self._sign_sum,
        }

    def merge(self, snapshot: dict[str, Any]) -> None:
        """Add another process's `snapshot` to these counters."""
        self.signatures += int(snapshot["signatures"])
        self.proofs.update(snapshot["proofs"])
        self.token_requests.update(snapshot["token_requests"])
        self.errors.update(snapshot["errors"])
        self.signer_failures.update(snapshot["signer_failures"])
        for index, count in enumerate(snapshot["buckets"][: len(self._bucket_counts)]):
            self._bucket_counts[index] += int(count)
        self._sign_count += int(snapshot["sign_count"])
        self._sign_sum += float(snapshot["sign_sum"])

    def render(self) -> str:
        """The text exposition of every family."""
        out = [
            "# HELP dpop_signatures_total ES256 signatures made with the key.",
            "# TYPE dpop_signatures_total counter",
            f"dpop_signatures_total {self.signatures}",
            "# HELP dpop_proofs_total DPoP proofs handed out, by endpoint.",
            "# TYPE dpop_proofs_total counter",
        ]
        out += [f'dpop_proofs_total{{endpoint="{k}"}} {v}' for k, v in sorted(self.proofs.items())]
        out += [
            "# HELP dpop_sign_seconds Time to sign one DPoP proof or token request proof.",
            "# TYPE dpop_sign_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip(_BUCKETS, self._bucket_counts, strict=True):
            cumulative += count
            out.append(f'dpop_sign_seconds_bucket{{le="{bound}"}} {cumulative}')
        out += [
            f'dpop_sign_seconds_bucket{{le="+Inf"}} {self._sign_count}',
            f"dpop_sign_seconds_sum {self._sign_sum:.6f}",
            f"dpop_sign_seconds_count {self._sign_count}",
            "# HELP dpop_token_requests_total Requests to the token endpoint, by HTTP status.",
            "# TYPE dpop_token_requests_total counter",
        ]
        out += [
            f'dpop_token_requests_total{{status="{k}"}} {v}'
            for k, v in sorted(self.token_requests.items())
        ]
        out += [
            "# HELP dpop_errors_total Errors answered to callers, by kind.",
            "# TYPE dpop_errors_total counter",
        ]
        out += [f'dpop_errors_total{{kind="{k}"}} {v}' for k, v in sorted(self.errors.items())]
        out += [
            "# HELP dpop_signer_failures_total Signatures that failed, by reason.",
            "# TYPE dpop_signer_failures_total counter",
        ]
        out += [
            f'dpop_signer_failures_total{{reason="{k}"}} {v}'
            for k, v in sorted(self.signer_failures.items())
        ]
        out += [
            "# HELP dpop_signer_state The key's state now, as /healthz reports it.",
            "# TYPE dpop_signer_state gauge",
        ]
        out.append(f'dpop_signer_state{{state="{self.signer_state}"}} 1')
        return "\n".join(out) + "\n"
