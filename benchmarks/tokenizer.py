"""Tokenizer speed, side by side in one process on the built-in Shakespeare corpus (~5 MB):

- BPE training to 8,192 tokens: lmforge (pure Python, incremental) vs HF `tokenizers` ByteLevelBPE (Rust).
- Encoding MB/s: our fast path (our ranks in tiktoken's core) vs tiktoken's GPT-2 encoding, and our pure-Python
  reference encoder for scale.

    python benchmarks/tokenizer.py [--vocab 8192] [--repeat 3]
"""

import argparse
import time

from lmforge.data import shakespeare_documents
from lmforge.download import file_from_pypi_sdist
from lmforge.tokenizer import EOT, GPT2_PATTERN, GPT2_TIKTOKEN_SHA256, BPETokenizer


def best_of(repeat, fn):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    text = "".join(t for _, t in shakespeare_documents())
    mb = len(text.encode()) / 1e6
    print(f"corpus: {mb:.2f} MB, {len(text):,} characters")

    ours_s, ours = best_of(1, lambda: BPETokenizer.train(text, args.vocab, progress=False))
    from tokenizers import ByteLevelBPETokenizer

    def hf_train():
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator([text], vocab_size=args.vocab, min_frequency=1, special_tokens=[EOT],
                                show_progress=False)
        return tok
    hf_s, _ = best_of(1, hf_train)

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    path = file_from_pypi_sdist("openai-whisper", "20250625", "whisper/assets/gpt2.tiktoken", GPT2_TIKTOKEN_SHA256)
    gpt2 = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(path)),
                             special_tokens={EOT: 50256})
    ours.encode(text[:1000])
    fast_s, ids = best_of(args.repeat, lambda: ours.encode(text))
    tik_s, _ = best_of(args.repeat, lambda: gpt2.encode_ordinary(text))
    ref_s, ref_ids = best_of(1, lambda: ours.encode_reference(text))
    assert ids == ref_ids, "fast and reference encoders disagree"

    print("\n| task | lmforge | reference peer | ratio |\n|---|---|---|---|")
    print(f"| BPE training to {args.vocab:,} tokens | {ours_s:.2f} s | HF tokenizers {hf_s:.2f} s | "
          f"{ours_s / hf_s:.2f}x the peer's time (target <= 5x) |")
    print(f"| encoding, fast path | {mb / fast_s:.1f} MB/s | tiktoken GPT-2 {mb / tik_s:.1f} MB/s | "
          f"{tik_s / fast_s:.2f}x the peer's speed (target >= 0.8x) |")
    print(f"| encoding, pure-Python reference | {mb / ref_s:.1f} MB/s | | ids identical to the fast path |")


if __name__ == "__main__":
    main()
