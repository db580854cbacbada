"""Checkpoints: tensors and JSON written atomically, and read back with their errors named. Knows no run kinds
(runs.py reads a run folder of any kind).

    runs/NAME/
      config.json  tokenizer.json  metrics.jsonl  curves.png  samples.txt
      model.safetensors  trainer_state.pt      the latest checkpoint (hard links into checkpoints/)
      checkpoints/step-000500/                 the last K checkpoints: model.safetensors, trainer_state.pt, config.json
      best/                                    the checkpoint with the lowest validation loss

A checkpoint folder is written under a temporary name, fsynced, and renamed: it either exists whole or not at all,
so a crash at any moment leaves the last complete one. Weights are safetensors (never pickle); the trainer state is
loaded with weights_only=True.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import MissingFileError, UserError
from .version import __version__

CHECKPOINTS = "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Point dst at src's content atomically (hard link where the filesystem allows it)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    tmp.replace(dst)


def publish_folder(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; an old out is first moved aside under a fresh name (so nothing else is
    ever in the way), then removed."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.replace(trash / out.name)
        tmp.replace(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.replace(out)


@contextlib.contextmanager
def new_folder(out: Path):
    """A temporary folder beside out, published as out (replacing it) when the block ends without an error; on an
    error (or Ctrl-C) nothing is left behind and out is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        publish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_config(model_config, train_config=None) -> dict:
    """What a run's config.json holds: the model config, the training config (or None) and lmforge's version."""
    return {"lmforge_version": __version__, "model": model_config.to_dict(),
            "train": train_config.to_dict() if train_config is not None else None}


def weights_for_saving(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """A state dict safetensors can hold: contiguous CPU tensors, the tied output matrix stored once (as wte)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}


WEIGHT_FILES = ("model.safetensors", "adapter.safetensors")  # a whole model, or a LoRA adapter on a base run


def save_checkpoint(run: Path, weights: dict[str, torch.Tensor], trainer_state: dict, config: dict,
                    keep_last: int = 2, is_best: bool = False, weights_name: str = "model.safetensors",
                    extra: dict[str, dict] | None = None) -> Path:
    """Write checkpoints/step-N atomically, point the run's top-level files at it, keep the last K and the best.
    weights_name: model.safetensors, or adapter.safetensors for a LoRA run; extra: more JSON files to write."""
    step = trainer_state["step"]
    root = run / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    try:
        save_file(weights, str(tmp / weights_name), metadata={"format": "pt", "step": str(step)})
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved again (a resumed run repeating its last save)
            shutil.rmtree(final)
        tmp.replace(final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in (weights_name, "trainer_state.pt", *(extra or {})):
        _link_or_copy(final / name, run / name)
    if is_best:
        best_tmp = Path(tempfile.mkdtemp(prefix=".tmp-best-", dir=run))
        for f in final.iterdir():
            _link_or_copy(f, best_tmp / f.name)
        (best_tmp / "best.json").write_text(json.dumps({"step": step, "val_loss": trainer_state.get("best_val")}) + "\n")
        old = run / ".best-old"
        shutil.rmtree(old, ignore_errors=True)
        if (run / "best").exists():
            (run / "best").replace(old)
        best_tmp.replace(run / "best")
        shutil.rmtree(old, ignore_errors=True)
    for stale in complete_checkpoints(run)[:-max(keep_last, 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in root.glob(".tmp-step-*"):  # from an earlier crash
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def complete_checkpoints(run: Path) -> list[Path]:
    """Checkpoint folders that finished writing, oldest first."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and any((p / w).is_file() for w in WEIGHT_FILES) and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run: Path) -> Path:
    found = complete_checkpoints(run)
    if not found:
        raise MissingFileError(f"{run} holds no complete checkpoint; train first (lmforge train) or check the path")
    return found[-1]


def load_weights(model, path: Path, new_rows: bool = False) -> None:
    """Load safetensors weights into model (tied weights are stored once). new_rows: the model's vocabulary may
    hold more rows than the weights (tokens added to the tokenizer); each new row of the embedding and output layer
    starts as the mean of the old rows (as transformers' resize_token_embeddings does)."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupted or not a safetensors file ({e}); resume from another checkpoint") from None
    if model.config.tie_embeddings:
        if "lm_head.weight" not in state and "wte.weight" in state:
            state["lm_head.weight"] = state["wte.weight"]
        if "wte.weight" not in state and "lm_head.weight" in state:
            state["wte.weight"] = state["lm_head.weight"]
    shapes = model.state_dict()
    if new_rows:
        for key in ("wte.weight", "lm_head.weight"):
            old, want = state.get(key), shapes.get(key)
            if old is not None and want is not None and old.shape[1:] == want.shape[1:] and old.shape[0] < want.shape[0]:
                mean = old.float().mean(0, keepdim=True).to(old.dtype)
                state[key] = torch.cat([old, mean.expand(want.shape[0] - old.shape[0], -1)])
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(shapes[k].shape)}" for k, v in state.items()
             if k in shapes and v.shape != shapes[k].shape]
    if wrong:
        raise UserError(f"{path} does not fit this model: shapes differ ({'; '.join(wrong[:3])}); keep the model "
                        f"settings (block_size, widths) the weights were trained with")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                         "the checkpoint belongs to another configuration")
    model.tie_weights()


def load_trainer_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch all raise their own types
        raise UserError(f"{path} is corrupted ({type(e).__name__}); resume from another checkpoint") from None
