"""The server against its own OpenAPI document, fuzzed by schemathesis: every route, bodies that fit the schema and
bodies that break it, against a real `lmforge serve` process. No 5xx, every refusal in OpenAI's error shape, every
response as the document declares it (status, content type, body schema), invalid bodies refused."""

import sys
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import TEXT, ServerProcess, save_run  # noqa: E402

EXAMPLES = {GenerationMode.POSITIVE: 250, GenerationMode.NEGATIVE: 100}  # per route (the whole test: ~30 s)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A run with a byte-level BPE, so that any text the fuzzer writes can be a prompt."""
    from lmforge import ModelConfig
    from lmforge.tokenizer import BPETokenizer
    tok = BPETokenizer.train(TEXT * 4, 300)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, position="rope", block_size=64)
    path = save_run(tmp_path_factory.mktemp("fuzz") / "bpe", tok, cfg)
    server = ServerProcess(path, "--max-tokens-limit", "8", "--model-name", "m")
    yield server
    server.stop()


def _served_model(case, use: bool):
    """Three bodies in four name the served model and leave out what the server refuses outright (penalties other than
    repetition_penalty, logit_bias, suffix, best_of; over 8 tokens), so generation runs on the fuzzer's prompts,
    settings and stop strings too (a random name is a 404)."""
    if use and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "m"
        for key in ("presence_penalty", "frequency_penalty", "logit_bias", "suffix", "best_of"):
            case.body.pop(key, None)
        for key in ("max_tokens", "max_completion_tokens", "n"):
            if isinstance(case.body.get(key), int) and not isinstance(case.body[key], bool):
                case.body[key] = max(0, min(case.body[key], 2 if key == "n" else 8))
    if use and case.path_parameters and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = "m"
    return case


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda m: m.value)
def test_every_route_keeps_to_its_openapi_document(served, mode):
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(o.method, o.path) for o in operations} >= {("post", "/v1/completions"), ("post", "/v1/chat/completions"),
                                                       ("post", "/tokenize"), ("get", "/v1/models/{model_id}")}
    statuses: dict[str, set] = {}
    for operation in operations:
        @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(st.tuples(operation.as_strategy(generation_mode=mode), st.integers(0, 3).map(bool)))
        def check(drawn):
            case, use = drawn
            if mode is GenerationMode.POSITIVE:  # (a negative case keeps what makes it invalid)
                case = _served_model(case, use)
            # the server checks more than a schema can say (a prompt or messages, ids inside the vocabulary,
            # text the tokenizer can encode): a schema-valid body may still be a 400, so that check is left out
            response = case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])
            statuses.setdefault(f"{operation.method} {operation.path}", set()).add(response.status_code)
            assert response.status_code < 500
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["message"], str) and error["type"] and "param" in error and "code" in error
        try:
            check()
        except Unsatisfiable:  # negative mode, a route with nothing to break (no body; any string is a path)
            assert mode is GenerationMode.NEGATIVE and operation.method == "get", operation.path
    generated = statuses.get("post /v1/completions", set())
    assert (200 in generated) if mode is GenerationMode.POSITIVE else generated <= {400, 404}, str(statuses)
    assert served.metric("lmforge_requests_running") == 0
