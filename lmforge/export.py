"""The `export` verb: a run written for other tools, one format a module, each imported only when asked for.

    lmforge export runs/base --format hf --out hf/base          # hf.py: the family's folder (transformers, vLLM)
    lmforge export runs/base --format onnx --out onnx/base      # onnx.py: prefill and decode graphs, KV cache in/out
    lmforge export runs/base --format gguf --out base.gguf      # gguf.py: one file for llama.cpp (--type f16, q8_0, q4_0)
"""

from __future__ import annotations

from .errors import UserError

FORMATS = ("hf", "onnx", "gguf")


def export(run, out, format: str, type: str | None = None, checkpoint: str | None = None, force: bool = False):
    """Export run to out in format; returns the path written. type: GGUF's weight type (default f32)."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if type is not None and format != "gguf":
        raise UserError(f"--type is for --format gguf (f32, f16, q8_0 or q4_0); --format {format} takes none")
    if format == "hf":
        from .hf import export_hf
        return export_hf(run, out, force=force, checkpoint=checkpoint)
    if format == "onnx":
        from .onnx import export_onnx
        return export_onnx(run, out, checkpoint=checkpoint, force=force)
    from .gguf import export_gguf
    return export_gguf(run, out, type or "f32", checkpoint=checkpoint, force=force)


def export_cli(args) -> int:
    out = export(args.run, args.out, args.format, args.type, args.checkpoint, args.force)
    said = {"hf": "its family's Hugging Face folder; load it with transformers' from_pretrained",
            "onnx": f"prefill.onnx, decode.onnx, onnx.json; run it with lmforge generate {out}",
            "gguf": f"{args.type or 'f32'} GGUF for llama.cpp, {out.stat().st_size / 1e6:.1f} MB"}[args.format]
    print(f"exported {args.run} to {out} ({said})")
    return 0
