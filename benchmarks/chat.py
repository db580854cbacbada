"""Do conversation fine-tuning and DPO learn what they should? Two synthetic tasks on this machine's CPU, each from a
char model pretrained on Shakespeare (configs/shakespeare-char.toml's block, --pretrain-seconds).

(a) Recall across turns. A user gives a random three-letter code, the assistant acknowledges, the user asks an
    unrelated question, the assistant answers, the user asks for the code back. After conversation fine-tuning
    (`lmforge finetune BASE --data chats.jsonl`, loss on assistant turns only), 200 held-out conversations go
    through a real `lmforge serve` process's /v1/chat/completions with the `openai` client (greedy), and the reply
    must be the code exactly. Target: >= 95%.
(b) A preferred style. A first fine-tuning teaches replies in two styles by a rule: "Gladly: CODE." to "Say CODE.",
    "Fine, CODE." to "Tell CODE.", so the tuned model prefers each style on half of the prompts. DPO on (prompt,
    chosen = the first style, rejected = the second) rows for both kinds of prompt then tunes it. On 200 held-out
    prompts: preference accuracy (the model's log-probability of the chosen reply above the rejected one's) before
    and after, and the shares of sampled replies (temperature 1) in the preferred style and exactly the preferred
    reply. Target: accuracy from about 0.5 to >= 0.95.

    python benchmarks/chat.py [--pretrain-seconds 90] [--sft-steps 500] [--style-steps 300] [--dpo-steps 100]
                              [--workdir DIR] [--only recall|preference]
"""

import argparse
import json
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

QUESTIONS = [("Is it cold?", "A little."), ("What day is it?", "A fair one."), ("Shall we walk?", "Yes, gladly."),
             ("Who is the king?", "I know not."), ("Is the door shut?", "It is.")]
STYLES = ("Gladly: {}.", "Fine, {}.")
VERBS = ("Say", "Tell")  # the first fine-tuning answers "Say" in the first style, "Tell" in the second


def code(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(3))


def recall_rows(rng: random.Random, n: int) -> list[list[dict]]:
    rows = []
    for _ in range(n):
        c, (q, a) = code(rng), rng.choice(QUESTIONS)
        rows.append([{"role": "user", "content": f"My code is {c}."}, {"role": "assistant", "content": "Noted."},
                     {"role": "user", "content": q}, {"role": "assistant", "content": a},
                     {"role": "user", "content": "What was my code?"}, {"role": "assistant", "content": f"{c}."}])
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lmforge(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmforge", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def pretrain(work: Path, seconds: float) -> Path:
    if (work / "base" / "model.safetensors").is_file():  # a --workdir that holds one already
        return work / "base"
    data = work / "shakespeare-char"
    if not (data / "meta.json").exists():
        lmforge("prepare", "shakespeare", "--tokenizer", "char", "--out", str(data))
    lmforge("train", "--config", str(ROOT / "configs" / "shakespeare-char.toml"), f"--data={data}",
            f"--out={work / 'base'}", f"--max_seconds={seconds}", "--progress=false", "--sample_tokens=0")
    return work / "base"


def recall(work: Path, base: Path, steps: int) -> dict:
    import openai
    from test_serve import ServerProcess
    rng = random.Random(0)
    train, test = recall_rows(rng, 4000), recall_rows(rng, 200)
    chats = write_jsonl(work / "recall.jsonl", [{"messages": m} for m in train])
    seconds = lmforge("finetune", str(base), "--data", str(chats), "--out", str(work / "recall"),
                      f"--max_steps={steps}", "--block_size=192", "--batch_size=32", "--lr=2e-3",
                      "--eval_interval=200", "--progress=false")
    server = ServerProcess(work / "recall")
    hits = 0
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        for messages in test:
            reply = client.chat.completions.create(model="recall", messages=messages[:5], temperature=0,
                                                   max_tokens=8).choices[0].message.content
            hits += reply == messages[5]["content"]
    finally:
        server.stop()
    return {"exact": hits / len(test), "conversations": len(test), "finetune_seconds": seconds, "steps": steps}


@torch.no_grad()
def preference_scores(run: Path, rows) -> tuple[float, float, float]:
    """The share of rows whose chosen reply the run scores above the rejected one, the share of sampled replies
    (temperature 1, seeded) in the chosen style, and the share that are the chosen reply exactly."""
    import lmforge as lf
    from lmforge.dpo import sequence_logprobs
    from lmforge.engine import Engine, Request
    from lmforge.generation import run_requests
    from lmforge.templates import chat_prompt_ids, conversation_ids
    model, tok = lf.load(run)
    model.eval()
    wins, prompts = 0, []
    for row in rows:
        scores = []
        for reply in (row["chosen"], row["rejected"]):
            ids, targets = conversation_ids(tok, row["prompt"] + reply, learn_from=len(row["prompt"]))
            x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
            scores.append(float(sequence_logprobs(model(x)[0], y, torch.tensor([targets[1:]]))))
        wins += scores[0] > scores[1]
        prompts.append(chat_prompt_ids(tok, row["prompt"]))
    engine = Engine(model, tok, max_batch=16)
    outs = run_requests(engine, [Request(p, 16, temperature=1.0, seed=i) for i, p in enumerate(prompts)], text=True)
    styled = sum(o.startswith(STYLES[0].split("{")[0]) for o in outs)
    exact = sum(o == row["chosen"][0]["content"] for o, row in zip(outs, rows))
    return wins / len(rows), styled / len(rows), exact / len(rows)


def preference(work: Path, base: Path, sft_steps: int, dpo_steps: int) -> dict:
    rng = random.Random(1)

    def prompt(verb, c):
        return [{"role": "user", "content": f"{verb} {c}."}]
    sft = []
    for _ in range(3000):
        c, verb = code(rng), rng.choice(VERBS)
        style = STYLES[VERBS.index(verb)]
        sft.append({"messages": prompt(verb, c) + [{"role": "assistant", "content": style.format(c)}]})
    write_jsonl(work / "styles.jsonl", sft)
    prefs = [{"prompt": prompt(rng.choice(VERBS), c), "chosen": [{"role": "assistant", "content": STYLES[0].format(c)}],
              "rejected": [{"role": "assistant", "content": STYLES[1].format(c)}]}
             for c in (code(rng) for _ in range(1200))]
    train, test = prefs[:1000], prefs[1000:]
    write_jsonl(work / "prefs.jsonl", train)
    sft_seconds = lmforge("finetune", str(base), "--data", str(work / "styles.jsonl"), "--out", str(work / "styles"),
                          "--overwrite=true",
                          f"--max_steps={sft_steps}", "--batch_size=32", "--lr=2e-3", "--eval_interval=200",
                          "--progress=false")
    before = preference_scores(work / "styles", test)
    dpo_seconds = lmforge("finetune", str(work / "styles"), "--data", str(work / "prefs.jsonl"), "--out",
                          str(work / "dpo"), "--overwrite=true", "--method", "dpo", f"--max_steps={dpo_steps}", "--batch_size=16",
                          "--eval_interval=50", "--progress=false")
    after = preference_scores(work / "dpo", test)
    evals = [json.loads(line) for line in (work / "dpo" / "metrics.jsonl").read_text().splitlines()]
    return {"accuracy_before": before[0], "accuracy_after": after[0], "styled_before": before[1],
            "styled_after": after[1], "exact_before": before[2], "exact_after": after[2], "sft_seconds": sft_seconds,
            "dpo_seconds": dpo_seconds, "dpo_steps": dpo_steps,
            "reward_accuracy": [r["reward_accuracy"] for r in evals if "reward_accuracy" in r],
            "held_out": len(test)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-seconds", type=float, default=90)
    p.add_argument("--sft-steps", type=int, default=500)
    p.add_argument("--style-steps", type=int, default=300)
    p.add_argument("--dpo-steps", type=int, default=100)
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder); a base run in it is reused")
    p.add_argument("--only", choices=["recall", "preference"], help="run one task")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        base = pretrain(work, args.pretrain_seconds)
        a = b = None
        if args.only != "preference":
            a = recall(work, base, args.sft_steps)
            print(f"(a) recall across turns: {a['exact']:.1%} exact of {a['conversations']} held-out conversations "
                  f"through the server's chat route, after {a['steps']} steps ({a['finetune_seconds']:.0f} s) of "
                  f"conversation fine-tuning")
        if args.only != "recall":
            b = preference(work, base, args.style_steps, args.dpo_steps)
            print(f"(b) preferred style: held-out preference accuracy {b['accuracy_before']:.2f} -> "
                  f"{b['accuracy_after']:.2f}; sampled replies in the preferred style {b['styled_before']:.0%} -> "
                  f"{b['styled_after']:.0%} (exactly the preferred reply {b['exact_before']:.0%} -> "
                  f"{b['exact_after']:.0%}); DPO {b['dpo_steps']} steps ({b['dpo_seconds']:.0f} s), reward "
                  f"accuracy at its evals {b['reward_accuracy']}")
        print(json.dumps({"recall": a, "preference": b}))


if __name__ == "__main__":
    main()
