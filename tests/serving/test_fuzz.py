"""Requests generated from the server's own OpenAPI schema (schemathesis: valid and invalid bodies
for every operation) never get a 5xx: bad input is a 4xx in OpenAI's error shape."""

import pytest
from hypothesis import HealthCheck, given, settings

from lmstack.generation.scheduler import Scheduler
from lmstack.serving.app import create_app, serve_in_thread

from .conftest import make_card, tiny_gpt

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis (the test extra)")


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model, tok = tiny_gpt()
    model.save(root / "tiny", tok)
    make_card(root / "tiny", model, root / "cards" / "pirate", "pirate", "You are a pirate.")
    app = create_app(model, tok, Scheduler(model, tok, max_batch=8), name="tiny", cards_dir=root / "cards")
    with serve_in_thread(app) as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json")


def test_no_server_errors(api_schema):
    # schemathesis' own pytest plugin does not run under this pytest; its strategies do, through hypothesis.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(timeout=60)
            assert response.status_code < 500, (
                f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code}: {response.text[:300]}"
            )
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
