"""Items per second of an lm-eval multiple-choice task: `lmforge evaluate` (batched forward passes of our model)
against lm-eval's own `hf` model on the run's exported folder (transformers), same model, same task, CPU.

The model is the demo's (the nano preset with RoPE, SwiGLU, RMSNorm; 10.7M parameters, character vocabulary),
random weights; the task is 200 HellaSwag-shaped items written from Shakespeare's text: half a line as context,
four 40-character endings. Each side runs in a process of its own, with its default batch size (ours 16, lm-eval's
hf model 1); lm-eval's hf model at batch size 16 is shown beside it. Seconds are the evaluation call's alone
(imports and process start excluded; loading the model and the task included on both sides).

    python benchmarks/evaluate.py [--items 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROUTES = {
    "lmforge evaluate (batch 16, default)": (
        "from lmforge.evaluate import evaluate\n"
        "r = evaluate(RUN, ['bench_mc'], include_path=TASKS)"),
    "lm-eval hf on the export (batch 1, default)": (
        "from lm_eval import simple_evaluate\nfrom lm_eval.tasks import TaskManager\n"
        "r = simple_evaluate(model='hf', model_args=f'pretrained={HF},dtype=float32', tasks=['bench_mc'], "
        "device='cpu', task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))"),
    "lm-eval hf on the export (batch 16)": (
        "from lm_eval import simple_evaluate\nfrom lm_eval.tasks import TaskManager\n"
        "r = simple_evaluate(model='hf', model_args=f'pretrained={HF},dtype=float32', tasks=['bench_mc'], "
        "device='cpu', batch_size=16, task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))"),
}


def build(root: Path, items: int) -> None:
    import torch

    from lmforge import GPT, CharTokenizer, ModelConfig
    from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic
    from lmforge.hf import export_hf
    from lmforge.sources import shakespeare_documents
    text = "".join(body for _, body in shakespeare_documents())
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 60]
    tok = CharTokenizer.train(text)
    cfg = ModelConfig.preset("nano", vocab_size=tok.vocab_size, position="rope", mlp="swiglu", norm="rmsnorm",
                             bias=False, block_size=128)
    run = root / "run"
    run.mkdir()
    write_json_atomic(run / "config.json", run_config(cfg))
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    save_checkpoint(run, weights_for_saving(GPT(cfg).state_dict(), True), {"step": 0}, run_config(cfg))
    export_hf(run, root / "hf")
    rng = random.Random(0)
    rows = []
    for line in rng.sample(lines, items):
        cut = len(line) // 2
        ending = line[cut:cut + 40]
        others = [o[len(o) // 2:len(o) // 2 + 40] for o in rng.sample(lines, 3)]
        choices = [ending] + others
        rng.shuffle(choices)
        rows.append({"context": line[:cut], "choices": choices, "label": choices.index(ending)})
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def timed(code: str, root: Path, threads: int) -> tuple[float, float]:
    """(seconds, accuracy) of code in a fresh Python."""
    script = (f"import time, torch\nfrom pathlib import Path\ntorch.set_num_threads({threads})\n"
              f"RUN, HF, TASKS = Path({str(root / 'run')!r}), Path({str(root / 'hf')!r}), Path({str(root / 'tasks')!r})\n"
              "import lm_eval, lm_eval.models.huggingface, lmforge.evaluate\n"
              f"t = time.perf_counter()\n{code}\n"
              "print(time.perf_counter() - t, r['results']['bench_mc']['acc,none'])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    seconds, accuracy = done.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.items)
        rows = {name: timed(code, root, args.threads) for name, code in ROUTES.items()}
    ours = args.items / next(iter(rows.values()))[0]
    print(f"{args.items} items x 4 choices, {args.threads} threads")
    print(f"{'route':48} {'seconds':>8} {'items/s':>8} {'ours is':>8} {'acc':>6}")
    for name, (seconds, accuracy) in rows.items():
        rate = args.items / seconds
        print(f"{name:48} {seconds:8.2f} {rate:8.1f} {ours / rate:7.2f}x {accuracy:6.3f}")


if __name__ == "__main__":
    main()
