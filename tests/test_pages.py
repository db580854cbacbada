"""2 MB pages (lmforge/cpu/pages.py): collapsing moves memory in place, keeps every value, and the engine decodes the same
tokens from collapsed weights."""

import platform
import re
from pathlib import Path

import pytest
import torch

from lmforge import GPT, Engine, ModelConfig, Request
from lmforge.cpu import pages
from lmforge.generation import generate_naive

MB = 1 << 20


def _collapse_supported() -> bool:
    """Linux 6.1 or newer with transparent huge pages not turned off: what MADV_COLLAPSE needs."""
    version = re.match(r"(\d+)\.(\d+)", platform.release())
    return (platform.system() == "Linux" and pages.huge_page_size() > 0 and version is not None
            and tuple(map(int, version.groups())) >= (6, 1))


needs_collapse = pytest.mark.skipif(not _collapse_supported(), reason="MADV_COLLAPSE needs Linux 6.1+ with THP on")
H = 2 * MB


def test_the_pages_asked_for_lie_wholly_inside_the_tensors():
    big = torch.randn(9 * MB // 4)  # 9 MB: 3 or 4 whole 2 MB pages inside it
    start, end = big.data_ptr(), big.data_ptr() + 9 * MB
    inside = list(range(-(-start // H) * H, end // H * H, H))
    assert pages._pages([big, big[:1000], None], H) == inside  # (a view adds nothing beyond itself)
    assert pages._pages([big[: MB // 4]], H) == [p for p in inside if p + H <= start + MB]  # a view: its own bytes
    first, second = big[: 4 * MB // 4], big[4 * MB // 4 + 2048:]  # 8 KB apart: one stretch across the gap
    assert pages._pages([first, second], H) == inside
    assert pages._pages([big[: 3 * MB // 4], big[6 * MB // 4:]], H) != inside  # 3 MB apart: not joined
    assert pages._pages([big.share_memory_()], H) == []  # shared memory is left alone
    if torch.backends.mkldnn.is_available():
        assert pages._pages([torch.randn(1024, 1024).to_mkldnn()], H) == []


@needs_collapse
def test_collapse_keeps_the_address_and_every_value():
    x = torch.randn(16 * MB // 4)
    before, address = x.clone(), x.data_ptr()
    done = pages.collapse([x])
    assert done >= len(pages._pages([x], H)) * H - H  # every whole page inside (one may find no free page at once)
    assert x.data_ptr() == address and torch.equal(x, before)
    assert pages.huge_page_bytes() >= done


def test_collapse_does_nothing_where_the_system_cannot(monkeypatch):
    monkeypatch.setitem(pages._state, "madvise", None)  # what _madvise() holds off Linux or with THP "never"
    assert pages.collapse([torch.randn(4 * MB)]) == 0


def big_vocab_model() -> GPT:
    torch.manual_seed(0)  # a 20,000-token vocabulary: a 5 MB embedding, holding at least one whole 2 MB page
    model = GPT(ModelConfig.preset("tiny", vocab_size=20000, block_size=32)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(5)  # sharper distributions: greedy paths are not near-ties
    return model


@needs_collapse
def test_engine_on_2mb_pages_decodes_what_the_naive_path_does():
    model = big_vocab_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, max_batch=2, max_seq_len=32, huge_pages=True)
    assert engine.huge_page_bytes >= 2 * MB
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    prompts = [[1, 2, 3], [7, 19000, 5, 5]]
    ids = [engine.add(Request(p, max_new_tokens=12, temperature=0)) for p in prompts]
    out = {rid: [] for rid in ids}
    while engine.has_work():
        for e in engine.step():
            out[e.request_id].append(e.token)
    for rid, p in zip(ids, prompts):
        assert out[rid] == generate_naive(model, p, 12, temperature=0)


def test_only_compiled_engines_collapse_by_default():
    model = big_vocab_model()
    assert Engine(model, max_batch=1, max_seq_len=8).huge_pages is False
    assert Engine(model, max_batch=1, max_seq_len=8, huge_pages=False).huge_page_bytes == 0
    assert Engine(model, max_batch=1, max_seq_len=8, huge_pages=True).huge_pages is True


def test_nothing_is_moved_where_huge_pages_are_turned_off(tmp_path, monkeypatch):
    (tmp_path / "enabled").write_text("always madvise [never]\n")
    (tmp_path / "hpage_pmd_size").write_text("2097152\n")
    monkeypatch.setattr(pages, "THP", tmp_path)
    monkeypatch.setattr(pages, "_state", {})
    assert pages.huge_page_size() == 0 and pages.collapse([torch.randn(4 * MB)]) == 0
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    monkeypatch.setattr(pages, "_state", {})
    assert pages.huge_page_size() == 2 * MB



FAULTS_SCRIPT = """
import ctypes, resource, sys
touched = []  # a spy on glibc's mallopt: every lookup of it through ctypes, whoever makes it
class SpyCDLL(ctypes.CDLL):
    def __getattr__(self, name):
        if name == "mallopt":
            touched.append(name)
        return super().__getattr__(name)
    def __getitem__(self, name):
        if name == "mallopt":
            touched.append(name)
        return super().__getitem__(name)
ctypes.CDLL = SpyCDLL
import torch
from lmforge import GPT, Engine, ModelConfig, Request
from lmforge.cpu import keep_freed_memory, pages
engine = Engine(GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)), max_batch=1)
engine.add(Request([1, 2], max_new_tokens=3, seed=0))
while engine.has_work():
    engine.step()
if sys.argv[1] == "opt-in":  # what lmforge generate and lmforge serve do for their own process
    keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def forward():  # four 20 MB activations freed together: 80 MB free at the top of the heap, past the most glibc
    blocks = [torch.ones(5 << 20) for _ in range(4)]  # ever lets lie there (twice its largest mmap threshold, 32 MB)
    del blocks
forward(); forward()
before = faults()
for _ in range(10):
    forward()
print(pages._state.get("kept"), bool(touched), (faults() - before) / 10)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_kept_only_when_the_process_opts_in():
    """An engine built and run leaves glibc's malloc settings as they were (a spy on mallopt sees no lookup of it).
    A process that opts in (lmforge.cpu.keep_freed_memory(), as the CLI and the server do) has a forward's freed
    activations reused by the next without a page fault; one started with its own malloc settings keeps them, and so does one that says
    LMFORGE_KEEP_FREED_MEMORY=0."""
    import os
    import subprocess
    import sys

    ours = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD",
            "LMFORGE_KEEP_FREED_MEMORY")

    def run(mode, **env):
        base = {k: v for k, v in os.environ.items() if k not in ours}
        kept, touched, faults = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True,
                                               text=True, check=True, env={**base, **env}).stdout.split()
        return kept, touched == "True", float(faults)

    kept, touched, _ = run("engine")  # a library call: mallopt is never looked up, glibc's settings stand (whether
    assert kept == "None" and not touched  # glibc then trims depends on the allocation history: not asserted)
    kept, touched, faults = run("opt-in")
    assert kept == "True" and touched and faults < 1024  # (0 alone; 512 pages once in a full parallel test run: 2 MB
    # of the 80, where trimming faults in all 20,480 pages)
    kept, _, faults = run("opt-in", MALLOC_TRIM_THRESHOLD_="131072")  # the process's own setting stands: glibc
    assert kept == "False" and faults > 10_000  # trims, and the 80 MB (20,480 pages) are faulted in again
    assert run("opt-in", LMFORGE_KEEP_FREED_MEMORY="0")[0] == "False"


CLI_SCRIPT = """
import sys
from lmforge.cli import main
from lmforge.cpu import pages
code = main(sys.argv[1:])
print(code, pages._state.get("kept"))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_generate_and_serve_commands_opt_in_for_their_own_process(tmp_path):
    """`lmforge generate` and `lmforge serve` own their process and keep freed memory on CPU (serve opts in before it
    loads the run, so a run that is not there still shows it)."""
    import os
    import subprocess
    import sys

    from lmforge.checkpoint import run_config, save_checkpoint, weights_for_saving, write_json_atomic
    from lmforge.tokenizer import CharTokenizer
    tok = CharTokenizer.train("to be or not")
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(run / "config.json", run_config(cfg))
    tok.save(run / "tokenizer.json")
    save_checkpoint(run, weights_for_saving(GPT(cfg).state_dict(), True), {"step": 1}, run_config(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                                                            "GLIBC_TUNABLES", "LD_PRELOAD", "LMFORGE_KEEP_FREED_MEMORY")}

    def run_cli(*argv):
        out = subprocess.run([sys.executable, "-c", CLI_SCRIPT, *argv], capture_output=True, text=True, env=env,
                             timeout=300)
        return out.stdout.split()[-2:]

    assert run_cli("generate", str(run), "--prompt", "to", "--max-new-tokens", "3", "--seed", "0") == ["0", "True"]
    assert run_cli("serve", str(tmp_path / "missing")) == ["2", "True"]
    assert run_cli("eval", str(run), "--data", str(tmp_path / "missing")) == ["2", "None"]  # (nothing else does)
