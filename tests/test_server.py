"""The HTTP server on the tiny build with the reference engine: answers, bad input, metrics.

Fake engines for the states a real one reaches only by accident (slow, failing, not ready):
test_server_states.py; settings, the start-up check and ``padrec serve``: test_server_cli.py;
vLLM: test_server_vllm.py. The helpers here are shared with those files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from padrec_vllm.catalog.catalog import Catalog
from server import create_app

MIB = 1 << 20

# (name, body, status, text the message must contain): every bad input the API documents
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
    (
        "exclude_history_string_bool",
        {"history": [1], "exclude_history": "false"},
        422,
        "body.exclude_history",
    ),
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
    if body["history"]["cold_start"]:  # no model call: no figures
        assert spec == {"speculative": False, "draft_tokens": 0, "accepted_tokens": 0, "tau": 0.0,
                        "target_forwards": 0, "acceptance_by_position": []}
        assert lat["engine"] == lat["prefill"] == lat["decode"] == lat["queue"] == 0
        return
    # every decode forward emits at least one token; the budget is several items long
    assert spec["target_forwards"] >= 1 and spec["tau"] >= 1.0
    assert 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
    positions = spec["acceptance_by_position"]
    assert len(positions) == (body["num_draft_tokens"] if spec["speculative"] else 0)
    assert all(0.0 <= rate <= 1.0 for rate in positions)
    assert positions == sorted(positions, reverse=True), "position j needs 1..j-1 accepted"
    if spec["speculative"]:  # a round proposes at most K drafts
        assert 0 < spec["draft_tokens"] <= spec["target_forwards"] * len(positions)
    else:
        assert spec["draft_tokens"] == 0


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
        'padrec_drafted_by_slot_total{slot="L0"}',
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
    assert 0 < accepted <= drafts
    forwards = values["padrec_target_forwards_total"]
    assert values["padrec_acceptance_length_count"] == forwards
    assert values["padrec_acceptance_length_sum"] == forwards + accepted

    def total(prefix: str) -> float:
        return sum(v for n, v in values.items() if n.startswith(prefix + "{"))

    assert total("padrec_accepted_by_position_total") == accepted
    assert total("padrec_drafted_by_position_total") == drafts
    # slots count the judged drafts (up to the first rejection of a round): every accepted one
    assert total("padrec_accepted_by_slot_total") == accepted
    assert accepted < total("padrec_drafted_by_slot_total") <= drafts
    slots = {n.split('slot="')[1].split('"')[0] for n in values
             if n.startswith("padrec_drafted_by_slot")}
    layout = client.app.state.server.recommender.catalog.layout
    assert slots <= set(layout.slot_labels().values()) and {"L0", "sep"} <= slots
