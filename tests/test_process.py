"""A library call changes nothing process-wide: thread counts, the global random number generators, warning filters,
signal handlers, the environment, torch's global switches, logging and matplotlib's backend are as they were after
preparing data, training (with its evaluations, samples and curves), loading, generating, stepping an engine,
quantizing, and fine-tuning with LoRA, loading and merging the adapter.
(glibc's malloc settings: tests/test_pages.py, by the page faults they cause.) It runs in a fresh process, so that
nothing another test did is mistaken for the library's doing."""

import json
import subprocess
import sys

SCRIPT = r'''
import json, logging, os, signal, sys, warnings
import torch
import matplotlib
# PyTorch's own modules that these calls import on first use set things when imported, whoever imports them (any
# torch.optim optimizer imports torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR and, through sympy, a warning
# filter; building C++ extensions imports setuptools, which adds its vendored path): imported first, they are not
# mistaken for lmforge's doing
import torch._dynamo, torch.utils.cpp_extension
os.environ.pop("MPLBACKEND", None)  # (so that a backend switch would show as one)

def state():
    return {
        "threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
        "rng": torch.get_rng_state().tolist(),
        "warnings": [repr(f) for f in warnings.filters],
        "signals": {s.name: repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)},
        "environ": dict(os.environ),
        "torch": [str(torch.get_default_dtype()), torch.is_grad_enabled(),
                  torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision(),
                  torch.backends.mkldnn.enabled, torch.backends.cudnn.benchmark, torch.is_anomaly_enabled()],
        "logging": [logging.getLogger().level, [repr(h) for h in logging.getLogger().handlers]],
        # (read without rcParams' own lookup, which would import pyplot and resolve the backend itself)
        "matplotlib": ["matplotlib.pyplot" in sys.modules, repr(dict.__getitem__(matplotlib.rcParams, "backend"))],
        "sys.path": list(sys.path),
        "stdio": [id(sys.stdout), id(sys.stderr)],
    }

torch.manual_seed(1234)
before = state()

import lmforge
from lmforge import Engine, Request, TrainConfig
from lmforge.data import prepare
from lmforge.quantize import quantize_model

root = sys.argv[1]
with open(f"{root}/corpus.txt", "w") as f:
    f.write("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 60)
prepare(f"{root}/corpus.txt", f"{root}/data", tokenizer="char", workers=1)
lmforge.train(TrainConfig(data=f"{root}/data", out=f"{root}/run", model="tiny", block_size=32, batch_size=4,
                          max_steps=4, eval_interval=2, eval_steps=1, sample_tokens=8, progress=False))
model, tok = lmforge.load(f"{root}/run")
lmforge.generate(model, tok, "To be", max_new_tokens=5, seed=0)
list(lmforge.generate(model, tok, "To be", max_new_tokens=5, seed=0, stream=True))
engine = Engine(model, tok, max_batch=2)
for i in range(2):
    engine.add(Request(tok.encode("To"), max_new_tokens=4, temperature=0.8, seed=i))
while engine.has_work():
    engine.step()
small = quantize_model(model, "int8")
small(torch.tensor([tok.encode("To be")]))
from lmforge.finetune import finetune, merge
with open(f"{root}/pairs.jsonl", "w") as f:
    f.write("".join(json.dumps({"prompt": "To be", "completion": ", or not"}) + "\n" for _ in range(40)))
lora = {"rank": 2, "alpha": 4.0, "targets": "attn", "dropout": 0.0}
finetune(f"{root}/run", f"{root}/pairs.jsonl", f"{root}/lora", lora=lora,
         overrides={"max_steps": "2", "eval_interval": "2", "eval_steps": "1", "sample_tokens": "0",
                    "progress": "false"})
lora_model, _ = lmforge.load(f"{root}/lora")
merge(f"{root}/lora", f"{root}/merged")
quantize_model(lora_model, "int4")
after = state()
print(json.dumps({"before": before, "after": after}))
'''


def test_library_calls_leave_the_process_as_they_found_it(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    states = json.loads(out.stdout.strip().splitlines()[-1])
    before, after = states["before"], states["after"]
    assert (tmp_path / "run" / "curves.png").is_file()  # (the curves were drawn, with matplotlib)
    for key in before:
        assert after[key] == before[key], f"{key} changed: {before[key]!r} -> {after[key]!r}"[:2000]
