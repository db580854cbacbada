"""Does prompt->completion training learn? Two measurements on this machine's CPU.

1. From scratch: a synthetic mapping with a held-out test split. Prompt: a random lowercase word of 3-10 letters
   and "=", completion: the word reversed. 1,000 test words never appear in training. A small model (4 x 128,
   RoPE, SwiGLU, RMSNorm) trains on the completion-only loss for --seconds of training, saving checkpoints on the way;
   each checkpoint's exact match on the held-out words is plotted against its training time (seq2seq.png).
2. LoRA: a char model pretrained on Shakespeare (--pretrain-seconds), then taught a format it has never seen:
   "lower: <a line>\\nupper: " -> the line in capitals, on held-out lines. Exact match before and after, LoRA
   (rank 8 on attn+mlp) against full fine-tuning for the same training time, with trainable parameters, the file
   sizes, and each process's peak RSS.

    python benchmarks/seq2seq.py [--seconds 240] [--pretrain-seconds 120] [--tune-seconds 90] [--skip-lora]
"""

import argparse
import json
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmforge
from lmforge.data import prepare, read_pairs
from lmforge.pair_eval import evaluate_pairs
from lmforge.train import read_metrics


def write_pairs(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


def reversal_task(root: Path, n_train: int = 40_000, n_test: int = 1_000, seed: int = 0):
    rng = random.Random(seed)
    words = set()
    while len(words) < n_train + n_test:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10))))
    words = sorted(words)
    rng.shuffle(words)
    test, train = words[:n_test], words[n_test:]
    return (write_pairs(root / "train.jsonl", [(w + "=", w[::-1]) for w in train]),
            write_pairs(root / "test.jsonl", [(w + "=", w[::-1]) for w in test]))


def in_subprocess(code: str) -> tuple[dict, float]:
    """Run code (which prints one JSON line last) in a fresh interpreter: its result and its peak RSS in MB."""
    probe = ("import resource, subprocess, sys, json; p = subprocess.run([sys.executable, '-c', sys.argv[1]], "
             "capture_output=True, text=True); sys.stderr.write(p.stderr[-3000:]); "
             "print(p.stdout.strip().splitlines()[-1]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", probe, code], capture_output=True, text=True, check=True).stdout
    result, rss = out.strip().splitlines()[-2:]
    return json.loads(result), float(rss)


def from_scratch(root: Path, seconds: float):
    train_pairs, test_pairs = reversal_task(root)
    data = prepare(str(train_pairs), root / "data", tokenizer="char", val_fraction=0.02).path
    cfg = lmforge.TrainConfig(
        data=str(data), out=str(root / "reverse"), model={"preset": "modern-tiny", "n_kv_head": 4},
        block_size=32, batch_size=128, max_steps=1_000_000, max_seconds=seconds, lr=3e-3, min_lr=1e-4,
        warmup_steps=100, optimizer="muon", weight_decay=0.0, eval_interval=300, eval_steps=4, keep_last=100,
        sample_tokens=16, progress=False, seed=1)
    t = time.perf_counter()
    summary = lmforge.train(cfg)
    wall = time.perf_counter() - t
    test = read_pairs(test_pairs)
    points = []
    for ckpt in sorted((root / "reverse" / "checkpoints").glob("step-*")):
        model, tok = lmforge.load(root / "reverse", checkpoint=str(ckpt))
        step = int(ckpt.name.split("-")[1])
        seconds_at = next(r["train_seconds"] for r in read_metrics(root / "reverse") if r.get("step") == step
                          and "train_seconds" in r)
        points.append((seconds_at, step, evaluate_pairs(model, tok, test)["exact_match"]))
    print("\n1. reversing held-out words, trained from scratch (completion-only loss)")
    print(f"   {summary['step']} steps, {summary['train_seconds']:.0f} s of training ({wall:.0f} s wall with evals)")
    print("| training s | step | held-out exact match |\n|---|---|---|")
    for s, step, em in points:
        print(f"| {s:.0f} | {step} | {em:.1%} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in points], [100 * p[2] for p in points], "o-")
    ax.axhline(99, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("training seconds (2-core CPU)")
    ax.set_ylabel("exact match on held-out words (%)")
    ax.set_title("reversing unseen words, trained from scratch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("seq2seq.png"), dpi=100)
    return points


def lora_vs_full(root: Path, pretrain_seconds: float, tune_seconds: float):
    data = prepare("shakespeare", root / "shakespeare", tokenizer="char").path
    lmforge.train(lmforge.TrainConfig(
        data=str(data), out=str(root / "base"), model={"preset": "modern-tiny"}, block_size=128, batch_size=32,
        max_steps=1_000_000, max_seconds=pretrain_seconds, lr=4e-3, min_lr=2e-4, optimizer="muon",
        eval_interval=500, eval_steps=5, sample_tokens=0, progress=False))
    lines = [ln.strip() for _, text in lmforge.data.shakespeare_documents() for ln in text.splitlines()
             if 20 <= len(ln.strip()) <= 48 and ln.strip().lower() != ln.strip().upper()]
    random.Random(0).shuffle(lines)
    rows = [(f"lower: {ln.lower()}\nupper: ", ln.upper()) for ln in lines[:6200]]
    train_pairs = write_pairs(root / "upper-train.jsonl", rows[:6000])
    test_pairs = write_pairs(root / "upper-test.jsonl", rows[6000:])
    code = """
import json, lmforge
from lmforge.data import read_pairs
from lmforge.finetune import finetune
from lmforge.pair_eval import evaluate_pairs
s = finetune({base!r}, {data!r}, {out!r}, overrides={overrides!r}, lora={lora!r})
model, tok = lmforge.load({out!r})
em = evaluate_pairs(model, tok, read_pairs(__import__('pathlib').Path({test!r})))["exact_match"]
print(json.dumps({{"exact_match": em, "trainable": s["trainable"], "total": s["total"], "seconds": s["train_seconds"],
                  "steps": s["step"]}}))
"""
    base_model, tok = lmforge.load(root / "base")
    before = evaluate_pairs(base_model, tok, read_pairs(test_pairs))["exact_match"]
    overrides = {"max_steps": "1000000", "max_seconds": str(tune_seconds), "eval_interval": "200", "batch_size": "32",
                 "progress": "false", "sample_tokens": "0"}
    results = {}
    for name, lora in (("LoRA r=8 attn+mlp", {"rank": 8, "alpha": 16, "targets": "attn,mlp", "dropout": 0.0}),
                       ("full fine-tuning", None)):
        out = root / name.split()[0].lower()
        results[name] = in_subprocess(code.format(base=str(root / "base"), data=str(train_pairs), out=str(out),
                                                  overrides=overrides, lora=lora, test=str(test_pairs)))
        weights = out / ("adapter.safetensors" if lora else "model.safetensors")
        results[name][0]["file_mb"] = weights.stat().st_size / 1e6
    print("\n2. a new format (lines to capitals) on a Shakespeare-pretrained char model, held-out lines")
    print(f"   before fine-tuning: exact match {before:.1%}")
    print("| | exact match | training s | steps | trainable params | saved file | peak RSS |\n|---|---|---|---|---|---|---|")
    for name, (r, rss) in results.items():
        print(f"| {name} | {r['exact_match']:.1%} | {r['seconds']:.0f} | {r['steps']} | {r['trainable']:,} of "
              f"{r['total']:,} | {r['file_mb']:.2f} MB | {rss:.0f} MB |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--pretrain-seconds", type=float, default=120)
    ap.add_argument("--tune-seconds", type=float, default=90)
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--skip-scratch", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    if not args.skip_scratch:
        from_scratch(root, args.seconds)
    if not args.skip_lora:
        lora_vs_full(root, args.pretrain_seconds, args.tune_seconds)


if __name__ == "__main__":
    main()
