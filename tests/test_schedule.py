"""The draft-length schedule (``padrec_vllm.engines.schedule``): parsing, validation, lookup, the
form vLLM receives, and the metric and readiness figures the server derives from it."""

from __future__ import annotations

import pytest

from padrec_vllm.engines import SpecRange, SpecSchedule
from padrec_vllm.model.config import MAX_DRAFT_TOKENS


@pytest.mark.parametrize(
    "text, canonical, ks",  # ks: K at batch sizes 1, 2, 3, 64, 1000
    [
        ("off", "off", [0, 0, 0, 0, 0]),
        (" OFF ", "off", [0, 0, 0, 0, 0]),
        ("4", "4", [4, 4, 4, 4, 4]),
        ("0", "off", [0, 0, 0, 0, 0]),
        ("1-1:4,2-64:0", "1:4,2-64:0", [4, 0, 0, 0, 0]),
        ("1:4, 2-:0", "1:4,2-:0", [4, 0, 0, 0, 0]),
        ("1-2:3,3-:1", "1-2:3,3-:1", [3, 3, 1, 1, 1]),
        ("[[1, 1, 4], [2, 64, 0]]", "1:4,2-64:0", [4, 0, 0, 0, 0]),
        ("1:4,2:3,3-63:2,64-:0", "1:4,2:3,3-63:2,64-:0", [4, 3, 2, 0, 0]),
        ("1-8:2", "1-8:2", [2, 2, 2, 2, 2]),  # past the last range: its K
    ],
)
def test_parse_and_lookup(text, canonical, ks):
    s = SpecSchedule.parse(text)
    assert str(s) == canonical and SpecSchedule.parse(str(s)) == s
    assert [s.k_for(n) for n in (1, 2, 3, 64, 1000)] == ks
    assert s.max_k == max(ks)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty draft-length schedule"),
        ("fast", "'fast' is not a range A-B:K"),
        ("1:4;2-:0", "is not a range"),
        ("1:-1", "is not a range"),
        ("1-x:2", "is not a range"),
        ("2-:4", "range 2-:4 must start at batch size 1"),
        ("1:4,3-:0", "range 3-:0 must start at 2"),
        ("1-4:4,3-:0", "range 3-:0 must start at 5"),
        ("1-:4,5:0", "follows a range with no end"),
        ("3-1:2", "must start at batch size 1"),
        ("1-0:2", "range 1-0 ends before it starts"),
        (f"1:{MAX_DRAFT_TOKENS + 1}", f"is not in 0..{MAX_DRAFT_TOKENS}"),
        ("[[1, 1]]", r"is not \(first, last, K\)"),
        ("[1, 2, 3]", r"is not \(first, last, K\)"),
        ('[[1, 2, "4"]]', "needs integers"),
        ("[[1, 1, 4],", "is not valid JSON"),
        ('{"1": 4}', "is not a range"),
        ("[]", "needs at least one range"),
    ],
)
def test_invalid_schedules_say_why_in_one_line(text, message):
    with pytest.raises(ValueError, match=message) as info:
        SpecSchedule.parse(text)
    assert "\n" not in str(info.value)


def test_construction_is_validated():
    with pytest.raises(ValueError, match="must start at 2"):
        SpecSchedule((SpecRange(1, 1, 4), SpecRange(3, None, 0)))
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        SpecSchedule.fixed(2).k_for(0)
    assert SpecSchedule.of([(1, 1, 4), (2, None, 0)]) == SpecSchedule.parse("1:4,2-:0")
    assert SpecSchedule.off().max_k == 0 and SpecSchedule.fixed(3).uniform


def test_clipped_to_the_engine_batch():
    s = SpecSchedule.parse("1:4,2-16:2,17-:0")
    assert str(s.clipped(8)) == "1:4,2-:2"  # 17-: is out of reach, the last range opens
    assert str(s.clipped(1)) == "4" and s.clipped(1).max_k == 4
    assert str(s.clipped(64)) == "1:4,2-16:2,17-:0"
    assert str(SpecSchedule.parse("1:0,2-:3").clipped(1)) == "off"
    assert str(SpecSchedule.parse("1:2,2:2,3-:0").clipped(8)) == "1-2:2,3-:0"  # same K merged
    assert s.largest_batch_speculating(8) == 8 and s.largest_batch_speculating(64) == 16
    assert SpecSchedule.off().largest_batch_speculating(8) == 0
    with pytest.raises(ValueError):
        s.clipped(0)


def test_vllm_form():
    """What goes into ``speculative_config["num_speculative_tokens_per_batch_size"]``: closed
    ranges from 1 to ``max_num_seqs``, which vLLM's own validator accepts."""
    s = SpecSchedule.parse("1:4,2-:0")
    assert s.to_vllm(64) == [(1, 1, 4), (2, 64, 0)]
    assert SpecSchedule.parse("1:4,2-16:2,17-:0").to_vllm(8) == [(1, 1, 4), (2, 8, 2)]
    assert SpecSchedule.fixed(3).to_vllm(8) == [(1, 8, 3)]
    try:
        from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup
    except ImportError:
        return
    lookup = build_dynamic_sd_schedule_lookup(s.to_vllm(8), 8, s.max_k)
    assert lookup[1:] == [s.k_for(n) for n in range(1, 9)]


def test_vllm_speculative_config():
    pytest.importorskip("vllm")
    from padrec_vllm.vllm_plugin.async_engine import speculative_config

    config = speculative_config("/h", SpecSchedule.parse("1:4,2-3:2,4-:0"), 8)
    assert config == {
        "method": "eagle", "model": "/h", "num_speculative_tokens": 4,
        "num_speculative_tokens_per_batch_size": [(1, 1, 4), (2, 3, 2), (4, 8, 0)],
    }
    # one K everywhere (after clipping): still per batch size, so that it can be switched
    assert speculative_config("/h", SpecSchedule.parse("1-8:3,9-:0"), 8) == {
        "method": "eagle", "model": "/h", "num_speculative_tokens": 3,
        "num_speculative_tokens_per_batch_size": [(1, 8, 3)],
    }
    with pytest.raises(ValueError, match="never speculates"):
        speculative_config("/h", SpecSchedule.off(), 8)


def test_metrics_follow_the_schedule():
    from padrec_vllm.decoding.accounting import RequestResult
    from server.metrics import ServerMetrics

    m = ServerMetrics()
    m.set_schedule(SpecSchedule.parse("1:4,2-7:2,8-:0"))
    spec = RequestResult(tokens=[5, 6, 7], target_forwards=1, accept_by_pos=[(1, 1), (1, 1)])
    plain = RequestResult(tokens=[5, 6, 7], target_forwards=2)
    m.observe_generation(spec)
    m.observe_generation(plain)
    value = m.registry.get_sample_value
    assert [value("padrec_spec_k", {"batch_size": b}) for b in ("1", "2-7", "8-")] == [4, 2, 0]
    assert value("padrec_decoded_requests_total", {"mode": "speculative"}) == 1
    assert value("padrec_decoded_requests_total", {"mode": "plain"}) == 1
    assert value("padrec_decoded_requests_by_k_total", {"k": "2"}) == 1
    assert value("padrec_decoded_requests_by_k_total", {"k": "0"}) == 1
    m.set_schedule(SpecSchedule.off())  # a new schedule replaces the series
    assert value("padrec_spec_k", {"batch_size": "2-7"}) is None
    assert value("padrec_spec_k", {"batch_size": "1-"}) == 0
