"""2 MB pages (lmforge/pages.py): collapsing moves memory in place, keeps every value, and the engine decodes the same
tokens from collapsed weights."""

import platform
from pathlib import Path

import pytest
import torch

from lmforge import GPT, Engine, ModelConfig, Request
from lmforge import pages
from lmforge.generation import generate_naive

MB = 1 << 20


def _collapse_supported() -> bool:
    """Linux 6.1 or newer with transparent huge pages not turned off: what MADV_COLLAPSE needs."""
    if not platform.system() == "Linux":
        return False
    try:
        enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    return "[never]" not in enabled and (major, minor) >= (6, 1)


needs_collapse = pytest.mark.skipif(not _collapse_supported(), reason="MADV_COLLAPSE needs Linux 6.1+ with THP on")


def test_pages_are_those_around_each_big_storage_once():
    big = torch.randn(3 * MB // 4)  # 3 MB
    views = [big[: 1000], big[5:].view(-1)]  # views of one storage: its pages once
    small = torch.randn(1000)
    found = pages._pages([big, *views, small, None, big.to_mkldnn()])
    p, n = big.untyped_storage().data_ptr(), big.untyped_storage().nbytes()
    assert found == sorted(set(found)) and all(page % pages.HUGE == 0 for page in found)
    assert found[0] <= p < found[0] + pages.HUGE and found[-1] < p + n <= found[-1] + pages.HUGE
    assert [b - a for a, b in zip(found, found[1:])] == [pages.HUGE] * (len(found) - 1)  # none missed


@needs_collapse
def test_collapse_keeps_the_address_and_every_value():
    x = torch.randn(16 * MB // 4)
    before, address = x.clone(), x.data_ptr()
    done = pages.collapse([x])
    assert done >= 16 * MB  # (widened to the 2 MB boundaries around it)
    assert x.data_ptr() == address and torch.equal(x, before)
    assert pages.huge_page_bytes() >= 14 * MB
    assert pages.collapse([x]) == done  # again: already on 2 MB pages, the same answer


def test_collapse_does_nothing_where_the_system_cannot(monkeypatch):
    monkeypatch.setitem(pages._state, "madvise", None)  # what _madvise() holds off Linux
    assert pages.collapse([torch.randn(4 * MB)]) == 0


def big_vocab_model() -> GPT:
    torch.manual_seed(0)  # a 12,000-token vocabulary: a 3 MB embedding, on 2 MB pages once collapsed
    model = GPT(ModelConfig.preset("tiny", vocab_size=12000, block_size=32)).eval()
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
    prompts = [[1, 2, 3], [7, 11000, 5, 5]]
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
