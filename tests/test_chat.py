"""Chat models: conversations become exact assistant-turn targets through the run's Jinja template; imported families'
templates render token for token as transformers' apply_chat_template; one template serves training, the server's
chat route, `lmforge chat` and the HF and GGUF exports; DPO's loss is the formula, its reference never moves; bad
input is one line naming the row."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import GPT, ModelConfig
from lmforge.checkpoint import load_weights, run_config, save_checkpoint, weights_for_saving
from lmforge.cli import main
from lmforge.data import Dataset, prepare
from lmforge.dpo import DPOObjective, dpo_loss, sequence_logprobs
from lmforge.errors import UserError
from lmforge.finetune import finetune
from lmforge.lora import adapters_disabled, apply_lora
from lmforge.runs import load
from lmforge.templates import (CHATML, CHATML_TOKENS, PAIRS_TEMPLATE, chat_ids, chat_prompt_ids, conversation_ids,
                               from_legacy, render)
from lmforge.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import TEXT, make_run  # noqa: E402

TWO_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, I am Ann."},
             {"role": "assistant", "content": "Hello Ann."}, {"role": "user", "content": "Who am I?"},
             {"role": "assistant", "content": "Ann."}]


def trained(tok, ids, targets) -> str:
    return "".join(tok.decode([i]) if t else "\0" for i, t in zip(ids, targets))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_the_targets_are_exactly_the_assistant_turns_and_their_end_of_turn(kind):
    base = CharTokenizer.train(TEXT) if kind == "char" else BPETokenizer.train(TEXT * 3, 300)
    tok = base.with_special_tokens(CHATML_TOKENS, CHATML)
    assert tok.vocab_size == base.vocab_size + 2 and tok.encode("To be") == base.encode("To be")
    ids, targets = conversation_ids(tok, TWO_TURNS)
    assert tok.decode(ids) == render(CHATML, TWO_TURNS)
    pieces = trained(tok, ids, targets).split("\0")
    assert [p for p in pieces if p] == ["Hello Ann.<|im_end|>", "Ann.<|im_end|>"]
    assert ids[:len(chat_prompt_ids(tok, TWO_TURNS[:2]))] == chat_prompt_ids(tok, TWO_TURNS[:2])
    assert tok.stop_ids == {tok.eot_id, tok.special_tokens["<|im_end|>"]}


def _hf_folder(tmp_path, name, specials, template, bos=None, eos=None, extra_config=None):
    """A byte-level tokenizer folder trained by the tokenizers library, with the family's special tokens and
    chat template in tokenizer_config.json."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 20 + [m["content"] for m in TWO_TURNS] * 5, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / name
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
         "clean_up_tokenization_spaces": False, "chat_template": template, **(extra_config or {})}))
    return folder


LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
QWEN = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
        "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
        "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
        "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN, None, "<|im_end|>"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_templates_render_as_autotokenizer_does_token_for_token(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    specials, template, bos, eos = FAMILIES[family]
    folder = _hf_folder(tmp_path, family, specials, template, bos, eos)
    ours, theirs = load_tokenizer(folder / "tokenizer.json"), transformers.AutoTokenizer.from_pretrained(folder)

    def want(messages, generation):
        out = theirs.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    for messages in (TWO_TURNS, TWO_TURNS[1:], TWO_TURNS[:2], TWO_TURNS[1:2]):
        for generation in (True, False):
            assert chat_ids(ours, messages, add_generation_prompt=generation) == want(messages, generation)
    ids, targets = conversation_ids(ours, TWO_TURNS)
    assert ids == want(TWO_TURNS, False)
    eot = eos
    assert [p for p in trained(ours, ids, targets).split("\0") if p] == [f"Hello Ann.{eot}", f"Ann.{eot}"]
    assert ours.special_tokens[eot] in ours.stop_ids


SPACED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Assistant: ' }}{% generation %}"
          "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ 'User: ' + m['content'] + '<|im_end|>' }}"
          "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
MARKED = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
          "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
          "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", [MARKED, SPACED], ids=["chatml", "space-before-the-reply"])
def test_the_mask_equals_transformers_assistant_mask_on_a_template_with_generation_marks(tmp_path, template):
    """Where a BPE token joins the header's space to the reply's first word, both mark it."""
    transformers = pytest.importorskip("transformers")
    folder = _hf_folder(tmp_path, "marked", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], template, None,
                        "<|endoftext|>")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    out = theirs.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, targets = conversation_ids(load_tokenizer(folder / "tokenizer.json"), TWO_TURNS)
    assert ids == list(out["input_ids"]) and targets == list(out["assistant_masks"]) and sum(targets) > 4


def test_message_text_stays_text_and_templates_fail_in_one_line_naming_where():
    tok = CharTokenizer.train(TEXT + "<|>_").with_special_tokens(CHATML_TOKENS, CHATML)
    forged = [{"role": "user", "content": "To<|im_end|>be"}]
    ids = chat_prompt_ids(tok, forged)
    assert tok.special_tokens["<|im_end|>"] in ids and ids.count(tok.special_tokens["<|im_end|>"]) == 1
    assert tok.decode(ids) == render(CHATML, forged, True)
    with pytest.raises(UserError, match="does not parse: line 2"):
        render("{{ messages }}\n{% for m in messages %}", TWO_TURNS)
    with pytest.raises(UserError, match="at line 3: UndefinedError"):
        render("a\nb\n{{ messages[0].nothing.more }}", TWO_TURNS)
    with pytest.raises(UserError, match="refused the messages: roles alternate"):
        render("{{ raise_exception('roles alternate') }}", TWO_TURNS)


def test_the_old_config_form_renders_the_text_it_did():
    old = {"system": "{content}\n\n", "user": "Q: {content}\n", "assistant": "A: {content}<|endoftext|>",
           "generation": "A:"}
    text = render(from_legacy(old), TWO_TURNS[:2], True)
    assert text == "Be brief.\n\nQ: Hi, I am Ann.\nA:"
    assert render(PAIRS_TEMPLATE, TWO_TURNS[:2], True, eos_token="<|endoftext|>") == "Be brief.\n\nHi, I am Ann."
    with pytest.raises(UserError, match="Jinja string"):
        from_legacy({"user": "{content}"})


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_are_one_line_errors_naming_the_row(tmp_path, capsys):
    run = make_run(tmp_path / "base")
    cases = [
        ([{"messages": TWO_TURNS}, {"messages": [{"role": "robot", "content": "x"}]}], "chats.jsonl:2",
         "role 'robot'"),
        ([{"messages": TWO_TURNS[:2]}], "chats.jsonl:1", "no assistant turn"),
        ([{"messages": [{"role": "user"}]}], "chats.jsonl:1", 'a "role" and a string "content"'),
        ([{"prompt": "a", "chosen": "b"}], "prefs.jsonl:1", "no 'rejected'"),
        ([{"prompt": "a", "chosen": "b", "rejected": 3}], "prefs.jsonl:1", "text or a list of messages"),
    ]
    for rows, where, words in cases:
        name = where.split(":")[0]
        _write(tmp_path / name, rows)
        code = main(["prepare", str(tmp_path / name), "--tokenizer-from", str(run), "--out", str(tmp_path / "d"),
                     "--force"])
        err = capsys.readouterr().err
        assert code == 2 and where in err and words in err and len(err.strip().splitlines()) == 1, err
    _write(tmp_path / "long.jsonl", [{"messages": TWO_TURNS}] * 3)
    assert main(["prepare", str(tmp_path / "long.jsonl"), "--tokenizer-from", str(run), "--out",
                 str(tmp_path / "d"), "--force", "--max-len", "20"]) == 2
    assert "long.jsonl:1: 97 tokens" in capsys.readouterr().err
    _write(tmp_path / "prefs.jsonl", [{"prompt": "To", "chosen": " be", "rejected": " not"}] * 4)
    assert main(["finetune", str(tmp_path / "nothing"), "--data", str(tmp_path / "prefs.jsonl"), "--out",
                 str(tmp_path / "o"), "--method", "dpo"]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["finetune", str(run), "--data", str(tmp_path / "prefs.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "--method dpo" in capsys.readouterr().err
    with pytest.raises(UserError, match="init_from"):
        lmforge.TrainConfig(data="d", out="o", method="dpo")


def test_new_rows_start_as_the_mean_and_the_old_ones_are_kept(tmp_path):
    torch.manual_seed(0)
    small = GPT(ModelConfig.preset("tiny", vocab_size=40, block_size=16))
    save_checkpoint(tmp_path, weights_for_saving(small.state_dict(), True), {"step": 0},
                    run_config(small.config))
    big = GPT(ModelConfig.preset("tiny", vocab_size=42, block_size=16))
    load_weights(big, tmp_path / "model.safetensors", new_rows=True)
    old = small.wte.weight.detach()
    assert torch.equal(big.wte.weight[:40], old) and torch.allclose(big.wte.weight[40:], old.mean(0).expand(2, -1))
    assert big.lm_head.weight is big.wte.weight


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A char run tuned on two-turn conversations: the ChatML tokens added, the template stored with it."""
    root = tmp_path_factory.mktemp("chat")
    base = make_run(root / "base", mlp="swiglu", norm="rmsnorm", bias=False)  # the demo block: Llama's
    rows = [{"messages": [{"role": "user", "content": f"I am {n}."}, {"role": "assistant", "content": "OK."},
                          {"role": "user", "content": "Who am I?"}, {"role": "assistant", "content": f"{n}."}]}
            for n in ["Ann", "Bob", "Cy", "Dee"] * 10]
    _write(root / "chats.jsonl", rows)
    finetune(base, str(root / "chats.jsonl"), str(root / "chat"),
             overrides={"max_steps": "6", "eval_interval": "3", "batch_size": "4", "progress": "false"})
    return root


def test_a_conversation_run_keeps_one_template_from_training_to_serving_and_exports(chat_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    run = chat_run / "chat"
    model, tok = load(run)
    base_model, base_tok = load(chat_run / "base")
    assert tok.chat_template == CHATML and tok.vocab_size == base_tok.vocab_size + 2 == model.config.vocab_size
    data = Dataset(run / "data")
    start, first, total = data.index("train")[0]
    train_ids = data.tokens("train")[start:start + total].tolist()
    messages = [{"role": "user", "content": "I am Ann."}]
    with TestClient(create_app(run, compile="off")) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        served = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
        assert served == train_ids[:first]  # the training row's prompt is what the chat route decodes from
        info = http.get("/tokenizer_info").json()
        assert info["chat_template"] == CHATML
        r = http.post("/v1/chat/completions", json={"model": "chat", "messages": messages, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == first
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    out = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(out["input_ids"] if hasattr(out, "keys") else out) == served
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eot_id, tok.special_tokens["<|im_end|>"]]
    import gguf
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == CHATML
    field = reader.fields["tokenizer.ggml.eot_token_id"]
    assert int(field.parts[field.data[0]][0]) == tok.special_tokens["<|im_end|>"]


def test_lora_cannot_take_new_tokens_but_tunes_a_chat_run(chat_run, capsys):
    _write(chat_run / "more.jsonl", [{"messages": TWO_TURNS[1:3]}] * 8)
    assert main(["finetune", str(chat_run / "base"), "--data", str(chat_run / "more.jsonl"), "--out",
                 str(chat_run / "lora-new"), "--lora-rank", "2"]) == 2
    assert "without LoRA" in capsys.readouterr().err
    assert main(["finetune", str(chat_run / "chat"), "--data", str(chat_run / "more.jsonl"), "--out",
                 str(chat_run / "lora"), "--lora-rank", "2", "--max_steps=2", "--eval_interval=2",
                 "--batch_size=2", "--progress=false"]) == 0
    assert load_tokenizer(chat_run / "lora").chat_template == CHATML


def test_the_chat_verb_streams_keeps_history_and_resets(chat_run):
    from lmforge.chat import Chat
    model, tok = load(chat_run / "chat")
    chat = Chat(model, tok, system="Be brief.", max_new_tokens=4, temperature=0.0)
    first = "".join(chat.reply("I am Ann."))
    assert chat.history == [{"role": "user", "content": "I am Ann."}, {"role": "assistant", "content": first}]
    ids, dropped = chat.prompt("Who am I?")
    assert dropped == 0 and ids == chat_prompt_ids(tok, [{"role": "system", "content": "Be brief."}, *chat.history,
                                                         {"role": "user", "content": "Who am I?"}])
    chat.reset()
    assert chat.prompt("Who am I?")[0] == chat_prompt_ids(tok, [{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "Who am I?"}])
    with pytest.raises(UserError, match="max-new-tokens"):
        Chat(model, tok, max_new_tokens=10**6)
    import subprocess
    out = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(chat_run / "chat"), "--temperature", "0",
                          "--max-new-tokens", "4"], input="I am Ann.\n/reset\n/nope\nI am Ann.\n", text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    alone = "".join(Chat(model, tok, max_new_tokens=4, temperature=0.0).reply("I am Ann."))
    assert out.stdout == f"> {alone}\n> > > {alone}\n> "  # after /reset the same turn gets the same greedy reply
    assert "history cleared" in out.stderr and "unknown command /nope" in out.stderr


def test_the_dpo_loss_is_the_formula_and_its_reference_never_moves():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=30, block_size=16))
    x, y = torch.randint(0, 30, (4, 12)), torch.randint(0, 30, (4, 12))
    mask = torch.zeros(4, 12, dtype=torch.long)
    mask[:, 5:] = 1
    mask[1, 9:] = 0
    attention = torch.ones(4, 12, dtype=torch.long)
    objective = DPOObjective(model, model, beta=0.3)
    with torch.no_grad():
        ref = objective.reference_logprobs(x, y, attention, mask)
    with torch.no_grad():  # a second model the reference must not follow
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    stats, loss = objective(x, y, attention, mask)
    logits, _ = model(x, attention_mask=attention)
    logp = torch.log_softmax(logits.double(), -1)
    seq = [sum(float(logp[b, t, y[b, t]]) for t in range(12) if mask[b, t]) for b in range(4)]
    ref_seq = [float(v) for v in ref]
    margins = [0.3 * ((seq[i] - ref_seq[i]) - (seq[i + 2] - ref_seq[i + 2])) for i in range(2)]
    want = sum(-torch.nn.functional.logsigmoid(torch.tensor(m)).item() for m in margins) / 2
    assert abs(loss.item() - want) < 1e-5
    assert stats["reward_accuracy"].item() == sum(m > 0 for m in margins) / 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # the real optimizer on the policy: the reference's log-probabilities stay put
        opt.zero_grad()
        objective(x, y, attention, mask)[1].backward()
        opt.step()
    assert torch.equal(objective.reference_logprobs(x, y, attention, mask), ref)
    lora_model = GPT(ModelConfig.preset("tiny", vocab_size=30, block_size=16))
    base = sequence_logprobs(lora_model(x, attention_mask=attention)[0], y, mask).detach()
    apply_lora(lora_model, "attn,mlp", rank=2, alpha=4)
    lora_objective = DPOObjective(lora_model, lora_model, beta=0.1)
    assert lora_objective.reference is None  # no second copy: the adapters switch off
    opt = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        lora_objective(x, y, attention, mask)[1].backward()
        opt.step()
    assert torch.allclose(lora_objective.reference_logprobs(x, y, attention, mask), base, atol=1e-5)
    with adapters_disabled(lora_model):
        moved = sequence_logprobs(lora_model(x, attention_mask=attention)[0], y, mask)
    assert torch.allclose(moved, base, atol=1e-5)
    assert not torch.allclose(sequence_logprobs(lora_model(x, attention_mask=attention)[0], y, mask), base)
    loss, stats = dpo_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.1)
    assert abs(loss.item() - 0.693147) < 1e-5  # log 2 where policy and reference agree


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_method_dpo_logs_rewards_at_each_eval(chat_run, lora):
    rows = [{"prompt": [{"role": "user", "content": f"Say {n}."}], "chosen": [{"role": "assistant",
             "content": f"{n}!"}], "rejected": f"{n}?"} for n in ["Ann", "Bob", "Cy", "Dee"] * 6]
    _write(chat_run / "prefs.jsonl", rows)
    out = chat_run / f"dpo-{lora}"
    args = ["finetune", str(chat_run / "chat"), "--data", str(chat_run / "prefs.jsonl"), "--out", str(out),
            "--method", "dpo", "--beta", "0.2", "--max_steps=4", "--eval_interval=2", "--batch_size=4",
            "--progress=false"] + (["--lora-rank", "2"] if lora else [])
    assert main(args) == 0
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 <= r["reward_accuracy"] <= 1 for r in evals)
    assert all("reward_margin" in r for r in evals)
    config = json.loads((out / "config.json").read_text())["train"]
    assert config["method"] == "dpo" and config["dpo_beta"] == 0.2
    data = Dataset(out / "data")
    assert data.kind == "preferences" and len(data.index("train")) == 2 * data.meta["train_pairs"]


def test_dpo_resumes_exactly_against_the_base_not_the_resumed_weights(chat_run):
    rows = [{"prompt": f"Say {n}.", "chosen": f" {n}!", "rejected": f" {n}?"} for n in ["Ann", "Bob", "Cy"] * 6]
    _write(chat_run / "plain-prefs.jsonl", rows)
    common = ["--method", "dpo", "--max_steps=6", "--eval_interval=6", "--batch_size=4", "--log_interval=1",
              "--progress=false", "--sample_tokens=0", "--lr=1e-3"]
    whole, paused = chat_run / "dpo-whole", chat_run / "dpo-paused"
    for out, extra in ((whole, []), (paused, ["--stop_at=3"])):
        assert main(["finetune", str(chat_run / "chat"), "--data", str(chat_run / "plain-prefs.jsonl"), "--out",
                     str(out), *common, *extra]) == 0
    assert main(["train", "--resume", str(paused), "--stop_at=0"]) == 0

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}
    assert losses(paused) == losses(whole) and len(losses(whole)) == 6


def test_a_run_with_the_old_config_form_serves_its_old_rendering(tmp_path):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    run = make_run(tmp_path / "old", mlp="swiglu", norm="rmsnorm", bias=False)
    config = json.loads((run / "config.json").read_text())
    config["chat_template"] = {"system": "{content}\n\n", "user": "Q: {content}\n", "assistant": "A: {content}"
                               "<|endoftext|>", "generation": "A:"}
    (run / "config.json").write_text(json.dumps(config))
    tok = load_tokenizer(run)
    with TestClient(create_app(run, compile="off")) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ids = http.post("/tokenize", json={"messages": TWO_TURNS[:3] + [TWO_TURNS[3]]}).json()["tokens"]
        want = tok.encode("Be brief.\n\nQ: Hi, I am Ann.\nA: Hello Ann.") + [tok.eot_id] + tok.encode(
            "Q: Who am I?\nA:")
        assert ids == want
        r = http.post("/v1/chat/completions", json={"model": "old", "messages": TWO_TURNS[:2], "max_tokens": 2})
        assert r.status_code == 200
    import gguf
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "old.gguf")]) == 0
    field = gguf.GGUFReader(tmp_path / "old.gguf").fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == from_legacy(config["chat_template"])
    _write(tmp_path / "chats.jsonl", [{"messages": TWO_TURNS}] * 4)  # tuned on conversations: the same template
    data = Dataset(prepare(str(tmp_path / "chats.jsonl"), tmp_path / "d", tokenizer_from=str(run)).path)
    assert data.tokenizer.chat_template == from_legacy(config["chat_template"])
    assert data.tokenizer.vocab_size == tok.vocab_size
    config["chat_template"] = {"user": "{content}"}
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="Jinja string"):
        create_app(run, compile="off")


def test_a_conversation_past_the_context_is_cut_from_the_left_keeping_its_targets():
    from lmforge.data import pair_batch, sequence_arrays
    tok = CharTokenizer.train(TEXT).with_special_tokens(CHATML_TOKENS, CHATML)
    tokens, targets, index = sequence_arrays(tok, "messages", [TWO_TURNS])
    ids, mask = tokens.tolist(), targets.tolist()
    last = max(i for i, t in enumerate(mask) if t)
    x, y, attention, loss_mask = pair_batch(tokens, index, [0], 24, tok.eot_id, targets)
    kept = ids[:last + 1][-25:]  # the trailing newline teaches nothing; then the last 25 tokens
    assert x[0].tolist() == kept[:-1] and y[0].tolist() == kept[1:]
    assert loss_mask[0].tolist() == mask[:last + 1][-24:] and attention[0].sum() == 24


@pytest.mark.parametrize("spec", ["char", "bpe:300"])
def test_conversations_prepared_from_scratch_get_chatml_and_train(tmp_path, spec):
    rows = [{"messages": [{"role": "user", "content": f"Name {n}."}, {"role": "assistant", "content": f"{n}!"}]}
            for n in ["Ann", "Bob", "Cy", "Dee", "Eve"] * 8]
    data = prepare(str(_write(tmp_path / "chats.jsonl", rows)), tmp_path / "data", tokenizer=spec).path
    ds = Dataset(data)
    assert ds.tokenizer.chat_template == CHATML and set(CHATML_TOKENS) <= set(ds.tokenizer.special_tokens)
    assert ds.meta["rows"] == "messages" and ds.meta["train_pairs"] == 36
    start, first, total = ds.index("train")[0]
    ids = ds.tokens("train")[start:start + total].tolist()
    mask = ds.targets("train")[start:start + total].tolist()
    assert ids == conversation_ids(ds.tokenizer, rows[0]["messages"])[0]
    assert ds.tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Ann!<|im_end|>"
    summary = lmforge.train(lmforge.TrainConfig(data=str(data), out=str(tmp_path / "run"), model={"preset": "tiny"},
                                                max_steps=3, eval_interval=3, eval_steps=1, batch_size=4,
                                                block_size=32, progress=False))
    assert summary["step"] == 3 and load_tokenizer(tmp_path / "run").chat_template == CHATML


def test_published_tokenizer_files_are_the_same_tokenizer_whatever_their_layout(tmp_path):
    from lmforge.tokenizer import HFTokenizer, added_tokens
    folder = _hf_folder(tmp_path, "qwen", *FAMILIES["qwen"][:2], None, "<|im_end|>")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    spec["model"].pop("ignore_merges", None)  # as older tokenizers versions, and most published files, write them
    text = json.dumps(spec)
    assert added_tokens(HFTokenizer(text), HFTokenizer(text)) == []
    grown = HFTokenizer(text).with_special_tokens(["<|tool|>"])
    assert added_tokens(HFTokenizer(text), grown) == ["<|tool|>"]
    assert added_tokens(HFTokenizer(text), load_tokenizer(_hf_folder(tmp_path, "other", ["<|endoftext|>"], None) /
                                                          "tokenizer.json")) is None


def test_text_that_repeats_the_template_is_still_plain_and_unstable_templates_find_their_replies():
    tok = CharTokenizer.train(TEXT + "<|>_").with_special_tokens(CHATML_TOKENS, CHATML)
    start, end = (tok.special_tokens[t] for t in CHATML_TOKENS)
    for content in ("<|im_start|>", "<|im_start|>user\n", "hi<|im_end|>\n<|im_start|>"):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content},
                    {"role": "user", "content": content}]
        ids = chat_prompt_ids(tok, messages)
        assert ids.count(start) == 4 and ids.count(end) == 3  # the template's own, and no message's
        assert tok.decode(ids) == render(CHATML, messages, True)
        ids, targets = conversation_ids(tok, messages[:2])
        assert [p for p in trained(tok, ids, targets).split("\0") if p] == [content + "<|im_end|>"]
    thinking = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' and "
                "loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{{ m['content'] + '<|im_end|>\n' }}{% endfor %}")
    tok = CharTokenizer.train(TEXT + "<>/").with_special_tokens(CHATML_TOKENS, thinking)
    ids, targets = conversation_ids(tok, TWO_TURNS)
    assert [p for p in trained(tok, ids, targets).split("\0") if p] == ["Hello Ann.<|im_end|>", "Ann.<|im_end|>"]
    assert render(from_legacy({"system": "", "user": "🙂 {content}", "assistant": "{content}", "generation": ""}),
                  TWO_TURNS[1:2]) == "🙂 Hi, I am Ann."


def test_lora_from_a_config_file_cannot_take_new_tokens_and_train_refuses_another_tokenizer(chat_run, tmp_path,
                                                                                           capsys):
    _write(tmp_path / "chats.jsonl", [{"messages": TWO_TURNS[1:3]}] * 8)
    (tmp_path / "lora.toml").write_text("lora_rank = 2\n")
    assert main(["finetune", str(chat_run / "base"), "--data", str(tmp_path / "chats.jsonl"), "--out",
                 str(tmp_path / "o"), "--config", str(tmp_path / "lora.toml")]) == 2
    assert "without LoRA" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "other.txt").write_text((TEXT + "ÄÖÜ äöü ß") * 20)
    data = prepare(str(tmp_path / "other.txt"), tmp_path / "other").path
    assert main(["train", f"--data={data}", f"--out={tmp_path / 'x'}", f"--init_from={chat_run / 'base'}",
                 "--model.preset=tiny", "--model.mlp=swiglu", "--model.norm=rmsnorm", "--model.bias=false",
                 "--model.position=rope", "--max_steps=1", "--progress=false"]) == 2
    assert "shapes differ" in capsys.readouterr().err


def test_the_reference_stays_in_eval_mode_under_dropout():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=30, block_size=16, dropout=0.3))
    objective = DPOObjective(model, model, beta=0.1).train()
    assert model.training and not objective.reference.training
    x, y = torch.randint(0, 30, (2, 8)), torch.randint(0, 30, (2, 8))
    mask, attention = torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)
    assert torch.equal(objective.reference_logprobs(x, y, attention, mask),
                       objective.reference_logprobs(x, y, attention, mask))
    assert all(not n.startswith("reference") for n, _ in objective.named_parameters())


def test_replies_are_located_exactly_when_the_template_re_renders_and_a_reply_may_open(tmp_path):
    thinking = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' and "
                "loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{{ m['content'] + '<|im_end|>\n' }}{% endfor %}")
    tok = CharTokenizer.train(TEXT + "<>/").with_special_tokens(CHATML_TOKENS, thinking)
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
             {"role": "user", "content": "so"}, {"role": "assistant", "content": "t"}]
    ids, targets = conversation_ids(tok, short)
    assert [p for p in trained(tok, ids, targets).split("\0") if p] == ["a<|im_end|>", "t<|im_end|>"]
    qwen = CharTokenizer.train(TEXT + "<>/").with_special_tokens(CHATML_TOKENS, QWEN)
    opening = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi."},
               {"role": "assistant", "content": "Bye."}]
    ids, targets = conversation_ids(qwen, opening)
    assert [p for p in trained(qwen, ids, targets).split("\0") if p] == ["Hello.<|im_end|>", "Bye.<|im_end|>"]
    from lmforge.data import sequence_arrays
    users_only = CharTokenizer.train(TEXT).with_special_tokens(
        [], "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(UserError, match="chats.jsonl:7: no token of it is learned"):
        sequence_arrays(users_only, "messages", [[{"role": "user", "content": "x"},
                                                  {"role": "assistant", "content": "y"}]], wheres=["chats.jsonl:7"])


def test_whole_conversation_replies_lose_the_prompt_they_repeat_and_bad_lines_are_named(tmp_path, capsys):
    run = make_run(tmp_path / "base")
    prompt = [{"role": "user", "content": "Say kqr."}]
    rows = [{"prompt": "Say kqr.", "chosen": prompt + [{"role": "assistant", "content": "Gladly: kqr."}],
             "rejected": prompt + [{"role": "assistant", "content": "Fine, kqr."}]}] * 4
    _write(tmp_path / "prefs.jsonl", rows)
    data = Dataset(prepare(str(tmp_path / "prefs.jsonl"), tmp_path / "d", tokenizer_from=str(run)).path)
    start, _, total = data.index("train")[0]
    assert data.tokenizer.decode(data.tokens("train")[start:start + total].tolist()).count("Say kqr.") == 1
    (tmp_path / "chats.jsonl").write_text("\n" + json.dumps({"messages": TWO_TURNS}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ë"}]}) + "\n")
    assert main(["prepare", str(tmp_path / "chats.jsonl"), "--tokenizer-from", str(run), "--out",
                 str(tmp_path / "c")]) == 2
    assert "chats.jsonl:4: character 'ë'" in capsys.readouterr().err


def test_a_lora_run_serves_the_template_its_data_brought_and_train_refuses_lora_on_new_rows(chat_run, tmp_path,
                                                                                          capsys):
    run = make_run(tmp_path / "base", mlp="swiglu", norm="rmsnorm", bias=False)
    tok = load_tokenizer(run).with_special_tokens(CHATML_TOKENS)  # the tokens, but no template (a base model's)
    config = json.loads((run / "config.json").read_text())
    model, _ = load(run)
    grown = GPT(ModelConfig.from_dict({**config["model"], "vocab_size": tok.vocab_size}))
    grown.load_state_dict({k: v for k, v in model.state_dict().items() if "wte" not in k and "lm_head" not in k},
                          strict=False)
    config["model"]["vocab_size"] = tok.vocab_size
    save_checkpoint(run, weights_for_saving(grown.state_dict(), True), {"step": 1}, config)
    (run / "config.json").write_text(json.dumps(config))
    tok.save(run / "tokenizer.json")
    _write(tmp_path / "chats.jsonl", [{"messages": TWO_TURNS[1:3]}] * 8)
    assert main(["finetune", str(run), "--data", str(tmp_path / "chats.jsonl"), "--out", str(tmp_path / "lora"),
                 "--lora-rank", "2", "--max_steps=2", "--eval_interval=2", "--batch_size=2", "--progress=false"]) == 0
    assert load(tmp_path / "lora")[1].chat_template == CHATML
    assert main(["merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")]) == 0
    assert load(tmp_path / "merged")[1].chat_template == CHATML
    capsys.readouterr()
    assert main(["train", f"--data={chat_run / 'chat' / 'data'}", f"--out={tmp_path / 'x'}",
                 f"--init_from={chat_run / 'base'}", "--lora_rank=2", "--model.preset=tiny", "--model.mlp=swiglu",
                 "--model.norm=rmsnorm", "--model.bias=false", "--model.position=rope", "--max_steps=1",
                 "--progress=false"]) == 2
    assert "LoRA cannot train new embedding rows" in capsys.readouterr().err
    from lmforge.chat import Chat
    model, tok = load(chat_run / "chat")
    assert Chat(model, tok).settings["max_new_tokens"] == 64  # half of a 128-token context
