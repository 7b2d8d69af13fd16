"""Hub IDs for models and datasets, resolved offline from a local hub cache in the hub's own layout."""

import json
import threading
from pathlib import Path

import pytest

from gkd.cli import main
from gkd.train.metrics import read_metrics
from helpers import http
from hubcache import add_model_folder, add_snapshot, commit_hash, parquet_bytes

REV1, REV2 = commit_hash("first"), commit_hash("second")


def _rows(n, tag):
    return [{"messages": [{"role": "user", "content": f"w{i} w{i + 1}"},
                          {"role": "assistant", "content": f"w{(i * 7 + tag) % 50}"}]} for i in range(n)]


@pytest.fixture
def hub_home(tiny, tmp_path, monkeypatch):
    """HF_HOME with org/student, org/teacher (two revisions) and org/data (two revisions, train and test
    splits); offline."""
    home = tmp_path / "hf"
    add_model_folder(home, "org/student", Path(tiny["student"]), REV1)
    add_model_folder(home, "org/teacher", Path(tiny["teacher"]), REV1)
    add_snapshot(home, "org/data", {"data/train-00000-of-00001.parquet": parquet_bytes(_rows(8, 0), tmp_path),
                                    "data/test-00000-of-00001.parquet": parquet_bytes(_rows(3, 1), tmp_path)},
                 REV1, repo_type="dataset")
    add_snapshot(home, "org/data", {"data/train-00000-of-00001.parquet": parquet_bytes(_rows(5, 2), tmp_path)},
                 REV2, repo_type="dataset", ref=None)  # reachable by its commit only
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_ids_train_offline_from_the_cache(hub_home, tmp_path, capsys, monkeypatch):
    import datasets

    seen, real = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: seen.append(k.get("num_proc")) or real(*a, **k))
    out = tmp_path / "run"
    rc = main(["train", "--model", "org/student", "--teacher_model", f"org/teacher@{REV1}", "--dataset", "org/data",
               "--output_dir", str(out), "--max_steps", "2", "--global_batch_size", "4", "--micro_batch_size", "4",
               "--max_completion_length", "4", "--lmbda", "0", "--progress_bar", "false", "--dataset_num_proc", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert (out / "final" / "config.json").is_file()
    assert (hub_home / "datasets").is_dir(), "datasets prepares the hub data under HF_HOME"
    assert seen == [2] and "not used" not in err  # --dataset_num_proc went to datasets


def test_dataset_num_proc_with_local_files_only_is_warned_about(tiny, tmp_path, capsys):
    assert main(["train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"],
                 "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--max_completion_length", "2",
                 "--progress_bar", "false", "--dataset_num_proc", "4"]) == 0
    assert "--dataset_num_proc 4 is not used" in capsys.readouterr().err


def test_hub_dataset_split_and_revision(hub_home, tmp_path):
    from gkd.data.rows import read_rows

    main_train = [r for _, r in read_rows("org/data")]
    test = [r for _, r in read_rows("org/data:test")]
    old = [r for _, r in read_rows(f"org/data@{REV2}:train")]
    assert main_train == _rows(8, 0) and test == _rows(3, 1) and old == _rows(5, 2)


def test_missing_hub_ids_are_one_line_naming_the_id_and_cache(hub_home, tmp_path, capsys):
    base = ["--teacher_model", "org/teacher", "--output_dir", str(tmp_path / "o"), "--progress_bar", "false"]
    assert main(["train", "--model", "org/absent", "--dataset", "org/data", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "org/absent" in err and str(hub_home / "hub") in err, err
    assert main(["train", "--model", "org/student", "--dataset", "org/nodata:train", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "org/nodata" in err and str(hub_home / "hub") in err, err
    assert main(["train", "--model", "org/student", "--dataset", "org/data:validation", *base]) == 2
    err = capsys.readouterr().err.strip()
    assert "no split 'validation'" in err and "train" in err and "test" in err, err
    assert not (tmp_path / "o").exists()


def test_eval_and_serve_take_hub_ids(hub_home, tiny, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", "--model", "org/student", "--teacher_model", "org/teacher", "--dataset", "org/data:test",
                 "--max_completion_length", "3", "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["divergence"] >= 0

    from gkd.config import ServeConfig
    from gkd.teacher.serve import TeacherServer

    server = TeacherServer(ServeConfig(model="org/teacher", port=0))
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        status, models = http("GET", server.address + "/v1/models")
        assert status == 200 and models["data"][0]["id"] == "org/teacher"
        status, ans = http("POST", server.address + "/v1/completions",
                           {"model": "org/teacher", "prompt": [1, 7, 9], "max_tokens": 1, "prompt_logprobs": 2})
        assert status == 200 and len(ans["choices"][0]["prompt_logprobs"]) == 3
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.scorer.stop()
