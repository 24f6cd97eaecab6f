"""The HTTP server on the tiny build with the reference engine: answers, bad input, metrics;
under the catalog constraint (the default) and without it (``PADREC_CONSTRAINED=false``).

Fake engines for the states a real one reaches only by accident (slow, failing, not ready):
test_server_states.py; settings, the start-up check and ``padrec serve``: test_server_cli.py;
vLLM: test_server_vllm.py. The helpers here are shared with those files."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.constraint import CatalogTrie, ListSpec
from padrec_vllm.engines import RequestResult
from server import Settings, create_app
from server.schemas import RecommendRequest

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
        assert spec == {"speculative": False, "num_draft_tokens": 0, "draft_tokens": 0,
                        "accepted_tokens": 0, "tau": 0.0, "target_forwards": 0,
                        "acceptance_by_position": []}
        assert lat["engine"] == lat["prefill"] == lat["decode"] == lat["queue"] == 0
        return
    # every decode forward emits at least one token; the budget is several items long
    assert spec["target_forwards"] >= 1 and spec["tau"] >= 1.0
    assert 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
    positions = spec["acceptance_by_position"]
    assert len(positions) == (body["num_draft_tokens"] if spec["speculative"] else 0)
    assert all(0.0 <= rate <= 1.0 for rate in positions)
    if not body["generation"]["constrained"]:
        # every round proposes K drafts, so position j's rate is over the same rounds as j - 1's
        # and cannot exceed it; under the constraint vLLM cuts a round's drafts at the first
        # illegal one, so later positions are proposed in fewer rounds and their rate may be higher
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
    calib = ready["calibration"]  # the schedule 1:3,2-:0 against K = 0 at batch sizes 1, 2, 4
    assert not calib["chosen"] and calib["identical_rate"] == 1.0 and calib["speedup"] > 0
    assert [b["batch_size"] for b in calib["by_batch_size"]] == [1, 2, 4]
    assert [sorted(b["requests_per_s"]) for b in calib["by_batch_size"]] == [["0", "3"], ["0"],
                                                                            ["0"]]
    assert calib["schedule"] == ready["spec_schedule"]["schedule"] == "1:3,2-:0"
    assert ready["spec_schedule"]["source"] == "setting"


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
    """The server's model items equal the target's plain greedy list (any engine): under the
    constraint plain constrained greedy's list for the request's ``ListSpec`` (``decoding.generate``
    with ``constraints``), all k of them from the model; without it the free greedy list,
    filtered. With ``check_generation``, the response's generated item count matches too."""
    from padrec_vllm.catalog.tokens import EOS_ID
    from padrec_vllm.decoding import generate
    from padrec_vllm.model.target import load_target

    target = load_target(Path(target_dir))
    rec = client.app.state.server.recommender
    trie = CatalogTrie.from_catalog(catalog)
    for history, exclude in (([1, 2, 3], True), ([40, 41, 42, 43, 44], True), ([90], False)):
        prompt = catalog.prompt_ids(history, rec.max_history)
        spec = rec.list_spec(4, history, exclude)
        ref = generate(
            target,
            [prompt],
            max_new_tokens=rec.budget(4, len(prompt)),
            eos_id=EOS_ID,
            batch_size=1,
            constraints=None if spec is None else [spec.start(trie)],
        )[0]
        body = client.post(
            "/recommend", json={"history": history, "k": 4, "exclude_history": exclude}
        ).json()
        got = [it["item_id"] for it in body["items"] if it["source"] == "model"]
        if spec is None:
            assert got == model_items(catalog, ref.tokens, history if exclude else [], 4)
        else:
            assert spec == ListSpec(4, tuple(history) if exclude else ())
            assert got == list(catalog.parse(ref.tokens).items) and len(got) == 4
        assert body["generation"]["constrained"] == (spec is not None)
        if check_generation:
            assert body["generation"]["items"] == len(catalog.parse(ref.tokens).items)


def test_model_items_are_the_greedy_list(client, catalog, tiny_artifacts):
    """Speculation is lossless under the constraint: the model items are plain constrained
    greedy's list of the same prompt and ``ListSpec``."""
    assert client.app.state.server.recommender.constrained
    assert_model_items_are_greedy(client, catalog, Path(tiny_artifacts) / "target")


# (history, k, exclude_history): requests whose catalog has at least k legal items
CONSTRAINED_CASES = [
    ([3, 4, 5, 6], 4, True),
    ([10, 11, 12], 10, True),
    ([7], 1, True),
    (list(range(1, 31)), 8, True),  # the prompt holds the newest 5, all 30 are excluded
    ([20, 21, 22], 10, False),
]


@pytest.mark.parametrize("history,k,exclude", CONSTRAINED_CASES)
def test_constrained_answers_are_all_the_models(client, catalog, history, k, exclude):
    """Under the constraint the model gives all k items: valid, distinct, none excluded, nothing
    dropped or filled."""
    r = client.post("/recommend", json={"history": history, "k": k, "exclude_history": exclude})
    assert r.status_code == 200, r.text
    body = r.json()
    check_answer(body, catalog, history, k, exclude)
    assert all(it["source"] == "model" for it in body["items"])
    gen = body["generation"]
    assert gen["constrained"] and gen["finished"] and gen["items"] == k
    assert gen["invalid"] == gen["duplicate"] == gen["in_history"] == gen["filled"] == 0
    assert gen["forced"] >= 0 and not any("filled" in n for n in body["notes"])


def test_constrained_plan(client):
    """The plan carries ListSpec(k, every known history item when exclude_history) and a budget
    of exactly k items and <eos> (cut by the model's length); a cold start has no constraint."""
    rec = client.app.state.server.recommender
    per_item = rec.catalog.layout.tokens_per_item
    plan = rec.plan(RecommendRequest(history=list(range(1, 31)) + [3], k=5))
    assert plan.constraint == ListSpec(5, tuple(range(1, 31))) and len(plan.used) == 5
    assert plan.max_new_tokens == 5 * per_item + 1
    plan = rec.plan(RecommendRequest(history=[4, 5], k=3, exclude_history=False))
    assert plan.constraint == ListSpec(3, ()) and plan.max_new_tokens == 3 * per_item + 1
    plan = rec.plan(RecommendRequest(history=[4, 5], k=50))
    assert plan.max_new_tokens == rec.max_model_len - len(plan.prompt) < 50 * per_item + 1
    assert rec.plan(RecommendRequest(history=[])).constraint is None


def test_constrained_list_cut_by_the_model_length_is_filled(client, catalog):
    """k=50 does not fit the tiny model's 256 positions: the model gives what fits (a trailing
    partial item is no invalid code), the most-popular list the rest, and the notes say why."""
    history = [3, 4, 5]
    body = client.post("/recommend", json={"history": history, "k": 50}).json()
    check_answer(body, catalog, history, 50)
    gen = body["generation"]
    assert gen["constrained"] and not gen["finished"]
    assert gen["invalid"] == gen["duplicate"] == gen["in_history"] == 0
    plan = client.app.state.server.recommender.plan(RecommendRequest(history=history, k=50))
    fit = plan.max_new_tokens // catalog.layout.tokens_per_item
    assert fit <= gen["items"] <= fit + 1 and gen["filled"] == 50 - gen["items"] > 0
    assert any("maximum length" in n and "filled" in n for n in body["notes"]), body["notes"]


def test_partial_item_is_not_invalid_under_the_constraint(client, catalog):
    """Unit: a constrained list cut inside an item keeps its complete items and counts nothing
    invalid; without the constraint the same cut is an invalid code, as before."""
    rec = client.app.state.server.recommender
    plan = rec.plan(RecommendRequest(history=[1, 2], k=3))
    tokens = catalog.completion_ids([5, 6], finished=False) + catalog.item_token_ids(7)[:2]
    gen = RequestResult(tokens=tokens, target_forwards=len(tokens) - 1)
    ans = rec.answer(plan, gen)
    assert ans.invalid == 0 and ans.generated_items == 2 and ans.generation.filled == 1
    free = rec.answer(replace(plan, constraint=None), gen)
    assert free.invalid == 1 and free.generated_items == 3


def test_every_item_excluded_gives_an_empty_answer(client, catalog):
    """No legal item at all: the engine ends the list at once and the fill finds nothing."""
    history = sorted(catalog.item_to_sid)
    body = client.post("/recommend", json={"history": history, "k": 3}).json()
    assert body["items"] == [] and body["generation"]["items"] == 0
    assert body["generation"]["finished"] and body["generation"]["constrained"]
    assert "cannot be met" in body["notes"][-1]


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
    # under the constraint the model lists every legal item, then ends: nothing to fill
    assert all(it["source"] == "model" for it in body["items"])
    assert body["generation"]["finished"] and body["generation"]["filled"] == 0
    assert any("no legal catalog item" in n for n in body["notes"]), body["notes"]


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
        'padrec_accepted_by_slot_total{slot="L0"}',
        "padrec_invalid_items_total",
        "padrec_duplicate_items_total",
        "padrec_filled_items_total",
        "padrec_history_items_generated_total",
        "padrec_invalid_item_rate",
        "padrec_forced_tokens_total",
        "padrec_constrained 1.0",
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
    assert slots <= set(layout.slot_labels().values()) and "L0" in slots
    assert not slots & {"sep", "special"}  # always forced under the constraint: never drafted
    # the catalog constraint: nothing invalid, repeated or from the history was ever generated,
    # and the speculative chains appended forced tokens (every <sep>, <eos>) unverified
    assert values["padrec_constrained"] == 1.0
    assert values["padrec_recommendations_total"] > 10
    assert values["padrec_generated_items_total"] > 0
    for series in ("invalid_items", "duplicate_items", "history_items_generated"):
        assert values[f"padrec_{series}_total"] == 0, series
    assert values["padrec_invalid_item_rate"] == 0
    assert values["padrec_forced_tokens_total"] > 0
    assert client.get("/readyz").json()["constrained"] is True


# --------------------------------------------------------------------------- without the constraint


@pytest.fixture(scope="module")
def free_client(settings):
    """The app with ``PADREC_CONSTRAINED=false`` from the environment: free decoding."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PADREC_CONSTRAINED", "false")
        free = Settings(**settings.model_dump(exclude={"constrained", "calibration_requests"}),
                        calibration_requests=2)
    assert not free.constrained
    with TestClient(create_app(free)) as c:
        wait_ready(c)
        yield c


def test_unconstrained_is_free_decoding_repaired(free_client, catalog, tiny_artifacts):
    """PADREC_CONSTRAINED=false: today's behaviour, the free greedy list (k + extra items),
    filtered and filled; no constraint reaches the engine."""
    assert free_client.get("/readyz").json()["constrained"] is False
    rec = free_client.app.state.server.recommender
    plan = rec.plan(RecommendRequest(history=[1, 2], k=4))
    assert plan.constraint is None
    assert plan.max_new_tokens == (4 + 5) * catalog.layout.tokens_per_item + 1
    assert_model_items_are_greedy(
        free_client, catalog, Path(tiny_artifacts) / "target", check_generation=True
    )
    history = [3, 4, 5, 6]
    body = free_client.post("/recommend", json={"history": history, "k": 10}).json()
    check_answer(body, catalog, history, 10)
    gen = body["generation"]
    assert gen["constrained"] is False and gen["forced"] == 0
    text = free_client.get("/metrics").text
    assert "padrec_constrained 0.0" in text and "padrec_forced_tokens_total 0.0" in text
