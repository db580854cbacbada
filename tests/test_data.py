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


# ------------------------------------------------------------------------------------------- data at scale

import gzip  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

import lmforge.sources as sources  # noqa: E402
from lmforge.data import ShardedTokens  # noqa: E402
from lmforge.tokenizer import BPETokenizer  # noqa: E402


def _files(ds: Dataset) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ds.path.iterdir())}


@pytest.mark.parametrize("tokenizer", ["char", "bpe:320"])
def test_two_workers_write_exactly_what_one_writes(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(sources, "BLOCK_CHARS", 500)
    monkeypatch.setattr("lmforge.data.UNIT_CHARS", 700)  # many units, so the pool really interleaves them
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.txt").write_text(f"document {i}\n" + TEXT[i * 50:] * 2)
    one = Dataset(prepare(str(folder), tmp_path / "one", tokenizer=tokenizer, workers=1).path)
    two = Dataset(prepare(str(folder), tmp_path / "two", tokenizer=tokenizer, workers=2).path)
    assert _files(one) == _files(two)
    assert one.meta["documents"] == 12 and one.meta["split"].startswith("documents: last 1 of 12")


TEXTS = st.lists(st.sampled_from(list("ab xy\n\n  ,.'\tZ9é") + ["'s", "don't", "\u00a0", "🙂", "\r\n"]),
                 max_size=300).map("".join)


@settings(max_examples=40, deadline=None)
@given(text=TEXTS)
def test_a_document_read_in_blocks_encodes_as_it_would_whole(text):
    import tempfile
    tok = _BPE
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "doc.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        saved = sources.BLOCK_CHARS
        sources.BLOCK_CHARS = 16
        try:
            blocks = list(sources._text_blocks(sources.Path(path), "strict"))
        finally:
            sources.BLOCK_CHARS = saved
    assert "".join(blocks) == text
    assert [i for b in blocks for i in tok.encode(b)] == tok.encode(text)


_BPE = BPETokenizer.train(TEXT * 3 + "ab xy don't it's 99 é 🙂 \t\n", 330)


def test_streaming_bpe_learns_the_vocabulary_of_the_in_memory_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_CHARS", 4096)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog's", "42", "naïve", "café", "!", "—"]
    rng = np.random.default_rng(0)
    text = "".join(words[i] + (" " if j % 9 else "\n") for j, i in enumerate(rng.integers(0, len(words), 60_000)))
    (tmp_path / "big.txt").write_text(text)
    ds = Dataset(prepare(str(tmp_path / "big.txt"), tmp_path / "data", tokenizer="bpe:400", workers=2).path)
    assert ds.tokenizer.ranks == BPETokenizer.train(text, 400).ranks
    train, val = ds.tokens("train"), ds.tokens("val")
    assert list(train) + list(val) == ds.tokenizer.encode(text) + [ds.tokenizer.eot_id]
    sampled = Dataset(prepare(str(tmp_path / "big.txt"), tmp_path / "sampled", tokenizer="bpe:400",
                              tokenizer_sample=10_000).path)
    assert sampled.meta["tokenizer_sample"] == 10_000 and sampled.tokenizer.ranks != ds.tokenizer.ranks


def test_shards_are_read_as_one_sequence_and_batches_equal_one_files(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT * 5)
    one = Dataset(prepare(str(path), tmp_path / "one").path)
    many = Dataset(prepare(str(path), tmp_path / "many", shard_tokens=1000).path)
    shards = many.meta["shards"]["train"]
    assert len(shards) > 5 and shards[0] == {"file": "train-00000.bin", "tokens": 1000}
    assert one.meta["shards"]["train"] == [{"file": "train.bin", "tokens": one.meta["train_tokens"]}]
    tokens = many.tokens("train")
    assert isinstance(tokens, ShardedTokens) and len(tokens) == len(one.tokens("train"))
    assert np.array_equal(tokens[990:2010], one.tokens("train")[990:2010])
    assert np.array_equal(many.tokens("val")[:], one.tokens("val")[:])
    for step in range(5):
        for a, b in zip(get_batch(tokens, 8, 300, seed=3, step=step), get_batch(one.tokens("train"), 8, 300, 3, step)):
            assert torch.equal(a, b)


def test_training_on_shards_equals_training_on_one_file(tmp_path):
    import lmforge
    from lmforge.config import TrainConfig
    path = tmp_path / "c.txt"
    path.write_text(TEXT * 5)
    losses = []
    for name, shard in (("one", 10**9), ("many", 700)):
        data = prepare(str(path), tmp_path / f"d-{name}", shard_tokens=shard).path
        cfg = TrainConfig(data=str(data), out=str(tmp_path / f"r-{name}"), model={"preset": "tiny"}, max_steps=4,
                          batch_size=4, block_size=64, eval_interval=4, eval_steps=2, progress=False, seed=1,
                          sample_tokens=0)
        lmforge.train(cfg)
        losses.append([json.loads(line).get("loss") for line in open(tmp_path / f"r-{name}" / "metrics.jsonl")])
    assert losses[0] == losses[1]


def test_sources_of_every_kind(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha text\n")
    (folder / "b.md").write_text("# beta\n")
    with gzip.open(folder / "c.txt.gz", "wt") as f:
        f.write("gamma gz\n")
    (folder / "d.jsonl").write_text('{"body": "delta one"}\n\n{"body": "delta two"}\n')
    (folder / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"body": "epsilon"}\n'))
    pq.write_table(pa.table({"body": ["zeta", None, "eta"]}), folder / "f.parquet")
    (folder / "ignored.csv").write_text("x,y\n")
    docs, _ = load_documents(str(folder), text_field="body")
    assert [t for _, t in docs] == ["alpha text\n", "# beta\n", "gamma gz\n", "delta one", "delta two", "epsilon",
                                    "zeta", "eta"]
    ds = Dataset(prepare(str(folder), tmp_path / "out", text_field="body", split="tail").path)
    assert ds.meta["documents"] == 8
    text = ds.tokenizer.decode(list(ds.tokens("train")) + list(ds.tokens("val")))
    assert text == "<|endoftext|>".join(t for _, t in docs) + "<|endoftext|>"
    globbed, _ = load_documents(str(folder / "*.jsonl*"), text_field="body")
    assert [t for _, t in globbed] == ["delta one", "delta two", "epsilon"]
    rows = Dataset(prepare(str(folder / "d.jsonl"), tmp_path / "rows", text_field="body").path)
    assert rows.meta["kind"] == "tokens" and rows.meta["split"].startswith("tail")  # 2 rows: none hashed to val


def test_hf_sources_stream_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "hub-like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i} " + TEXT[:80]}) + "\n"
                                                for i in range(30)))
    ds = Dataset(prepare(f"hf:{folder}", tmp_path / "out", tokenizer="char").path)
    assert ds.meta["documents"] == 30 and ds.meta["source"] == f"hf:{folder}"
    with pytest.raises(ValueError, match="no 'story' field"):
        prepare(f"hf:{folder}", tmp_path / "out2", text_field="story")


@pytest.mark.parametrize("files,message", [
    ({"x.jsonl": '{"text": "ok"}\n{"title": "no text"}\n'}, "line 2 has no 'text' field"),
    ({"x.jsonl": '{"text": "ok"}\n{"text": 5}\n'}, "line 2: 'text' is int"),
    ({"x.jsonl": '{"text": "ok"}\nnot json\n'}, "line 2 is not JSON"),
    ({"x.txt.gz": b"not gzip at all"}, "cannot be read"),
    ({"a.txt": "fine text\n", "b.txt": b"ok \xc3\x28 bad"}, "b.txt is not valid UTF-8 at byte offset 3"),
    ({"x.jsonl": b'{"text": "ok"}\n{"text": "\xff"}\n'}, "line 2 is not valid UTF-8"),
    ({"x.parquet": b"PAR1 not really"}, "not a readable parquet file"),
])
def test_bad_corpora_are_one_line_errors(tmp_path, files, message):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        prepare(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_streams_a_corpus_larger_than_its_memory_allows(tmp_path):
    """A 150 MB corpus prepared with the address space capped at what the process needed before plus 100 MB."""
    corpus = tmp_path / "big.txt"
    line = (TEXT.replace("\n", " ") + "\n").encode()
    with open(corpus, "wb") as f:
        for _ in range(150_000_000 // len(line)):
            f.write(line)
    script = f"""
import resource, lmforge.data
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 100 * 2**20, resource.RLIM_INFINITY))
try:
    bytearray(150 * 2**20)
    raise SystemExit("the cap did not hold")
except MemoryError:
    pass
meta = lmforge.data.prepare({str(corpus)!r}, {str(tmp_path / "out")!r}, workers=1).meta
print(meta["train_tokens"] + meta["val_tokens"])
"""
    # one malloc arena: each extra one reserves 64 MB of address space, counted against the cap though never used
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) == corpus.stat().st_size + 1


def test_a_killed_prepare_leaves_no_folder_that_looks_complete(tmp_path):
    corpus = tmp_path / "big.txt"
    corpus.write_text(TEXT * 150_000)
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "prepare", str(corpus), "--out", str(tmp_path / "out"),
                             "--tokenizer", "bpe:300", "--workers", "2"])
    time.sleep(4)
    assert proc.poll() is None, "prepare finished before it could be killed; make the corpus bigger"
    proc.kill()
    proc.wait()
    assert not (tmp_path / "out").exists()
    assert not any((p / "meta.json").exists() for p in tmp_path.iterdir() if p.is_dir())


def test_review_cases_truncated_zst_empty_validation_names_and_odd_rows(tmp_path):
    import zstandard
    body = "".join(f"some line of text number {i}\n" for i in range(20000)).encode()
    (tmp_path / "t.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(body)[:-3000])
    with pytest.raises(ValueError, match="t.txt.zst cannot be read .*truncated"):
        prepare(str(tmp_path / "t.txt.zst"), tmp_path / "o1")
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(9):
        (folder / f"{i}.txt").write_text(TEXT[i:])
    (folder / "zz_empty.txt").write_text("  \n")
    ds = Dataset(prepare(str(folder), tmp_path / "o2").path)  # the validation file holds no text: the tail instead
    assert ds.meta["val_tokens"] > 0 and ds.meta["split"].startswith("tail") and ds.meta["documents"] == 9
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["hello there", "", "   ", None, "bye now"]))
    small = Dataset(prepare(str(rows), tmp_path / "o3").path)  # 2 documents: no row hashes to val, so the tail
    assert small.meta["documents"] == 2 and small.meta["val_tokens"] > 0
    assert small.tokenizer.decode(list(small.tokens("train")) + list(small.tokens("val"))) == \
        "hello there<|endoftext|>bye now<|endoftext|>"
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"text": f"row {i} " + TEXT[:50]}) + "\n" for i in range(200)))
    a = Dataset(prepare(str(many), tmp_path / "a").path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        b = Dataset(prepare("many.jsonl", tmp_path / "b").path)  # the same rows, the path typed differently
    finally:
        os.chdir(cwd)
    assert a.meta["val_tokens"] == b.meta["val_tokens"] > 0
    assert a.meta["split"].startswith("documents: a document is validation when crc32")
    (tmp_path / "notes[1].txt").write_text(TEXT)
    assert Dataset(prepare(str(tmp_path / "notes[1].txt"), tmp_path / "o4").path).meta["documents"] == 1
    (tmp_path / "s.jsonl").write_text('{"text": "broken \\ud83d emoji"}\n')
    with pytest.raises(ValueError, match="s.jsonl line 1: 'text' holds invalid Unicode"):
        prepare(str(tmp_path / "s.jsonl"), tmp_path / "o5")
    with pytest.raises(ValueError, match="--tokenizer-sample is for bpe"):
        prepare(str(rows), tmp_path / "o6", tokenizer_sample=10)


def test_a_line_of_cjk_text_is_cut_where_it_encodes_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_CHARS", 64)
    text = "这是一个测试句子。\n" * 40 + "helloworld" * 30 + "\n"
    (tmp_path / "cjk.txt").write_text(text)
    blocks = list(sources._text_blocks(tmp_path / "cjk.txt", "strict"))
    assert "".join(blocks) == text and len(blocks) > 3
    assert [i for b in blocks for i in _BPE.encode(b)] == _BPE.encode(text)
