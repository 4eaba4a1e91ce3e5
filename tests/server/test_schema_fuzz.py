"""Schema fuzzing (issue 18): every route of the live server's /openapi.json, with schemathesis generating
requests that follow each route's schema (positive) and requests that break it (negative). No answer may be a
5xx, every error is JSON in the server's error shape, and the server stays healthy. Bounded: a fixed number of
examples a route and mode, derandomized (the same cases every run)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .conftest import Server

EXAMPLES = 100  # per route and mode


@pytest.fixture(scope="module")
def fuzzed_server(m0_dir):
    s = Server(m0_dir, "--max-documents", "16", "--max-request-bytes", "200000", "--request-timeout", "20")
    yield s
    assert s.stop() == 0


def operations(server: Server) -> list:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_the_schema_names_every_api_route(fuzzed_server):
    labels = {op.label for op in operations(fuzzed_server)}
    assert {"POST /v1/rerank", "POST /rerank", "POST /v2/rerank", "GET /health", "GET /v1/models"} <= labels, labels


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_every_route_from_openapi_never_gets_a_5xx(fuzzed_server, mode):
    seen: dict[str, int] = {}
    for op in operations(fuzzed_server):

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                  database=None)  # fmt: skip
        @given(op.as_strategy(generation_mode=mode))
        def check(case):
            response = case.call(base_url=fuzzed_server.url, timeout=30)
            seen[op.label] = seen.get(op.label, 0) + 1
            assert response.status_code < 500, (op.label, case.body, response.status_code, response.text[:500])
            if response.status_code >= 400:
                body = response.json()
                assert {"error", "detail"} <= set(body) and body["error"]["message"], body

        try:
            check()
        except Unsatisfiable:  # nothing of a route without parameters or body can break its schema
            assert mode is GenerationMode.NEGATIVE and op.method.upper() == "GET", op.label
    assert len(seen) >= (5 if mode is GenerationMode.POSITIVE else 3), seen
    assert fuzzed_server.get("/health")[0] == 200
