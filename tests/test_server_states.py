"""Server states a real engine reaches only by accident (slow, failing, not ready), with fake
engines; then the engine settings the server passes on (int8 drafting, the draft-length
schedule), with the reference engine."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient
from test_server import wait_ready

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.engines import EngineConfig, EngineError, RequestResult, SpecSchedule
from server import Settings, create_app


@pytest.fixture(scope="module")
def catalog(tiny_artifacts) -> Catalog:
    return Catalog.load(tiny_artifacts)



class FakeEngine:
    """Answers every prompt with the same item list after ``delay_s``; ``gate`` delays start.
    ``started`` records the budget and constraint of ``start``, ``constraints`` those of every
    ``generate``."""

    name = "fake"

    def __init__(
        self,
        settings: Settings,
        *,
        delay_s=0.0,
        gate: threading.Event | None = None,
        fail_start=False,
        fail_generate=False,
    ):
        self.config = EngineConfig(artifacts=settings.artifacts, head=None)
        self.delay_s, self.gate = delay_s, gate
        self.fail_start, self.fail_generate = fail_start, fail_generate
        catalog = Catalog.load(settings.artifacts)
        self.tokens = catalog.completion_ids([5, 6, 7], finished=True)
        self.started = None
        self.constraints = []

    num_draft_tokens = 0
    max_draft_tokens = 0
    schedule = SpecSchedule.off()
    max_model_len = 256

    async def start(self, warmup_prompts, max_new_tokens, constraint=None):
        self.started = (max_new_tokens, constraint)
        if self.gate is not None:
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        if self.fail_start:
            raise EngineError("weights are corrupt")

    async def set_schedule(self, schedule):
        self.schedule = schedule

    async def generate(self, prompt, max_new_tokens, constraint=None):
        self.constraints.append(constraint)
        await asyncio.sleep(self.delay_s)
        if self.fail_generate:
            raise EngineError("engine core died")
        forwards = len(self.tokens) - 1
        return RequestResult(
            tokens=self.tokens,
            target_forwards=forwards,
            plain_forwards=forwards,
            prefill_s=0.001,
            decode_s=0.002,
        )

    async def close(self):
        self.closed = True

    def alive(self) -> bool:
        return not getattr(self, "closed", False) and not self.dead

    dead = False

    def prometheus_text(self) -> bytes:
        return b"fake_engine_series 1.0\n"


def fake_client(settings: Settings, **kw) -> TestClient:
    return TestClient(create_app(settings, engine_factory=lambda s: FakeEngine(s, **kw)))


def test_overload_is_503_with_retry_after(settings):
    s = settings.model_copy(update={"max_in_flight": 2, "retry_after_s": 3})
    with fake_client(s, delay_s=0.5) as c:
        wait_ready(c)
        r = c.post("/recommend/batch", json={"requests": [{"history": [1]}] * 3})
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.json()["error"] == "overloaded"
        slow = threading.Thread(
            target=c.post,
            args=("/recommend/batch",),
            kwargs={"json": {"requests": [{"history": [1]}] * 2}},
        )
        slow.start()
        time.sleep(0.2)
        r = c.post("/recommend", json={"history": [1]})
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        slow.join()
        assert c.post("/recommend", json={"history": [1]}).status_code == 200
        assert 'padrec_rejected_requests_total{reason="overload"} 2.0' in c.get("/metrics").text


def test_not_ready_until_the_engine_is_warm(settings):
    gate = threading.Event()
    with fake_client(settings, gate=gate) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "starting"
        r = c.post("/recommend", json={"history": [1]})
        assert (
            r.status_code == 503 and r.json()["error"] == "not_ready" and "retry-after" in r.headers
        )
        gate.set()
        wait_ready(c)
        body = c.post("/recommend", json={"history": [1, 2], "k": 4}).json()
        assert [it["item_id"] for it in body["items"]][:3] == [5, 6, 7]
        assert body["head"] is None and body["spec"]["draft_tokens"] == 0
        assert "fake_engine_series 1.0" in c.get("/metrics").text


def test_engine_failures_are_503(settings):
    with fake_client(settings, fail_start=True) as c:
        for _ in range(100):
            if c.get("/readyz").json()["status"] != "starting":
                break
            time.sleep(0.05)
        ready = c.get("/readyz").json()
        assert ready["status"] == "failed" and "weights are corrupt" in ready["error"]
        assert c.get("/healthz").status_code == 503
        assert c.post("/recommend", json={"history": [1]}).status_code == 503
    with fake_client(settings, fail_generate=True) as c:
        wait_ready(c)
        r = c.post("/recommend", json={"history": [1]})
        assert r.status_code == 503 and r.json()["error"] == "engine_error"
        assert c.app.state.server.in_flight == 0
        assert c.get("/healthz").status_code == 200
        c.app.state.server.engine.dead = True  # e.g. vLLM's engine core process died
        assert c.get("/healthz").status_code == 503
        assert c.get("/readyz").json()["error"] == "the engine died"
        assert c.post("/recommend", json={"history": [1]}).json()["error"] == "not_ready"


@pytest.mark.parametrize("constrained", [True, False])
def test_constraint_reaches_the_engine(settings, catalog, constrained):
    """Start-up warms up and calibrates under ListSpec(k=the schema's default k) with a budget
    of exactly that list; each request's plan hands its ListSpec to ``generate``. Without the
    constraint (PADREC_CONSTRAINED=false) neither gets one, and the budget has the extra items."""
    from padrec_vllm.catalog.constraint import ListSpec
    from server.schemas import DEFAULT_K

    per_item = catalog.layout.tokens_per_item
    with fake_client(settings.model_copy(update={"constrained": constrained})) as c:
        wait_ready(c)
        engine = c.app.state.server.engine
        body = c.post("/recommend", json={"history": [1, 2, 1], "k": 4}).json()
        c.post("/recommend", json={"history": []})  # cold start: no engine call
        if constrained:
            assert engine.started == (DEFAULT_K * per_item + 1, ListSpec(DEFAULT_K))
            assert engine.constraints == [ListSpec(4, (1, 2))]
        else:
            assert engine.started == ((DEFAULT_K + 5) * per_item + 1, None)
            assert engine.constraints == [None]
        # the fake's 3 finished items: the fill gives the 4th and says why
        assert [it["source"] for it in body["items"]] == ["model"] * 3 + ["popular"]
        assert body["generation"]["constrained"] is constrained
        why = "no legal catalog item was left" if constrained else "the model's list had 3"
        assert why in body["notes"][-1]
        assert c.get("/readyz").json()["constrained"] is constrained


# --------------------------------------------------------------------------- engine settings


def test_int8_drafting_serves_the_greedy_lists(tiny_artifacts, catalog):
    """PADREC_DRAFT_INT8: the reference engine drafts with an int8 head; lists stay plain greedy."""
    from server.engines import build_engine

    prompts = [catalog.prompt_ids(h, 5) for h in ([1, 2, 3], [4, 5], [6, 7, 8, 9])]

    async def lists(**kw):
        engine = build_engine(Settings(artifacts=tiny_artifacts, engine="reference", **kw))
        await engine.start(prompts, 20)
        try:
            return [(await engine.generate(p, 20)).tokens for p in prompts]
        finally:
            await engine.close()

    assert asyncio.run(lists(draft_int8=True)) == asyncio.run(lists(speculative=False))
    for bad in ({"engine": "vllm"}, {"device": "cuda"}, {"dtype": "bfloat16"}):
        with pytest.raises(Exception, match="draft_int8 needs engine=reference"):
            Settings(artifacts=tiny_artifacts, **{"engine": "reference", **bad}, draft_int8=True)


def test_default_schedule_speculates_on_one_row_batches(tiny_artifacts, catalog):
    """The reference engine's default on CPU (auto without calibration): ``1:K,2-:0``. Four
    requests arriving together are decoded as one plain batch; alone, each is speculated with K.
    The lists are plain greedy decoding in every case."""
    from server.engines import build_engine

    prompts = [catalog.prompt_ids(h, 5) for h in ([1, 2, 3], [4, 5], [6, 7, 8, 9], [2, 9])]

    async def run(**kw):
        engine = build_engine(Settings(artifacts=tiny_artifacts, engine="reference", **kw))
        await engine.start(prompts[:2], 20)
        try:
            together = await asyncio.gather(*(engine.generate(p, 20) for p in prompts))
            alone = [await engine.generate(p, 20) for p in prompts]
        finally:
            await engine.close()
        return together, alone, engine.schedule

    together, alone, schedule = asyncio.run(run())
    plain = [g.tokens for g in asyncio.run(run(speculative=False))[0]]
    assert str(schedule) == "1:3,2-:0"
    assert [g.tokens for g in together] == [g.tokens for g in alone] == plain
    assert not any(g.speculative or g.draft_tokens or g.num_draft_tokens for g in together)
    assert all(g.target_forwards == g.decode_tokens for g in together)  # one token per forward
    assert all(g.speculative and g.draft_tokens > 0 and g.num_draft_tokens == 3 for g in alone)

    together, _, schedule = asyncio.run(run(spec_schedule="1-4:2,5-:0"))
    assert str(schedule) == "1-4:2,5-:0" and [g.tokens for g in together] == plain
    assert all(g.speculative and g.num_draft_tokens == 2 and g.draft_tokens > 0 for g in together)

    _, together, schedule = asyncio.run(run(spec_schedule="off"))
    assert str(schedule) == "off" and [g.tokens for g in together] == plain


def test_calibration_measures_every_k_and_stays_lossless(tiny_artifacts, catalog):
    """``engines.calibrate`` on the reference engine (tiny build): auto measures K = 0..3 at
    batch sizes 1, 2, 4 (the fastest K and K = 0 twice), every point's lists equal K = 0's, and
    the engine is left on the chosen schedule; an explicit schedule is measured against K = 0
    only and kept. ``set_schedule`` refuses more drafts than the head's."""
    from padrec_vllm.engines import EngineError, SpecSchedule, calibrate
    from server.engines import build_engine

    histories = [[1 + i % 9, 2 + i % 7, 3 + i % 5] for i in range(8)]
    prompts = [catalog.prompt_ids(h, 5) for h in histories]

    async def run(schedule):
        engine = build_engine(Settings(artifacts=tiny_artifacts, engine="reference"))
        await engine.start(prompts[:2], 20)
        try:
            with pytest.raises(EngineError, match="drafts 4 tokens"):
                await engine.set_schedule(SpecSchedule.fixed(4))
            c = await calibrate(engine, prompts, 20, max_k=engine.max_draft_tokens,
                                schedule=schedule, requests=4, max_batch=4)
            return c, engine.schedule
        finally:
            await engine.close()

    auto, in_use = asyncio.run(run(None))
    assert auto.chosen and auto.identical_rate == 1.0 and str(in_use) == str(auto.schedule)
    assert auto.batch_sizes == [1, 2, 4]
    for b in (1, 2, 4):
        ks = {p.k for p in auto.points if p.batch_size == b}
        assert ks == {0, 1, 2, 3}
        plain = auto.point(b, 0)
        assert plain.requests == 2 * max(4, 2 * b)  # measured twice
        assert plain.tau == 1.0  # K = 0: one token per forward (forced tokens skipped)
    assert all(p.tau > 1.0 for p in auto.points if p.k > 0)
    fixed, in_use = asyncio.run(run(SpecSchedule.parse("1:3,2-:1")))
    assert not fixed.chosen and str(in_use) == "1:3,2-:1" == str(fixed.schedule)
    assert {(p.batch_size, p.k) for p in fixed.points} == {(1, 0), (1, 3), (2, 0), (2, 1),
                                                          (4, 0), (4, 1)}
    assert fixed.identical_rate == 1.0


@pytest.mark.parametrize("constrained", [False, True])
def test_schedule_is_lossless_across_batch_sizes(tiny_artifacts, catalog, constrained):
    """Requests arriving while others decode form batches of 1, 2 and 3 rows, which the schedule
    ``1:3,2:1,3-:0`` decodes with K = 3, 1 and 0: every list is plain greedy decoding's (under
    the catalog constraint too), and every result reports its batch's K."""
    from padrec_vllm.catalog.constraint import ListSpec
    from server.engines import build_engine

    histories = ([1, 2, 3], [4, 5], [6, 7, 8, 9], [2, 9], [3, 8], [7, 1, 4])
    prompts = [catalog.prompt_ids(h, 5) for h in histories]
    groups = [prompts[:1], prompts[1:3], prompts[3:]]  # batches of 1, 2 and 3 rows
    spec = ListSpec(k=3) if constrained else None
    budget = 3 * catalog.layout.tokens_per_item + 1 if constrained else 20

    async def run(**kw):
        engine = build_engine(Settings(artifacts=tiny_artifacts, engine="reference", **kw))
        await engine.start(prompts[:2], budget)
        try:
            tasks = []
            for group in groups:  # each group is queued once the worker took the one before
                tasks += [asyncio.create_task(engine.generate(p, budget, spec)) for p in group]
                await asyncio.sleep(0)  # the new tasks enqueue
                while engine._pending:
                    await asyncio.sleep(0.001)
            return await asyncio.gather(*tasks), engine.schedule
        finally:
            await engine.close()

    results, schedule = asyncio.run(run(spec_schedule="1:3,2:1,3-:0"))
    plain, _ = asyncio.run(run(spec_schedule="off"))
    assert [r.tokens for r in results] == [r.tokens for r in plain]
    ks = [schedule.k_for(len(g)) for g in groups for _ in g]
    assert ks == [3, 1, 1, 0, 0, 0] == [r.num_draft_tokens for r in results]
    assert [r.speculative for r in results] == [k > 0 for k in ks]
    assert all(r.draft_tokens > 0 for r in results[:3]) and not any(r.draft_tokens for r in plain)
    assert all(len(r.tokens) > 1 for r in results)


def test_spec_schedule_settings(tiny_artifacts):
    """PADREC_SPEC_SCHEDULE is read and kept in canonical form; PADREC_SPEC_MAX_BATCH is refused
    with the schedule that replaces it; K has one source."""
    from server.engines import engine_config

    def settings(**kw):
        return Settings(artifacts=tiny_artifacts, engine="reference", **kw)

    assert settings().spec_schedule == "auto" and settings().schedule() is None
    assert settings(spec_schedule=" AUTO ").spec_schedule == "auto"
    assert settings(spec_schedule="1-1:4,2-64:0").spec_schedule == "1:4,2-64:0"
    assert settings(spec_schedule="[[1, 1, 4], [2, 64, 0]]").spec_schedule == "1:4,2-64:0"
    assert str(settings(spec_schedule="OFF").schedule()) == "off"
    for bad, match in (("1:4,3-:0", "must start at 2"), ("2-:4", "must start at batch size 1"),
                       ("1:99", "not in 0..16"), ("fast", "not a range")):
        with pytest.raises(Exception, match=match):
            settings(spec_schedule=bad)
    with pytest.raises(Exception, match="PADREC_SPEC_SCHEDULE=1-4:K,5-:0"):
        settings(spec_max_batch=4)
    with pytest.raises(Exception, match="put K in the schedule"):
        settings(spec_schedule="1:4,2-:0", num_draft_tokens=3)
    with pytest.raises(Exception, match="speculative=false loads no head"):
        settings(spec_schedule="2", speculative=False)
    assert settings(spec_schedule="off", speculative=False).schedule().max_k == 0

    # settings -> engine config: an explicit schedule passes on, "off" loads no head, auto
    # leaves the engine's default (reference on CPU: 1:K,2-:0; vLLM: K everywhere)
    config = engine_config(settings(spec_schedule="1:2,2-:0", max_batch_size=8))
    assert str(config.schedule()) == "1:2,2-:0" and config.head == "padrec"
    config = engine_config(settings(spec_schedule="off"))
    assert config.head is None and str(config.schedule()) == "off"
    assert str(engine_config(settings()).schedule()) == "1:3,2-:0"
    assert str(engine_config(settings(num_draft_tokens=2)).schedule()) == "1:2,2-:0"
    vllm = engine_config(Settings(artifacts=tiny_artifacts, engine="vllm", max_batch_size=8))
    assert str(vllm.schedule()) == "3"
    vllm = engine_config(Settings(artifacts=tiny_artifacts, spec_schedule="1:3,2-64:1"))
    assert str(vllm.schedule()) == "1:3,2-:1"  # clipped to max_batch_size (32)


def test_server_reports_the_schedule(settings):
    """The reference app under ``1:2,2-:0``: ``/readyz`` and ``padrec_spec_k`` report the
    schedule; a request alone answers ``spec.num_draft_tokens`` 2, three sent together 0, and
    the decoded-requests counters follow."""
    s = settings.model_copy(update={"spec_schedule": "1:2,2-:0", "calibration_requests": 2})
    with TestClient(create_app(s)) as c:
        ready = wait_ready(c)
        assert ready["spec_schedule"] == {
            "setting": "1:2,2-:0", "schedule": "1:2,2-:0", "ranges": [[1, 1, 2], [2, None, 0]],
            "source": "setting",
        }
        assert ready["num_draft_tokens"] == 2 and ready["calibration"]["schedule"] == "1:2,2-:0"
        alone = c.post("/recommend", json={"history": [1, 2, 3]}).json()
        assert alone["spec"]["speculative"] and alone["spec"]["num_draft_tokens"] == 2
        assert len(alone["spec"]["acceptance_by_position"]) == 2
        body = {"requests": [{"history": h} for h in ([1, 2], [3, 4], [5, 6])]}
        together = c.post("/recommend/batch", json=body).json()["responses"]
        assert [r["spec"]["num_draft_tokens"] for r in together] == [0, 0, 0]
        assert not any(r["spec"]["speculative"] for r in together)
        text = c.get("/metrics").text
        assert 'padrec_spec_k{batch_size="1"} 2.0' in text
        assert 'padrec_spec_k{batch_size="2-"} 0.0' in text
        assert 'padrec_decoded_requests_total{mode="plain"} 3.0' in text
        assert 'padrec_decoded_requests_total{mode="speculative"} 1.0' in text
        assert 'padrec_decoded_requests_by_k_total{k="2"} 1.0' in text
    auto = settings.model_copy(update={"spec_schedule": "auto", "calibration_requests": 0})
    with TestClient(create_app(auto)) as c:  # auto without calibration: the engine's default
        schedule = wait_ready(c)["spec_schedule"]
        assert schedule["setting"] == "auto" and schedule["source"] == "default"
        assert schedule["schedule"] == "1:3,2-:0"


def test_auto_schedule_is_calibrated_stored_and_reused(settings, tmp_path, monkeypatch):
    """PADREC_SPEC_SCHEDULE=auto: the first start measures and stores the calibration under
    PADREC_CALIBRATION_DIR, a restart with the same settings reuses it, PADREC_RECALIBRATE=true
    measures again, and other settings (a smaller engine batch, other preloaded libraries) are
    another key."""
    s = settings.model_copy(update={"spec_schedule": "auto", "calibration_requests": 2,
                                    "calibration_max_batch": 2, "calibration_dir": tmp_path})

    def start(**update):
        with TestClient(create_app(s.model_copy(update=update))) as c:
            ready = wait_ready(c)
            assert c.post("/recommend", json={"history": [1, 2, 3]}).status_code == 200
            return ready

    first = start()
    assert first["spec_schedule"]["source"] == "calibrated" and first["calibration"]["chosen"]
    assert first["spec_schedule"]["schedule"] == first["calibration"]["schedule"]
    stored = list(tmp_path.glob("reference-*.json"))
    assert len(stored) == 1
    again = start()
    assert again["spec_schedule"]["source"] == "stored"
    assert again["calibration"] == first["calibration"]
    assert start(recalibrate=True)["spec_schedule"]["source"] == "calibrated"
    assert start(max_batch_size=2)["spec_schedule"]["source"] == "calibrated"
    assert len(list(tmp_path.glob("reference-*.json"))) == 2
    monkeypatch.setenv("LD_PRELOAD", "/elsewhere/libtcmalloc_minimal.so.4")
    assert start()["spec_schedule"]["source"] == "calibrated"
    assert len(list(tmp_path.glob("reference-*.json"))) == 3
