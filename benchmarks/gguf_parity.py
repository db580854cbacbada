"""llama.cpp runs what lmforge exports: GGUF files of the Llama block (RoPE, SwiGLU, RMSNorm, no biases: llama.cpp's
`llama`, with the character vocabulary as SentencePiece pieces) and of a `modern` run (QK-norm: `qwen3`, a BPE
vocabulary), loaded by llama.cpp through llama-cpp-python; its greedy ids equal ours for 64 tokens, and its
tokenizer splits text as ours does. With --run, a trained run of yours instead (e.g. the demo's runs/shakespeare-char).

    python benchmarks/gguf_parity.py [--run runs/shakespeare-char] [--tokens 64]

Random weights are perturbed off their init (norm weights too) so a wrong layout cannot hide behind ones.
Needs the bench extra (llama-cpp-python builds llama.cpp from source).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from lmforge import GPT, BPETokenizer, CharTokenizer, ModelConfig
from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic
from lmforge.generation import decode_ids
from lmforge.gguf import export_gguf
from lmforge.runs import load

TEXT = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? 1234 ça 🙂\n") * 30


def random_run(folder: Path, tok, **fields) -> Path:
    cfg = ModelConfig.preset("nano", vocab_size=tok.vocab_size, block_size=256, **fields)
    folder.mkdir(parents=True)
    write_json_atomic(folder / "config.json", run_config(cfg))
    tok.save(folder / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.wte.weight.mul_(4)  # sharper distributions: greedy paths away from near-ties
    save_checkpoint(folder, weights_for_saving(model.state_dict(), cfg.tie_embeddings), {"step": 1}, run_config(cfg))
    return folder


def compare(run: Path, gguf_path: Path, tokens: int) -> bool:
    from llama_cpp import Llama
    model, tok = load(run)
    llm = Llama(model_path=str(gguf_path), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    prompt_text = "ROMEO:\nBut, soft! what light"
    ours_prompt = tok.encode(prompt_text)
    theirs_prompt = llm.tokenize(prompt_text.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(ours_prompt)
    with torch.no_grad():
        ours_logits = model(torch.tensor([ours_prompt]))[0][0]
    diff = (torch.tensor(llm.scores[:len(ours_prompt)]) - ours_logits).abs().max().item()
    theirs = []
    for _ in range(tokens):
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        theirs.append(nxt)
        llm.eval([nxt])
    ours = decode_ids(model, [ours_prompt], tokens, temperature=0)[0]
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    arch = llm.metadata.get("general.architecture")
    llm.close()
    print(f"{run.name}: llama.cpp arch {arch}, tokenizer {'equal' if theirs_prompt == ours_prompt else 'DIFFERS'} "
          f"on the prompt, prompt logits within {diff:.1e}, greedy ids equal for {same}/{tokens} tokens")
    if theirs_prompt != ours_prompt:
        print(f"  ours   {ours_prompt}\n  theirs {theirs_prompt}")
    return same == tokens and theirs_prompt == ours_prompt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a trained run to check instead of the two random ones")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: pip install -c constraints.txt -e '.[bench]' (builds llama.cpp)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.run:
            runs = [Path(args.run)]
        else:
            runs = [random_run(tmp / "demo-block", CharTokenizer.train(TEXT), position="rope", mlp="swiglu",
                               norm="rmsnorm", bias=False),
                    random_run(tmp / "modern", BPETokenizer.train(TEXT, 400),
                               **{k: v for k, v in ModelConfig.preset("modern-tiny").to_dict().items()
                                  if k not in ("vocab_size", "block_size")})]
        ok = True
        for run in runs:
            path = export_gguf(run, tmp / f"{run.name}.gguf", "f32")
            ok &= compare(run, path, args.tokens)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
