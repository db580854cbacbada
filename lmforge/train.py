"""Training: one loop, readable top to bottom, inside train(cfg) so tests and the CLI call the same thing.

Every N steps it evaluates on fixed validation batches, writes a sample, redraws the curves and saves an atomic
checkpoint. A run resumes exactly: batches are a function of (seed, step), and the checkpoint holds the optimizer,
the step and the RNG states. Under torchrun it trains with DDP (or FSDP2 when asked); only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (complete_checkpoints, latest_checkpoint, load_trainer_state, load_weights, run_config,
                         save_checkpoint, weights_for_saving, write_json_atomic)
from .config import ModelConfig, TrainConfig
from .data import Dataset, get_batch, get_pair_batch
from .errors import MissingFileError, UserError
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_settings, apply_lora, load_lora_state, lora_state
from .model import GPT
from .runs import base_identity, check_device, model_folder, read_run_config, refuse_quantized


class TrainingError(UserError):
    """A run that cannot go on (diverged, incompatible resume): reported as one line."""


# --------------------------------------------------------------------------------------------------- small helpers

def progress(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """How far through its run step is, from 0 to 1: of max_steps, or of max_seconds when a time budget runs out
    first (a budgeted run still ends annealed, and depends on the machine's speed; a step-bounded one does not)."""
    done = step / max(1, cfg.max_steps)
    if cfg.max_seconds > 0:
        done = max(done, seconds / cfg.max_seconds)
    return min(1.0, done)


def lr_at(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """The learning rate of step (0-based), seconds of training into the run. Linear warmup to cfg.lr over
    warmup_steps, or over the first warmup_fraction of the run; then cosine / linear decay to min_lr over the rest,
    wsd (warmup-stable-decay: lr until the last decay_fraction of the run, then linear to min_lr), or constant.
    Fractions of the run fit any budget: the same config warms up and anneals in 30 s as in 3 minutes."""
    if cfg.warmup_fraction > 0:
        done = progress(step + 1, cfg, seconds)  # (of the step being taken: the first one has a learning rate)
        if done < cfg.warmup_fraction:
            return cfg.lr * done / cfg.warmup_fraction
        decayed = (done - cfg.warmup_fraction) / (1 - cfg.warmup_fraction)
    else:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        decayed = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.max_seconds > 0:
            decayed = max(decayed, seconds / cfg.max_seconds)
        decayed = min(1.0, decayed)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * decayed
    if cfg.schedule == "wsd":
        done = progress(step, cfg, seconds) if cfg.warmup_fraction == 0 else done
        start = 1 - cfg.decay_fraction
        return cfg.lr - (cfg.lr - cfg.min_lr) * max(0.0, done - start) / cfg.decay_fraction
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * decayed)) * (cfg.lr - cfg.min_lr)


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32 on a CPU, and in bfloat16 elsewhere, as torch has
    it, run once for all matrices of a shape (batched products: one call where torch makes one per matrix). CPUs
    without bfloat16 instructions emulate bfloat16 matrix products: on an AVX2 EPYC (Zen 3), the iteration ran 28x
    (128 x 128) to 100x (768 x 3072) slower in bfloat16 than in float32. The rest is torch's step: Nesterov momentum,
    decoupled weight decay, the learning rate scaled by shape."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if "momentum_buffer" not in state:  # (torch's name: its state dicts load here, and ours there)
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                by_shape.setdefault((tuple(p.shape), p.device, p.dtype), []).append((p, update))
            for (shape, _, _), pairs in by_shape.items():
                updates = newton_schulz(torch.stack([u for _, u in pairs]), group["ns_coefficients"],
                                        group["ns_steps"], group["eps"])
                scale = -lr * _muon_lr_scale(group["adjust_lr_fn"], torch.Size(shape))
                for (p, _), update in zip(pairs, updates):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update, alpha=scale)
        return loss


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration towards the orthogonal factor of each matrix of g (..., rows, cols), as
    torch's, in float32 on a CPU and bfloat16 elsewhere."""
    a, b, c = coefficients
    x = g.to(torch.float32 if g.device.type == "cpu" else torch.bfloat16)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    flat = x.reshape(-1, *x.shape[-2:])  # (n, rows, cols): batched products
    for _ in range(steps):
        gram = flat @ flat.mT
        flat = torch.baddbmm(flat, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), flat, beta=a)
    x = flat.reshape(x.shape)
    return x.mT if tall else x


def _muon_lr_scale(rule: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate scale for a matrix of this shape."""
    rows, cols = shape[:2]
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))  # "original" (torch's default)


def lr_ratio(opt: torch.optim.Optimizer, cfg: TrainConfig) -> float:
    """What the schedule's learning rate is multiplied by for this optimizer: muon_lr / lr for Muon, else 1. From
    the config, never from a checkpoint, so a resumed run follows the muon_lr it is given."""
    return (cfg.muon_lr or cfg.lr) / cfg.lr if isinstance(opt, Muon) else 1.0


def make_optimizers(model: GPT, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on matrices only (the fused kernel on CUDA and CPU: on CPU it steps a 124M model
    ~7x faster than the default). With optimizer="muon", Muon takes the hidden matrices (inside blocks), at muon_lr,
    and AdamW the embeddings, output layer, norms and biases, at lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if p.dim() == 2 and n.startswith("blocks.")] if cfg.optimizer == "muon" else []
    hidden_ids = {id(p) for p in hidden}
    decay = [p for n, p in named if p.dim() >= 2 and id(p) not in hidden_ids]
    no_decay = [p for n, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizers = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **fused)]
    if hidden:
        optimizers.append(Muon(hidden, lr=cfg.muon_lr or cfg.lr, weight_decay=cfg.weight_decay,
                               adjust_lr_fn="match_rms_adamw"))
    return optimizers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we started the process group, so we end it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> Dist:
    """Under torchrun (RANK set): start the process group, NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        return Dist()
    info = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if use_cuda and info.local_rank >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"process {info.local_rank} of this machine has no CUDA device of its own ({n} visible): "
                        f"start at most {n} per machine (torchrun --nproc_per_node={n}; a launcher that sets "
                        f"CUDA_VISIBLE_DEVICES per process must leave LOCAL_RANK below it), or train on CPU with "
                        f"--device=cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        info.owns_group = True
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    return info


def resolve_device(pref: str, info: Dist) -> torch.device:
    if pref == "auto":
        return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = check_device(pref)
    return torch.device("cuda", info.local_rank) if pref == "cuda" else device


def autocast_context(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def make_batch(data: Dataset, split: str, batch_size: int, block_size: int, seed: int, step: int, micro: int = 0):
    """(x, y, extra forward arguments) of either kind of data: token windows, or padded prompt/completion pairs
    with their attention and loss masks."""
    if data.kind in ("pairs", "preferences"):
        x, y, attn, loss_mask = get_pair_batch(data, split, batch_size, block_size, seed, step, micro)
        return x, y, {"attention_mask": attn, "loss_mask": loss_mask}
    x, y = get_batch(data.tokens(split), batch_size, block_size, seed, step, micro)
    return x, y, {}


# ------------------------------------------------------------------------------------------------ setup and checks

def check_fits(cfg: TrainConfig, data: Dataset) -> None:
    if data.kind == "preferences" and cfg.method != "dpo":
        raise UserError(f"{data.path} holds preference rows (chosen, rejected): tune on them with --method dpo")
    if cfg.method == "dpo" and data.kind != "preferences":
        raise UserError(f"method=dpo needs preference rows ({{\"prompt\", \"chosen\", \"rejected\"}}); {data.path} "
                        f"holds {data.meta.get('describe', data.kind)}")
    if data.kind in ("pairs", "preferences"):
        for split in ("train", "val"):
            if len(data.index(split)) == 0:
                raise UserError(f"{data.path} has no {split} pairs; give more pairs (the last 10% validate) or a "
                                f"separate validation file (lmforge finetune --val)")
    if data.kind == "tokens":
        for split in ("train", "val"):
            n = len(data.tokens(split))
            if n < cfg.block_size + 1:
                raise UserError(f"block_size={cfg.block_size} does not fit the {split} data ({n} tokens in "
                                 f"{data.path}); use a smaller block_size or more data")


def check_resume(run: Path, model_cfg: ModelConfig, data: Dataset) -> Path:
    """The checkpoint to resume from, after checking that it fits this config and data."""
    saved = read_run_config(run)
    refuse_quantized(run, saved)
    saved_tok = json.loads((run / "tokenizer.json").read_text())
    if saved_tok != json.loads((data.path / "tokenizer.json").read_text()):
        raise TrainingError(f"cannot resume {run}: the tokenizer of {data.path} differs from the run's; "
                            "resume on the data the run was trained on")
    if ModelConfig.from_dict(saved["model"]) != model_cfg:
        diff = [k for k, v in model_cfg.to_dict().items() if saved["model"].get(k) != v]
        raise TrainingError(f"cannot resume {run}: the model differs from the saved one in {', '.join(diff)}; "
                            "keep the saved model settings or start a new run")
    return latest_checkpoint(run)


@torch.no_grad()
def _mean_rows(model: GPT, ids: list[int], n_old: int) -> None:
    for weight in {id(w): w for w in (model.wte.weight, model.lm_head.weight)}.values():
        weight[ids] = weight[:n_old].mean(0, keepdim=True).expand(len(ids), -1)


def _added_to_base(base: Path, data: Dataset) -> list[str] | None:
    """The special tokens data's tokenizer adds to the base run's ([] for the same one), or None for another."""
    from .tokenizer import added_tokens, load_tokenizer
    if not (base / "tokenizer.json").is_file():
        return None
    return added_tokens(load_tokenizer(base / "tokenizer.json"), data.tokenizer)


def _wrap(model: GPT, cfg: TrainConfig, info: Dist, device: torch.device):
    """DDP or FSDP2 under torchrun, then torch.compile when asked. The raw model stays the one we save."""
    wrapped = model
    if info.world > 1 and cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        # the mesh names the training device: left out, FSDP takes CUDA wherever it exists, also under --device=cpu
        mesh = init_device_mesh(device.type, (info.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def _full_state(model: GPT, optimizers, cfg: TrainConfig, info: Dist) -> tuple[dict, list[dict]]:
    """Unsharded model and optimizer states (gathered to every rank under FSDP)."""
    if info.world > 1 and cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(model, options=opts),
                [get_optimizer_state_dict(model, opt, options=opts) for opt in optimizers])
    return model.state_dict(), [opt.state_dict() for opt in optimizers]


def _load_optimizers(model: GPT, optimizers, states: list[dict], cfg: TrainConfig, info: Dist) -> None:
    if len(states) != len(optimizers):
        raise TrainingError("the checkpoint's optimizer does not match optimizer=" + cfg.optimizer)
    for opt, state in zip(optimizers, states):
        if info.world > 1 and cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state)


# ------------------------------------------------------------------------------------------------------ the loop

def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or resume) the run cfg.out on cfg.data. Returns a summary: step, losses, paths. The run seeds its own
    random number generators (cfg.seed, or the checkpoint's states on resume); the caller's are as they were after."""
    info = init_distributed(cfg.device)
    try:
        device = resolve_device(cfg.device, info)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            summary = _train(cfg, resume, info, device)
    except BaseException:
        if info.owns_group:
            dist.destroy_process_group()
        raise
    if info.owns_group:  # leave together: a process exiting with live gloo/NCCL threads aborts
        gc.collect()  # and free what still holds communication work (FSDP's) while the interpreter is whole
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _train(cfg: TrainConfig, resume: bool, info: Dist, device: torch.device) -> dict:
    entered = time.perf_counter()
    run = Path(cfg.out)
    data = Dataset(cfg.data)
    check_fits(cfg, data)
    check_sample_prompt(cfg, data)
    vocab, added = data.tokenizer.vocab_size, None
    if cfg.init_from:  # a base's rows past its tokenizer (a padded vocabulary) are kept; tokens added to its own
        added = _added_to_base(Path(cfg.init_from), data)  # tokenizer add rows; any other tokenizer fails to load
        if added is not None:
            vocab = max(vocab, int(cfg.model.get("vocab_size", 0)))
        if added and cfg.lora_rank:
            raise UserError(f"{data.path}'s tokenizer adds {', '.join(added)} to {cfg.init_from}'s, and LoRA cannot "
                            f"train new embedding rows; train without LoRA (lora_rank=0) first")
    grows = bool(added)
    model_cfg = cfg.model_config({"vocab_size": vocab})
    ckpt = check_resume(run, model_cfg, data) if resume else None
    if not resume and complete_checkpoints(run) and not cfg.overwrite:
        raise TrainingError(f"{run} already holds checkpoints; resume it with --resume {run}, pick another --out, "
                            "or pass --overwrite=true to start over")

    torch.default_generator.manual_seed(cfg.seed)  # the generators the run uses, and no other (not every GPU's)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(cfg.seed)  # (this device's generator only)
    model = GPT(model_cfg).to(device)
    if cfg.init_from:
        base = model_folder(cfg.init_from)
        refuse_quantized(cfg.init_from, read_run_config(cfg.init_from))
        if not (base / "model.safetensors").is_file():
            raise TrainingError(f"{cfg.init_from} is a LoRA run; fold its adapter in first (lmforge merge) and "
                                f"start from that")
        load_weights(model, base / "model.safetensors", new_rows=grows)
        if grows:  # the added tokens' rows start as the mean of the base's (also where a padded vocabulary had rows)
            _mean_rows(model, [data.tokenizer.special_tokens[t] for t in added],
                       data.tokenizer.vocab_size - len(added))
    # DPO's reference is the base as loaded, before a resumed checkpoint replaces the weights (LoRA: adapters off)
    reference = copy.deepcopy(model) if cfg.method == "dpo" and not cfg.lora_rank else None
    adapter = None
    if cfg.lora_rank:
        if cfg.fsdp and info.world > 1:
            raise TrainingError("LoRA with FSDP is not supported; use DDP (fsdp=false) or one process")
        targets = apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        adapter = {**base_identity(Path(cfg.init_from), run), "rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
                   "targets": cfg.lora_targets, "dropout": cfg.lora_dropout, "modules": targets}
    state = None
    if ckpt is not None:
        if adapter is not None:
            from safetensors.torch import load_file
            saved = adapter_settings(ckpt) or {}
            if saved.get("base_sha256") not in (None, adapter["base_sha256"]):
                raise TrainingError(f"cannot resume {run}: its base {cfg.init_from} has changed since the adapter was "
                                    f"trained on it (its weights differ); restore that base or start a new run")
            load_lora_state(model, load_file(str(ckpt / "adapter.safetensors"), device=str(device)),
                            f"the adapter in {ckpt}")
        else:
            load_weights(model, ckpt / "model.safetensors")
        state = load_trainer_state(ckpt / "trainer_state.pt")
    model.activation_checkpointing = cfg.activation_checkpointing
    # a sparse gradient of the tied embedding: not with FSDP's sharding, and not through torch.compile (inductor
    # cannot take sparse tensors)
    model.sparse_embedding_grad &= not (cfg.fsdp and info.world > 1) and not cfg.compile
    wrapped = _wrap(model, cfg, info, device)
    if cfg.method == "dpo":  # the loop calls the objective where it calls the model; the reference is fixed now
        from .dpo import DPOObjective
        wrapped = DPOObjective(wrapped, model, cfg.dpo_beta, reference)
    optimizers = make_optimizers(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    step, best_val, train_seconds, tokens_seen = 0, float("inf"), 0.0, 0
    if state is not None:
        _load_optimizers(model, optimizers, state["optimizers"], cfg, info)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, best_val = state["step"], state["best_val"]
        train_seconds, tokens_seen = state["train_seconds"], state["tokens_seen"]
        set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)], device)

    config = run_config(model_cfg, cfg)
    if info.main:
        run.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run / "config.json", config)
        data.tokenizer.save(run / "tokenizer.json")
        _truncate_metrics(run / "metrics.jsonl", step, fresh=not resume)
        if not resume:
            (run / "samples.txt").unlink(missing_ok=True)

    def batch(split: str, at: int, micro: int, seed: int):
        x, y, extra = make_batch(data, split, cfg.batch_size, cfg.block_size, seed, at, micro)
        return [x.to(device), y.to(device)], {k: v.to(device) for k, v in extra.items()}

    @torch.no_grad()
    def evaluate() -> tuple[float, dict]:
        """The mean validation loss, and the mean of whatever statistics the objective reports (DPO's rewards)."""
        wrapped.eval()
        losses, stats = [], {}
        for i in range(cfg.eval_steps):  # the same batches at every evaluation
            (x, y), extra = batch("val", i, 0, cfg.seed + 1)
            with autocast_context(device, cfg.dtype):
                out, loss = wrapped(x, y, **extra)
            losses.append(loss.float())
            for k, v in (out.items() if isinstance(out, dict) else ()):
                stats.setdefault(k, []).append(float(v))
        wrapped.train()
        return torch.stack(losses).mean().item(), {k: round(sum(v) / len(v), 6) for k, v in stats.items()}

    def save(is_best: bool) -> None:
        weights, opt_states = _full_state(model, optimizers, cfg, info)
        rng = [rng_state(device)]
        if info.world > 1:  # every rank's RNG, so dropout resumes exactly on each
            gathered = [None] * info.world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if info.main:
            trainer_state = {"step": step, "optimizers": opt_states, "scaler": scaler.state_dict(), "rng": rng,
                             "best_val": best_val, "train_seconds": train_seconds, "tokens_seen": tokens_seen}
            if adapter is not None:  # the adapter alone: the base weights are init_from's, untouched
                save_checkpoint(run, weights_for_saving(lora_state(model), False), trainer_state, config,
                                cfg.keep_last, is_best, ADAPTER_WEIGHTS, {ADAPTER_CONFIG: adapter})
                from .families import holds
                if holds(model_cfg):  # a block Hugging Face knows: PEFT's format too, kept as current
                    from .hf import save_peft_adapter
                    save_peft_adapter(model, adapter, run / "peft")
            else:
                save_checkpoint(run, weights_for_saving(weights, model_cfg.tie_embeddings), trainer_state, config,
                                cfg.keep_last, is_best)
        if info.world > 1:
            dist.barrier()

    bar = _progress_bar(cfg, step, info.main)
    # where this invocation's time goes: setting up (data, model, optimizers, a resumed checkpoint), the training
    # steps, evaluating, sampling, saving, drawing the curves
    seconds = {"setup": time.perf_counter() - entered, "train": 0.0, "eval": 0.0, "sample": 0.0, "save": 0.0,
               "curves": 0.0}
    # under compile, a process's first step is mostly compiling: it is timed as setup, not as training, so that a
    # time budget's warmup and decay fall on training steps (max_seconds counts training, as without compile); the
    # budget is charged the next step's time for it instead, so a resumed run (which compiles again) stays exact
    compiling, owed = cfg.compile, False

    @contextlib.contextmanager
    def timing(phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds[phase] += time.perf_counter() - start
    wrapped.train()
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * info.world
    last_val, val_stats, sample_text, stop_reason = None, {}, "", "max_steps"
    out_of_time = 0 < cfg.max_seconds <= train_seconds  # (a resumed run that had spent its budget: no step to take)
    if out_of_time:
        stop_reason = "max_seconds"
    window_start, window_tokens = time.perf_counter(), 0
    try:
        while step < cfg.max_steps and not out_of_time:
            if info.world > 1 and cfg.max_seconds > 0:  # (no rank's clock counts another's sampling or saving)
                dist.barrier()
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, train_seconds)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr * lr_ratio(opt, cfg)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                (x, y), extra = batch("train", step, info.rank * cfg.grad_accum + micro, cfg.seed)
                sync = micro == cfg.grad_accum - 1 or info.world == 1 or cfg.fsdp
                with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast_context(device, cfg.dtype):
                    _, loss = wrapped(x, y, **extra)
                scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float()
            if cfg.grad_clip > 0:
                for opt in optimizers:
                    scaler.unscale_(opt)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            train_loss = loss_sum / cfg.grad_accum
            if info.world > 1:
                dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
            train_loss = train_loss.item()
            if not math.isfinite(train_loss):
                kept = complete_checkpoints(run)
                where = f"the last good checkpoint ({kept[-1].name}) is kept" if kept else "no checkpoint was written"
                raise TrainingError(f"loss became {train_loss} at step {step}; {where}; lower lr, or set grad_clip")
            took = time.perf_counter() - t0
            if info.world > 1 and cfg.max_seconds > 0:  # every rank keeps the same clock: one schedule, one stop
                took_t = torch.tensor(took, dtype=torch.float64, device=device)
                dist.all_reduce(took_t, op=dist.ReduceOp.MAX)
                took = took_t.item()
            if compiling:
                seconds["setup"] += took
                compiling, owed = False, True
            else:
                train_seconds += 2 * took if owed else took
                seconds["train"] += took
                owed = False
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            out_of_time = cfg.max_seconds > 0 and train_seconds >= cfg.max_seconds
            stopping = cfg.stop_at > 0 and step >= cfg.stop_at
            last_step = step == cfg.max_steps or out_of_time or stopping
            if out_of_time or stopping:
                stop_reason = "max_seconds" if out_of_time else "stop_at"

            if step % cfg.log_interval == 0 or last_step:
                now = time.perf_counter()
                tok_s = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                row = {"step": step, "loss": round(train_loss, 6), "lr": lr, "tokens_per_s": round(tok_s, 1),
                       "tokens": tokens_seen, "train_seconds": round(train_seconds, 3)}
                if cfg.grad_clip > 0:
                    row["grad_norm"] = round(float(grad_norm), 4)
                if info.main:
                    _append_metrics(run, row)
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            bar.update(1)

            should_eval = step % cfg.eval_interval == 0 or step == cfg.max_steps or out_of_time  # stop_at: a pause
            should_save = last_step or (step % cfg.save_interval == 0 if cfg.save_interval else should_eval)
            is_best = False
            if should_eval:
                with timing("eval"):
                    last_val, val_stats = evaluate()
                is_best = last_val < best_val
                best_val = min(best_val, last_val)
                if info.main:
                    _append_metrics(run, {"step": step, "val_loss": round(last_val, 6),
                                          "val_ppl": round(math.exp(min(last_val, 50)), 4), **val_stats})
                    if not cfg.fsdp:  # sampling runs on rank 0 alone, which sharded weights do not allow
                        with timing("sample"):
                            sample_text = _write_sample(run, model, data, cfg, step, last_val)
                    with timing("curves"):
                        plot_curves(run)
            if should_save:
                with timing("save"):
                    save(is_best)
            if last_step:
                break
    except KeyboardInterrupt:
        if info.main:
            print(f"\ninterrupted at step {step}; saving a checkpoint to resume from")
        with timing("save"):
            save(False)
        stop_reason = "interrupted"
    finally:
        bar.close()
    return {"step": step, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50)) if last_val is not None else None,
            "best_val": best_val, "train_seconds": train_seconds, "tokens": tokens_seen, "stop_reason": stop_reason,
            "run": str(run), "curves": str(run / "curves.png"), "sample": sample_text,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            **({"val_" + k: v for k, v in val_stats.items()} if last_val is not None else {})}


# --------------------------------------------------------------------------------------------------- run outputs

def _progress_bar(cfg: TrainConfig, step: int, main: bool):
    from tqdm.auto import tqdm
    desc = f"train (stops at {cfg.max_seconds:.0f} s of training)" if cfg.max_seconds else "train"
    return tqdm(total=cfg.max_steps, initial=step, disable=not (main and cfg.progress), unit="step",
                dynamic_ncols=True, desc=desc)


def _append_metrics(run: Path, row: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int, fresh: bool) -> None:
    """On resume drop lines past the checkpoint (they will be written again); on a new run start empty. The file
    is replaced by rename, so a crash here never loses the history."""
    rows = [] if fresh else [r for r in _metric_rows(path) if r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _metric_rows(path: Path) -> list[dict]:
    """Rows of metrics.jsonl; a line cut short by a crash mid-append is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_metrics(run: Path) -> list[dict]:
    return _metric_rows(Path(run) / "metrics.jsonl")


def _write_sample(run: Path, model: GPT, data: Dataset, cfg: TrainConfig, step: int, val_loss: float) -> str:
    """What samples.txt gets at an evaluation: for pairs data, a few validation prompts with their greedy completion
    and the expected one; otherwise text continued from sample_prompt. Sampling never ends a run: a failure is
    written down and training goes on."""
    if cfg.sample_tokens == 0:
        return ""
    was_training = model.training
    model.eval()
    try:
        if data.targets("val") is not None:
            text = _reply_samples(model, data)
        elif data.kind == "pairs":
            text = _pair_samples(model, data, cfg)
        else:
            from .generation import generate
            text = cfg.sample_prompt + generate(model, data.tokenizer, cfg.sample_prompt,
                                                max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=200,
                                                seed=cfg.seed)
    except Exception as e:  # noqa: BLE001 - a sample is a nicety; losing the run over it is not
        text = f"(sampling failed: {type(e).__name__}: {e})"
        print(f"warning: step {step}: {text}")
    finally:
        model.train(was_training)
    with open(run / "samples.txt", "a") as f:
        f.write(f"=== step {step}, val loss {val_loss:.4f} ===\n{text}\n\n")
    return text


def _pair_samples(model: GPT, data: Dataset, cfg: TrainConfig, n: int = 3) -> str:
    from .pair_eval import evaluate_pairs
    tok, tokens = data.tokenizer, data.tokens("val")
    pairs = [(tok.decode(tokens[s:s + p].tolist()), tok.decode(tokens[s + p:s + t - 1].tolist()))
             for s, p, t in data.index("val")[:n]]
    result = evaluate_pairs(model, tok, pairs, examples=n)
    return "\n".join(f"{'ok ' if ex['match'] else 'BAD'} {ex['prompt']!r} -> {ex['generated']!r}"
                     f"{'' if ex['match'] else ' (expected ' + repr(ex['expected']) + ')'}" for ex in result["examples"])


def _reply_samples(model: GPT, data: Dataset, n: int = 3) -> str:
    """Conversations and preference rows: the greedy reply to the first few validation prompts (everything before
    the first target token), beside the reply the data wants (the first run of targets: chosen for preferences)."""
    from .engine import Engine, Request
    from .generation import run_requests
    tok, tokens, targets, index = data.tokenizer, data.tokens("val"), data.targets("val"), data.index("val")
    rows = list(range(0, len(index), 2 if data.kind == "preferences" else 1))[:n]
    block = model.config.block_size
    prompts, wanted = [], []
    for r in rows:
        start, first, total = (int(v) for v in index[r])
        mask = np.asarray(targets[start + first:start + total])
        end = first + (int(np.argmin(mask)) if not mask.all() else len(mask))
        wanted.append(np.asarray(tokens[start + first:start + end]).tolist())
        prompts.append(np.asarray(tokens[start:start + first]).tolist()[-(block - len(wanted[-1])):] or [tok.eot_id])
    engine = Engine(model, tok, max_batch=len(rows), max_seq_len=block)
    outs = run_requests(engine, [Request(p, max(1, min(len(w) + 8, block - len(p))), temperature=0.0)
                                 for p, w in zip(prompts, wanted)])
    lines = []
    for p, w, out in zip(prompts, wanted, outs):
        verdict = "ok " if out == w else "BAD"
        lines.append(f"{verdict} {tok.decode(p[-80:])!r} -> {tok.decode(out)!r}"
                     f"{'' if out == w else ' (expected ' + repr(tok.decode(w)) + ')'}")
    return "\n".join(lines)


def check_sample_prompt(cfg: TrainConfig, data: Dataset) -> None:
    """A sample prompt the data's tokenizer cannot encode fails now, before any step, not at the first eval."""
    if cfg.sample_tokens and data.kind == "tokens" and cfg.sample_prompt:
        try:
            data.tokenizer.encode(cfg.sample_prompt)
        except UserError as e:
            raise UserError(f"sample_prompt={cfg.sample_prompt!r} cannot be encoded with {data.path}'s tokenizer "
                            f"({e}); pass --sample_prompt= (start of a document) or --sample_tokens=0") from None


def plot_curves(run: Path) -> Path:
    """curves.png: train and validation loss against step, and the learning rate below."""
    from matplotlib.figure import Figure  # (not pyplot: no backend or global figure state of the caller's changes)
    rows = read_metrics(run)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    fig = Figure(figsize=(8, 6))
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        ax.plot(*zip(*train), label="train", color="tab:blue", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", color="tab:orange")
        best = min(val, key=lambda v: v[1])
        ax.annotate(f"best {best[1]:.3f}", best, textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{Path(run).name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if lrs:
        ax_lr.plot(*zip(*lrs), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run) / "curves.png"
    tmp = out.with_name(".curves.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    return out


# ------------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate_run(run: str | Path, data_dir: str | Path | None = None, split: str = "val", batches: int = 50,
                 batch_size: int = 16, seed: int = 0, device: str = "cpu", checkpoint: str | None = None) -> dict:
    """Loss and perplexity of a run's latest checkpoint on a prepared data directory (default: its own data)."""
    from .runs import load
    if batches < 1 or batch_size < 1:
        raise UserError(f"batches={batches} and batch_size={batch_size} must be at least 1")
    model, tokenizer = load(run, device=device, checkpoint=checkpoint)
    config = read_run_config(Path(run))
    data_dir = data_dir or (config.get("train") or {}).get("data")
    if not data_dir:
        raise UserError(f"{run} records no training data; pass the data to evaluate on (--data DIR)")
    data = Dataset(data_dir)
    if json.loads((Path(run) / "tokenizer.json").read_text()) != json.loads((data.path / "tokenizer.json").read_text()):
        raise UserError(f"the tokenizer of {data.path} differs from the run's; evaluate on data prepared with "
                         f"--tokenizer-from {run}")
    block = model.config.block_size
    if data.kind == "tokens":
        block = min(block, len(data.tokens(split)) - 1)
    losses = []
    for i in range(batches):
        x, y, extra = make_batch(data, split, batch_size, block, seed, i)
        extra = {k: v.to(model.wte.weight.device) for k, v in extra.items()}
        losses.append(model(x.to(model.wte.weight.device), y.to(model.wte.weight.device), **extra)[1].item())
    mean = sum(losses) / len(losses)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "data": str(data.path), "split": split,
            "batches": batches}


# ------------------------------------------------------------------------------------------------------------ CLI

def train_cli(args) -> int:
    from .config import parse_overrides
    overrides = parse_overrides(args.overrides)
    if args.resume:
        saved = read_run_config(Path(args.resume)).get("train")
        if not saved:
            raise UserError(f"{args.resume} has no training config to resume")
        cfg = TrainConfig.from_dict(saved)
        if args.config:
            cfg = TrainConfig.from_toml(args.config)
        cfg = cfg.with_overrides({**overrides, "out": args.resume})
    else:
        if args.config and not Path(args.config).is_file():
            raise MissingFileError(f"no config file at {args.config} (presets live in configs/)")
        cfg = (TrainConfig.from_toml(args.config) if args.config else TrainConfig()).with_overrides(overrides)
    summary = train(cfg, resume=bool(args.resume))
    if int(os.environ.get("RANK", 0)) == 0:
        print_summary(summary)
    return 0


def print_summary(s: dict) -> None:
    print(f"\nstopped at step {s['step']} ({s['stop_reason']}) after {s['train_seconds']:.0f} s of training, "
          f"{s['tokens']:,} tokens")
    if s["val_loss"] is None and s["stop_reason"] in ("max_steps", "max_seconds"):
        print(f"nothing to train: the run had already reached its {s['stop_reason']}; give a larger --max_steps or "
              f"--max_seconds (0: no time limit) to continue it")
    if s["val_loss"] is not None:
        print(f"final val loss {s['val_loss']:.4f}, perplexity {s['val_ppl']:.2f} (best {s['best_val']:.4f})")
    if "val_reward_accuracy" in s:
        print(f"DPO on the validation rows: reward accuracy {s['val_reward_accuracy']:.2%}, margin "
              f"{s['val_reward_margin']:.3f} (chosen {s['val_reward_chosen']:.3f}, rejected "
              f"{s['val_reward_rejected']:.3f})")
    if s["sample"]:
        print("\n--- sample ---\n" + s["sample"].strip() + "\n--------------")
    print("time:   " + ", ".join(f"{name} {s['seconds'][key]:.1f} s" for key, name in (
        ("setup", "setting up"), ("train", "training"), ("eval", "evaluating"), ("sample", "sampling"),
        ("save", "saving"), ("curves", "curves")) if key in s.get("seconds", {})))
    print(f"curves: {s['curves']}\nrun:    {s['run']}")


def eval_cli(args) -> int:
    if args.pairs:
        if args.data:
            raise UserError("--pairs and --data are two different evaluations; give one")
        from .pair_eval import eval_pairs_cli
        return eval_pairs_cli(args)
    r = evaluate_run(args.run, args.data, args.split, args.batches, args.batch_size, device=args.device,
                     checkpoint=args.checkpoint)
    print(f"{r['data']} [{r['split']}]: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} "
          f"({r['batches']} batches)")
    return 0
