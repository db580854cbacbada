"""Memory and time of conversion: a random ~500M-parameter Llama-shaped model built with transformers and saved in
shards, then, each in a process of its own (peak RSS is the process's own high-water mark):
- lmforge import-hf (folder -> run) and lmforge export --format hf (run -> folder), tensor by tensor;
- transformers' own AutoModelForCausalLM.from_pretrained + save_pretrained of the same folder.
Prints seconds and peak RSS, also as a multiple of the checkpoint's size; the target is under 1.3x.

    python benchmarks/convert.py [--layers 24] [--width 1280] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = {
    "lmforge import-hf": "from lmforge.hf import import_hf; import_hf(SRC, OUT / 'run', dtype='auto', tokenizer=TOK)",
    "lmforge export hf": "from lmforge.hf import export_hf; export_hf(OUT / 'run', OUT / 'back')",
    "transformers load + save": (
        "import torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(SRC, dtype='auto'); "
        "m.save_pretrained(OUT / 'hf-back')"),
}


HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"


def run_step(code: str, src: Path, out: Path, tok: Path) -> tuple[float, int, int]:
    """Seconds, peak RSS and RSS after importing torch (bytes) of code in a fresh Python. The peak is the kernel's
    VmHWM, which starts anew with the process (ru_maxrss would carry the parent's over exec)."""
    script = (f"import time\nfrom pathlib import Path\nSRC, OUT, TOK = Path({str(src)!r}), "
              f"Path({str(out)!r}), Path({str(tok)!r})\nimport torch\nbase = {HWM}\nt = time.perf_counter()\n"
              f"{code}\nprint(time.perf_counter() - t, {HWM}, base)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seconds, peak, base = done.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(peak), int(base)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shard", default="500MB")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        src = tmp / "src"
        build = (  # in a process of its own, so this one stays small (its children start from it)
            "import torch, transformers\n"
            f"cfg = transformers.LlamaConfig(vocab_size={args.vocab}, hidden_size={args.width}, "
            f"intermediate_size={args.width * 3}, num_hidden_layers={args.layers}, "
            f"num_attention_heads={args.width // 64}, num_key_value_heads={args.width // 256}, "
            "max_position_embeddings=2048, tie_word_embeddings=False)\n"
            "with torch.device('meta'):\n    model = transformers.LlamaForCausalLM(cfg)\n"
            f"model = model.to_empty(device='cpu').to(torch.{args.dtype})\n"
            "with torch.no_grad():\n    [p.normal_(0, 0.02) for p in model.parameters()]\n"
            f"model.save_pretrained({str(src)!r}, max_shard_size={args.shard!r})\n"
            "print(sum(p.numel() for p in model.parameters()), torch.get_num_threads())")
        done = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, check=True)
        n, threads = map(int, done.stdout.split()[-2:])
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        shards = len(list(src.glob("*.safetensors")))
        import tokenizers
        from tokenizers import models, pre_tokenizers
        tok = tokenizers.Tokenizer(models.BPE({"<unk>": 0, "</s>": 1, **{chr(97 + i): 2 + i for i in range(26)}}, []))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        (tmp / "tok").mkdir()
        tok.save(str(tmp / "tok" / "tokenizer.json"))
        (tmp / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
        print(f"Llama-shaped, {n / 1e6:.0f}M parameters, {args.dtype}, {shards} shards, {size / 1e9:.2f} GB; "
              f"{threads} threads")
        print("| step | seconds | peak RSS | RSS with torch imported | peak / checkpoint |")
        print("|---|---|---|---|---|")
        for name, code in STEPS.items():
            seconds, peak, base = run_step(code, src, tmp, tmp / "tok" / "tokenizer.json")
            print(f"| {name} | {seconds:.1f} | {peak / 1e9:.2f} GB | {(peak - base) / 1e9:.2f} GB | "
                  f"{peak / size:.2f}x |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
