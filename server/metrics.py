"""Prometheus series of one app (its own ``CollectorRegistry``); docs/SERVER.md describes each.

The speedup figures:
- ``padrec_speedup{method="calibration"}``: at start-up the engine decodes the same calibration
  prompts without and with speculation (``padrec_vllm.engines.Calibration``); wall-clock plain /
  speculative.
  ``padrec_calibration_identical_output_ratio`` says whether both runs agreed token for token.
- ``padrec_speedup{method="live"}``: plain decode seconds per token measured at calibration,
  divided by the decode seconds per token of the speculative requests served since start-up.

The draft-length schedule: ``padrec_spec_k{batch_size}`` is the K of each batch-size range of the
schedule in use (0 = plain); ``padrec_decoded_requests_total{mode}`` and
``padrec_decoded_requests_by_k_total{k}`` count requests by the K they ran with, and the live
speedup covers the speculative ones only.

The catalog constraint: ``padrec_constrained`` is 1 when it is on (``PADREC_CONSTRAINED``);
``padrec_forced_tokens_total`` counts the tokens it forced that the engine appended unverified;
the invalid / duplicate / history item counters then stay at 0.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from padrec_vllm.engines import Calibration, RequestResult, SpecSchedule
from padrec_vllm.model.config import MAX_DRAFT_TOKENS

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """The series of one app. ``slot_labels`` (``TokenLayout.slot_labels()``: ``L0``.., ``sep``,
    ``special``) name the ``slot`` label values; the lifespan sets them once the catalog is
    loaded (``set_slot_labels``)."""

    def __init__(self, slot_labels: dict[int, str] | None = None):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.slot_labels = dict(slot_labels or {})
        self.request_seconds = Histogram(
            "padrec_request_duration_seconds",
            "HTTP request latency",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recommendations = Counter(
            "padrec_recommendations", "recommendations answered", registry=r
        )
        self.generated_tokens = Counter(
            "padrec_generated_tokens", "tokens the engine generated", registry=r
        )
        self.forced_tokens = Counter(
            "padrec_forced_tokens",
            "tokens the catalog constraint forced (the only legal one) that the engine appended "
            "without a target forward choosing them (0 where the engine verifies them: vLLM, "
            "plain reference batches)",
            registry=r,
        )
        self.constrained = Gauge(
            "padrec_constrained",
            "1 when lists are decoded under the catalog constraint (PADREC_CONSTRAINED), else 0",
            registry=r,
        )
        self.target_forwards = Counter(
            "padrec_target_forwards", "target forwards after prefill (verify rounds)", registry=r
        )
        self.decoded = Counter(
            "padrec_decoded_requests",
            "requests the engine decoded, by mode: speculative, or plain (no head, or K = 0 under "
            "the draft-length schedule)",
            ["mode"],
            registry=r,
        )
        self.spec_k = Gauge(
            "padrec_spec_k",
            "draft tokens per round (K) the draft-length schedule gives a batch of batch_size "
            "requests (a range first-last, or first- for no end); 0 = plain decoding",
            ["batch_size"],
            registry=r,
        )
        self.decoded_by_k = Counter(
            "padrec_decoded_requests_by_k",
            "requests the engine decoded, by the K they ran with (0 = plain)",
            ["k"],
            registry=r,
        )
        self.draft_tokens = Counter("padrec_draft_tokens", "draft tokens proposed", registry=r)
        self.accepted_tokens = Counter(
            "padrec_accepted_tokens", "draft tokens accepted", registry=r
        )
        self.acceptance_length = Histogram(
            "padrec_acceptance_length",
            "tokens emitted per verify round (accepted drafts + 1)",
            buckets=tuple(range(1, MAX_DRAFT_TOKENS + 2)),
            registry=r,
        )
        self.drafted_by_pos = Counter(
            "padrec_drafted_by_position", "drafts proposed at position", ["position"], registry=r
        )
        self.accepted_by_pos = Counter(
            "padrec_accepted_by_position", "drafts accepted at position", ["position"], registry=r
        )
        self.drafted_by_slot = Counter(
            "padrec_drafted_by_slot",
            "judged drafts by item slot (SID level or sep)",
            ["slot"],
            registry=r,
        )
        self.accepted_by_slot = Counter(
            "padrec_accepted_by_slot", "accepted drafts by item slot", ["slot"], registry=r
        )
        self.tau = Gauge(
            "padrec_tau", "tokens per target forward while decoding, since start", registry=r
        )
        # per answer; under the catalog constraint invalid, duplicate and history stay 0
        self.generated_items = Counter(
            "padrec_generated_items", "items the model generated", registry=r
        )
        self.invalid_items = Counter(
            "padrec_invalid_items", "generated codes naming no item", registry=r
        )
        self.duplicate_items = Counter("padrec_duplicate_items", "generated repeats", registry=r)
        self.history_items = Counter(
            "padrec_history_items_generated",
            "generated history items dropped (exclude_history)",
            registry=r,
        )
        self.filled_items = Counter(
            "padrec_filled_items", "items filled from most-popular", registry=r
        )
        self.invalid_rate = Gauge(
            "padrec_invalid_item_rate", "invalid / generated items since start", registry=r
        )
        self.in_flight = Gauge(
            "padrec_in_flight_requests", "recommendations being answered", registry=r
        )
        self.rejected = Counter(
            "padrec_rejected_requests", "requests refused", ["reason"], registry=r
        )
        self.decode_seconds = Counter(
            "padrec_decode_seconds", "engine decode seconds (after the first token)", registry=r
        )
        self.decode_tokens = Counter("padrec_decode_tokens", "tokens after the first", registry=r)
        self.speedup = Gauge(
            "padrec_speedup",
            "wall-clock speedup of speculative over plain decoding (see docs/SERVER.md)",
            ["method"],
            registry=r,
        )
        self.calib_identical = Gauge(
            "padrec_calibration_identical_output_ratio",
            "calibration requests identical with and without speculation",
            registry=r,
        )
        self.calib_tau = Gauge("padrec_calibration_tau", "tau of the calibration run", registry=r)
        self.calib_s_per_token = Gauge(
            "padrec_calibration_decode_seconds_per_token",
            "decode seconds per token at calibration",
            ["mode"],
            registry=r,
        )
        self._plain_s_per_token: float | None = None
        self._spec_decode_s = 0.0
        self._spec_decode_tokens = 0
        self._tokens = self._forwards = 0
        self._items = self._invalid = 0

    def set_slot_labels(self, labels: dict[int, str]) -> None:
        self.slot_labels = dict(labels)

    def set_constrained(self, on: bool) -> None:
        self.constrained.set(1 if on else 0)

    def set_schedule(self, schedule: SpecSchedule) -> None:
        """``padrec_spec_k``: one series per range of the schedule in use."""
        self.spec_k.clear()
        for r in schedule.ranges:
            self.spec_k.labels(r.label()).set(r.k)

    def set_calibration(self, c: Calibration) -> None:
        self.speedup.labels("calibration").set(c.speedup)
        self.calib_identical.set(c.identical_rate)
        self.calib_tau.set(c.tau)
        self.calib_s_per_token.labels("plain").set(c.plain_s_per_token)
        self.calib_s_per_token.labels("speculative").set(c.speculative_s_per_token)
        self._plain_s_per_token = c.plain_s_per_token

    def observe_generation(self, g: RequestResult) -> None:
        self.generated_tokens.inc(len(g.tokens))
        self.forced_tokens.inc(g.forced_tokens)
        self.target_forwards.inc(g.target_forwards)
        self.decode_seconds.inc(g.decode_s)
        self.decode_tokens.inc(g.decode_tokens)
        self._tokens += g.decode_tokens
        self._forwards += g.target_forwards
        if self._forwards:
            self.tau.set(self._tokens / self._forwards)
        self.decoded.labels("speculative" if g.speculative else "plain").inc()
        self.decoded_by_k.labels(str(g.num_draft_tokens)).inc()
        if not g.speculative:
            return
        self.draft_tokens.inc(g.draft_tokens)
        self.accepted_tokens.inc(g.accepted_tokens)
        for a, count in enumerate(g.acceptance_histogram):
            for _ in range(count):
                self.acceptance_length.observe(a + 1)
        for j, (acc, prop) in enumerate(g.accept_by_pos, 1):
            self.drafted_by_pos.labels(str(j)).inc(prop)
            self.accepted_by_pos.labels(str(j)).inc(acc)
        for slot, (acc, prop) in g.accept_by_slot.items():
            name = self.slot_labels.get(slot, str(slot))
            self.drafted_by_slot.labels(name).inc(prop)
            self.accepted_by_slot.labels(name).inc(acc)
        if self._plain_s_per_token and g.decode_tokens:
            self._spec_decode_s += g.decode_s
            self._spec_decode_tokens += g.decode_tokens
            if self._spec_decode_s > 0:
                live = self._spec_decode_s / self._spec_decode_tokens
                self.speedup.labels("live").set(self._plain_s_per_token / live)

    def observe_items(
        self, generated: int, invalid: int, duplicate: int, in_history: int, filled: int
    ) -> None:
        self.recommendations.inc()
        self.generated_items.inc(generated)
        self.invalid_items.inc(invalid)
        self.duplicate_items.inc(duplicate)
        self.history_items.inc(in_history)
        self.filled_items.inc(filled)
        self._items += generated
        self._invalid += invalid
        if self._items:
            self.invalid_rate.set(self._invalid / self._items)

