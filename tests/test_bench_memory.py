"""``cortex bench memory``: the report's structure on a tiny model, and recall@k itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cortex_plugins.bench.memory import (
    FAISS_EXACT,
    INDEXES,
    SCALE_INDEX,
    TORCH_EXACT,
    MemoryBench,
    clustered_keys,
    ivf_nlist,
    recall_at_k,
    torch_exact,
)
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
    shortlist: list[int] = [2, 8]
    pq_m: int = 8


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
        assert set(per) == {*INDEXES, FAISS_EXACT, TORCH_EXACT, "exact_1x"}
        assert per["exact_1x"] in (FAISS_EXACT, TORCH_EXACT)
        fastest = max(per[FAISS_EXACT]["best"]["qps"]["mean"], per[TORCH_EXACT]["best"]["qps"]["mean"])
        assert per[per["exact_1x"]]["speedup_vs_exact"] == 1.0
        for index in (FAISS_EXACT, TORCH_EXACT):  # both exact: the same top-10 as the ground truth
            points = per[index]["points"]  # on every CPU and on one, the faster one counting
            assert len(points) == len({os.cpu_count(), 1}) and all(p["recall"]["mean"] == 1.0 for p in points)
            assert per[index]["best"]["qps"]["mean"] == max(p["qps"]["mean"] for p in points)
        for index in INDEXES:
            entry = per[index]
            assert entry["build_s"] >= 0 and entry["bytes_per_entry"] > 0 and entry["index_bytes_per_entry"] > 0
            assert entry["peak_rss_bytes"] >= entry["rss_bytes"] > 0
            assert entry["speedup_vs_exact"] == pytest.approx(entry["best"]["qps"]["mean"] / fastest)
            assert all(p["cpu_qps"]["mean"] > 0 and p["cpu_speedup_vs_exact"] > 0 for p in entry["points"])
            assert entry["stats"]["entries"] == int(n)
            for point in entry["points"]:
                assert 0.0 <= point["recall"]["mean"] <= 1.0 and point["qps"]["mean"] > 0
        assert per["ltm:flat"]["best"]["recall"]["mean"] == 1.0  # exact as well
        assert len(per["ltm:ivf"]["points"]) == 2 and len(per["ltm:hnsw"]["points"]) == 2
        assert len(per["ltm:ivfpq"]["points"]) == 4  # nprobe x shortlist
        # 8 one-byte codes and an 8-byte id per key (plus codebooks), against 4 x 32 bytes for flat
        assert per["ltm:ivfpq"]["index_bytes_per_entry"] < per["ltm:flat"]["index_bytes_per_entry"]
        assert per["archive"]["settings"]["pq_m"] == 8  # the manifest's own archive settings
        assert per["archive"]["settings"]["deepest_level_entries"] == int(n)
        assert per["archive"]["fp32_ratio"] < 1.0  # compressed
    names = [c["name"] for c in data["checks"]]
    assert len(names) == 7
    assert any("LTM @1,500" in c and "queries/s / fastest exact" in c for c in names)
    assert any("IVF-PQ index @1,500: index bytes/entry" in c for c in names)
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
    assert len(data["checks"]) == 7  # the LTM checks fall back on IVF and IVF-PQ
    assert "skipped" in (tmp_path / "out" / "memory" / "report.md").read_text()


def test_torch_exact_in_chunks_equals_one_matmul(monkeypatch):
    import cortex_plugins.bench.memory as bench

    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(1000, 16, generator=g), dim=-1)
    q = torch.randn(20, 16, generator=g)
    whole = (torch.nn.functional.normalize(q, dim=-1) @ keys.T).topk(10, dim=1).indices
    monkeypatch.setattr(bench, "CHUNK", 64)  # 16 chunks, the last one partial
    assert torch.equal(torch_exact(keys, q, 10), whole)


def test_clustered_keys_are_unit_seeded_and_clustered():
    a, b = clustered_keys(3000, 32, 1), clustered_keys(3000, 32, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, clustered_keys(3000, 32, 2))
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)

    def nearest(x):  # each of the first 50 keys' nearest other key
        return np.sort(x @ x[:50].T, axis=0)[-2].mean()

    uniform = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    uniform /= np.linalg.norm(uniform, axis=1, keepdims=True)
    assert nearest(a) > nearest(uniform) + 0.2  # a close neighbour in its cluster
    out = np.zeros((3000, 32), dtype=np.float32)
    assert clustered_keys(3000, 32, 1, out) is out and np.array_equal(out, a)


def test_bench_memory_above_tier_max_measures_ivfpq_on_memory_mapped_keys(cortex_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(MemoryBench, "Settings", TinySettings)
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(TINY, encoding="utf-8")
    out = tmp_path / "out"
    result = cortex_cli("bench", "memory", manifest, "--quick", "-o", out, "--set", "keys=clustered",
                        "--set", "tier_max=1000", "--set", "quick_sizes=600,4e3", "--set", "nprobe=1,64")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "memory" / "results.json").read_text())
    fig = data["figures"][str(manifest)]
    assert fig["keys"]["kind"] == "clustered" and (out / "memory" / "keys-clustered-32.npy").is_file()
    assert set(fig["sizes"]["600"]) >= set(INDEXES) and SCALE_INDEX not in fig["sizes"]["600"]
    big = fig["sizes"]["4000"]
    assert set(big) == {FAISS_EXACT, TORCH_EXACT, "exact_1x", SCALE_INDEX}
    scale = big[SCALE_INDEX]
    assert scale["settings"]["full_keys"] == "memory-mapped from the keys file"
    # per key 8 one-byte codes and an 8-byte id; shared: 256 x 32 floats of codebooks, the list centroids
    shared = (256 * 32 * 4 + scale["settings"]["nlist"] * 32 * 4) / 4000
    assert 16 + shared < scale["index_bytes_per_entry"] < 16 + shared + 1
    recall = {p["setting"]: p["recall"]["mean"] for p in scale["points"]}
    one, every = (max(v for k, v in recall.items() if f"nprobe {p}," in k) for p in (1, 64))
    assert every > 0.9 and every > one  # more lists visited, more found; re-ranked exactly
    opq = cortex_cli("bench", "memory", manifest, "--quick", "-o", out, "--set", "keys=clustered",
                     "--set", "tier_max=1000", "--set", "quick_sizes=4e3", "--set", "nprobe=64", "--set", "opq=true")
    assert opq.exit_code == 0, opq.output  # the index behind its OPQ rotation
    points = json.loads((out / "memory" / "results.json").read_text())["figures"][str(manifest)]["sizes"]["4000"]
    assert all(p["setting"].endswith("OPQ") and p["recall"]["mean"] > 0.9 for p in points[SCALE_INDEX]["points"])
    bad = cortex_cli("bench", "memory", manifest, "--quick", "-o", out, "--set", "sizez=1")
    assert bad.exit_code != 0 and "NAME one of" in bad.output and "Traceback" not in bad.output
