"""Training: exact resume, crash safety under SIGKILL, DDP parity, schedules, guards and one-line errors."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.cli import main
from lmforge.config import TrainConfig
from lmforge.data import prepare
from lmforge.train import TrainingError, lr_at, read_metrics, train

TEXT = Path(__file__).with_name("test_train.py").read_text() * 3  # a few hundred KB of real text


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(prepare_once(tmp_path_factory.mktemp("data") / "chars", "char"))


def prepare_once(out: Path, tokenizer: str) -> Path:
    src = out.parent / "corpus.txt"
    src.write_text(TEXT)
    return prepare(str(src), out, tokenizer=tokenizer).path


def config(data, out, **kw) -> TrainConfig:
    base = dict(data=data, out=str(out), model={"preset": "tiny", "dropout": 0.1}, max_steps=12, batch_size=4,
                block_size=32, eval_interval=4, eval_steps=2, log_interval=1, sample_tokens=0, progress=False,
                warmup_steps=3, lr=3e-3, device="cpu")  # CPU runs are bit-exact (test_cuda.py covers CUDA)
    return TrainConfig(**{**base, **kw})


def losses(run):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run)]


def weights(run):
    return load_file(str(Path(run) / "model.safetensors"))


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(data_dir, tmp_path, optimizer):
    train(config(data_dir, tmp_path / "full", optimizer=optimizer))
    train(config(data_dir, tmp_path / "part", optimizer=optimizer, stop_at=5))  # same schedule, stopped early
    train(config(data_dir, tmp_path / "part", optimizer=optimizer, stop_at=0), resume=True)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_incompatible_config_or_corrupt_file_keeps_the_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    train(config(data_dir, run, max_steps=4))
    before = digest(run / "checkpoints")
    with pytest.raises(TrainingError, match="model differs from the saved one in n_layer"):
        train(config(data_dir, run, max_steps=8, model={"preset": "tiny", "dropout": 0.1, "n_layer": 3}), resume=True)
    other = str(prepare_once(tmp_path / "bpe", "bpe:300"))
    with pytest.raises(ValueError, match="tokenizer"):
        train(config(other, run, max_steps=8), resume=True)
    state = run / "checkpoints" / "step-000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before["step-000004/trainer_state.pt"] = hashlib.sha256(state.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="trainer_state.pt is corrupted"):
        train(config(data_dir, run, max_steps=8), resume=True)
    weights_file = run / "checkpoints" / "step-000004" / "model.safetensors"
    weights_file.write_bytes(b"\x00" * 50)
    before["step-000004/model.safetensors"] = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="model.safetensors is corrupted"):
        train(config(data_dir, run, max_steps=8), resume=True)
    assert digest(run / "checkpoints") == before  # nothing was written over


def test_existing_run_needs_resume_or_overwrite(data_dir, tmp_path):
    train(config(data_dir, tmp_path / "run", max_steps=4))
    with pytest.raises(TrainingError, match="already holds checkpoints; resume it with --resume"):
        train(config(data_dir, tmp_path / "run", max_steps=4))
    train(config(data_dir, tmp_path / "run", max_steps=4, overwrite=True))


KILL_SCRIPT = """
import sys
from lmforge.config import TrainConfig
from lmforge.train import train
cfg = TrainConfig.from_json(sys.argv[1])
train(cfg, resume=sys.argv[2] == "resume")
"""


def test_sigkill_at_random_moments_never_loses_the_last_checkpoint(data_dir, tmp_path):
    """Kill a training subprocess again and again (often mid-save); every time the run loads and resumes, and the
    end result equals an uninterrupted run."""
    cfg = config(data_dir, tmp_path / "run", max_steps=400, eval_interval=25, save_interval=1, keep_last=2,
                 model={"preset": "tiny", "dropout": 0.1, "n_embd": 128})
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    rng = random.Random(0)
    mode, kills, steps_seen = "new", 0, []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while kills < 8:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "cfg.json"), mode], env=env,
                                stderr=subprocess.PIPE)
        time.sleep(rng.uniform(2.5, 4.5))  # past the imports, somewhere in training or saving
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").glob("step-*")):
            continue  # killed before the first save: start again from scratch
        model, _ = lmforge.load(tmp_path / "run")  # the last complete checkpoint always loads
        state = torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=True)
        steps_seen.append(state["step"])
        mode = "resume"
    assert kills >= 3 and steps_seen == sorted(steps_seen)
    if mode == "resume":
        train(cfg.with_overrides({"progress": False}), resume=True)
    else:
        train(cfg.with_overrides({"overwrite": True}))
    train(cfg.with_overrides({"out": str(tmp_path / "straight")}))
    a, b = weights(tmp_path / "run"), weights(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r for r in losses(tmp_path / "run")] == losses(tmp_path / "straight")


# -------------------------------------------------------------------------------------------------- the loop

def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lin = cfg.with_overrides({"schedule": "linear"})
    assert lr_at(60, lin) == pytest.approx(0.55) and lr_at(35, lin) == pytest.approx(1.0 - 0.9 * 0.25)
    assert lr_at(100, cfg.with_overrides({"schedule": "constant"})) == 1.0


def test_schedules_as_fractions_of_the_run_fit_any_budget():
    """warmup_fraction and wsd follow the run's progress: of max_steps, or of max_seconds when time runs out first,
    so the same config warms up and anneals in a 30 s budget as in a 3-minute one."""
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_fraction=0.1, schedule="wsd", decay_fraction=0.4, max_steps=100)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(4, cfg) == pytest.approx(0.5)  # 1/100, 5/100 of 10%
    assert lr_at(9, cfg) == pytest.approx(1.0) and lr_at(59, cfg) == pytest.approx(1.0)  # stable to 60%
    assert lr_at(79, cfg) == pytest.approx(0.5) and lr_at(99, cfg) == pytest.approx(0.0)  # linear to min_lr
    timed = cfg.with_overrides({"max_steps": 10**6, "max_seconds": 30.0})  # the clock, not the steps, decides
    assert lr_at(0, timed, 1.5) == pytest.approx(0.5) and lr_at(500, timed, 12.0) == pytest.approx(1.0)
    assert lr_at(900, timed, 24.0) == pytest.approx(0.5) and lr_at(950, timed, 31.0) == pytest.approx(0.0)
    steps = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.5, max_steps=100)
    assert lr_at(5, steps) == pytest.approx(0.6) and lr_at(50, steps) == 1.0 and lr_at(75, steps) == pytest.approx(0.5)
    for bad in ({"warmup_fraction": 1.0}, {"decay_fraction": 0.0}, {"muon_lr": -1.0}, {"muon_lr": float("nan")},
                {"lr": float("inf")}, {"schedule": "wsd", "warmup_fraction": 0.5, "decay_fraction": 0.6}):
        with pytest.raises(lmforge.UserError):
            TrainConfig(**bad)


def test_muon_lr_keeps_its_ratio_to_lr_through_the_schedule(data_dir, tmp_path):
    from lmforge.train import lr_ratio, make_optimizers
    from lmforge.model import GPT
    cfg = config(data_dir, tmp_path / "run", optimizer="muon", lr=1e-3, muon_lr=2e-2)
    adamw, muon = make_optimizers(GPT(cfg.model_config({"vocab_size": 80})), cfg, torch.device("cpu"))
    assert muon.param_groups[0]["lr"] == 2e-2 and lr_ratio(muon, cfg) == pytest.approx(20.0)
    assert lr_ratio(adamw, cfg) == 1.0 and lr_ratio(muon, cfg.with_overrides({"muon_lr": 0.0})) == 1.0


class _SteppingClock:
    """A clock that moves 1/64 s at every reading (exact in binary): every step then takes 1/64 s, in every run."""
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1 / 64
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_time_budgeted_resume_is_exact(data_dir, tmp_path, monkeypatch):
    """A run with max_seconds, a warmup fraction and wsd (its learning rate a function of the seconds trained,
    which the checkpoint keeps), stopped and resumed, equals the run left alone: same losses, same weights."""
    import importlib
    train_module = importlib.import_module("lmforge.train")
    kw = dict(optimizer="muon", max_steps=10**4, max_seconds=20 / 64, warmup_fraction=0.2, schedule="wsd", min_lr=0.0)
    for run, stops in (("full", [0]), ("part", [7, 0])):
        for i, stop in enumerate(stops):
            monkeypatch.setattr(train_module, "time", _SteppingClock())
            train(config(data_dir, tmp_path / run, stop_at=stop, **kw), resume=i > 0)
    assert losses(tmp_path / "part") == losses(tmp_path / "full") and losses(tmp_path / "full")[-1][0] == 20
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming a run that has spent its budget takes no step (and says so), and changes nothing
    again = train(config(data_dir, tmp_path / "full", **kw), resume=True)
    assert again["step"] == 20 and again["stop_reason"] == "max_seconds" and again["val_loss"] is None
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    assert all(torch.equal(a[k], v) for k, v in weights(tmp_path / "full").items())


def test_training_learns_and_writes_its_outputs(data_dir, tmp_path):
    run = tmp_path / "run"
    summary = train(config(data_dir, run, max_steps=60, eval_interval=20, sample_tokens=30,
                           model={"preset": "tiny"}, batch_size=8))
    rows = read_metrics(run)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    vocab = lmforge.load_tokenizer(Path(data_dir) / "tokenizer.json").vocab_size
    assert len(vals) == 3 and vals[0] > vals[1] > vals[2]
    assert vals[-1] < np.log(vocab) - 1.2  # well below the loss of a uniform guess: it learns
    assert summary["val_loss"] == pytest.approx(vals[-1], abs=1e-6)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "samples.txt").read_text().count("=== step") == 3
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 60
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000040", "step-000060"]
    model, tok = lmforge.load(run)
    assert isinstance(lmforge.generate(model, tok, "def ", max_new_tokens=10, temperature=0), str)


def test_gradient_accumulation_matches_a_bigger_batch(data_dir, tmp_path):
    """Two micro-batches of the same windows, accumulated, give the step a single batch of both would."""
    from lmforge.data import Dataset, get_batch
    from lmforge.model import GPT
    cfg = config(data_dir, tmp_path / "x", model={"preset": "tiny"})
    model = GPT(cfg.model_config({"vocab_size": Dataset(data_dir).tokenizer.vocab_size}))
    tokens = Dataset(data_dir).tokens("train")
    (x0, y0), (x1, y1) = get_batch(tokens, 4, 32, 0, 0, 0), get_batch(tokens, 4, 32, 0, 0, 1)
    for x, y in ((x0, y0), (x1, y1)):
        (model(x, y)[1] / 2).backward()
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(torch.cat([x0, x1]), torch.cat([y0, y1]))[1].backward()
    for a, b in zip(accumulated, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(config(data_dir, run, max_steps=4))
    kept = digest(run / "checkpoints")
    from lmforge import model as model_module
    original = model_module.GPT.forward

    def poisoned(self, *args, **kwargs):
        logits, loss = original(self, *args, **kwargs)
        return logits, (loss * float("nan") if loss is not None and self.training else loss)
    monkeypatch.setattr(model_module.GPT, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5; the last good checkpoint \(step-000004\)"):
        train(config(data_dir, run, max_steps=8), resume=True)
    assert digest(run / "checkpoints") == kept


def test_pairs_data_trains_on_completions(tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(10)]
    (tmp_path / "add.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = prepare(str(tmp_path / "add.jsonl"), tmp_path / "pairs").path
    summary = train(config(str(data), tmp_path / "run", max_steps=30, block_size=16, model={"preset": "tiny"}))
    assert summary["val_loss"] < 2.5  # a loss over completion tokens only (digits and end-of-text)


def test_bad_config_and_data_are_one_line_errors(data_dir, tmp_path, capsys):
    assert main(["train", "--data", data_dir, "--out", str(tmp_path / "r"), "--max_step=5"]) == 2
    assert "unknown TrainConfig field 'max_step' (did you mean 'max_steps'?)" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "r")]) == 2
    assert "lmforge prepare" in capsys.readouterr().err
    assert main(["train", "--data", data_dir, "--out", str(tmp_path / "r"), "--block_size=10000000"]) == 2
    assert "block_size=10000000 does not fit" in capsys.readouterr().err
    assert main(["train", "--data", data_dir, "--out", str(tmp_path / "r"), "--model.n_head=5"]) == 2
    assert "n_embd=128 is not divisible by n_head=5" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "no config file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_toml_config_and_cli_overrides(data_dir, tmp_path, capsys):
    (tmp_path / "run.toml").write_text(f'data = "{data_dir}"\nout = "{tmp_path / "run"}"\nmax_steps = 3\n'
                                       'eval_interval = 3\nsample_tokens = 0\nprogress = false\nblock_size = 16\n'
                                       '[model]\npreset = "tiny"\nn_layer = 1\n')
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--batch_size=2", "--model.n_embd", "32"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["n_layer"] == 1 and saved["model"]["n_embd"] == 32 and saved["train"]["batch_size"] == 2
    assert "final val loss" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.slow
def test_compile_trains_like_eager(data_dir, tmp_path):
    eager = train(config(data_dir, tmp_path / "eager", max_steps=4, model={"preset": "tiny"}))
    compiled = train(config(data_dir, tmp_path / "compiled", max_steps=4, model={"preset": "tiny"}, compile=True))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-4)
    # the compiling first step is setting up, not training: a time budget's schedule falls on training steps
    assert compiled["seconds"]["setup"] > 5 * compiled["train_seconds"]


# --------------------------------------------------------------------------------------------- multi-process

def _torchrun(n: int, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port",
           str(29500 + random.randint(0, 2000)), "-m", "lmforge", "train", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_equal_one_process_with_two_accumulation_steps(data_dir, tmp_path, fsdp):
    common = ["--data", data_dir, "--model=tiny", "--model.dropout=0", "--max_steps=6", "--eval_interval=3",
              "--eval_steps=2", "--batch_size=4", "--block_size=32", "--sample_tokens=0", "--progress=false",
              "--log_interval=1", "--warmup_steps=2", "--device=cpu"]
    _torchrun(2, common + ["--out", str(tmp_path / "two"), "--grad_accum=1", f"--fsdp={fsdp}"])
    assert main(["train", *common, "--out", str(tmp_path / "one"), "--grad_accum=2"]) == 0
    a, b = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (_, la, va), (_, lb, vb) in zip(a, b):
        assert (la is None) == (lb is None) and (la is None or abs(la - lb) < 1e-5)
        assert (va is None) == (vb is None) and (va is None or abs(va - vb) < 1e-5)
    wa, wb = weights(tmp_path / "two"), weights(tmp_path / "one")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_processes_share_one_clock_under_a_time_budget(data_dir, tmp_path):
    """Each rank times its steps, and they differ: the ranks take the slowest one's time, so that they follow one
    learning rate and stop at the same step (a rank that stopped alone would leave the others waiting)."""
    _torchrun(2, ["--data", data_dir, "--model=tiny", "--max_steps=1000000", "--max_seconds=3", "--eval_interval=50",
                  "--eval_steps=2", "--batch_size=4", "--block_size=32", "--sample_tokens=0", "--progress=false",
                  "--log_interval=1", "--warmup_fraction=0.1", "--schedule=wsd", "--min_lr=0", "--device=cpu",
                  "--out", str(tmp_path / "two")])
    rows = read_metrics(tmp_path / "two")
    assert rows[-1]["val_loss"] and rows[-2]["train_seconds"] >= 3
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] < 0.05 * max(lrs)  # annealed to min_lr (0) at the budget's end


def test_resume_survives_a_metrics_line_cut_short(data_dir, tmp_path):
    """A crash mid-append leaves half a line in metrics.jsonl: resume drops it and keeps the history."""
    train(config(data_dir, tmp_path / "full"))
    run = tmp_path / "part"
    train(config(data_dir, run, stop_at=5))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    train(config(data_dir, run, stop_at=0), resume=True)
    assert losses(run) == losses(tmp_path / "full")


def test_more_processes_than_cuda_devices_is_a_one_line_error(monkeypatch):
    """Seen on a one-GPU machine: torchrun --nproc_per_node=2 ended in CUDA's 'invalid device ordinal' traceback."""
    from lmforge.errors import UserError
    from lmforge.train import init_distributed
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"--nproc_per_node=1.*or train on CPU with --device=cpu"):
        init_distributed("auto")


def _reference_muon_steps(weight, grads, lr, weight_decay, rule, momentum=0.95, a=3.4445, b=-4.7750, c=2.0315):
    """Muon written out plainly in float64: Nesterov momentum, the quintic Newton-Schulz iteration (5 steps),
    decoupled weight decay, and the learning rate scaled by the matrix's shape (torch.optim.Muon's rules)."""
    w, buf = weight.double().clone(), torch.zeros_like(weight, dtype=torch.float64)
    rows, cols = weight.shape
    scale = 0.2 * max(rows, cols) ** 0.5 if rule == "match_rms_adamw" else max(1, rows / cols) ** 0.5
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        x = (1 - momentum) * g + momentum * buf
        x = x.T if rows > cols else x
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.T if rows > cols else x
        w = w * (1 - lr * weight_decay) - lr * scale * x
    return w


@pytest.mark.parametrize("shape,rule", [((24, 40), "match_rms_adamw"), ((40, 24), "match_rms_adamw"), ((32, 32), None)])
def test_muon_on_cpu_is_torch_muon_with_the_iteration_in_float32(shape, rule):
    """lmforge's Muon runs the Newton-Schulz iteration in float32 on a CPU (bfloat16 matrix products are emulated on
    CPUs without bfloat16 instructions, and ran up to 100x slower): it equals a float64 reference to float32 rounding
    over several steps, and torch.optim.Muon (bfloat16) to bfloat16 rounding, so it is the same algorithm."""
    from lmforge.train import Muon
    torch.manual_seed(0)
    start = torch.randn(*shape)
    grads = [torch.randn(*shape) for _ in range(4)]
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=rule)
    opts = [Muon([ours], **kw), torch.optim.Muon([theirs], **kw)]
    for g in grads:
        for p, opt in zip((ours, theirs), opts):
            p.grad = g.clone()
            opt.step()
    want = _reference_muon_steps(start, grads, 0.02, 0.1, rule)
    torch.testing.assert_close(ours.detach().double(), want, atol=2e-5, rtol=1e-5)
    moved = (want - start.double()).abs().max()
    assert (theirs.detach().double() - want).abs().max() < 0.05 * moved  # bfloat16's iteration, close to ours
    assert (ours.detach().double() - want).abs().max() < 1e-3 * moved  # ours, far closer


def test_muon_steps_matrices_of_one_shape_together_as_each_alone():
    """The Newton-Schulz iteration runs batched over every matrix of a shape: each matrix ends where the float64
    reference takes it alone (wide, tall and square ones in one optimizer)."""
    from lmforge.train import Muon
    torch.manual_seed(1)
    shapes = [(24, 40), (24, 40), (40, 24), (32, 32), (24, 40)]
    starts = [torch.randn(*s) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(3)]
    params = [w.clone().requires_grad_() for w in starts]
    opt = Muon(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    for i, p in enumerate(params):
        want = _reference_muon_steps(starts[i], [step[i] for step in grads], 0.02, 0.1, "match_rms_adamw")
        torch.testing.assert_close(p.detach().double(), want, atol=2e-5, rtol=1e-5)
