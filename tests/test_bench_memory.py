"""``cortex bench memory``: the report's structure on a tiny model, and recall@k itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cortex_plugins.bench.memory import INDEXES, TORCH_EXACT, MemoryBench, ivf_nlist, recall_at_k
from tests.conftest import tiny_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = tiny_manifest(memory=[{"type": "stm", "settings": {"capacity": 8}}, {"type": "archive", "settings": {"pq_m": 8}}])


class TinySettings(MemoryBench.Settings):
    """Sizes small enough for a test; everything else as shipped."""

    quick_sizes: list[int] = [600, 1500]
    queries: int = 64
    batch: int = 32
    nprobe: list[int] = [2, 8]
    ef_search: list[int] = [16, 64]


@pytest.fixture
def tiny_suite(monkeypatch):
    monkeypatch.setattr(MemoryBench, "Settings", TinySettings)


def test_recall_at_k_on_a_hand_made_case():
    exact = torch.tensor([[0, 1, 2], [3, 4, 5], [6, -1, -1], [-1, -1, -1]])
    found = torch.tensor([[2, 1, 9], [5, 4, 3], [6, 7, 8], [1, 2, 3]])
    # 2/3, 3/3, 1/1 (only one exact neighbour); the query with no exact neighbour is left out
    assert recall_at_k(found, exact, 3) == pytest.approx((2 / 3 + 1 + 1) / 3)
    # only the first k of each count: at k=1, row 0 found 2 where exact has 0
    assert recall_at_k(found, exact, 1) == pytest.approx((0 + 0 + 1) / 3)
    # an empty result slot (-1) never matches an empty exact slot
    assert recall_at_k(torch.tensor([[-1, -1]]), torch.tensor([[4, -1]]), 2) == 0.0
    assert recall_at_k(torch.tensor([[4, 7]]), torch.tensor([[7, 4]]), 2) == 1.0


def test_ivf_nlist_is_the_power_of_two_nearest_sqrt():
    assert [ivf_nlist(n) for n in (10_000, 100_000, 1_000_000)] == [128, 256, 1024]


def test_bench_memory_quick_report_structure(cortex_cli, tmp_path, tiny_suite):
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(TINY, encoding="utf-8")
    out = tmp_path / "out"
    result = cortex_cli("bench", "memory", manifest, "--quick", "-o", out)
    assert result.exit_code == 0, result.output
    report_dir = out / "memory"
    data = json.loads((report_dir / "results.json").read_text())
    setup = data["figures"]["setup"]
    assert setup["sizes"] == [600, 1500] and setup["batch"] == 32 and setup["queries"] == 64
    assert setup["faiss_threads"] >= 1 and setup["torch_threads"] >= 1
    fig = data["figures"][str(manifest)]
    assert fig["keys"]["source"] == "manifest (built untrained)"
    assert fig["keys"]["how"].startswith("memory_system.keys")
    assert fig["keys"]["unique_keys"] == 1500 and fig["keys"]["documents"] > 0
    for n in ("600", "1500"):
        per = fig["sizes"][n]
        assert set(per) == {*INDEXES, TORCH_EXACT}
        for index in INDEXES:
            entry = per[index]
            assert entry["build_s"] >= 0 and entry["bytes_per_entry"] > 0
            assert entry["stats"]["entries"] == int(n)
            for point in entry["points"]:
                assert 0.0 <= point["recall"]["mean"] <= 1.0 and point["qps"]["mean"] > 0
        assert per["ltm:flat"]["best"]["recall"]["mean"] == 1.0  # the ground truth itself
        assert len(per["ltm:ivf"]["points"]) == 2 and len(per["ltm:hnsw"]["points"]) == 2
        assert per["archive"]["settings"]["pq_m"] == 8  # the manifest's own archive settings
        assert per["archive"]["settings"]["deepest_level_entries"] == int(n)
        assert per["archive"]["fp32_ratio"] < 1.0  # compressed
    names = [c["name"] for c in data["checks"]]
    assert len(names) == 4
    assert any("LTM @1,500" in c and "queries/s / Flat" in c for c in names)
    assert any("Archive @1,500" in c and "bytes/entry / fp32 tier" in c for c in names)
    assert all(isinstance(c["passed"], bool) for c in data["checks"])
    for png in ("memory_queries_per_s.png", "memory_recall.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keys = np.load(report_dir / "keys-tiny.npy")
    assert keys.shape == (1500, 32) and len({k.tobytes() for k in keys}) > 1400
    report = (report_dir / "report.md").read_text()
    assert "recall@10" in report and "Tier stats()" in report and "untrained" in report
    # a second run reuses the cached keys
    again = cortex_cli("bench", "memory", manifest, "--quick", "-o", out)
    assert again.exit_code == 0, again.output
    data = json.loads((report_dir / "results.json").read_text())
    assert data["figures"][str(manifest)]["keys"]["cache"].startswith("reused")


def test_bench_memory_reads_a_run_directory_without_memory(cortex_cli, tmp_path, monkeypatch):
    class Smaller(TinySettings):
        quick_sizes: list[int] = [700]
        hnsw_budget_s: float = 1e-9  # every HNSW build is abandoned at once

    monkeypatch.setattr(MemoryBench, "Settings", Smaller)
    manifest = tmp_path / "plain.yaml"
    manifest.write_text(tiny_manifest("plain"))
    built = cortex_cli("build", manifest, "-o", tmp_path / "runs")
    assert built.exit_code == 0, built.output
    run = tmp_path / "runs" / "plain"
    result = cortex_cli("bench", "memory", run, "--quick", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "memory" / "results.json").read_text())
    keys = data["figures"][str(run)]["keys"]
    assert keys["source"].startswith("run directory") and "hidden_states(layer=1, window=16)" in keys["how"]
    assert Path(tmp_path / "out" / "memory" / "keys-plain.npy").is_file()
    hnsw = data["figures"][str(run)]["sizes"]["700"]["ltm:hnsw"]
    assert "hnsw_budget_s" in hnsw["skipped"] and hnsw["entries_built"] < 700
    assert len(data["checks"]) == 4  # the LTM check falls back on IVF
    assert "skipped" in (tmp_path / "out" / "memory" / "report.md").read_text()
