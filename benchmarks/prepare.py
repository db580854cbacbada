"""Preparing a large corpus with GPT-2's tokenizer: throughput and peak memory, against the nanoGPT recipe.

The corpus is generated here: --mb megabytes of Shakespeare's works (the built-in corpus), as 1 MB text files with
numbered headers. Each side runs in a process of its own, timed wall-clock, with its peak RSS read from the kernel
(ru_maxrss of the largest process in its tree):

    lmforge prepare DIR --tokenizer gpt2 --workers N      streaming, a pool of N encoders, shards as needed
    the nanoGPT recipe                                    tiktoken's encode_ordinary in a multiprocessing.Pool over
                                                          the files, each file's ids + end-of-text as uint16, written
                                                          in order into one file (what nanoGPT's prepare.py does
                                                          through HF datasets' map and a memmap)

Both hold the same ids: the benchmark checks the train + val files against the recipe's file. It also times
single-threaded encoding of 20 MB: our BPETokenizer (its encode and the encode_array prepare uses) against
tiktoken's encode_ordinary with the same ranks. Last, it checks that a BPE vocabulary learned by the streaming
prepare (chunk counts gathered by the pool) equals BPETokenizer.train on the whole text in memory, on one file of
--bpe-mb megabytes.

    python benchmarks/prepare.py [--mb 200] [--workers 1 2] [--bpe-mb 100] [--bpe-vocab 4096]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.data import shakespeare_documents
from lmforge.tokenizer import BPETokenizer

RECIPE = r'''
import sys, multiprocessing as mp, numpy as np, tiktoken
from pathlib import Path
from lmforge.tokenizer import BPETokenizer, GPT2_PATTERN
tok = BPETokenizer.gpt2()
enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=tok.ranks, special_tokens={"<|endoftext|>": 50256})

def encode(path):
    ids = enc.encode_ordinary(Path(path).read_text(encoding="utf-8"))
    ids.append(enc.eot_token)
    return np.array(ids, dtype=np.uint16)

if __name__ == "__main__":
    folder, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    files = sorted(str(p) for p in Path(folder).glob("*.txt"))
    with mp.Pool(workers) as pool, open(out, "wb") as f:
        for ids in pool.imap(encode, files, chunksize=4):
            ids.tofile(f)
'''


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB of the largest process in its tree) of a command, in a fresh measuring process."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True).stdout
    seconds, rss = out.split()
    return float(seconds), float(rss)


def make_corpus(folder: Path, mb: int) -> int:
    text = "".join(t for _, t in shakespeare_documents())
    folder.mkdir()
    size, i = 0, 0
    while size < mb * 1_000_000:
        start = (i * 997_001) % (len(text) - 1_000_000)
        piece = f"Part {i}\n" + text[start:start + 1_000_000]
        (folder / f"{i:05d}.txt").write_text(piece, encoding="utf-8")
        size += len(piece.encode("utf-8"))
        i += 1
    return size


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bpe-mb", type=int, default=100, help="size of the BPE check's corpus (0: skip the check)")
    ap.add_argument("--bpe-vocab", type=int, default=4096)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    size = make_corpus(root / "corpus", args.mb)
    print(f"corpus: {size / 1e6:.0f} MB in {len(list((root / 'corpus').iterdir()))} files; GPT-2 tokenizer; "
          f"{os.cpu_count()} cores\n")

    tok = BPETokenizer.gpt2()
    sample = "".join(t for _, t in shakespeare_documents())[:20_000_000]
    enc = tok._fast()
    timings = {}
    for name, fn in (("tiktoken encode_ordinary", lambda: enc.encode_ordinary(sample)),
                     ("lmforge BPETokenizer.encode", lambda: tok.encode(sample)),
                     ("lmforge BPETokenizer.encode_array", lambda: tok.encode_array(sample))):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        timings[name] = len(sample.encode()) / best / 1e6
    base = timings["tiktoken encode_ordinary"]
    print("| single-threaded encode, 20 MB | MB/s | vs tiktoken |\n|---|---|---|")
    for name, mbs in timings.items():
        print(f"| {name} | {mbs:.1f} | {mbs / base:.2f}x |")

    rows = []
    script = root / "recipe.py"
    script.write_text(RECIPE)
    for workers in args.workers:
        out = root / f"recipe-{workers}.bin"
        seconds, rss = run_measured([sys.executable, str(script), str(root / "corpus"), str(out), str(workers)])
        rows.append(("nanoGPT recipe (tiktoken + Pool)", workers, seconds, rss))
        data = root / f"ours-{workers}"
        seconds, rss = run_measured([sys.executable, "-m", "lmforge", "prepare", str(root / "corpus"), "--tokenizer",
                                     "gpt2", "--workers", str(workers), "--out", str(data)])
        rows.append(("lmforge prepare", workers, seconds, rss))
        meta = json.loads((data / "meta.json").read_text())
        ours = np.concatenate([np.fromfile(data / f["file"], dtype=np.uint16)
                               for split in ("train", "val") for f in meta["shards"][split]])
        theirs = np.fromfile(out, dtype=np.uint16)
        assert np.array_equal(ours, theirs), "the two pipelines wrote different ids"
        (out.unlink(), __import__("shutil").rmtree(data))
    print(f"\nthe same {len(theirs):,} ids from both\n")
    print("| pipeline | workers | seconds | MB/s | peak RSS (largest process) |\n|---|---|---|---|---|")
    recipe = {w: s for name, w, s, _ in rows if name.startswith("nanoGPT")}
    for name, workers, seconds, rss in rows:
        ratio = "" if name.startswith("nanoGPT") else f" ({recipe[workers] / seconds:.2f}x the recipe)"
        print(f"| {name} | {workers} | {seconds:.1f} | {size / seconds / 1e6:.1f}{ratio} | {rss:.0f} MB |")
    if args.bpe_mb:
        check_bpe(root, args.bpe_mb, args.bpe_vocab)
    __import__("shutil").rmtree(root)


def check_bpe(root: Path, mb: int, vocab: int):
    from lmforge.data import Dataset, prepare
    files = sorted((root / "corpus").glob("*.txt"))
    text = "".join(p.read_text(encoding="utf-8") for p in files)
    while len(text) < mb * 1_000_000:
        text += text
    text = text[:mb * 1_000_000]
    (root / "one.txt").write_text(text, encoding="utf-8")
    t = time.perf_counter()
    streamed = Dataset(prepare(str(root / "one.txt"), root / "bpe", tokenizer=f"bpe:{vocab}").path).tokenizer
    t_stream = time.perf_counter() - t
    t = time.perf_counter()
    in_memory = BPETokenizer.train(text, vocab)
    t_memory = time.perf_counter() - t
    same = streamed.ranks == in_memory.ranks
    print(f"\nBPE of {vocab} tokens on one {mb} MB file: streamed prepare (vocabulary + encoding) {t_stream:.0f} s, "
          f"in-memory BPETokenizer.train {t_memory:.0f} s; vocabularies {'EQUAL' if same else 'DIFFERENT'}")
    assert same


if __name__ == "__main__":
    main()
