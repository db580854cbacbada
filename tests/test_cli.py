"""The command line's boundary: every verb turns a user's mistake into one line on stderr and exit status 2 (never a
traceback), and its surface (verbs and options) changes only on purpose."""

import argparse

import pytest
import torch

from lmforge import GPT, ModelConfig
from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic
from lmforge.cli import build_parser, main
from lmforge.data import prepare
from lmforge.tokenizer import CharTokenizer

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40

SURFACE = {
    "prepare": ["--errors", "--force", "--max-len", "--out", "--shard-tokens", "--split", "--text-field", "--tokenizer",
                "--tokenizer-from", "--tokenizer-sample", "--val-fraction", "--workers", "source"],
    "train": ["--config", "--resume"],
    "eval": ["--batch-size", "--batches", "--checkpoint", "--data", "--device", "--pairs", "--split", "run"],
    "evaluate": ["--apply-chat-template", "--batch-size", "--checkpoint", "--device", "--dtype",
                 "--fewshot-as-multiturn", "--gen-kwargs", "--include-path", "--limit", "--log-samples",
                 "--max-length", "--num-fewshot", "--out", "--system-instruction", "--tasks", "run"],
    "finetune": ["--beta", "--config", "--data", "--lora-alpha", "--lora-dropout", "--lora-rank", "--lora-targets",
                 "--max-len", "--method", "--out", "--val", "run"],
    "merge": ["--force", "--out", "run"],
    "quantize": ["--checkpoint", "--data", "--device", "--eval-tokens", "--force", "--group-size", "--max-kl",
                 "--method", "--out", "--overwrite", "run"],
    "export": ["--checkpoint", "--force", "--format", "--out", "--type", "run"],
    "import-hf": ["--dtype", "--force", "--out", "--tokenizer", "source"],
    "generate": ["--checkpoint", "--choice", "--compile", "--device", "--dtype", "--early-stopping", "--grammar",
                 "--interactive", "--json-schema", "--length-penalty", "--max-new-tokens", "--num-beams",
                 "--num-samples", "--prompt", "--prompt-file", "--regex", "--repetition-penalty", "--seed", "--stop",
                 "--temperature", "--top-k", "--top-p", "run"],
    "chat": ["--checkpoint", "--device", "--dtype", "--max-new-tokens", "--seed", "--system", "--temperature",
             "--top-k", "--top-p", "run"],
    "serve": ["--api-key", "--checkpoint", "--client-timeout", "--compile", "--device", "--drain-seconds", "--dtype",
              "--host", "--log-level", "--log-prompts", "--max-batch", "--max-body-bytes", "--max-connections",
              "--max-queue", "--max-seq-len", "--max-tokens-limit", "--model-name", "--port", "--request-timeout",
              "runs"],
}


def test_the_cli_surface_is_pinned():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    surface = {name: sorted(o for a in p._actions for o in (a.option_strings or [a.dest]) if o not in ("-h", "--help"))
               for name, p in sub.choices.items()}
    assert surface == SURFACE


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(TEXT)
    (root / "binary.txt").write_bytes(b"\x00\x01\xff" * 100)
    data = prepare(str(root / "corpus.txt"), root / "data", tokenizer="char").path
    tok = CharTokenizer.train(TEXT)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, position="rope")
    run = root / "run"
    run.mkdir()
    write_json_atomic(run / "config.json", run_config(cfg))
    tok.save(run / "tokenizer.json")
    save_checkpoint(run, weights_for_saving(GPT(cfg).state_dict(), True), {"step": 1}, run_config(cfg))
    return {"root": str(root), "src": str(root / "corpus.txt"), "bin": str(root / "binary.txt"), "data": str(data),
            "run": str(run)}


NO_CUDA = not torch.cuda.is_available()
BAD = [
    # no verb, or an unknown one
    (["frobnicate"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
    # prepare
    (["prepare", "{root}/missing.txt", "--out", "{root}/o1"], "no such file"),
    (["prepare", "{src}"], "--out"),
    (["prepare", "{src}", "--out", "{root}/o2", "--tokenizer", "bpe:abc"], "must be a number"),
    (["prepare", "{src}", "--out", "{root}/o3", "--tokenizer", "wordpiece"], "unknown tokenizer"),
    (["prepare", "{src}", "--out", "{root}/o4", "--val-fraction", "1.5"], "val"),
    (["prepare", "{src}", "--out", "{root}/o5", "--split", "random"], "invalid choice"),
    (["prepare", "{bin}", "--out", "{root}/o6"], "binary"),
    (["prepare", "{src}", "--out", "{data}"], "exists"),
    (["prepare", "{src}", "--out", "{root}/o7", "--tokenizer-from", "{root}/nothing"], "no"),
    # train
    (["train", "--config", "{root}/missing.toml"], "no config file"),
    (["train", "--max_steps=abc", "--data={data}"], "max_steps"),
    (["train", "--no_such_field=1"], "no_such_field"),
    (["train", "--data={root}/nothing", "--out={root}/r1"], "no data directory"),
    (["train", "--data={data}", "--out={root}/r2", "--model.n_head=5"], "n_head"),
    (["train", "--data={data}", "--out={root}/r3", "--device=foo"], "device"),
    (["train", "--resume", "{root}/nothing"], "nothing"),
    (["train", "--data={data}", "--out={root}/r4", "--batch_size=0"], "batch_size"),
    # eval
    (["eval", "{root}/nothing"], "no run directory"),
    (["eval", "{run}", "--batches", "0"], "batches=0"),
    (["eval", "{run}", "--batch-size", "0"], "batch_size=0"),
    (["eval", "{run}", "--split", "test"], "invalid choice"),
    (["eval", "{run}", "--data", "{root}/nothing"], "no data directory"),
    (["eval", "{run}", "--device", "foo"], "unknown device"),
    (["eval", "{run}", "--batches", "many"], "invalid int"),
    # generate
    (["generate"], "run"),
    (["generate", "{root}/nothing"], "no run directory"),
    (["generate", "{run}", "--device", "foo"], "unknown device"),
    (["generate", "{run}", "--dtype", "int8"], "invalid choice"),
    (["generate", "{run}", "--device", "cuda:0" if NO_CUDA else "cuda:99"], "cuda"),
    (["generate", "{run}", "--top-p", "2"], "top_p"),
    (["generate", "{run}", "--top-k", "0"], "top_k"),
    (["generate", "{run}", "--regex", "a(b"], "regex cannot be compiled"),
    (["generate", "{run}", "--regex", "a+", "--choice", "b"], "give one"),
    (["generate", "{run}", "--json-schema", "{root}/nothing.json"], "cannot read"),
    (["generate", "{run}", "--choice", "a", "--num-beams", "2"], "beam search does not take a constraint"),
    (["generate", "{run}", "--max-new-tokens", "-1"], "max_new_tokens"),
    (["generate", "{run}", "--max-new-tokens", "ten"], "invalid int"),
    (["generate", "{run}", "--temperature", "-1"], "temperature"),
    (["generate", "{run}", "--num-beams", "0"], "num_beams"),
    (["generate", "{run}", "--num-samples", "0"], "num-samples"),
    (["generate", "{run}", "--stop", ""], "stop strings"),
    (["generate", "{run}", "--prompt", "To be\u00e9"], "character"),
    (["generate", "{run}", "--prompt-file", "{root}/missing.txt"], "missing.txt"),
    (["generate", "{run}", "--checkpoint", "{root}/nothing"], "no checkpoint"),
    (["generate", "{run}", "--temperature", "nan"], "temperature"),
    (["generate", "{run}", "--repetition-penalty", "nan"], "repetition_penalty"),
    (["generate", "{run}", "--max-new-tokens", "1000000000"], "GB"),
    (["generate", "{run}", "--seed", "100000000000000000000000"], "seed"),
    (["generate", "{run}", "--prompt-file", "{bin}"], "not UTF-8"),
    (["eval", "{run}"], "records no training data"),  # a run with no training config, as an imported one
]
if NO_CUDA:
    BAD += [(["eval", "{run}", "--device", "cuda"], "no CUDA device"),
            (["train", "--data={data}", "--out={root}/r5", "--device=cuda"], "no CUDA device")]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_a_user_mistake_is_one_line_and_exit_status_2(world, capsys, argv, needle):
    code = main([a.format(**world) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("lmforge") and needle.lower() in err.lower(), err


def test_the_dtype_choices_are_what_load_accepts():
    from lmforge.runs import INFERENCE_DTYPES
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for verb in ("generate", "serve"):
        action = next(a for a in sub.choices[verb]._actions if "--dtype" in a.option_strings)
        assert list(action.choices) == list(INFERENCE_DTYPES)
