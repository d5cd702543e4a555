"""Nothing is lost: data-loss cases found by trying the CLI as a careful user would."""

from __future__ import annotations

import json


def test_data_prepare_never_replaces_a_folder_that_merely_holds_a_meta_json(cortex_cli, tmp_path):
    mine = tmp_path / "mydir"
    mine.mkdir()
    (mine / "meta.json").write_text("{}")
    (mine / "thesis.txt").write_text("my thesis")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "hello world"}\n{"text": "second doc"}\n')
    refused = cortex_cli("data", "prepare", corpus, "-o", mine)
    assert refused.exit_code == 1 and "is not a Cortex dataset" in refused.stderr
    assert (mine / "thesis.txt").read_text() == "my thesis" and (mine / "meta.json").read_text() == "{}"

    data = tmp_path / "data"
    assert cortex_cli("data", "prepare", corpus, "-o", data).exit_code == 0
    assert cortex_cli("data", "prepare", corpus, "-o", data).exit_code == 0  # a dataset is replaced
    (data / "notes.txt").write_text("mine")  # ... but not once it holds a file of the user's
    again = cortex_cli("data", "prepare", corpus, "-o", data)
    assert again.exit_code == 1 and (data / "notes.txt").read_text() == "mine"
    assert json.loads((data / "meta.json").read_text())["cortex_dataset"]
