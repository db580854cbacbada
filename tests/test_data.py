"""prepare and batches: outputs, atomicity, one-line errors, reproducible rank-aware sampling, pair masks."""

import http.server
import json
import threading

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data import (Dataset, get_batch, get_pair_batch, load_documents, prepare, token_dtype)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_prepare_a_file_char(corpus, tmp_path):
    out = prepare(str(corpus), tmp_path / "data", tokenizer="char").path
    ds = Dataset(out)
    meta = ds.meta
    assert meta["kind"] == "tokens" and meta["dtype"] == "uint16" and meta["split"].startswith("tail")
    train, val = ds.tokens("train"), ds.tokens("val")
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert len(train) + len(val) == len(TEXT) + 1  # one document, closed by end-of-text
    tok = ds.tokenizer
    assert tok.decode(list(train) + list(val)) == TEXT + "<|endoftext|>"


def test_prepare_a_folder_splits_by_documents_with_bpe(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i:02d}.txt").write_text(f"document {i}: " + TEXT[: 200 + 10 * i])
    ds = Dataset(prepare(str(folder), tmp_path / "data", tokenizer="bpe:300").path)
    assert ds.meta["documents"] == 10 and ds.meta["split"].startswith("documents: last 1 of 10")
    val_text = ds.tokenizer.decode(list(ds.tokens("val")))
    assert val_text == "document 9: " + TEXT[:290] + "<|endoftext|>"
    assert ds.tokenizer.vocab_size == 300


def test_token_dtype_switches_to_uint32_past_65536():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_prepare_is_atomic(corpus, tmp_path, monkeypatch):
    import lmforge.tokenizer as tokmod

    def crash(self, path):
        raise RuntimeError("disk full")
    monkeypatch.setattr(tokmod.Tokenizer, "save", crash)
    with pytest.raises(RuntimeError):
        prepare(str(corpus), tmp_path / "data")
    assert not (tmp_path / "data").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.txt"]  # no half-written folder left behind


def test_existing_output_needs_force(corpus, tmp_path):
    prepare(str(corpus), tmp_path / "data")
    with pytest.raises(ValueError, match="already exists; pass --force"):
        prepare(str(corpus), tmp_path / "data")
    (tmp_path / "other.txt").write_text("xyz" * 100)
    prepare(str(tmp_path / "other.txt"), tmp_path / "data", force=True)
    assert Dataset(tmp_path / "data").tokenizer.chars == ["x", "y", "z"]


@pytest.mark.parametrize("content,message", [
    (b"", "holds no text"),
    (b"\x00\x01binary\x00", "looks like a binary file"),
    (b"good text \xff\xfe bad", "not valid UTF-8 at byte offset 10; fix the file or pass --errors replace"),
])
def test_bad_sources(tmp_path, content, message):
    path = tmp_path / "in.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        prepare(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_errors_replace_goes_on(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"good text \xff bad" * 20)
    ds = Dataset(prepare(str(path), tmp_path / "out", errors="replace").path)
    assert "\ufffd" in ds.tokenizer.chars


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such file or folder" in err
    (tmp_path / "a.txt").write_text("abc" * 50)
    assert main(["prepare", str(tmp_path / "a.txt"), "--tokenizer", "bpe:100", "--out", str(tmp_path / "o")]) == 2
    assert "vocab_size=100 is too small" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "a.txt"), "--tokenizer", "wordpiece", "--out", str(tmp_path / "o")]) == 2
    assert "unknown tokenizer 'wordpiece'" in capsys.readouterr().err


def test_unreachable_url_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="could not download http://127.0.0.1:9/corpus.txt"):
        load_documents("http://127.0.0.1:9/corpus.txt")


def test_url_is_downloaded_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            body = TEXT.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/corpus.txt"
        for _ in range(2):
            docs, source = load_documents(url)
            assert docs == [("corpus.txt", TEXT)] and source == url
    finally:
        server.shutdown()
    assert hits == ["/corpus.txt"]


# --------------------------------------------------------------------------------------------------------- batches

def test_batches_are_reproducible_and_rank_aware():
    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = get_batch(tokens, 4, 16, seed=1, step=5, micro=0)
    x2, y2 = get_batch(tokens, 4, 16, seed=1, step=5, micro=0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1, x1 + 1)  # y is x shifted by one token
    assert x1.dtype == torch.long and x1.shape == (4, 16)
    others = [get_batch(tokens, 4, 16, seed=1, step=5, micro=1)[0], get_batch(tokens, 4, 16, seed=1, step=6)[0],
              get_batch(tokens, 4, 16, seed=2, step=5)[0]]
    assert all(not torch.equal(x1, o) for o in others)


def test_batch_larger_than_data_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than block_size \\+ 1"):
        get_batch(np.arange(10, dtype=np.uint16), 2, 16, seed=0, step=0)


def test_pairs_dataset_masks(tmp_path):
    rows = [{"prompt": f"english: word{i} =", "completion": f" mot{i}"} for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = Dataset(prepare(str(tmp_path / "pairs.jsonl"), tmp_path / "pd", tokenizer="char").path)
    assert ds.meta["kind"] == "pairs" and ds.meta["train_pairs"] == 18 and ds.meta["val_pairs"] == 2
    tok = ds.tokenizer
    x, y, attn, loss_mask = get_pair_batch(ds, "train", 6, 64, seed=0, step=0)
    for b in range(6):
        n = int(attn[b].sum())
        assert attn[b, :n].all() and not attn[b, n:].any()  # right padding
        prompt_text = tok.decode(x[b, :n].tolist())
        completion = tok.decode(y[b][loss_mask[b].bool()].tolist())
        i = prompt_text.split("word")[1].split(" ")[0]
        assert completion == f" mot{i}<|endoftext|>"  # loss covers the completion and its end, nothing else
        assert torch.equal(y[b, :n - 1], x[b, 1:n])


def test_long_pairs_keep_the_end_of_the_prompt(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x" * 50 + "PROMPT END", "completion": "done"}) + "\n")
    ds = Dataset(prepare(str(tmp_path / "p.jsonl"), tmp_path / "pd").path)
    x, y, attn, loss_mask = get_pair_batch(ds, "train", 1, 16, seed=0, step=0)
    assert x.shape == (1, 16)
    assert ds.tokenizer.decode(y[0][loss_mask[0].bool()].tolist()) == "done<|endoftext|>"
    assert ds.tokenizer.decode(x[0].tolist()) == "xxPROMPT ENDdone"  # the last 17 tokens, shifted


def test_malformed_jsonl_names_the_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"\n')
    with pytest.raises(ValueError, match="p.jsonl:3: not valid JSON"):
        prepare(str(tmp_path / "p.jsonl"), tmp_path / "pd")
    (tmp_path / "q.jsonl").write_text('{"prompt": "a", "completion": 3}\n')
    with pytest.raises(ValueError, match='q.jsonl:1: each line needs string fields "prompt" and "completion"'):
        prepare(str(tmp_path / "q.jsonl"), tmp_path / "pd")


def test_missing_data_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="lmforge prepare"):
        Dataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no meta.json"):
        Dataset(tmp_path / "empty")
