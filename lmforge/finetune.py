"""Fine-tuning a run on prompt->completion pairs or conversations, or on preference rows with DPO (dpo.py), fully or
with LoRA, through the training loop (train.py); merging an adapter back into its base (pair_eval.py scores a run on
held-out pairs by exact match).

    lmforge finetune runs/base --data pairs.jsonl --out runs/tuned [--lora-rank 8] [--lr=1e-3 ...]
    lmforge finetune runs/tuned --data prefs.jsonl --out runs/dpo --method dpo [--beta 0.1]
    lmforge merge runs/tuned --out runs/merged
    lmforge eval runs/tuned --pairs test.jsonl                                          (pair_eval.py)

finetune builds a TrainConfig whose model is the base run's, init_from the base run, and (with --lora-rank) LoRA
settings; then it is an ordinary training run: checkpoints, exact resume (`lmforge train --resume runs/tuned`),
evaluation, curves and samples all come from the same loop. A .jsonl given as --data is prepared into
RUN2/data with the base run's tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import complete_checkpoints, new_folder, run_config, weights_for_saving, write_json_atomic
from .config import ModelConfig, TrainConfig
from .data import Dataset, prepare
from .errors import UserError
from .lora import adapter_settings, merge_lora
from .runs import check_output, load, read_run_config, refuse_quantized
from .tokenizer import added_tokens, load_tokenizer
from .train import print_summary, train

# Settings that fit fine-tuning better than training's defaults; --field=value and --config override them.
FINETUNE_DEFAULTS = {"max_steps": 300, "warmup_steps": 20, "eval_interval": 50, "eval_steps": 10, "batch_size": 16,
                     "lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.0}
LORA_DEFAULTS = {"lr": 1e-2, "min_lr": 1e-3}  # a low-rank update of a frozen model takes larger steps
DPO_DEFAULTS = {"lr": 3e-5, "min_lr": 3e-6, "method": "dpo"}  # preferences move a tuned model a little; faster
DPO_LORA_DEFAULTS = {"lr": 3e-4, "min_lr": 3e-5}  # steps over-optimize (the rejected reply's tokens fall, not the rest)


def finetune_config(base: str | Path, data: str, out: str, overrides: dict | None = None,
                    config_file: str | None = None, lora: dict | None = None, method: str = "sft",
                    beta: float | None = None) -> TrainConfig:
    """The TrainConfig of fine-tuning base on data into out (lora: rank, alpha, targets, dropout, or None;
    method: sft, or dpo with beta)."""
    import tomllib
    base_cfg = read_run_config(Path(base))
    refuse_quantized(base, base_cfg)
    model = ModelConfig.from_dict(base_cfg["model"])
    given = {}  # only what the TOML file sets: its absent fields keep the fine-tuning defaults
    if config_file:
        with open(config_file, "rb") as f:
            given = {k: v for k, v in tomllib.load(f).items() if k != "model"}
    overrides = dict(overrides or {})
    uses_lora = bool(lora) or int(given.get("lora_rank", 0)) > 0 or int(overrides.get("lora_rank", 0) or 0) > 0
    dpo = method == "dpo" or given.get("method") == "dpo" or overrides.get("method") == "dpo"
    values = {**FINETUNE_DEFAULTS, **(LORA_DEFAULTS if uses_lora else {}), "block_size": model.block_size,
              "sample_prompt": ""}
    if dpo:
        values.update({**DPO_DEFAULTS, **(DPO_LORA_DEFAULTS if uses_lora else {})})
    if beta is not None:
        values["dpo_beta"] = beta
    values.update({f"lora_{k}": v for k, v in (lora or {}).items()})
    values.update(given)
    values.update(data=str(Path(data).resolve()), out=str(out), init_from=str(Path(base).resolve()),
                  model=model.to_dict())
    return TrainConfig.from_dict(values).with_overrides(overrides)


def finetune(base: str | Path, data: str, out: str, val: str | None = None, overrides: dict | None = None,
             config_file: str | None = None, lora: dict | None = None, resume: bool = False, method: str = "sft",
             beta: float | None = None, max_len: int | None = None) -> dict:
    """Fine-tune base on data: a prepared folder, or a .jsonl prepared here with the base's tokenizer (pairs,
    conversations, or with method="dpo" preference rows)."""
    if method not in ("sft", "dpo"):
        raise UserError(f"--method {method!r} must be sft or dpo")
    base, out = Path(base), Path(out)
    read_run_config(base)
    if out.resolve() == base.resolve() or base.resolve() in out.resolve().parents:
        raise UserError(f"--out {out} would write into the base run {base}; pick a folder of its own")
    if val and not str(data).endswith(".jsonl"):
        raise UserError("--val goes with a .jsonl --data; a prepared folder has its own validation split")
    if out.exists() and any(out.iterdir()) and not resume:
        if str((overrides or {}).get("overwrite", "false")).lower() not in ("true", "1", "yes"):
            raise UserError(f"{out} already exists; pick another --out, or pass --overwrite=true to start over")
        shutil.rmtree(out)  # start over: nothing of the old run (adapter or weights) may linger beside the new one
    created = not out.exists()
    try:
        return _finetune(base, data, out, val, overrides, config_file, lora, resume, method, beta, max_len)
    except BaseException:
        if created and out.exists() and not complete_checkpoints(out):  # a failed start leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _finetune(base: Path, data: str, out: Path, val, overrides, config_file, lora, resume: bool, method: str,
              beta, max_len) -> dict:
    if str(data).endswith(".jsonl"):
        prepared = out / "data"
        if not resume:
            prepared = prepare(str(data), prepared, tokenizer_from=str(base / "tokenizer.json"), val_pairs=val,
                               force=True, max_len=max_len).path
    else:
        prepared = Path(data)
    dataset = Dataset(prepared)
    added = added_tokens(load_tokenizer(base / "tokenizer.json"), dataset.tokenizer)
    if added is None:
        raise UserError(f"the tokenizer of {dataset.path} differs from {base}'s; prepare the data with "
                        f"--tokenizer-from {base}")
    cfg = finetune_config(base, str(prepared), str(out), overrides, config_file, lora, method, beta)
    if added and not cfg.lora_rank:  # (with LoRA, train() refuses new rows)
        print(f"added {', '.join(added)} to the tokenizer and the model's embedding (the chat template's tokens)")
    if dataset.kind in ("pairs", "preferences"):
        long = int((dataset.index("train")[:, 2] > cfg.block_size + 1).sum())
        if long:
            what = ("pairs are longer than the context ({} tokens): their prompts are cut from the left"
                    if dataset.targets("train") is None else
                    "sequences are longer than the context ({} tokens): they are cut from the left")
            print(f"{long} of {len(dataset.index('train'))} training {what.format(cfg.block_size)}")
    summary = train(cfg, resume=resume)
    summary["trainable"], summary["total"] = _parameter_counts(cfg)
    summary["lora"] = cfg.lora_rank > 0
    return summary


def _parameter_counts(cfg: TrainConfig) -> tuple[int, int]:
    model, _ = load(cfg.out)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) if cfg.lora_rank else None
    total = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return trainable or total, total


def merge(run: str | Path, out: str | Path, force: bool = False) -> Path:
    """A LoRA run's adapter folded into its base's weights, written as an ordinary weights-only run."""
    run, out = Path(run), Path(out)
    if adapter_settings(run) is None:
        raise UserError(f"{run} has no LoRA adapter (adapter_config.json); only a LoRA run can be merged")
    out = check_output(run, out, force)
    model, tokenizer = load(run)
    merge_lora(model)
    config = read_run_config(run)
    from safetensors.torch import save_file
    with new_folder(out) as tmp:
        save_file(weights_for_saving(model.state_dict(), model.config.tie_embeddings), str(tmp / "model.safetensors"))
        merged = run_config(model.config)
        merged["merged_from"] = str(run.resolve())
        if "chat_template" in config:
            merged["chat_template"] = config["chat_template"]
        write_json_atomic(tmp / "config.json", merged)
        tokenizer.save(tmp / "tokenizer.json")
    return out


# ------------------------------------------------------------------------------------------------------------ CLI

def finetune_cli(args) -> int:
    from .config import parse_overrides
    lora = None
    if args.lora_rank:
        lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets,
                "dropout": args.lora_dropout}
    summary = finetune(args.run, args.data, args.out, args.val, parse_overrides(args.overrides), args.config, lora,
                       method=args.method, beta=args.beta, max_len=args.max_len)
    print_summary(summary)
    out = Path(args.out)
    if summary["lora"]:
        size = (out / "adapter.safetensors").stat().st_size
        full = (Path(args.run) / "model.safetensors")
        full = full if full.is_file() else next(Path(args.run).rglob("model.safetensors"), None)
        ratio = f", {size / full.stat().st_size:.2%} of the model's {full.stat().st_size / 1e6:.1f} MB" if full else ""
        print(f"LoRA: {summary['trainable']:,} trainable parameters of {summary['total']:,} "
              f"({summary['trainable'] / summary['total']:.2%}); adapter {size / 1e6:.2f} MB{ratio}")
    return 0


def merge_cli(args) -> int:
    out = merge(args.run, args.out, args.force)
    print(f"merged {args.run} into {out}")
    return 0
