"""Checkpoint layout: atomic writes, step listing, fencing, setting aside, deletion, no path escape."""

import json

import pytest

from trainer_worker.core import checkpoints as ck


def write(root, step, job_id="", project="proj", name="model", writer=ck.UNFENCED):
    def files(folder):
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"weights")

    return ck.write_checkpoint(root, project, name, step, files,
                               {"job_id": job_id, "base_model": "tiny", "metrics": {"loss": 1.5}}, writer)


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


def test_the_writer_is_recorded_and_fenced_just_before_the_rename(tmp_path):
    path = write(tmp_path, 0, writer=ck.Writer(7, "trainer@a"))
    meta = json.loads((path / "trainq.json").read_text())
    assert (meta["token"], meta["worker"]) == (7, "trainer@a")

    class Fenced(Exception):
        pass

    def fenced():
        raise Fenced("another worker leads now")

    with pytest.raises(Fenced):
        write(tmp_path, 1, writer=ck.Writer(7, "trainer@a", fenced))
    assert ck.list_steps(tmp_path, "proj", "model") == [0]
    assert [p.name for p in ck.model_dir(tmp_path, "proj", "model").iterdir()] == ["0000"], "nothing left behind"


def test_a_write_removes_older_writers_temporaries_and_never_a_newer_ones(tmp_path):
    write(tmp_path, 0, writer=ck.Writer(5))
    folder = ck.model_dir(tmp_path, "proj", "model")
    older, same, newer = (folder / f".tmp-t{t}-0001-abcd1234" for t in (4, 5, 6))
    for temporary in (older, same, newer):
        temporary.mkdir()
    write(tmp_path, 1, writer=ck.Writer(5))
    assert not older.exists() and not same.exists(), "crashed writes of this token or before are cleaned"
    assert newer.exists(), "the folder of a newer writer (the one that fenced this one out) is not touched"


def test_read_info_if_any_and_set_aside(tmp_path):
    write(tmp_path, 0)
    write(tmp_path, 1, job_id="job-1")
    assert ck.read_info_if_any(tmp_path, "proj", "model", 1).job_id == "job-1"
    assert ck.read_info_if_any(tmp_path, "proj", "model", 2) is None
    ck.set_aside(tmp_path, "proj", "model", 1, ck.Writer(3))
    assert ck.list_steps(tmp_path, "proj", "model") == [0]
    assert [p.name for p in ck.model_dir(tmp_path, "proj", "model").iterdir()] == ["0000"]


def test_delete_never_removes_the_latest(tmp_path):
    for step in range(4):
        write(tmp_path, step)
    assert ck.delete_steps(tmp_path, "proj", "model", [0, 2, 3, 7]) == [0, 2]
    assert ck.list_steps(tmp_path, "proj", "model") == [1, 3]
    assert [p.name for p in ck.model_dir(tmp_path, "proj", "model").iterdir() if p.name.startswith(".")] == []


def test_delete_keeps_the_committed_step_and_anything_beyond_it(tmp_path):
    for step in range(5):
        write(tmp_path, step)
    # Step 2 is committed; 3 and 4 are writes never committed, which only their jobs' next deliveries decide.
    assert ck.delete_steps(tmp_path, "proj", "model", [0, 1, 2, 3, 4], latest=2) == [0, 1]
    assert ck.list_steps(tmp_path, "proj", "model") == [2, 3, 4]


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
