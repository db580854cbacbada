"""`lmforge <verb>`: a table from verbs to functions; each verb's module is imported only when that verb runs.

User mistakes (bad paths, bad values, bad options) raise UserError and end as one line on stderr with exit status 2,
as do operating-system errors on a path the user named (permission denied, ...); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .errors import UserError

# verb -> (module:function, one-line help, example)
VERBS: dict[str, tuple[str, str, str]] = {}
BUILDERS: dict[str, callable] = {}  # verb -> function adding its arguments to a parser


def verb(name: str, target: str, help: str, example: str):
    """Register a verb. The builder adds its arguments; the target runs it with the parsed namespace."""
    def register(build):
        VERBS[name] = (target, help, example)
        BUILDERS[name] = build
        return build
    return register


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake raised as a UserError (one line) instead of usage text and sys.exit."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__
    parser = _Parser(
        prog="lmforge", description="From raw text to a trained, served generative language model.",
        epilog="Run `lmforge VERB --help` for a verb's options and an example.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (_, help_text, example) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        BUILDERS[name](p)
    return parser


def _terminated(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line itself: a SIGTERM unwinds like Ctrl-C, so temporary folders are removed
        import signal
        signal.signal(signal.SIGTERM, _terminated)
        argv = sys.argv[1:]
    parser = build_parser()
    verb = next((a for a in argv if a in VERBS), None)
    try:
        args, extra = parser.parse_known_args(argv)
        if args.verb is None:
            if extra:
                raise UserError(f"unrecognized arguments: {' '.join(extra)} (see lmforge --help)")
            parser.print_help()
            return 0
        if extra and not getattr(args, "accepts_overrides", False):
            raise UserError(f"unrecognized arguments: {' '.join(extra)} (see lmforge {args.verb} --help)")
        args.overrides = extra
        module_name, function_name = VERBS[args.verb][0].split(":")
        handler = getattr(import_module(f"lmforge.{module_name}"), function_name)
        result = handler(args)
    except UserError as e:  # the user's mistake: one line; anything else is a bug and keeps its traceback
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lmforge{' ' + verb if verb else ''}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        print(f"lmforge{' ' + verb if verb else ''}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


# ---------------------------------------------------------------------------------------------------------- verbs

@verb("prepare", "data:prepare_cli", "Tokenize a corpus into train.bin / val.bin / tokenizer.json / meta.json.",
      "lmforge prepare shakespeare --tokenizer char --out data/shakespeare-char")
def _prepare_args(p):
    p.add_argument("source", help="a file, folder or glob of .txt/.md/.jsonl/.parquet (.gz/.zst too), a URL, "
                                  "hf:NAME[:CONFIG], a .jsonl of pairs, conversations or preferences, or the built-in "
                                  "'shakespeare'")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--tokenizer", default="char", help="char | bpe:VOCAB (e.g. bpe:8192) | gpt2 (default: char)")
    p.add_argument("--tokenizer-from", help="reuse the tokenizer of a run or data directory")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation (default 0.1)")
    p.add_argument("--split", default="auto", choices=["auto", "documents", "tail"],
                   help="hold out whole documents or the tail of the token stream (auto: documents when there are "
                        "enough of them)")
    p.add_argument("--errors", default="strict", choices=["strict", "replace"], help="on invalid UTF-8")
    p.add_argument("--text-field", default="text", help="the text of a .jsonl/.parquet row or hf: dataset (default text)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: every core)")
    p.add_argument("--shard-tokens", type=int, default=500_000_000,
                   help="tokens per output file; more make numbered shards (default 500,000,000)")
    p.add_argument("--tokenizer-sample", type=int, default=None, metavar="CHARS",
                   help="learn a char/BPE vocabulary from the first CHARS characters of training text only")
    p.add_argument("--max-len", type=int, help="conversations and preferences: refuse a row longer than this many "
                                               "tokens")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


@verb("train", "train:train_cli", "Train a model (or resume a run) on prepared data.",
      "lmforge train --config configs/shakespeare-char.toml --max_steps=500 --model.n_layer=4")
def _train_args(p):
    p.add_argument("--config", help="a TOML file of TrainConfig fields (see configs/)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this directory from its last checkpoint")
    p.set_defaults(accepts_overrides=True)
    p.epilog += ("\n\nany TrainConfig field can follow as --field=value; model fields as --model.field=value, "
                 "a preset as --model=NAME")


@verb("eval", "train:eval_cli", "Report loss and perplexity of a run on prepared data (or exact match on pairs).",
      "lmforge eval runs/shakespeare-char --data data/shakespeare-char")
def _eval_args(p):
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="prepared data directory (default: the run's own)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batches", type=int, default=50, help="batches to average over (default 50)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest; e.g. RUN/best)")
    p.add_argument("--pairs", help="a .jsonl of prompt/completion pairs: report exact match of greedy completions "
                                   "and the loss per completion token instead")


@verb("evaluate", "evaluate:evaluate_cli", "Score a run on standard benchmarks with lm-evaluation-harness.",
      "lmforge evaluate runs/shakespeare-char --tasks my_tasks/ --limit 100 --out results.json")
def _evaluate_args(p):
    p.add_argument("run", help="run directory (or an ONNX export, for loglikelihood tasks)")
    p.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated (hellaswag,arc_easy), or a "
                                                  "folder of task YAML (all its tasks)")
    p.add_argument("--include-path", action="append", metavar="DIR", help="a folder of task YAML whose tasks "
                                                                          "--tasks may name (repeatable)")
    p.add_argument("--num-fewshot", type=int, help="examples before each item (default: each task's own, else 0)")
    p.add_argument("--limit", help="items per task (e.g. 100), or a fraction of them below 1 (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--max-length", type=int, help="tokens of context (default: the model's block_size)")
    p.add_argument("--gen-kwargs", help="generation settings over the tasks' own, e.g. temperature=0,max_gen_toks=64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest; e.g. RUN/best)")
    p.add_argument("--log-samples", action="store_true", help="keep every item's requests and scores in the results")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render each prompt as a conversation through the run's chat template (as it is served)")
    p.add_argument("--fewshot-as-multiturn", action="store_true",
                   help="with --apply-chat-template: each few-shot example a user/assistant exchange")
    p.add_argument("--system-instruction", help="a system message before each prompt")
    p.add_argument("--out", help="write lm-eval's results JSON here (with the run, checkpoint and weights' sha256)")


@verb("generate", "generation:generate_cli", "Generate text from a trained run.",
      'lmforge generate runs/shakespeare-char --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50')
def _generate_args(p):
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--interactive", action="store_true", help="keep reading prompts from the terminal")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--early-stopping", default="exact", choices=["exact", "true", "false", "never"],
                   help="beam search's stopping rule: exact (stop when nothing can still win), or transformers' "
                        "true / false / never, for the same results as its generate()")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--json-schema", metavar="FILE", help="output JSON that follows this schema (`object`: any JSON "
                                                          "object); needs lmforge[structured]")
    p.add_argument("--regex", help="output text the whole of which matches this regular expression")
    p.add_argument("--grammar", metavar="FILE", help="output text this grammar (Lark, or llama.cpp's GBNF) accepts")
    p.add_argument("--choice", action="append", default=[], help="output one of these strings (repeatable)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    _dtype_arg(p)
    p.add_argument("--compile", action="store_true",
                   help="decode through a torch.compile'd static-cache step: faster per token, but the first "
                        "generation compiles (tens of seconds on a small CPU)")
    p.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest; e.g. RUN/best)")


@verb("chat", "chat:chat_cli", "Chat with a run in the terminal, through its chat template, replies streamed.",
      'lmforge chat runs/chat --system "You are terse." --temperature 0.7')
def _chat_args(p):
    p.add_argument("run", help="run directory")
    p.add_argument("--system", help="a system message that starts the conversation")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest reply (default: 256, or half the context when that is less)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the first reply (each later one: seed + turn)")
    p.add_argument("--device", default="cpu")
    _dtype_arg(p)
    p.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest; e.g. RUN/best)")
    p.epilog += "\n\nin the chat: /reset forgets the history, /system TEXT sets the system message, /exit leaves"


def _dtype_arg(p):  # the names of runs.INFERENCE_DTYPES (this module imports no torch)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations while decoding (bfloat16: half the memory, on a GPU about half the "
                        "time a token takes)")


@verb("serve", "serve:serve_cli", "Serve a run over an OpenAI-compatible HTTP API, with a playground page at /.",
      "lmforge serve runs/shakespeare-char --port 8000 --max-batch 16")
def _serve_args(p):
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directory; give several to serve each as its own model id, routed by 'model'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (or set LMFORGE_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together (engine slots, shared by every run served; default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 429 (over every run served; default 64)")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask for "
                                                        "(default: the model's context)")
    p.add_argument("--max-seq-len", type=int, help="positions per slot: prompt plus new tokens (default: block_size)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compile the decode step at startup (auto: on CUDA, and on CPU for models of 20M+ params)")
    p.add_argument("--model-name", action="append",
                   help="the model id clients name (default: the run folder's name); once per run, in order")
    p.add_argument("--drain-seconds", type=float, default=30,
                   help="on SIGTERM: new requests get 503 while running ones get this long to finish; the rest then "
                        "end with finish_reason 'shutdown' (default 30)")
    p.add_argument("--request-timeout", type=float, help="end a request's generations after this many seconds "
                                                           "(finish_reason 'timeout'; default: no limit)")
    p.add_argument("--max-connections", type=int, help="requests handled at once past which new ones get 503 "
                                                       "(default: no limit besides --max-queue)")
    p.add_argument("--client-timeout", type=float, default=60,
                   help="drop a client that takes longer than this to send its body (408) or to take the next part "
                        "of its answer (default 60 s)")
    p.add_argument("--log-prompts", action="store_true", help="put prompts in the per-request log lines")
    p.add_argument("--device", default="cpu")
    _dtype_arg(p)
    p.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest; e.g. RUN/best)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


@verb("finetune", "finetune:finetune_cli",
      "Fine-tune a run on prompt/completion pairs or conversations, or on preferences (DPO); fully or with LoRA.",
      "lmforge finetune runs/base --data chats.jsonl --out runs/chat --max_steps=500")
def _finetune_args(p):
    p.add_argument("run", help="the base run")
    p.add_argument("--data", required=True, help="a .jsonl of pairs {prompt, completion}, conversations {messages}, "
                                                 "or with --method dpo preferences {prompt, chosen, rejected}; or a "
                                                 "prepared data directory")
    p.add_argument("--val", help="a .jsonl of validation rows (default: the last 10%% of --data)")
    p.add_argument("--method", default="sft", choices=["sft", "dpo"],
                   help="sft: learn the replies (default); dpo: prefer chosen over rejected, against the base")
    p.add_argument("--beta", type=float, help="DPO's beta (default 0.1): larger keeps the policy nearer the base")
    p.add_argument("--max-len", type=int, help="refuse a row longer than this many tokens (default: cut rows longer "
                                               "than the context from the left, and say how many)")
    p.add_argument("--out", required=True, help="the new run's directory")
    p.add_argument("--config", help="a TOML file of TrainConfig fields")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (default 0: all weights)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale: alpha / rank (default 16)")
    p.add_argument("--lora-targets", default="attn,mlp", help="modules that take LoRA (default attn,mlp)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.set_defaults(accepts_overrides=True)
    p.epilog += "\n\nany TrainConfig field can follow as --field=value (fine-tuning defaults: lr 1e-3, LoRA 1e-2)"


@verb("merge", "finetune:merge_cli", "Fold a LoRA run's adapter into its base weights, as a new run.",
      "lmforge merge runs/tuned --out runs/tuned-merged")
def _merge_args(p):
    p.add_argument("run", help="a LoRA run")
    p.add_argument("--out", required=True, help="the merged run's directory")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


@verb("quantize", "quantize_run:quantize_cli", "Quantize a run's weights to int8 or int4, behind a quality gate.",
      "lmforge quantize runs/base --method int8 --out runs/base-int8")
def _quantize_args(p):
    p.add_argument("run", help="a full-precision run (a LoRA run is quantized with its adapter merged)")
    p.add_argument("--method", required=True, choices=["int8", "int4"],
                   help="int8: per-channel symmetric; int4: group-wise, two weights a byte")
    p.add_argument("--out", required=True, help="the quantized run's directory")
    p.add_argument("--group-size", type=int, default=None, help="int4 inputs sharing a scale (default 32)")
    p.add_argument("--data", help="prepared data to measure the quantized model on (default: the run's own; its "
                                  "val split)")
    p.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens to measure on (default 16,384)")
    p.add_argument("--max-kl", type=float, default=0.05,
                   help="refuse to write the run when the mean KL divergence from the original's next-token "
                        "distributions exceeds this, in nats (default 0.05)")
    p.add_argument("--force", action="store_true", help="write the run even above --max-kl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest)")
    p.add_argument("--device", default="cpu", help="where to quantize and measure (default cpu)")


@verb("export", "export:export_cli", "Export a run for other tools: Hugging Face, ONNX (with a KV cache) or GGUF.",
      "lmforge export runs/base --format onnx --out onnx/base")
def _export_args(p):
    p.add_argument("run", help="run directory (a LoRA run exports with its adapter merged)")
    p.add_argument("--format", required=True, choices=["hf", "onnx", "gguf"],
                   help="hf: the family's folder (GPT-2, Llama, Qwen2 or Qwen3, by the run's block); onnx: prefill "
                        "and decode graphs with the KV cache in and out; gguf: one file for llama.cpp, tokenizer inside")
    p.add_argument("--out", required=True, help="output folder (a file for gguf)")
    p.add_argument("--type", choices=["f32", "f16", "q8_0", "q4_0"], help="GGUF weight type (default f32)")
    p.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the latest)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


@verb("import-hf", "hf:import_cli", "Import a Hugging Face checkpoint (GPT-2, Llama, Mistral, Qwen2, Qwen3) as a run.",
      "lmforge import-hf path/to/SmolLM2-135M --out runs/smol")
def _import_args(p):
    p.add_argument("source", help="a folder with config.json and model.safetensors (or its shards and "
                                  "model.safetensors.index.json, or pytorch_model.bin), and its tokenizer unless "
                                  "--tokenizer names one; or a hub id such as gpt2 (downloaded when online)")
    p.add_argument("--out", required=True, help="the new run's directory")
    p.add_argument("--tokenizer", metavar="gpt2|PATH",
                   help="the tokenizer, for a folder that holds weights only: gpt2 (GPT-2's own), a tokenizer.json, "
                        "or a folder with vocab.json + merges.txt (default: the folder's own)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="the run's weight type (default float32; auto keeps the checkpoint's, e.g. bfloat16)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
