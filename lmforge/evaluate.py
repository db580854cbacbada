"""Standard benchmarks through EleutherAI's lm-evaluation-harness (extra `eval`): an lm-eval model class over runs.

    lmforge evaluate runs/base --tasks hellaswag,arc_easy --num-fewshot 0 --limit 200 --out results.json
    lmforge evaluate runs/base --tasks my_tasks/          # every task of a folder of lm-eval task YAML (offline)
    python -m lmforge.evaluate --model lmforge --model_args run=runs/base --tasks lambada_openai   # lm-eval's own CLI
    results = evaluate("runs/base", ["my_task"], include_path="my_tasks")                         # lm-eval's dict

LmforgeLM (registered with lm-eval as `lmforge`) answers lm-eval's three requests:
  loglikelihood           batched forward passes of the run's model: sequences sorted by length, right-padded
                          (causal attention never looks right), inputs that share a prefix computed once;
                          context + continuation cut to the model's last max_length tokens, as lm-eval's hf model.
  loglikelihood_rolling   lm-eval's own rolling windows (every token scored once, each with the most context).
  generate_until          the inference engine, greedy unless the task samples, with the task's stop strings; the
                          context cut so that it and max_gen_toks fit max_length.
Tokens are the run's tokenizer's, with the text of a special token read as that token and the begin-of-text token
added where the family's tokenizer adds one, as transformers' tokenizers do, so that the scores equal lm-eval's `hf`
model on the run's exported folder. An ONNX export (lmforge export --format onnx) answers the loglikelihood requests
through onnxruntime.

lm-eval finds no model classes outside its own package, so its `lm_eval` command does not know `lmforge`;
`python -m lmforge.evaluate` is that command with this class registered.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import random
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError



@contextlib.contextmanager
def _process_kept():
    """Warning filters and environment variables as they were: lm-eval and its dependencies set both as they import
    and run (HF_XET_HIGH_PERFORMANCE, KMP_DUPLICATE_LIB_OK, TORCHINDUCTOR_CACHE_DIR, ...)."""
    environ = dict(os.environ)
    with warnings.catch_warnings():
        try:
            yield
        finally:
            for key in set(os.environ) - set(environ):
                del os.environ[key]
            for key, value in environ.items():
                if os.environ.get(key) != value:
                    os.environ[key] = value


try:
    with _process_kept():
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model
        import lm_eval.models  # noqa: F401  (its own names first: it lists them only while its registry is empty)
except ImportError:  # the extra is missing: evaluate() and the verb say so in one line
    TemplateLM, register_model = object, None

LOGIT_BUDGET = 1 << 26  # logits (floats) one forward pass may hold: ~256 MB; longer or wider batches are split
DEFAULT_BATCH = 16


def _need_lm_eval() -> None:
    if register_model is None:
        raise UserError("evaluation on standard benchmarks needs lm-eval; install the extra: pip install "
                        "'lmforge[eval]'")


def _positive_int(name: str, value, default: int) -> int:
    if value is None or value == "auto":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = 0.0
    if isinstance(value, bool) or not number.is_integer() or number < 1:
        raise UserError(f"{name}={value!r} must be a positive integer")
    return int(number)


class _RunScorer:
    """Log-probabilities from the run's GPT."""

    def __init__(self, run: Path, checkpoint, device: str, dtype: str):
        from .runs import load
        self.model, self.tokenizer = load(run, device=device, checkpoint=checkpoint, dtype=dtype)
        self.config = self.model.config
        self.device = self.model.wte.weight.device

    @torch.no_grad()
    def logits(self, rows: list[list[int]]) -> torch.Tensor:
        """rows right-padded into one batch -> float32 logits (B, T, V) on the CPU."""
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r)
        return self.model(batch.to(self.device))[0].float().cpu()


class _OnnxScorer:
    """Log-probabilities from an ONNX export's prefill graph, in onnxruntime."""

    def __init__(self, path: Path):
        from .onnx import OnnxModel
        self.onnx = OnnxModel(path)
        self.tokenizer, self.config = self.onnx.tokenizer, self.onnx.config

    def logits(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        batch = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = r
        return torch.from_numpy(self.onnx.prefill(batch)[0]).float()


class LmforgeLM(TemplateLM):
    """An lm-eval model over an lmforge run (or its ONNX export). model_args: run (the folder), checkpoint (e.g.
    RUN/best; default the latest), device, dtype (float32, bfloat16, float16), batch_size (sequences per forward
    pass, and engine slots for generation), max_length (tokens; default the model's block_size)."""

    def __init__(self, run: str, checkpoint: str | None = None, device: str | None = "cpu", dtype: str = "float32",
                 batch_size: int | str | None = DEFAULT_BATCH, max_length: int | None = None,
                 max_batch_size: int | None = None, **unused):
        super().__init__()
        path = Path(run)
        self.onnx = (path / "onnx.json").is_file()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # as lm-eval's hf model treats its default
        self.scorer = _OnnxScorer(path) if self.onnx else _RunScorer(path, checkpoint, device, dtype)
        self.tok, self.config = self.scorer.tokenizer, self.scorer.config
        self.run, self.checkpoint, self.dtype = path, checkpoint, dtype
        self.batch_size = _positive_int("batch_size", batch_size, DEFAULT_BATCH)
        self._max_length = _positive_int("max_length", max_length, self.config.block_size)
        if self._max_length > self.config.block_size and not self.config.extrapolates:
            raise UserError(f"max_length={self._max_length} is past block_size={self.config.block_size}, which "
                            f"position={self.config.position!r} cannot go past; give at most {self.config.block_size}")
        self._engine = None

    # --- what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def prefix_token_id(self) -> int:  # what an empty context is: begin-of-text where the family has one
        bos = getattr(self.tok, "bos_id", None)
        return self.tok.eot_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode_with_specials(string)
        if add_special_tokens is not False and getattr(self.tok, "add_bos", False) and ids[:1] != [self.tok.bos_id]:
            ids = [self.tok.bos_id] + ids
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def chat_template(self, chat_template=False):
        """The run's one chat template (templates.template_of), when lm-eval is asked to apply one."""
        if not chat_template:
            return None
        if isinstance(chat_template, str) and chat_template != self._template():
            raise UserError("a run chats through its own template; --apply_chat_template takes no template name")
        return self._template()

    def _template(self) -> str:
        """The run's template, read once (every conversation of a task renders through it)."""
        if getattr(self, "_chat_template", None) is None:
            from .runs import read_run_config
            from .templates import template_of
            self._chat_template = template_of(self.tok, {} if self.onnx else read_run_config(self.run))
        return self._chat_template

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the text the server's chat route renders (tok_encode reads its special tokens)."""
        from .templates import check_messages, render_for
        messages = check_messages(chat_history, "the task's conversation", need_assistant=False)
        return render_for(self.tok, messages, add_generation_prompt, self._template())

    @property
    def tokenizer_name(self) -> str:
        return f"lmforge:{self.run}"

    def get_model_info(self) -> dict:
        return {"lmforge_run": str(self.run), "lmforge_checkpoint": self.checkpoint, "model_dtype": self.dtype,
                "model_num_parameters": None if self.onnx else self.scorer.model.num_params()}

    # --- loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request of
        (strings, context ids, continuation ids)."""
        from tqdm import tqdm
        inputs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # one forward per distinct input
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise UserError("a loglikelihood request has an empty continuation; the task gives nothing to score")
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens is longer than max_length="
                                f"{self.max_length}; raise max_length or shorten the task's targets")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs.setdefault(tuple(whole[:-1]), []).append((i, list(continuation)))
        order = sorted(inputs, key=len, reverse=True)  # the longest first: batches of like lengths, errors early
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        vocab = self.config.vocab_size
        start = 0
        while start < len(order):
            rows = max(1, min(self.batch_size, LOGIT_BUDGET // (len(order[start]) * vocab)))
            batch = order[start:start + rows]
            logits = self.scorer.logits([list(x) for x in batch])
            for row, x in enumerate(batch):
                for i, continuation in inputs[x]:
                    n = len(continuation)
                    logprobs = F.log_softmax(logits[row, len(x) - n:len(x)], dim=-1)
                    target = torch.tensor(continuation)
                    score = logprobs.gather(1, target[:, None]).sum().item()
                    results[i] = (score, bool((logprobs.argmax(-1) == target).all()))
                    if requests[i][0] is not None:  # (context, continuation); rolling windows have none
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                    progress.update(1)
            start += rows
        progress.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        windows, owner = [], []
        for i, (string,) in enumerate(r.args for r in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owner, scores):
            totals[i] += score
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
        return totals

    # --- generation
    def check_generates(self) -> None:
        if self.onnx:
            raise UserError("generate_until tasks run on the engine, which an ONNX export does not have; evaluate "
                            "the run itself (lmforge evaluate RUN), or give this export loglikelihood tasks only "
                            "(multiple choice, perplexity)")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .engine import Engine, Request
        from .generation import run_requests
        self.check_generates()
        if not requests:
            return []
        if self._engine is None:
            self._engine = Engine(self.scorer.model, self.tok, max_batch=min(self.batch_size, len(requests)),
                                  max_seq_len=self.max_length)
        batch, stops, seen = [], [], Counter()
        for context, kwargs in (r.args for r in requests):
            settings = _generation_settings(kwargs, self.max_length)
            key = json.dumps([context, settings], sort_keys=True, default=str)
            seen[key] += 1  # a task's repeats of one item draw different samples, the same ones every run
            seed = int(hashlib.sha256(f"{key}#{seen[key]}".encode()).hexdigest()[:15], 16)
            new = settings["max_gen_toks"]
            ids = self.tok_encode(context)[-(self.max_length - new):]  # the context cut as lm-eval's hf model cuts it
            batch.append(Request(ids, new, settings["temperature"] if settings["do_sample"] else 0.0,
                                 settings["top_k"], settings["top_p"], stop=settings["until"], seed=seed))
            stops.append(settings["until"])
        texts = run_requests(self._engine, batch, text=True)
        out = []
        for r, text, until in zip(requests, texts, stops):
            for s in until:  # the engine stops at them; a stop string lm-eval adds later is cut here too
                text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", r.args, text)
            out.append(text)
        return out


GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _generation_settings(kwargs, max_length: int) -> dict:
    """A generate_until request's settings, checked: unknown keys, values of the wrong kind and a max_gen_toks that
    leaves its context no room are one-line errors, not silently ignored."""
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
    if unknown:
        raise UserError(f"generation setting {unknown[0]!r} is not one lmforge's model class takes; it takes "
                        f"{', '.join(GENERATION_KEYS)}")
    until = kwargs.get("until")
    until = [until] if isinstance(until, str) else until if isinstance(until, list) else [] if until is None else None
    if until is None or not all(isinstance(s, str) and s for s in until):
        raise UserError(f"generation setting until={kwargs.get('until')!r} must be a non-empty string or a list of them")
    new = _positive_int("max_gen_toks", kwargs.get("max_gen_toks", 256), 256)
    if new >= max_length:
        raise UserError(f"max_gen_toks={new} leaves no room for the context within max_length={max_length}; pass "
                        f"--gen-kwargs max_gen_toks=N with N well below {max_length}, or a larger --max-length")
    sample = kwargs.get("do_sample", False)
    if not isinstance(sample, bool):
        raise UserError(f"generation setting do_sample={sample!r} must be true or false")
    numbers = {}
    for name, low, high, kind in (("temperature", 0.0, None, float), ("top_p", 0.0, 1.0, float),
                                  ("top_k", 1, None, int)):
        value = kwargs.get(name)
        if value is None:
            numbers[name] = 1.0 if name == "temperature" else None
            continue
        try:
            number = kind(float(value)) if kind is float or float(value).is_integer() else None
        except (TypeError, ValueError):
            number = None
        if isinstance(value, bool) or number is None or number < low or (high is not None and number > high) \
                or (name == "top_p" and number == 0):
            raise UserError(f"generation setting {name}={value!r} must be a number"
                            f"{f' from {low} to {high}' if high is not None else f' of at least {low}'}")
        numbers[name] = None if name == "top_p" and number == 1.0 else number
    return {"until": until, "max_gen_toks": new, "do_sample": sample, **numbers}


if register_model is not None:
    register_model("lmforge")(LmforgeLM)


# ----------------------------------------------------------------------------------------------------- tasks

def _task_yaml(folder: Path) -> list[tuple[Path, dict]]:
    """Every task YAML of a folder, parsed (lm-eval's !function tags read as nothing), or a one-line error naming
    the file that does not parse or is no mapping."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    files = sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml"))
    if not files:
        raise UserError(f"{folder} holds no task YAML (*.yaml)")
    docs = []
    for file in files:
        try:
            doc = yaml.load(file.read_text(encoding="utf-8"), Loader=Loader)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise UserError(f"{file} is not valid YAML{at} ({getattr(e, 'problem', None) or e}); fix or remove "
                            f"it") from None
        if not isinstance(doc, dict):
            raise UserError(f"{file} is not an lm-eval task (a mapping with task: or group:)")
        docs.append((file, doc))
    return docs


def _task_names(folder: Path) -> list[str]:
    names = [doc.get("task") or doc.get("group") for _, doc in _task_yaml(folder)]
    names = [n for n in names if isinstance(n, str)]
    if not names:
        raise UserError(f"{folder}: none of its YAML files names a task (task: NAME)")
    return names


def resolve_tasks(tasks, include_path=None):
    """(task names, a TaskManager that knows them). tasks: names (a list, or a comma-separated string) and folders
    of task YAML (each adds every task it names). lm-eval's built-in tasks are indexed only when a name needs
    them (indexing them takes seconds)."""
    _need_lm_eval()
    from lm_eval.tasks import TaskManager
    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    items = [t for t in items if t]
    if not items:
        raise UserError("no task given; name lm-eval tasks (--tasks hellaswag,arc_easy) or a folder of task YAML")
    folders = [Path(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path or [])]
    names = []
    for item in items:
        if Path(item).is_dir():
            folders.append(Path(item))
            names += _task_names(Path(item))
        else:
            names.append(item)
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"--include-path {folder}: no such folder")
        _task_yaml(folder)  # (again for a --tasks folder: cheap)
    names = list(dict.fromkeys(names))
    paths = [str(f) for f in folders] or None
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=paths)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=5, cutoff=0.6)
        raise UserError(f"unknown task {unknown[0]!r}" + (f" (close: {', '.join(close)})" if close else "")
                        + "; `lm-eval ls tasks` lists lm-eval's, or give a folder of task YAML")
    return names, manager


def _load_tasks(names: list[str], manager):
    """Each task built (its dataset loaded), or a one-line error naming the task whose data could not be had."""
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except UserError:
            raise
        except Exception as e:  # datasets and the hub raise many types: offline, gated, missing files
            entry = manager.task_index.get(name)
            source = (entry.cfg or {}).get("dataset_path") if entry is not None else None
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(f"task {name}: its data{f' ({source})' if source else ''} could not be loaded "
                            f"({type(e).__name__}{': ' + message[:160] if message else ''}); offline, write a task "
                            f"YAML with dataset_path: json and dataset_kwargs: {{data_files: ...}} naming local files, "
                            f"and pass its folder (--tasks DIR or --include-path DIR)") from None
        built += list(loaded["groups"].values())[:1] if name in loaded["groups"] else list(loaded["tasks"].values())
    return built


# ------------------------------------------------------------------------------------------------- evaluating

@contextlib.contextmanager
def _random_state_kept(device: str):
    """lm-eval seeds Python's, numpy's and torch's global generators (the GPU's too); the caller gets its own back."""
    state = random.getstate(), np.random.get_state()
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []):
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def _check_limit(limit):
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0 \
            or (limit >= 1 and limit != int(limit)):
        raise UserError(f"--limit {limit:g} evaluates nothing or is unclear; give a number of items per task (e.g. 100) "
                        f"or a fraction of them below 1 (e.g. 0.1)")
    return int(limit) if limit >= 1 else float(limit)


def evaluate(run: str | Path, tasks, num_fewshot: int | None = None, limit: int | float | None = None,
             batch_size: int = DEFAULT_BATCH, device: str = "cpu", dtype: str = "float32",
             checkpoint: str | None = None, include_path=None, log_samples: bool = False, max_length: int | None = None,
             gen_kwargs: str | None = None, bootstrap_iters: int = 100_000, apply_chat_template: bool = False,
             fewshot_as_multiturn: bool = False, system_instruction: str | None = None) -> dict:
    """lm-eval's results for a run (or its ONNX export) on tasks (see resolve_tasks), as its simple_evaluate returns
    them, with "lmforge": the run, checkpoint, weights' sha256 and model config they came from. Nothing of the
    caller's random state changes."""
    _need_lm_eval()
    with _process_kept():
        from lm_eval import simple_evaluate

    from .runs import check_device
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise UserError(f"--num-fewshot {num_fewshot} must be 0 or more")
    limit = _check_limit(limit)
    check_device(device)  # asked for by name here: a missing GPU is an error, not a fallback
    names, manager = resolve_tasks(tasks, include_path)
    lm = LmforgeLM(str(run), checkpoint=checkpoint, device=device, dtype=dtype, batch_size=batch_size,
                   max_length=max_length)
    with _random_state_kept(lm.scorer.device if not lm.onnx else "cpu"), _process_kept():
        built = _load_tasks(names, manager)
        leaves = [t for b in built for t in (b.get_all_tasks() if hasattr(b, "get_all_tasks") else [b])]
        if any(t.get_config("output_type") == "generate_until" for t in leaves):
            lm.check_generates()  # before any item runs
        results = simple_evaluate(model=lm, tasks=built, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=log_samples, gen_kwargs=gen_kwargs,
                                  bootstrap_iters=bootstrap_iters, batch_size=lm.batch_size, device=device,
                                  apply_chat_template=apply_chat_template,
                                  fewshot_as_multiturn=fewshot_as_multiturn, system_instruction=system_instruction)
    results["lmforge"] = _provenance(Path(run), checkpoint, lm.onnx)
    return results


def _provenance(run: Path, checkpoint, onnx: bool) -> dict:
    from .download import sha256_file
    from .runs import model_folder, read_run_config
    if onnx:
        meta = json.loads((run / "onnx.json").read_text())
        return {"onnx": str(run), "model": meta.get("model")}
    folder = model_folder(run, checkpoint)
    weights = next(folder / w for w in ("model.safetensors", "adapter.safetensors") if (folder / w).is_file())
    config = read_run_config(run)
    step = folder.name.removeprefix("step-")
    out = {"run": str(run.resolve()), "checkpoint": str(folder.resolve()),
           "step": int(step) if step.isdigit() else None, "weights": str(weights.resolve()),
           "weights_sha256": sha256_file(weights), "config": config}
    if weights.name == "adapter.safetensors":  # a LoRA run: its base's weights too, as the adapter recorded them
        from .lora import adapter_settings
        out["base"] = {k: v for k, v in (adapter_settings(folder) or adapter_settings(run) or {}).items()
                       if k not in ("rank", "alpha", "dropout", "modules")}
    return out


def write_results(results: dict, out: str | Path) -> Path:
    """lm-eval's results as JSON (what it cannot serialize, as it writes it), atomically."""
    from lm_eval.utils import handle_non_serializable
    out = check_out(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as e:
        raise UserError(f"--out {out}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"--out {out}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def check_out(out: str | Path) -> Path:
    """Where results may go: not a folder, somewhere writable (checked before an evaluation spends its time)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the results file, e.g. {out / 'results.json'}")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not a folder this process may write in")
    return out


def evaluate_cli(args) -> int:
    _need_lm_eval()
    from lm_eval.utils import make_table
    limit = None
    if args.limit is not None:
        try:
            limit = float(args.limit)
        except ValueError:
            raise UserError(f"--limit {args.limit} is not a number") from None
    if args.out:
        check_out(args.out)
    results = evaluate(args.run, args.tasks, num_fewshot=args.num_fewshot, limit=limit, batch_size=args.batch_size,
                       device=args.device, dtype=args.dtype, checkpoint=args.checkpoint,
                       include_path=args.include_path, log_samples=args.log_samples, max_length=args.max_length,
                       gen_kwargs=args.gen_kwargs, apply_chat_template=args.apply_chat_template,
                       fewshot_as_multiturn=args.fewshot_as_multiturn, system_instruction=args.system_instruction)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.out:
        print(f"results written to {write_results(results, args.out)}")
    return 0


if __name__ == "__main__":  # lm-eval's own command line, with `lmforge` among its models
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()
