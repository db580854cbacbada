"""lm-evaluation-harness over runs, offline: a small model trained here, tasks written by the test (multiple choice,
rolling perplexity, generate_until) as lm-eval YAML over local JSON. Three routes agree item by item: `lmforge
evaluate`, lm-eval's local-completions against a real `lmforge serve` process, lm-eval's hf model on the run's
exported folder. Bad input is one line."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lmforge.cli import main  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.evaluate import evaluate  # noqa: E402

PLACES = {"cat": "mat", "dog": "log", "fox": "box", "hen": "pen", "owl": "elm", "pig": "sty"}
COLOURS = ["red", "old", "big", "shy", "wet", "fat", "sad", "odd", "new", "hot"]


def _sentence(rng: random.Random) -> tuple[str, str]:
    animal = rng.choice(list(PLACES))
    return f"the {rng.choice(COLOURS)} {animal} sat on the", f" {PLACES[animal]}."


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run of the demo's block trained for a few seconds on sentences whose last word follows from the animal,
    its Hugging Face export, and a folder of three tasks."""
    from lmforge import train
    from lmforge.config import TrainConfig
    from lmforge.data import prepare
    root = tmp_path_factory.mktemp("evaluate")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join("".join(_sentence(rng)) for _ in range(3000)) + "\n")
    data = prepare(str(root / "corpus.txt"), root / "data").path
    train(TrainConfig(data=str(data), out=str(root / "run"), max_steps=150, batch_size=16, block_size=64, lr=3e-3,
                      warmup_steps=10, eval_interval=150, eval_steps=2, sample_tokens=0, progress=False, seed=0,
                      model={"preset": "tiny", "position": "rope", "mlp": "swiglu", "norm": "rmsnorm",
                             "bias": False}))
    assert main(["export", str(root / "run"), "--format", "hf", "--out", str(root / "hf")]) == 0
    tasks = root / "tasks"
    tasks.mkdir()
    mc = []
    for _ in range(60):
        context, answer = _sentence(rng)
        choices = sorted([answer] + rng.sample([f" {p}." for p in sorted(PLACES.values()) if f" {p}." != answer], 3))
        mc.append({"context": context, "choices": choices, "label": choices.index(answer)})
    gen = [{"context": c, "answer": a.rstrip(".")} for c, a in (_sentence(rng) for _ in range(12))]  # "." stops
    docs = [{"text": " ".join("".join(_sentence(rng)) for _ in range(8))} for _ in range(6)]  # past the window
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", docs)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_files = lambda name: f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / name}.jsonl\n" \
                              f"test_split: test\n"  # noqa: E731
    (tasks / "mc.yaml").write_text(
        "task: animals_mc\n" + data_files("mc") + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "gen.yaml").write_text(
        "task: animals_gen\n" + data_files("gen") + "output_type: generate_until\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "ppl.yaml").write_text(
        "task: animals_ppl\n" + data_files("ppl") + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return root


@pytest.fixture(scope="module")
def onnx_export(world):
    pytest.importorskip("onnxruntime")
    assert main(["export", str(world / "run"), "--format", "onnx", "--out", str(world / "onnx")]) == 0
    return world / "onnx"


def _scores(results, task):
    """Each item's loglikelihoods (one per choice, or the document's) and its generations."""
    return [[r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in s["resps"]]
            for s in results["samples"][task]]


def _hf(world, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    return simple_evaluate(model="hf", model_args=f"pretrained={world / 'hf'},dtype=float32", tasks=tasks,
                           task_manager=TaskManager(include_path=str(world / "tasks"), include_defaults=False),
                           log_samples=True, device="cpu", batch_size=4)


def test_three_routes_agree_item_by_item_on_a_trained_model(world):
    """(a) lmforge evaluate, (b) lm-eval's local-completions against `lmforge serve` (its tokenizer read through
    the server's /tokenize routes), (c) lm-eval's hf model on the exported folder: per-item loglikelihoods within
    1e-3, equal accuracies, on 60 multiple-choice items."""
    import httpx
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    sys.path.insert(0, os.path.dirname(__file__))
    from test_serve import ServerProcess
    a = evaluate(world / "run", ["animals_mc"], include_path=world / "tasks", log_samples=True)
    c = _hf(world, ["animals_mc"])
    server = ServerProcess(world / "run")
    try:
        info = httpx.get(server.url + "/tokenizer_info").json()
        assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
        ids = httpx.post(server.url + "/tokenize", json={"prompt": "the cat<|endoftext|>"}).json()["tokens"]
        assert ids[-1] == info["vocab_size"] - 1 and len(ids) == 8  # the special token's text is the token
        assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "the cat<|endoftext|>"
        b = simple_evaluate(model="local-completions", tasks=["animals_mc"], log_samples=True,
                            model_args=f"base_url={server.url}/v1/completions,model=run,max_length=64",
                            task_manager=TaskManager(include_path=str(world / "tasks"), include_defaults=False))
    finally:
        server.stop()
    ours, served, theirs = (np.array(_scores(r, "animals_mc")) for r in (a, b, c))
    assert ours.shape == (60, 4) and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    np.testing.assert_allclose(ours, served, atol=1e-3, rtol=0)
    accuracy = [r["results"]["animals_mc"]["acc,none"] for r in (a, b, c)]
    assert accuracy[0] == accuracy[1] == accuracy[2] > 0.5, accuracy  # and the model learned the task
    assert a["lmforge"]["step"] == 150 and len(a["lmforge"]["weights_sha256"]) == 64
    assert a["lmforge"]["config"]["model"]["position"] == "rope"


def test_rolling_perplexity_and_generation_equal_transformers(world):
    """Documents longer than the context are scored in lm-eval's rolling windows, as the hf model scores them;
    greedy generations with a stop string are the same text."""
    a = evaluate(world / "run", ["animals_ppl", "animals_gen"], include_path=world / "tasks", log_samples=True)
    c = _hf(world, ["animals_ppl", "animals_gen"])
    np.testing.assert_allclose(_scores(a, "animals_ppl"), _scores(c, "animals_ppl"), atol=1e-3, rtol=0)
    assert _scores(a, "animals_gen") == _scores(c, "animals_gen")
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert a["results"]["animals_ppl"][metric] == pytest.approx(c["results"]["animals_ppl"][metric], rel=1e-4)
    assert a["results"]["animals_gen"]["exact_match,none"] == c["results"]["animals_gen"]["exact_match,none"] > 0.5
    sampled = "do_sample=true,temperature=1.5"  # an item's sample is its own, whichever tasks run beside it
    alone = evaluate(world / "run", ["animals_gen"], include_path=world / "tasks", log_samples=True,
                     gen_kwargs=sampled)
    beside = evaluate(world / "run", ["animals_ppl", "animals_gen"], include_path=world / "tasks", log_samples=True,
                      gen_kwargs=sampled)
    assert _scores(alone, "animals_gen") == _scores(beside, "animals_gen") != _scores(a, "animals_gen")


def test_the_cli_and_lm_evals_own_command_line(world, tmp_path, capsys):
    """`lmforge evaluate RUN --tasks DIR` prints lm-eval's table and writes its JSON with the run beside it;
    `python -m lmforge.evaluate` is lm-eval's command line with `lmforge` among its models; the caller's random
    state is as it was."""
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    environ = dict(os.environ)
    assert main(["evaluate", str(world / "run"), "--tasks", str(world / "tasks"), "--limit", "10",
                 "--out", str(tmp_path / "results.json")]) == 0
    out = capsys.readouterr().out
    assert all(f"|{t}" in out.replace(" ", "") for t in ("animals_mc", "animals_gen", "animals_ppl")), out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["results"]) == {"animals_mc", "animals_gen", "animals_ppl"}
    assert saved["config"]["limit"] == 10 and saved["lmforge"]["run"] == str((world / "run").resolve())
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2]) and dict(os.environ) == environ
    proc = subprocess.run([sys.executable, "-m", "lmforge.evaluate", "--model", "lmforge", "--model_args",
                           f"run={world / 'run'}", "--batch_size", "4", "--tasks", "animals_mc", "--include_path",
                           str(world / "tasks"), "--limit", "10"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "animals_mc" in proc.stdout, proc.stderr[-2000:]
    mine = saved["results"]["animals_mc"]["acc,none"]
    row = next(line for line in proc.stdout.splitlines() if "animals_mc" in line)
    assert float(row.split("|")[7]) == pytest.approx(mine, abs=1e-4)


def test_bad_input_is_one_line(world, onnx_export, tmp_path, capsys):
    def fails(*args, env=None):
        if env:  # a separate process: the hub client reads its offline switch at import
            proc = subprocess.run([sys.executable, "-m", "lmforge", "evaluate", *args], capture_output=True,
                                  text=True, timeout=300, env={**os.environ, **env})
            code, err = proc.returncode, proc.stderr.strip().splitlines()[-1]
        else:
            code, err = main(["evaluate", *args]), capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error" in line.lower()]  # (datasets' progress bars aside)
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    run, tasks = str(world / "run"), str(world / "tasks")
    assert "unknown task 'animals_mcq'" in fails(run, "--tasks", "animals_mcq", "--include-path", tasks)
    assert "animals_mc" in fails(run, "--tasks", "animals_mcq", "--include-path", tasks)  # the close names
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: x\n  oops: [\n")
    assert f"{bad / 'broken.yaml'} is not valid YAML at line 2" in fails(run, "--tasks", str(bad))
    for limit in ("0", "-2", "1.5"):
        assert f"--limit {limit} evaluates nothing" in fails(run, "--tasks", tasks, "--limit", limit)
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "h.yaml").write_text("task: hub_task\ndataset_path: lmforge-test/not-a-dataset\noutput_type: "
                                "multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_choice: c\n"
                                "doc_to_target: 0\n")
    err = fails(run, "--tasks", str(hub), env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert "task hub_task: its data (lmforge-test/not-a-dataset) could not be loaded" in err
    assert "dataset_path: json" in err
    assert "generate_until tasks run on the engine" in fails(str(onnx_export), "--tasks", "animals_gen",
                                                              "--include-path", tasks, "--limit", "2")
    with pytest.raises(UserError, match="batch_size=0 must be a positive integer"):
        evaluate(run, ["animals_mc"], include_path=tasks, batch_size=0)
    for settings, words in (("max_new_tokens=3", "'max_new_tokens' is not one"),
                            ("do_sample=true,temperature=x", "temperature='x' must be a number"),
                            ("max_gen_toks=64", "max_gen_toks=64 leaves no room")):
        assert words in fails(run, "--tasks", "animals_gen", "--include-path", tasks, "--gen-kwargs", settings)
    assert "is a folder; name the results file" in fails(run, "--tasks", tasks, "--out", str(tmp_path))
    sys.path.insert(0, os.path.dirname(__file__))
    from test_serve import make_run
    learned = make_run(tmp_path / "learned", position="learned")
    assert "max_length=200 is past block_size=128" in fails(str(learned), "--tasks", tasks, "--max-length", "200")


def test_an_onnx_export_scores_as_the_run(world, onnx_export):
    """Loglikelihood tasks on the ONNX export (onnxruntime's prefill graph) give the run's scores."""
    a = evaluate(world / "run", ["animals_mc"], include_path=world / "tasks", log_samples=True, limit=20)
    o = evaluate(onnx_export, ["animals_mc"], include_path=world / "tasks", log_samples=True, limit=20)
    np.testing.assert_allclose(_scores(a, "animals_mc"), _scores(o, "animals_mc"), atol=1e-3, rtol=0)


def test_a_chat_template_is_applied_as_transformers_applies_it(world, tmp_path):
    """--apply-chat-template renders each prompt through the run's own template: the same contexts and scores as
    lm-eval's hf model applying the template the export carries."""
    import shutil

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmforge.tokenizer import load_tokenizer
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    tok = load_tokenizer(run)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} " \
                        "{% endif %}"
    tok.save(run / "tokenizer.json")
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ours = evaluate(run, ["animals_mc"], include_path=world / "tasks", log_samples=True, limit=12,
                    apply_chat_template=True)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                             tasks=["animals_mc"], log_samples=True, device="cpu", batch_size=4, limit=12,
                             apply_chat_template=True,
                             task_manager=TaskManager(include_path=str(world / "tasks"), include_defaults=False))
    contexts = [s["arguments"][0][0] for s in ours["samples"]["animals_mc"]]
    assert contexts == [s["arguments"][0][0] for s in theirs["samples"]["animals_mc"]]
    assert all(c.endswith("sat on the ") for c in contexts)  # the template's generation prompt ends each one
    np.testing.assert_allclose(np.array(_scores(ours, "animals_mc")), np.array(_scores(theirs, "animals_mc")),
                               atol=1e-3, rtol=0)
