"""Structured output: generations held to a JSON schema, any JSON object, a regular expression, a grammar or a choice
of strings, through llguidance. Sampled outputs (temperature 1) under a schema all parse and validate with
jsonschema; constrained and free requests decode in one batch, each as it would alone; greedy constrained decoding
equals a step-by-step reference that masks the full forward's logits; bad constraints are one-line errors; and the
server takes OpenAI's response_format and vLLM's guided_* fields from the real openai client."""

import json
import re
import sys
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

from lmforge import GPT, ModelConfig, UserError
from lmforge.engine import Engine
from lmforge.request import Request
from lmforge.structured import MAX_SPEC_CHARS, Constraint
from lmforge.tokenizer import CharTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import KEY, ServerProcess, save_run  # noqa: E402

TEXT = 'abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 {}[]":,.-_\n'
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(TEXT)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)  # five rows past the tokenizer's, as a padded vocabulary has: never allowed
    return GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size + 5, block_size=256, position="rope")).eval()


@pytest.fixture(scope="module")
def free(tok):
    """A model of the tokenizer's vocabulary exactly, for batches with unconstrained requests."""
    torch.manual_seed(0)
    return GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=256, position="rope")).eval()


def run_all(engine: Engine, requests: list[Request]) -> list[tuple[list[int], str]]:
    ids = [engine.add(r) for r in requests]
    tokens, reasons = {i: [] for i in ids}, {}
    while engine.has_work():
        for event in engine.step():
            if event.token is not None:
                tokens[event.request_id].append(event.token)
            if event.finished:
                reasons[event.request_id] = event.finish_reason
    return [(tokens[i], reasons[i]) for i in ids]


def text_of(tok, tokens: list[int]) -> str:
    return tok.decode([t for t in tokens if t != tok.eot_id])


def test_sampled_outputs_under_a_schema_all_validate(tok, model):
    engine = Engine(model, tok, max_batch=8)
    requests = [Request(tok.encode("x"), 120, temperature=1.0, seed=i, constraint=Constraint.json_schema(SCHEMA))
                for i in range(24)]
    outputs = run_all(engine, requests)
    texts = set()
    for tokens, reason in outputs:
        assert reason == "stop" and max(tokens) < tok.vocab_size
        value = json.loads(text_of(tok, tokens))
        jsonschema.validate(value, SCHEMA)
        texts.add(json.dumps(value))
    assert len(texts) > 20  # sampled, not one answer: the mask narrows the choice, the model still makes it


def test_each_kind_holds_its_shape(tok, model):
    engine = Engine(model, tok, max_batch=4)
    kinds = [(Constraint.json_schema({"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"],
                                      "additionalProperties": False}), lambda s: json.loads(s)["k"] in (1, 2)),
             (Constraint.regex(r"[0-9]{3}-[a-c]+"), lambda s: re.fullmatch(r"[0-9]{3}-[a-c]+", s)),
             (Constraint.choice(["yes", "no", "maybe"]), lambda s: s in ("yes", "no", "maybe")),
             (Constraint.grammar('root ::= "(" [a-z]+ ")" | "[" [0-9] "]"'),  # GBNF, as llama.cpp takes it
              lambda s: re.fullmatch(r"\([a-z]+\)|\[[0-9]\]", s))]
    for seed in range(4):
        outputs = run_all(engine, [Request(tok.encode("x"), 60, temperature=1.0, seed=seed, constraint=c)
                                   for c, _ in kinds])
        for (tokens, reason), (_, holds) in zip(outputs, kinds):
            assert reason == "stop" and holds(text_of(tok, tokens)), text_of(tok, tokens)
        # any JSON object: a random model may write one longer than max_tokens, but it is one from its first token
        (tokens, reason), = run_all(engine, [Request(tok.encode("x"), 200, temperature=1.0, seed=seed,
                                                     constraint=Constraint.json_object())])
        text = text_of(tok, tokens)
        assert text.startswith("{") and (reason == "length" or isinstance(json.loads(text), dict)), text


def test_constrained_and_free_requests_decode_together_each_as_alone(tok, free):
    """A batch mixing schemas, a regex and unconstrained requests: every seeded request gives the tokens it gives
    alone, so the masks stay on their own rows."""
    requests = [Request(tok.encode("ab"), 40, temperature=1.0, seed=i,
                        constraint=[Constraint.json_schema(SCHEMA), None, Constraint.regex("[a-z]{5,9}"), None][i % 4])
                for i in range(8)]
    together = run_all(Engine(free, tok, max_batch=8), requests)
    for request, outcome in zip(requests, together):
        assert run_all(Engine(free, tok, max_batch=1), [request]) == [outcome]


def test_greedy_constrained_decoding_equals_masking_the_full_forward(tok, free):
    """The reference: the whole sequence through the model without a cache at every step, its last logits masked
    by llguidance's own torch helpers, the best allowed token taken."""
    from llguidance.torch import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask
    model = free
    engine = Engine(model, tok, max_batch=2)
    constraint = Constraint.json_schema(SCHEMA)
    (tokens, _), _ = run_all(engine, [Request(tok.encode("ab"), 60, temperature=0.0, constraint=constraint),
                                      Request(tok.encode("c"), 30, temperature=0.0)])
    matcher = engine.grammars.matcher(constraint)
    ids, expected = tok.encode("ab"), []
    mask = allocate_token_bitmask(1, model.config.vocab_size)
    with torch.no_grad():
        while len(expected) < 60:
            logits = model(torch.tensor([ids]))[0][:, -1].clone()
            fill_next_token_bitmask(matcher, mask)
            apply_token_bitmask_inplace(logits, mask)
            token = int(logits.argmax())
            expected.append(token)
            if token == tok.eot_id:
                break
            assert matcher.consume_token(token)
            ids.append(token)
            if matcher.is_stopped():
                break
    assert tokens == expected


def test_a_grammar_past_the_parsers_limits_ends_its_own_request_only(tok, model):
    """An ambiguous grammar outgrows llguidance's parser (its rows hold at most 2,000 items) some hundreds of tokens
    in: that request ends with finish_reason 'constraint', its neighbour decodes on. And a grammar that names token
    ids directly gets none past the tokenizer's vocabulary."""
    flat = GPT(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, block_size=256, position="rope",
                                  tie_embeddings=False)).eval()
    with torch.no_grad():  # every logit 0: greedy takes the lowest allowed id, "a" before "b" and end-of-text
        flat.lm_head.weight.zero_()
    engine = Engine(flat, tok, max_batch=2, max_seq_len=1024)
    ambiguous = Constraint.grammar('start: e "b"\ne: e e | e e e | "a"')
    (held, reason), (tokens, free_reason) = run_all(engine, [
        Request(tok.encode("x"), 1000, temperature=0.0, constraint=ambiguous),
        Request(tok.encode("x"), 200, temperature=1.0, seed=1, stop_at_eos=False)])
    assert reason == "constraint" and 100 < len(held) < 1000 and set(text_of(tok, held)) == {"a"}
    assert free_reason == "length" and len(tokens) == 200
    ids = Constraint.grammar(f"start: <[{tok.vocab_size - 3}-{tok.vocab_size + 4}]>+")
    tokens, _ = run_all(Engine(model, tok, max_batch=1), [Request(tok.encode("x"), 50, temperature=1.0, seed=2,
                                                                     constraint=ids)])[0]
    assert tokens and max(tokens) < tok.vocab_size


def test_what_is_not_a_constraint_is_a_one_line_error(tok, model):
    with pytest.raises(UserError, match="list of strings"):
        Constraint.choice("yes")
    with pytest.raises(UserError, match="structured.Constraint"):
        Engine(model, tok).add(Request(tok.encode("x"), 5, constraint={"type": "object"}))


@pytest.mark.parametrize("constraint, message", [
    (Constraint.regex("a(b"), "regex cannot be compiled"),
    (Constraint.json_schema('{"type": "object", '), "not valid JSON"),
    (Constraint.json_schema({"type": "frobnicate"}), "json schema cannot be compiled"),
    (Constraint.json_schema({"type": "string", "pattern": "x" * MAX_SPEC_CHARS}), "characters, more than"),
    (Constraint.grammar("root ::= ("), "grammar"),
    (Constraint.choice([]), "non-empty list"),
    (Constraint.regex("é+"), "cannot begin with any token"),  # a character this vocabulary lacks
    (Constraint("yaml"), "one of the kinds"),
    (Constraint.regex("a\ud800"), "lone surrogate"),
    (Constraint.json_schema("[" * 3000 + "]" * 3000), "json_schema"),
])
def test_bad_constraints_are_one_line_errors(tok, model, constraint, message):
    engine = Engine(model, tok, max_batch=1)
    with pytest.raises(UserError, match=message) as e:
        engine.add(Request(tok.encode("x"), 10, constraint=constraint))
    assert "\n" not in str(e.value)
    assert not engine.has_work()


# ------------------------------------------------------------------------------------------------ the server

@pytest.fixture(scope="module")
def json_run(tmp_path_factory, tok):
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, position="rope", block_size=256)
    return save_run(tmp_path_factory.mktemp("structured") / "json-run", tok, cfg, seed=1)


def test_generate_keeps_to_a_constraint_in_python_and_on_the_command_line(json_run, tmp_path, capsys):
    from lmforge import generate, load
    from lmforge.cli import main
    model, tokenizer = load(json_run)
    texts = generate(model, tokenizer, ["x", "y"], max_new_tokens=30, seed=3, constraint=Constraint.regex("[a-z]{4}"))
    assert all(re.fullmatch("[a-z]{4}", t) for t in texts)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    assert main(["generate", str(json_run), "--prompt", "P:", "--json-schema", str(tmp_path / "schema.json"),
                 "--max-new-tokens", "120", "--seed", "1", "--num-samples", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("P:")]
    assert len(lines) == 2
    for line in lines:
        jsonschema.validate(json.loads(line[2:]), SCHEMA)


@pytest.fixture(scope="module")
def server(json_run):
    server = ServerProcess(json_run, "--api-key", KEY, "--max-batch", "4")
    yield server
    server.stop()


def test_the_openai_client_gets_json_that_follows_its_schema(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    chat = client.chat.completions.create(model="json-run", messages=[{"role": "user", "content": "a person"}],
                                          response_format=fmt, max_tokens=120, temperature=1.0, n=3, seed=5)
    for choice in chat.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert choice.finish_reason == "stop"
    stream = client.completions.create(model="json-run", prompt="x", max_tokens=120, stream=True, seed=1,
                                       extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in stream)), SCHEMA)
    anything = client.completions.create(model="json-run", prompt="x", max_tokens=20, seed=1,
                                         extra_body={"response_format": {"type": "json_object"}})
    assert anything.choices[0].text.startswith("{")
    regex = client.completions.create(model="json-run", prompt="x", max_tokens=40, seed=2,
                                      extra_body={"guided_regex": "[A-Z][a-z]{2,6}"})
    assert re.fullmatch("[A-Z][a-z]{2,6}", regex.choices[0].text)
    choice = client.completions.create(model="json-run", prompt="x", max_tokens=10,
                                       extra_body={"guided_choice": ["left", "right"]})
    assert choice.choices[0].text in ("left", "right")


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "cannot be compiled"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
    ({"guided_regex": "(", "guided_choice": ["a"]}, "guided_choice", "give one"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar", "grammar"),
    ({"response_format": {"type": "xml"}}, None, "response_format"),
    ({"guided_regex": "a\ud800"}, "guided_regex", "lone surrogate"),
    ({"guided_json": {"enum": ["\ud800"]}}, "guided_json", "json_schema"),
    ({"guided_regex": "é+"}, "guided_regex", "cannot begin with any token"),
])
def test_bad_structured_requests_are_400s_naming_the_field(server, extra, param, message):
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}",
                                                             "Content-Type": "application/json"},
                   content=json.dumps({"model": "json-run", "prompt": "x", "max_tokens": 5, **extra}))  # (\u escapes)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and (param is None or error["param"] == param)
    assert httpx.get(server.url + "/health").status_code == 200

