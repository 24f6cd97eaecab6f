"""The HTTP server on the tiny build with the reference engine, plus fake engines for the states a
real one reaches only by accident (slow, failing, not ready). vLLM: test_server_vllm.py."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.engine_api import EngineConfig, EngineError, Generation, generation_from_rounds
from padrec_vllm.errors import UserError
from server import Settings, create_app
from server.app import check

MIB = 1 << 20

# (name, body, status, text the message must contain): every bad input of issue 5
BAD_INPUTS = [
    ("k_zero", {"history": [1], "k": 0}, 422, "body.k"),
    ("k_too_big", {"history": [1], "k": 51}, 422, "body.k"),
    ("k_string", {"history": [1], "k": "10"}, 422, "body.k"),
    ("k_float", {"history": [1], "k": 2.5}, 422, "body.k"),
    ("k_bool", {"history": [1], "k": True}, 422, "body.k"),
    ("history_missing", {"k": 3}, 422, "body.history"),
    ("history_null", {"history": None}, 422, "body.history"),
    ("history_string", {"history": "1,2,3"}, 422, "body.history"),
    ("history_item_string", {"history": [1, "2"]}, 422, "body.history[1]"),
    ("history_item_float", {"history": [1, 2.5]}, 422, "body.history[1]"),
    ("history_item_huge", {"history": [1, 10**30]}, 422, "history"),
    (
        "exclude_history_type",
        {"history": [1], "exclude_history": "maybe"},
        422,
        "body.exclude_history",
    ),
    ("exclude_history_int", {"history": [1], "exclude_history": 0}, 422, "body.exclude_history"),
    ("exclude_history_string_bool", {"history": [1], "exclude_history": "false"}, 422, "body.exclude_history"),
    ("unknown_items_mode", {"history": [1], "unknown_items": "drop"}, 422, "body.unknown_items"),
    ("user_id_object", {"history": [1], "user_id": {"a": 1}}, 422, "body.user_id"),
    ("extra_field", {"history": [1], "kk": 3}, 422, "body.kk"),
    ("body_array", [1, 2, 3], 422, "body"),
    ("unknown_item", {"history": [1, 99999, -4], "k": 3}, 422, "99999, -4"),
]


def wait_ready(client: TestClient, timeout_s: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 503 and r.headers.get("content-type") == "application/json"
        assert r.json()["status"] == "starting", r.json()
        time.sleep(0.1)
    raise AssertionError("server not ready in time")


def check_answer(
    body: dict, catalog: Catalog, history: list[int], k: int, exclude: bool = True
) -> None:
    """k distinct valid catalog items, ranked, none from the history; figures present."""
    items = body["items"]
    ids = [it["item_id"] for it in items]
    assert len(ids) == k and len(set(ids)) == k
    assert [it["rank"] for it in items] == list(range(1, k + 1))
    for it in items:
        assert tuple(it["sid"]) == catalog.item_to_sid[it["item_id"]]
        assert it["title"] == catalog.titles.get(it["item_id"])
        assert it["source"] in ("model", "popular")
    if exclude:
        assert not set(ids) & set(history)
    sources = [it["source"] for it in items]
    assert sources == sorted(sources, key=lambda s: s != "model"), "model items rank first"
    assert body["generation"]["filled"] == sources.count("popular")
    lat = body["latency_ms"]
    assert (
        lat["total"] >= lat["engine"] >= lat["prefill"] + lat["decode"] >= 0 and lat["queue"] >= 0
    )
    spec = body["spec"]
    assert spec["target_forwards"] >= 0 and spec["accepted_tokens"] <= spec["draft_tokens"]


def model_items(catalog: Catalog, tokens: list[int], history: list[int], k: int) -> list[int]:
    """What the server must keep of a generated list: valid, first occurrence, not in history."""
    out, seen = [], set()
    for item in catalog.parse(tokens).items:
        if item is not None and item not in seen:
            seen.add(item)
            if item not in history and len(out) < k:
                out.append(item)
    return out


# --------------------------------------------------------------------------- reference engine app


@pytest.fixture(scope="module")
def settings(tiny_artifacts, synth_data_dir) -> Settings:
    return Settings(
        artifacts=tiny_artifacts,
        engine="reference",
        data_dir=synth_data_dir,
        calibration_requests=8,
        max_in_flight=8,
        max_batch_requests=4,
    )


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def catalog(tiny_artifacts) -> Catalog:
    return Catalog.load(tiny_artifacts)


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["engine"] == "reference" and ready["head"] == "padrec"
    assert ready["num_draft_tokens"] == 3 and ready["model"] == "Synth/tiny"
    assert ready["fallback"] == "most popular (popularity.json)"  # written by padrec build
    calib = ready["calibration"]
    assert calib["requests"] == 8 and calib["identical_rate"] == 1.0 and calib["speedup"] > 0
    assert calib["batch_rows"] == 1  # CPU: speculation is calibrated one row at a time


@pytest.mark.parametrize("k", [1, 4, 10, 50])
def test_recommend_returns_k_items(client, catalog, k):
    history = [3, 4, 5, 6]
    r = client.post("/recommend", json={"history": history, "k": k, "user_id": "u-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    check_answer(body, catalog, history, k)
    app_ms = float(r.headers["server-timing"].removeprefix("app;dur="))
    assert app_ms >= body["latency_ms"]["total"]
    assert body["user_id"] == "u-1" and body["k"] == k
    assert (
        body["engine"] == "reference" and body["head"] == "padrec" and body["num_draft_tokens"] == 3
    )
    assert body["spec"]["draft_tokens"] > 0 and body["spec"]["tau"] >= 1.0
    assert len(body["spec"]["acceptance_by_position"]) == 3
    assert not body["history"]["truncated"] and body["history"]["used"] == 4


def assert_model_items_are_greedy(client, catalog: Catalog, target_dir: Path,
                                  check_generation: bool = False) -> None:
    """The server's model items equal the target's plain greedy list, filtered (any engine);
    with ``check_generation``, the response's generated item count matches that list too."""
    from padrec_vllm.catalog.tokens import EOS_ID
    from padrec_vllm.decoding import generate
    from padrec_vllm.model.target import load_target

    target = load_target(Path(target_dir))
    budget = client.app.state.server.recommender.budget
    for history in ([1, 2, 3], [40, 41, 42, 43, 44], [90]):
        prompt = catalog.prompt_ids(history, 5)
        plain = generate(
            target, [prompt], max_new_tokens=budget(4, len(prompt)), eos_id=EOS_ID, batch_size=1
        )[0]
        body = client.post("/recommend", json={"history": history, "k": 4}).json()
        got = [it["item_id"] for it in body["items"] if it["source"] == "model"]
        assert got == model_items(catalog, plain.tokens, history, 4)
        if check_generation:
            assert body["generation"]["items"] == len(catalog.parse(plain.tokens).items)


def test_model_items_are_the_greedy_list(client, catalog, tiny_artifacts):
    """Speculation is lossless: the model items are the target's plain greedy list, filtered."""
    assert_model_items_are_greedy(client, catalog, Path(tiny_artifacts) / "target")


def test_exclude_history_false_allows_history_items(client, catalog):
    history = [10, 11, 12]
    body = client.post(
        "/recommend", json={"history": history, "k": 5, "exclude_history": False}
    ).json()
    check_answer(body, catalog, history, 5, exclude=False)
    assert body["generation"]["in_history"] == 0


@pytest.mark.parametrize("name,payload,status,needle", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_4xx_naming_the_field(client, name, payload, status, needle):
    r = client.post("/recommend", json=payload)
    assert r.status_code == status, r.text
    assert needle in r.json()["message"]


def test_unknown_items_ignored_on_request(client, catalog):
    r = client.post(
        "/recommend", json={"history": [1, 99999, 2, -4, 99999], "k": 3, "unknown_items": "ignore"}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["history"]["unknown_dropped"] == [99999, -4] and body["history"]["used"] == 2
    check_answer(body, catalog, [1, 2], 3)


@pytest.mark.parametrize(
    "payload", [{"history": []}, {"history": [0, 99999], "unknown_items": "ignore"}]
)
def test_empty_history_is_a_cold_start(client, catalog, payload):
    r = client.post("/recommend", json=payload | {"k": 7})
    assert r.status_code == 200
    body = r.json()
    check_answer(body, catalog, [], 7)
    assert body["history"]["cold_start"] and all(it["source"] == "popular" for it in body["items"])
    assert body["spec"]["target_forwards"] == 0 and "cold start" in body["notes"][-1]
    state = client.app.state.server
    assert [it["item_id"] for it in body["items"]] == state.recommender.popular[:7]


def test_long_history_keeps_the_newest(client, catalog):
    history = list(range(1, 31))
    body = client.post("/recommend", json={"history": history, "k": 5}).json()
    assert body["history"] == {
        "received": 30,
        "used": 5,
        "truncated": True,
        "unknown_dropped": [],
        "cold_start": False,
    }
    assert any("newest 5" in n for n in body["notes"])
    check_answer(body, catalog, history, 5)


def test_k_larger_than_the_catalog_outside_history(client, catalog):
    history = sorted(catalog.item_to_sid)[:60]  # 96 items: 36 remain
    body = client.post("/recommend", json={"history": history, "k": 50}).json()
    assert len(body["items"]) == 36 and not {it["item_id"] for it in body["items"]} & set(history)
    assert "cannot be met" in body["notes"][-1]


def test_malformed_json_is_400(client):
    r = client.post(
        "/recommend", content=b'{"history": [1,', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"


def test_body_over_1mib_is_413(client):
    big = b'{"history": [' + b"1," * (MIB // 2) + b"1]}"
    r = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    def chunks():  # no Content-Length: counted while reading
        for _ in range(5):
            yield b" " * (MIB // 4)

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_path_and_method(client):
    assert (
        client.get("/nope").status_code == 404
        and client.get("/nope").json()["error"] == "not_found"
    )
    assert client.get("/recommend").status_code == 405


def test_batch_answers_in_order(client, catalog):
    reqs = [
        {"history": [1, 2], "k": 3, "user_id": 1},
        {"history": [], "k": 2, "user_id": 2},
        {"history": [50, 51, 52], "k": 6, "user_id": "three"},
    ]
    r = client.post("/recommend/batch", json={"requests": reqs})
    assert r.status_code == 200
    out = r.json()["responses"]
    assert [o["user_id"] for o in out] == [1, 2, "three"]
    for req, o in zip(reqs, out):
        check_answer(o, catalog, req["history"], req["k"])


@pytest.mark.parametrize(
    "payload,needle",
    [
        ({"requests": []}, "body.requests"),
        ({"requests": [{"history": [1]}] * 5}, "at most 4"),
        ({"requests": [{"history": [1]}, {"history": [1], "k": 0}]}, "body.requests[1].k"),
        ({"requests": [{"history": [1]}, {"history": [99999]}]}, "requests[1].history"),
        ({"history": [1]}, "body.requests"),
    ],
)
def test_batch_bad_input(client, payload, needle):
    r = client.post("/recommend/batch", json=payload)
    assert r.status_code == 422 and needle in r.json()["message"], r.text


def test_metrics(client):
    client.post("/recommend", json={"history": [7, 8, 9], "k": 10})
    text = client.get("/metrics").text
    for series in [
        'padrec_request_duration_seconds_bucket{endpoint="/recommend",le="0.001",status="200"}',
        'padrec_request_duration_seconds_count{endpoint="/recommend",status="422"}',
        'padrec_request_duration_seconds_count{endpoint="/recommend",status="413"}',
        "padrec_generated_tokens_total",
        "padrec_draft_tokens_total",
        "padrec_accepted_tokens_total",
        'padrec_decoded_requests_total{mode="speculative"}',
        "padrec_target_forwards_total",
        "padrec_acceptance_length_bucket",
        'padrec_drafted_by_position_total{position="3"}',
        'padrec_accepted_by_position_total{position="1"}',
        'padrec_drafted_by_slot_total{slot="level0"}',
        'padrec_accepted_by_slot_total{slot="sep"}',
        "padrec_invalid_items_total",
        "padrec_duplicate_items_total",
        "padrec_filled_items_total",
        "padrec_history_items_generated_total",
        "padrec_invalid_item_rate",
        "padrec_tau",
        "padrec_in_flight_requests 0.0",
        'padrec_speedup{method="calibration"}',
        'padrec_speedup{method="live"}',
        "padrec_calibration_identical_output_ratio 1.0",
        'padrec_calibration_decode_seconds_per_token{mode="plain"}',
    ]:
        assert series in text, series
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    drafts, accepted = values["padrec_draft_tokens_total"], values["padrec_accepted_tokens_total"]
    assert 0 <= accepted <= drafts and drafts > 0
    forwards = values["padrec_target_forwards_total"]
    assert values["padrec_acceptance_length_count"] == forwards
    assert values["padrec_acceptance_length_sum"] == forwards + accepted
    assert (
        sum(v for n, v in values.items() if n.startswith("padrec_accepted_by_position_total"))
        == accepted
    )


# --------------------------------------------------------------------------- fake engines


class FakeEngine:
    """Answers every prompt with the same item list after ``delay_s``; ``gate`` delays start."""

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

    num_draft_tokens = 0
    max_model_len = 256

    async def start(self, warmup_prompts, max_new_tokens, calibrate=True):
        if self.gate is not None:
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        if self.fail_start:
            raise EngineError("weights are corrupt")

    async def generate(self, prompt, max_new_tokens):
        await asyncio.sleep(self.delay_s)
        if self.fail_generate:
            raise EngineError("engine core died")
        return Generation(
            tokens=self.tokens,
            queue_s=0.0,
            prefill_s=0.001,
            decode_s=0.002,
            target_forwards=len(self.tokens) - 1,
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


# --------------------------------------------------------------------------- settings and units


def test_settings_from_environment(monkeypatch, tiny_artifacts):
    monkeypatch.setenv("PADREC_ARTIFACTS", str(tiny_artifacts))
    monkeypatch.setenv("PADREC_ENGINE", "reference")
    monkeypatch.setenv("PADREC_SPECULATIVE", "false")
    monkeypatch.setenv("PADREC_MAX_IN_FLIGHT", "3")
    monkeypatch.setenv("PADREC_VLLM_ARGS", '{"max_num_batched_tokens": 512}')
    s = Settings()
    assert (s.artifacts, s.engine, s.speculative, s.max_in_flight) == (
        Path(tiny_artifacts),
        "reference",
        False,
        3,
    )
    assert s.vllm_args == {"max_num_batched_tokens": 512}
    assert Settings(port=9000).port == 9000  # arguments override the environment
    monkeypatch.setenv("PADREC_ENGINE", "tensorrt")
    with pytest.raises(Exception, match="engine"):
        Settings()


def test_check_rejects_unusable_setups(tmp_path, tiny_artifacts):
    with pytest.raises(UserError, match="not an artifacts directory"):
        check(Settings(artifacts=tmp_path))
    with pytest.raises(UserError, match="max_history"):
        check(Settings(artifacts=tiny_artifacts, max_history=500))
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art, ignore=shutil.ignore_patterns("padrec"))
    with pytest.raises(UserError, match="no padrec head"):
        check(Settings(artifacts=art))
    check(Settings(artifacts=art, head="eagle"))
    check(Settings(artifacts=art, speculative=False))


def test_serve_fails_fast_on_bad_settings(tmp_path, monkeypatch):
    from server.main import serve

    monkeypatch.delenv("PADREC_ARTIFACTS", raising=False)

    with pytest.raises(UserError, match="not an artifacts directory"):
        serve(tmp_path, port=0)
    with pytest.raises(UserError, match="PADREC_PORT"):
        serve(tmp_path, port=70000)
    with pytest.raises(UserError, match="PADREC_ARTIFACTS: Field required"):
        serve()


def test_generation_from_rounds_matches_the_reference_accounting():
    slots = [9] * 5 + [0] * 4 + [1] * 4  # ids 5..8 slot 0, 9..12 slot 1
    # prefill emits 5; round 1 accepts 2 of 3 (6, 9) then the target's 10; round 2 accepts 0 (-> 7)
    g = generation_from_rounds(
        [5, 6, 9, 10, 7], [2, 0], [3, 3], 3, slots, queue_s=0.0, prefill_s=0.1, decode_s=0.2
    )
    assert g.accept_by_pos == ((1, 2), (1, 2), (0, 2))
    assert g.acceptance_histogram == (1, 0, 1, 0)
    assert g.accept_by_slot == {0: (1, 2), 1: (1, 2)}  # judged: 6 ok, 9 ok, 10 no | 7 no
    assert (g.draft_tokens, g.accepted_tokens, g.target_forwards, g.tau) == (6, 2, 2, 2.0)


def test_bench_overhead_runs(tiny_artifacts):
    from server.bench_overhead import run

    res = run(tiny_artifacts, "null", requests=20, k=5, history=3, warmup=5)
    assert res["requests"] == 20 and 0 < res["rtt_p50_ms"] and res["engine_p50_ms"] >= 0
    assert res["overhead_p50_ms"] <= res["rtt_p50_ms"]


def test_int8_drafting_serves_the_greedy_lists(tiny_artifacts, catalog):
    """PADREC_DRAFT_INT8: the reference engine drafts with an int8 head; lists stay plain greedy."""
    from server.engines import build_engine

    prompts = [catalog.prompt_ids(h, 5) for h in ([1, 2, 3], [4, 5], [6, 7, 8, 9])]

    async def lists(**kw):
        engine = build_engine(Settings(artifacts=tiny_artifacts, engine="reference", **kw))
        await engine.start(prompts, 20, calibrate=False)
        try:
            return [(await engine.generate(p, 20)).tokens for p in prompts]
        finally:
            await engine.close()

    assert asyncio.run(lists(draft_int8=True)) == asyncio.run(lists(speculative=False))
    for bad in ({"engine": "vllm"}, {"device": "cuda"}, {"dtype": "bfloat16"}):
        with pytest.raises(Exception, match="draft_int8 needs engine=reference"):
            Settings(artifacts=tiny_artifacts, **{"engine": "reference", **bad}, draft_int8=True)


def test_batches_over_spec_max_batch_decode_plainly(tiny_artifacts, catalog):
    """PADREC_SPEC_MAX_BATCH: a reference batch of more rows decodes without the head.

    Default on CPU is 1: four requests arriving together are decoded as one plain batch; alone,
    each is speculated. The lists are plain greedy decoding in every case.
    """
    from server.engines import build_engine

    prompts = [catalog.prompt_ids(h, 5) for h in ([1, 2, 3], [4, 5], [6, 7, 8, 9], [2, 9])]

    async def run(**kw):
        engine = build_engine(Settings(artifacts=tiny_artifacts, engine="reference", **kw))
        calib = await engine.start(prompts, 20, calibrate=True)
        try:
            together = await asyncio.gather(*(engine.generate(p, 20) for p in prompts))
            alone = [await engine.generate(p, 20) for p in prompts]
        finally:
            await engine.close()
        return calib, together, alone

    calib, together, alone = asyncio.run(run())
    plain = [g.tokens for g in asyncio.run(run(speculative=False))[1]]
    assert calib.batch_rows == 1 and calib.identical_rate == 1.0
    assert [g.tokens for g in together] == [g.tokens for g in alone] == plain
    assert not any(g.speculative or g.draft_tokens for g in together)
    assert all(g.target_forwards == g.decode_tokens for g in together)  # one token per forward
    assert all(g.speculative and g.draft_tokens > 0 for g in alone)

    calib, together, _ = asyncio.run(run(spec_max_batch=4))
    assert calib.batch_rows == 4 and calib.identical_rate == 1.0
    assert [g.tokens for g in together] == plain
    assert all(g.speculative and g.draft_tokens > 0 for g in together)

    with pytest.raises(Exception, match="spec_max_batch needs engine=reference"):
        Settings(artifacts=tiny_artifacts, engine="vllm", spec_max_batch=2)
    with pytest.raises(Exception, match="spec_max_batch"):
        Settings(artifacts=tiny_artifacts, engine="reference", spec_max_batch=0)
