"""The example pipelines in examples/pipelines/ run end to end at their tiny sizes.

Each script drives the real command line (or benchmark suite); the tests check what it
produced, not that it printed something: the token shares of the prepared data, the loss
going down, one table column per ablated component, a resumable two-rank run directory.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cortex.kernel.manifest import load_manifest_text

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "examples" / "pipelines"
# one OpenMP thread in the scripts' processes: the tiny models gain nothing from more
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def script(name: str):
    """The pipeline script ``name`` imported as a module (its ``main`` not run)."""
    spec = importlib.util.spec_from_file_location(f"pipeline_{name}", PIPELINES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(PIPELINES / f"{name}.py"), *args], capture_output=True, text=True,
                         timeout=timeout, env=ENV, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.parametrize("size", ["tiny", "default"])
def test_the_scripts_manifests_validate(size, tmp_path):
    ko_en, ablation, ddp = script("korean_english_bpe"), script("ablation_study"), script("distributed_training")
    tokenizer = tmp_path / "tokenizer.json"
    from cortex.core.tokenizer import ByteTokenizer

    ByteTokenizer().save(tokenizer)  # stands in for the trained BPE: only the manifest is checked
    for text in (ko_en.manifest(tokenizer, tmp_path / "data", ko_en.SIZES[size], 0),
                 ablation.MANIFEST.format(**ablation.SIZES[size]), ddp.manifest(ddp.SIZES[size])):
        assert load_manifest_text(text).manifest.train is not None


def test_korean_english_bpe_mixes_and_trains(tmp_path):
    import cortex
    from cortex.core.tokenizer import load_tokenizer

    out = run_script("korean_english_bpe", "--tiny", "-o", str(tmp_path / "ko-en"))
    report = json.loads((tmp_path / "ko-en" / "report.json").read_text(encoding="utf-8"))
    assert 259 < report["vocab_size"] <= 800
    assert all(t["ok"] and t["exact"] == t["documents"] == 300 for t in report["round_trip"].values())
    # Hangul costs more tokens per character than ASCII, even with merges learnt on both
    trips = report["round_trip"]
    assert trips["ko.jsonl"]["tokens_per_char"] > trips["en.jsonl"]["tokens_per_char"]
    mix = report["mix"]
    assert mix["requested"] == {"ko.jsonl": 0.4, "en.jsonl": 0.6} and mix["ok"]
    for name, share in mix["requested"].items():
        assert abs(mix["measured"][name] - share) <= 0.02  # counted in train.bin by the script
        assert abs(mix["measured"][name] - mix["meta"][name]) < 1e-9  # and what meta.json claims
    assert report["steps"] == 40
    assert report["loss_last"] < report["loss_first"] - 0.5
    assert report["val_loss_last"] < report["val_loss_first"]
    assert "shares within 0.02: ok" in out.stdout
    model = cortex.load(report["run"])  # the run directory loads, with the trained BPE
    assert model.tokenizer.fingerprint == load_tokenizer(tmp_path / "ko-en" / "tokenizer.json").fingerprint
    assert model.tokenizer.decode(model.tokenizer.encode("민아는 부산에 살아. Mina lives in Busan.")) == \
        "민아는 부산에 살아. Mina lives in Busan."


def test_ablation_study_has_a_column_per_component(tmp_path, capsys):
    result = script("ablation_study").main(["--tiny", "-o", str(tmp_path / "abl")])
    components = ["memory[0] stm", "memory[1] ltm", "plasticity[0] hebbian", "features[0] working"]
    assert result["components"] == components
    table = result["table"]
    assert list(table) == ["full", *(f"without {c}" for c in components)]
    header = (tmp_path / "abl" / "ablation.md").read_text(encoding="utf-8").splitlines()[4]
    assert [c.strip() for c in header.strip("|").split("|")] == ["metric", *table]
    assert "## Ablation of" in (tmp_path / "abl" / "report.md").read_text(encoding="utf-8")  # the suite's report
    for values in table.values():  # every variant was trained, then measured
        assert values["train loss"]["mean"] < math.log(256) - 0.3 and math.isfinite(values["val loss"]["mean"])
    # the LTM is what keeps the pairs once the small STM has overflowed with filler
    for task in ("mqar", "passkey"):
        metric = f"recall:{task}:knn_lm:1"
        assert table["full"][metric]["mean"] > table["without memory[1] ltm"][metric]["mean"] == 0.0
        assert table["full"][f"recall:{task}:off:1"]["mean"] == 0.0
    assert "without features[0] working" in capsys.readouterr().out


@pytest.mark.slow
def test_distributed_training_trains_resumes_and_loads(tmp_path):
    import cortex
    from cortex.runtime.checkpoint import latest_checkpoint

    out = run_script("distributed_training", "--tiny", "-o", str(tmp_path / "ddp"))
    report = json.loads((tmp_path / "ddp" / "report.json").read_text(encoding="utf-8"))
    assert all(report["checks"].values()), report["checks"]
    assert "FAILED" not in out.stdout
    run = Path(report["run"])
    summary = json.loads((run / "train.json").read_text(encoding="utf-8"))
    assert summary["world_size"] == 2 and summary["steps"] == 8
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "event" not in json.loads(x)]
    assert steps == list(range(1, 9))
    assert latest_checkpoint(run).name == "step-00000008"
    assert report["max_loss_gap"] < 1e-3  # two ranks made the same updates as one process
    assert report["losses"][-1] < report["losses"][0]
    cortex.load(run)
