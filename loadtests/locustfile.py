"""Locust load test of the padrec server: ``POST /recommend`` with real users' histories.

Each simulated user sends one request after another with no think time (a closed loop), so the
number of users is the concurrency. Histories are the test-split histories (leave-one-out:
every item but the last) of the dataset the artifacts were built from, drawn at random.

    locust -f loadtests/locustfile.py --headless -u 4 -r 4 -t 30s --host http://127.0.0.1:8000 \
        --dataset Beauty --data-dir ../shared/data

``loadtests/run.py`` wraps this for a report and for the speculation on/off sweep. An answer counts
as a failure unless it is a 200 holding exactly k distinct items, none from the history.
It talks to the server over HTTP only; the dataset files are read with the library's loader.
"""

from __future__ import annotations

import itertools
import random

from locust import HttpUser, constant, events, task

from padrec_vllm.data.s3rec import leave_one_out, load_dataset

HISTORIES: list[list[int]] = []
_USER_NUMBERS = itertools.count()


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--dataset", default="Beauty", help="dataset whose test split is sampled")
    parser.add_argument("--data-dir", default=None,
                        help="datasets folder (default: $PADREC_DATA_DIR or ../shared/data)")
    parser.add_argument("--k", type=int, default=10, help="items per recommendation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the history draws")


@events.init.add_listener
def _load_histories(environment, **_kwargs) -> None:
    opts = environment.parsed_options
    if opts is None:  # imported by a tool, not run by locust
        return
    split = leave_one_out(load_dataset(opts.dataset, opts.data_dir).sequences)
    HISTORIES[:] = [history for history, _target in split.test.values()]
    if not HISTORIES:
        raise SystemExit(f"no test users in dataset {opts.dataset}")


class RecommendUser(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.k = opts.k
        self.rng = random.Random(opts.seed * 100_003 + next(_USER_NUMBERS))

    @task
    def recommend(self) -> None:
        history = self.rng.choice(HISTORIES)
        with self.client.post("/recommend", json={"history": history, "k": self.k},
                              name="/recommend", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            problem = check_answer(response.json(), history, self.k)
            if problem:
                response.failure(problem)


def check_answer(body: dict, history: list[int], k: int) -> str | None:
    """Why a 200 answer is wrong, or None: exactly k distinct items, none from the history."""
    ids = [item["item_id"] for item in body.get("items", [])]
    if len(ids) != k:
        return f"{len(ids)} items, expected {k}"
    if len(set(ids)) != k:
        return "repeated items"
    if set(ids) & set(history):
        return "history items recommended"
    return None
