"""Fine-tuning: the loss covers completions only (tokenized apart, so BPE never moves the boundary), LoRA starts as the
base and trains only its adapters with the real optimizer, adapters save alone, load onto their base, merge to the
same logits, resume exactly, and are refused on another base; samples never end a run; exact match is what greedy
decoding gives."""

import json
import random

import pytest
import torch

import lmforge
from lmforge import GPT, ModelConfig
from lmforge.runs import load
from lmforge.cli import main
from lmforge.data import Dataset, encode_pair, pair_batch, pair_arrays, prepare
from lmforge.finetune import finetune, merge
from lmforge.pair_eval import evaluate_pairs
from lmforge.generation import generate_naive
from lmforge.lora import LoRALinear, apply_lora, lora_state, merge_lora
from lmforge.tokenizer import BPETokenizer
from lmforge.train import read_metrics

WORDS = ["apple", "river", "stone", "light", "music", "green", "table", "cloud", "happy", "sweet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)
    rows = []
    for _ in range(200):
        w = rng.choice(WORDS) + rng.choice(WORDS)
        rows.append({"prompt": w + " -> ", "completion": w[::-1]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:180]))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[180:]))
    (root / "corpus.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(5000)) + " -> ")
    data = prepare(str(root / "corpus.txt"), root / "data").path
    cfg = lmforge.TrainConfig(data=str(data), out=str(root / "base"), model={"preset": "tiny"}, max_steps=30,
                              block_size=48, batch_size=8, eval_interval=30, eval_steps=2, progress=False,
                              sample_tokens=0, lr=3e-3)
    lmforge.train(cfg)
    return root


def test_lora_starts_as_the_base_and_merges_to_the_same_logits():
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=50, block_size=32)).eval()
    x = torch.randint(0, 50, (2, 16))
    before = model(x)[0]
    wrapped = apply_lora(model, "attn,mlp", rank=4, alpha=8)
    assert len(wrapped) == 4 * model.config.n_layer  # c_attn, c_proj of attention and c_fc, c_proj of the MLP
    assert torch.equal(model(x)[0], before)  # B is zero: exactly the base
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.{k}" for n in wrapped for k in ("lora_A", "lora_B")}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    unmerged = model(x)[0]
    assert not torch.allclose(unmerged, before)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x)[0], unmerged, atol=1e-5, rtol=0)


def test_bad_targets_and_settings_are_one_line_errors():
    model = GPT(ModelConfig.preset("tiny", vocab_size=50, block_size=32))
    with pytest.raises(lmforge.UserError, match="matches no linear layer; there are: .*c_attn.*c_fc"):
        apply_lora(model, "attention", rank=4, alpha=8)
    with pytest.raises(lmforge.UserError, match="rank"):
        apply_lora(model, "attn", rank=0, alpha=8)
    with pytest.raises(lmforge.UserError, match="lm_head shares its weight"):
        apply_lora(model, "lm_head", rank=2, alpha=4)


def test_prompt_positions_get_exactly_zero_gradient(world):
    model, tok = load(world / "base")
    tokens, index = pair_arrays(tok, [("stone -> ", "enots"), ("lightgreen -> ", "neergthgil")])
    x, y, attn, loss_mask = pair_batch(tokens, index, [0, 1], 48, tok.eot_id)
    logits, loss = model(x, y, attention_mask=attn, loss_mask=loss_mask)
    logits.retain_grad()
    loss.backward()
    per_position = logits.grad.abs().sum(-1)  # (B, T)
    for b, (start, p_len, total) in enumerate(index):
        assert torch.all(per_position[b, :p_len - 1] == 0)  # targets inside the prompt: no loss, no gradient
        assert torch.all(per_position[b, p_len - 1:total - 1] > 0)  # the completion and its end-of-text
        assert torch.all(per_position[b, total - 1:] == 0)  # padding
        assert y[b, p_len - 1:total - 1].tolist() == tokens[start + p_len:start + total].tolist()


def test_a_prompt_ending_in_a_space_masks_the_completion_as_tokenized_alone():
    tok = BPETokenizer.train("the cat sat on the mat. the dog sat on the log. " * 30, 300)
    prompt, completion = "Translate: the cat ", "sat on the mat"
    assert tok.encode(prompt + completion) != tok.encode(prompt) + tok.encode(completion)  # BPE merges " sat"
    p, c = encode_pair(tok, prompt, completion)
    tokens, index = pair_arrays(tok, [(prompt, completion)])
    x, y, attn, loss_mask = pair_batch(tokens, index, [0], 64, tok.eot_id)
    assert y[0][loss_mask[0].bool()].tolist() == c == tok.encode(completion) + [tok.eot_id]
    assert tok.decode(c[:-1]) == completion and tok.decode(p) == prompt


def test_lora_finetune_trains_only_the_adapter_and_resumes_exactly(world):
    base_weights = {k: v.clone() for k, v in load(world / "base")[0].state_dict().items()}
    overrides = {"max_steps": "8", "eval_interval": "4", "progress": "false", "optimizer": "adamw", "log_interval": "1"}
    lora = {"rank": 4, "alpha": 8, "targets": "attn,mlp", "dropout": 0.0}
    finetune(world / "base", str(world / "pairs.jsonl"), str(world / "lora"), overrides=overrides, lora=lora)
    tuned, _ = load(world / "lora")
    state = tuned.state_dict()
    for k, v in base_weights.items():  # the real fused AdamW ran; the base is bit for bit what it was
        assert torch.equal(state[k.replace("c_attn.", "c_attn.base.").replace("c_fc.", "c_fc.base.")
                                 .replace("c_proj.", "c_proj.base.")], v), k
    assert any(v.abs().sum() > 0 for k, v in lora_state(tuned).items() if k.endswith("lora_B"))
    adapter = (world / "lora" / "adapter.safetensors").stat().st_size
    assert adapter < (world / "base" / "model.safetensors").stat().st_size / 4
    # an interrupted run resumed equals the uninterrupted one
    finetune(world / "base", str(world / "pairs.jsonl"), str(world / "lora2"),
             overrides={**overrides, "stop_at": "4"}, lora=lora)
    assert main(["train", "--resume", str(world / "lora2"), "--progress=false", "--stop_at=0"]) == 0
    losses = [[r["loss"] for r in read_metrics(world / name) if "loss" in r] for name in ("lora", "lora2")]
    assert len(losses[0]) == 8 and losses[0] == losses[1]
    # merged equals unmerged
    merge(world / "lora", world / "merged")
    merged, _ = load(world / "merged")
    x = torch.randint(0, merged.config.vocab_size, (2, 20))
    torch.testing.assert_close(merged(x)[0], tuned(x)[0], atol=1e-5, rtol=0)


def test_an_adapter_on_another_base_says_which_shapes_differ(world, tmp_path):
    finetune(world / "base", str(world / "pairs.jsonl"), str(tmp_path / "a"),
             overrides={"max_steps": "2", "eval_interval": "2", "progress": "false"},
             lora={"rank": 2, "alpha": 4, "targets": "c_attn", "dropout": 0.0})
    other = tmp_path / "other"
    data = Dataset(world / "data")
    lmforge.train(lmforge.TrainConfig(data=str(data.path), out=str(other), model={"preset": "tiny", "n_embd": 32,
                                                                                   "n_head": 2}, max_steps=1,
                                      block_size=48, batch_size=2, eval_interval=1, eval_steps=1, progress=False,
                                      sample_tokens=0))
    settings = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    moved = {**settings, "base": str(other), "base_weights": "checkpoints/step-000001/model.safetensors"}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(moved))
    with pytest.raises(lmforge.UserError, match="made for another base: shapes differ"):
        load(tmp_path / "a")


def test_an_adapter_is_pinned_to_its_base_and_moves_with_the_project(world, tmp_path):
    import shutil
    project = tmp_path / "project"
    shutil.copytree(world / "base", project / "base")
    finetune(project / "base", str(world / "pairs.jsonl"), str(project / "tuned"),
             overrides={"max_steps": "2", "eval_interval": "2", "progress": "false"},
             lora={"rank": 2, "alpha": 4, "targets": "c_attn", "dropout": 0.0})
    x = torch.randint(0, 20, (1, 12))
    before = load(project / "tuned")[0](x)[0]
    project.rename(tmp_path / "moved")  # the base is found beside the run, relative to it
    torch.testing.assert_close(load(tmp_path / "moved" / "tuned")[0](x)[0], before, atol=0, rtol=0)
    weights = next((tmp_path / "moved" / "base" / "checkpoints").glob("step-*")) / "model.safetensors"
    from safetensors.torch import load_file, save_file
    state = load_file(str(weights))
    state["wpe.weight"] = state["wpe.weight"] + 1.0  # the base changes under the adapter
    save_file(state, str(weights))
    with pytest.raises(lmforge.UserError, match="has changed since this adapter was trained"):
        load(tmp_path / "moved" / "tuned")
    with pytest.raises(lmforge.UserError, match="would write into the base run"):
        finetune(world / "base", str(world / "pairs.jsonl"), str(world / "base"), lora=None)


def test_exact_match_is_what_greedy_decoding_gives(world):
    model, tok = load(world / "base")
    with torch.no_grad():  # every position's hidden state becomes e_0, whose top token is end-of-text
        model.norm_f.weight.zero_()
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tok.eot_id, 0] = 10.0
    pairs = [("stone -> ", "")] + [(r["prompt"], r["completion"]) for r in map(json.loads, open(world / "test.jsonl"))]
    result = evaluate_pairs(model, tok, pairs, max_batch=4)
    want = []
    for prompt, completion in pairs:
        c = tok.encode(completion) + [tok.eot_id]
        want.append(generate_naive(model, tok.encode(prompt), len(c), temperature=0, eos_id=tok.eot_id) == c)
    assert want[0] and not any(want[1:])
    assert result["exact_match"] == 1 / len(pairs)
    assert result["examples"][0]["match"] and result["examples"][0]["generated"] == ""


def test_samples_never_end_a_run_and_pairs_samples_show_expected_completions(world, tmp_path):
    data = prepare(str(world / "pairs.jsonl"), tmp_path / "pairs", tokenizer="char").path
    cfg = lmforge.TrainConfig(data=str(data), out=str(tmp_path / "run"), model={"preset": "tiny"}, max_steps=4,
                              block_size=48, batch_size=4, eval_interval=2, eval_steps=1, progress=False,
                              sample_prompt="ROMEO:\n")  # outside this vocabulary: pairs samples do not use it
    lmforge.train(cfg)
    samples = (tmp_path / "run" / "samples.txt").read_text()
    assert samples.count("=== step") == 2 and "(expected " in samples and " -> " in samples
    tokens = prepare(str(world / "corpus.txt"), tmp_path / "tokens", tokenizer="char").path
    bad = cfg.with_overrides({"data": str(tokens), "out": str(tmp_path / "run2")})
    with pytest.raises(lmforge.UserError, match="sample_prompt='ROMEO:\\\\n' cannot be encoded"):
        lmforge.train(bad)
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_finetune_cli_errors_are_one_line(world, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text('{"prompt": "a", "completion": ""}\n')
    assert main(["finetune", str(world / "base"), "--data", str(tmp_path / "empty.jsonl"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "the completion is empty" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    assert main(["finetune", str(world / "base"), "--data", str(tmp_path / "broken.jsonl"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "broken.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["finetune", str(world / "base"), "--data", str(world / "pairs.jsonl"), "--out", str(tmp_path / "o"),
                 "--lora-rank", "2", "--lora-targets", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nowhere' matches no linear layer; there are:" in err
    assert main(["merge", str(world / "base"), "--out", str(tmp_path / "m")]) == 2
    assert "only a LoRA run can be merged" in capsys.readouterr().err
    assert main(["eval", str(world / "base"), "--pairs", str(world / "test.jsonl")]) == 0
    assert "exact match" in capsys.readouterr().out
