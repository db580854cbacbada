"""A minute of mixed traffic with faults against a real server (benchmarks/soak.py, short): nothing lost or
answered twice, seeded answers stable, malformed bodies refused in OpenAI's shape, every slot free at the end, and
resident memory flat after warm-up."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from test_serve import ServerProcess, make_run  # noqa: E402


@pytest.mark.slow
def test_a_minute_of_mixed_traffic_with_faults_leaves_nothing_behind(tmp_path):
    from soak import print_summary, soak
    server = ServerProcess(make_run(tmp_path / "tiny"), "--max-batch", "8", "--max-queue", "64")
    try:
        summary = soak(server.url, server.proc.pid, clients=16, seconds=60, window=15)
    finally:
        server.stop()
    print_summary(summary)
    assert summary["problems"] == []
    counts = summary["counts"]
    assert counts["answered"] > 200 and counts["malformed"] > 5 and counts["dropped"] > 5, counts
    assert summary["running"] == 0 and summary["waiting"] == 0
    assert summary["rss_growth"] is not None and summary["rss_growth"] < 0.05, summary
    assert all(w["requests"] > 0 for w in summary["windows"])
