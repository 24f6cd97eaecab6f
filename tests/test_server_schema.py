"""Schemathesis against the server's OpenAPI schema (reference engine, tiny build): for the
bodies the schema allows and for the invalid ones schemathesis derives from it, every answer
conforms to the schema and none is a 5xx.

All of schemathesis' checks run except ``positive_data_acceptance``: a schema-valid history may
hold ids that are not in the catalog, and those get a documented 422 the schema cannot express.
"""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.python.asgi import get_client
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server import Settings, create_app


@pytest.fixture(scope="module")
def api_schema(tiny_artifacts, synth_data_dir):
    app = create_app(
        Settings(
            artifacts=tiny_artifacts,
            engine="reference",
            data_dir=synth_data_dir,
            calibration_requests=0,
            max_in_flight=1000,
        )
    )
    client = get_client(app).__enter__()  # starts the lifespan once, for every call below
    deadline = time.monotonic() + 300
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.1)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_schema, mode):
    @given(case=api_schema.as_strategy(generation_mode=mode))
    @settings(
        max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def run(case):
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)

    run()
