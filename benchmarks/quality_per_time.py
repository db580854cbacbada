"""Quality per unit of training time on a CPU: nanoGPT's documented CPU recipe vs our best CPU recipe, same data,
same machine, same wall-clock budget, run one after the other in one process.

Data: tinyshakespeare with nanoGPT's split (first 90% of characters train, last 10% validation), char-level.
The baseline is nanoGPT's CPU command reproduced in lmforge (4 x 128, context 64, batch 12, 2000 iterations); our
recipe then gets exactly the baseline's measured training time (max_seconds) and we compare final validation losses.

    python benchmarks/quality_per_time.py [--text ../shared/data/tinyshakespeare.txt] [--recipe configs/X.toml]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from lmforge.config import TrainConfig
from lmforge.data import Dataset, prepare
from lmforge.train import train

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--baseline", default=str(ROOT / "configs" / "nanogpt-cpu.toml"))
    ap.add_argument("--recipe", default=str(ROOT / "configs" / "shakespeare-char.toml"))
    ap.add_argument("--budget", type=float, default=0, help="seconds for our recipe (default: the baseline's time)")
    ap.add_argument("--skip-baseline", action="store_true", help="use --budget and skip the nanoGPT run")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-quality"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    data = work / "tinyshakespeare-char"
    if not (data / "meta.json").is_file():
        prepare(args.text, data, tokenizer="char", split="tail", val_fraction=0.1, force=True)
    meta = Dataset(data).meta
    print(f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens ({meta['split']})")

    results = []
    budget = args.budget
    if not args.skip_baseline:
        base = TrainConfig.from_toml(args.baseline).with_overrides(
            {"data": str(data), "out": str(work / "baseline"), "overwrite": True, "sample_tokens": 0})
        s = train(base)
        budget = budget or s["train_seconds"]
        results.append(("nanoGPT CPU recipe", base, s))
    ours = TrainConfig.from_toml(args.recipe).with_overrides(
        {"data": str(data), "out": str(work / "ours"), "overwrite": True, "max_seconds": budget, "sample_tokens": 0})
    results.append(("lmforge CPU recipe", ours, train(ours)))

    print("\n| run | model | steps | train s | tokens | val loss |\n|---|---|---|---|---|---|")
    for name, cfg, s in results:
        m = cfg.model_config({"vocab_size": meta["vocab_size"]})
        shape = f"{m.n_layer}x{m.n_embd} {m.position}/{m.mlp}/{m.norm}, ctx {m.block_size}, batch {cfg.batch_size}"
        print(f"| {name} | {shape} | {s['step']} | {s['train_seconds']:.0f} | {s['tokens']:,} | {s['val_loss']:.4f} |")
    (work / "results.json").write_text(json.dumps([{"name": n, "config": c.to_dict(), **s} for n, c, s in results],
                                                  indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
