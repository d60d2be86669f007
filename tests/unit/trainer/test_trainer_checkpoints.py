"""Checkpoint layout: atomic writes, step listing, job lookup, deletion, no path escape."""

import json

import pytest

from trainer_worker.core import checkpoints as ck


def write(root, step, job_id="", project="proj", name="model"):
    def files(folder):
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"weights")

    return ck.write_checkpoint(root, project, name, step, files, {"job_id": job_id, "base_model": "tiny", "metrics": {"loss": 1.5}})


def test_layout_and_metadata(tmp_path):
    path = write(tmp_path, 0)
    assert path == tmp_path.resolve() / "proj" / "model" / "checkpoints" / "0000"
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "trainq.json"]
    meta = json.loads((path / "trainq.json").read_text())
    assert meta["step"] == 0 and meta["base_model"] == "tiny" and meta["created_at"] > 0
    info = ck.read_info(tmp_path, "proj", "model", 0)
    assert info.metrics == {"loss": 1.5} and info.path == path


def test_steps_are_listed_in_order_and_latest_is_last(tmp_path):
    assert ck.latest_step(tmp_path, "proj", "model") is None
    for step in (0, 1, 2, 10, 10000):
        write(tmp_path, step)
    assert ck.list_steps(tmp_path, "proj", "model") == [0, 1, 2, 10, 10000]
    assert ck.latest_step(tmp_path, "proj", "model") == 10000


def test_failed_write_leaves_nothing_behind(tmp_path):
    def broken(folder):
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ck.write_checkpoint(tmp_path, "proj", "model", 0, broken, {})
    folder = ck.model_dir(tmp_path, "proj", "model")
    assert list(folder.iterdir()) == []
    assert ck.latest_step(tmp_path, "proj", "model") is None


def test_crashed_write_is_invisible_and_cleaned_by_the_next(tmp_path):
    write(tmp_path, 0)
    crashed = ck.model_dir(tmp_path, "proj", "model") / ".tmp-0001-deadbeef"
    crashed.mkdir()
    (crashed / "adapter_model.safetensors").write_bytes(b"partial")
    assert ck.list_steps(tmp_path, "proj", "model") == [0]
    write(tmp_path, 1)
    assert not crashed.exists()
    assert ck.list_steps(tmp_path, "proj", "model") == [0, 1]


def test_an_existing_step_is_never_overwritten(tmp_path):
    write(tmp_path, 0, job_id="a")
    with pytest.raises(FileExistsError):
        write(tmp_path, 0, job_id="b")
    assert ck.read_info(tmp_path, "proj", "model", 0).job_id == "a"


def test_find_job(tmp_path):
    write(tmp_path, 0)
    write(tmp_path, 1, job_id="job-1")
    write(tmp_path, 2, job_id="job-2")
    assert ck.find_job(tmp_path, "proj", "model", "job-1").step == 1
    assert ck.find_job(tmp_path, "proj", "model", "job-3") is None
    assert ck.find_job(tmp_path, "proj", "model", "") is None


def test_delete_never_removes_the_latest(tmp_path):
    for step in range(4):
        write(tmp_path, step)
    assert ck.delete_steps(tmp_path, "proj", "model", [0, 2, 3, 7]) == [0, 2]
    assert ck.list_steps(tmp_path, "proj", "model") == [1, 3]
    assert [p.name for p in ck.model_dir(tmp_path, "proj", "model").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("project", "name"), [("..", "model"), ("proj", ".."), ("a/b", "model"), ("proj", "../../etc"), ("", "model"), (".hidden", "m")]
)
def test_names_cannot_escape_the_root(tmp_path, project, name):
    with pytest.raises(ValueError):
        ck.model_dir(tmp_path, project, name)


@pytest.mark.parametrize("step", [-1, 1.5, True, "3"])
def test_step_must_be_a_non_negative_int(tmp_path, step):
    with pytest.raises(ValueError, match="step"):
        ck.checkpoint_dir(tmp_path, "proj", "model", step)
