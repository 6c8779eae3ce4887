"""``batch --ray`` on a real local Ray runtime: same records as the local pipeline, bad files, resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, SHARED_SAMPLES
from test_folder import make_bad_images, make_good_images, read_jsonl

ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'captioner[ray]')")

from captioner.pipelines.cli import main  # noqa: E402
from captioner.pipelines.ray_batch import iter_records, read_bytes  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray") / "photos"
    make_good_images(folder, 40)
    return folder


def by_path(records):
    return {r["path"]: r for r in records}


def test_ray_gives_the_local_pipelines_records_for_40_real_photos(photos, tmp_path, capfd):
    assert main(["batch", str(photos), "-o", str(tmp_path / "local.jsonl"), "--quiet"]) == 0
    assert main(["batch", str(photos), "-o", str(tmp_path / "shards"), "--ray", "--shard-size", "16", "--quiet"]) == 0
    assert "INFO" not in capfd.readouterr().err  # Ray Data's plans and progress stay out of a quiet run
    local, shards = by_path(read_jsonl(tmp_path / "local.jsonl")), by_path(iter_records(str(tmp_path / "shards")))
    assert len(shards) == len(local) == 40 and shards.keys() == local.keys()
    for path, record in local.items():
        assert shards[path]["caption"] == record["caption"], path
        assert shards[path]["tags"] == record["tags"]
        assert shards[path]["score"] == pytest.approx(record["score"], abs=1e-4)
        assert shards[path]["confidence"] == pytest.approx(record["confidence"], abs=1e-3)
    assert len(list((tmp_path / "shards").glob("part-*.jsonl"))) == 3  # 16 + 16 + 8


def test_bad_files_become_error_records_and_the_job_goes_on(tmp_path, capsys):
    folder = tmp_path / "mixed"
    make_good_images(folder, 3)
    expected = make_bad_images(folder / "bad")
    os.mkfifo(folder / "bad" / "pipe.jpg")  # would block a reader that opened it
    expected["pipe.jpg"] = "not a regular file"
    out = tmp_path / "out"
    assert main(["batch", str(folder), "-o", str(out), "--ray", "--merge"]) == 1
    records = by_path(read_jsonl(out / "captions.jsonl"))
    errors = {os.path.basename(path): r["error"] for path, r in records.items() if "error" in r}
    assert errors.keys() == expected.keys()
    assert all(reason in errors[name] and name in errors[name] for name, reason in expected.items())
    assert all(errors[name].count(name) == 1 for name in expected)  # "PATH: reason", the path said once
    assert sum("caption" in r for r in records.values()) == 3
    assert "3 captioned, 6 failed, 0 already done" in capsys.readouterr().err
    assert main(["batch", str(folder), "-o", str(out), "--ray"]) == 1  # a rerun: the failures are still there
    assert "0 captioned, 0 failed, 9 already done, 0.0 images/s; 6 files failed in an earlier run (use " \
           "--retry-errors" in capsys.readouterr().err
    shutil.copy(SHARED_SAMPLES / "rocket.jpg", folder / "bad" / "notes.jpg")  # one of them fixed
    assert main(["batch", str(folder), "-o", str(out), "--ray", "--retry-errors", "--merge"]) == 1
    assert "1 captioned, 5 failed, 3 already done" in capsys.readouterr().err
    merged = by_path(read_jsonl(out / "captions.jsonl"))
    assert len(merged) == 9 and merged[str(folder / "bad" / "notes.jpg")]["caption"]
    assert sum("error" in r for r in merged.values()) == 5


def test_parquet_shards_from_a_file_uri_resume_as_the_plain_folder_and_a_rerun_captions_nothing(photos, tmp_path,
                                                                                                capsys):
    source, out = f"file://{photos}", f"file://{tmp_path / 'pq.parquet'}"  # the extension picks parquet
    assert main(["batch", source, "-o", out, "--ray", "--shard-size", "32"]) == 0
    records = list(iter_records(str(tmp_path / "pq.parquet"), "parquet"))
    local = {str(p) for p in photos.rglob("*.jpg")}
    assert len(records) == 40 and {r["path"] for r in records} == local and all(r["caption"] for r in records)
    capsys.readouterr()
    assert main(["batch", str(photos), "-o", out, "--ray", "--format", "parquet"]) == 0  # the folder as a path
    assert "0 captioned, 0 failed, 40 already done" in capsys.readouterr().err
    assert len(list(iter_records(str(tmp_path / "pq.parquet"), "parquet"))) == 40


def test_an_output_folder_is_one_runs_at_a_time_and_one_formats(photos, tmp_path, capsys):
    from captioner.pipelines.ray_batch import ShardWriter

    out = tmp_path / "shards"
    with ShardWriter(str(out), "jsonl", 10):  # another run holds it
        assert main(["batch", str(photos), "-o", str(out), "--ray"]) == 1
        assert "another captioner run is writing this folder" in capsys.readouterr().err
    (out / "part-earlier-000000.jsonl").write_text('{"path": "/x.jpg", "caption": "a dog", "score": -1.0}\n')
    assert main(["batch", str(photos), "-o", str(out), "--ray", "--format", "parquet"]) == 2
    assert "holds jsonl shards; resume with that --format" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "nowhere"), "-o", str(tmp_path / "new"), "--ray"]) == 2
    assert not (tmp_path / "new").exists()  # the source is refused before the output is made


def test_file_uris_name_folders_of_this_machine_and_old_uri_records_still_resume(photos, tmp_path):
    from captioner.errors import OptionError
    from captioner.pipelines.ray_batch import ShardWriter, _still_to_do, list_images, local_path, record_key

    assert local_path("file:///a%20b/c") == "/a b/c" and local_path("file://localhost/x") == "/x"
    assert local_path("s3://bucket/x") == "s3://bucket/x"
    # old records held file:// plus the raw path, never an encoded URI: nothing is unquoted or cut at '#'
    assert [record_key({"path": p}) for p in ("file:///d/a#1.jpg", "file:///d/a%20b.jpg", "/d/x.jpg", "s3://b/x")] == \
        ["/d/a#1.jpg", "/d/a%20b.jpg", "/d/x.jpg", "s3://b/x"]
    for uri in ("file://nas/share/photos", "file://"):  # another machine's folder, or none: never the root here
        with pytest.raises(OptionError, match="names a folder on this machine"):
            local_path(uri)
    first, *rest = list_images(str(photos))
    out = tmp_path / "old"
    out.mkdir()  # shards of an older version, which named a file:// source's files by URI
    (out / "part-old-000000.jsonl").write_text(json.dumps({"path": f"file://{first[0]}", "caption": "a dog",
                                                           "score": -1.0, "min_prob": 0.5}) + "\n")
    with ShardWriter(str(out), "jsonl", 10) as writer:
        todo, summary = _still_to_do(writer, [first, *rest], retry_errors=False)
    assert first not in todo and len(todo) == len(rest) and summary.already_done == 1


def test_a_uri_read_task_keeps_the_order_of_its_files_and_names_one_that_is_gone(photos):
    files = sorted(photos.rglob("*.jpg"))[:12]
    inside = [str(f) for f in files[:5]] + [str(photos / "gone.jpg")] + [str(f) for f in files[5:]]
    batch = {"path": np.array([f"file://{p}" for p in inside]), "inside": np.array(inside)}
    read = read_bytes(batch, f"file://{photos}")  # fetched on several threads at once
    assert read["path"] == list(batch["path"])
    assert read["data"][5] == b"" and "gone.jpg" in read["error"][5]
    others = [i for i in range(len(inside)) if i != 5]
    assert [read["data"][i] for i in others] == [open(inside[i], "rb").read() for i in others]
    assert not any(read["error"][i] for i in others)


def test_a_killed_driver_resumes_without_duplicates(photos, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "captioner.pipelines.cli", "batch", str(photos), "-o", str(out),
               "--ray", "auto", "--shard-size", "4", "--batch-size", "4"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.jsonl"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(iter_records(str(out))))
    assert 8 <= partial < 40
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    paths = [r["path"] for r in iter_records(str(out))]
    assert len(paths) == len(set(paths)) == 40
    assert not [p.name for p in out.iterdir() if p.name.startswith(".part-")]  # a cut-off shard's staging file is gone


def test_sigterm_ends_a_ray_run_as_it_ends_any_command_and_keeps_what_came_back(photos, tmp_path):
    out = tmp_path / "termed"
    proc = subprocess.Popen([sys.executable, "-m", "captioner.pipelines.cli", "batch", str(photos), "-o", str(out),
                             "--ray", "auto", "--shard-size", "4", "--batch-size", "4", "--quiet"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.jsonl"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)  # after ray.init, which puts in a handler of its own
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "captioner: error: terminated" and "SIGTERM received" not in err
    kept = [r["path"] for r in iter_records(str(out))]
    assert len(kept) >= 8 and len(kept) == len(set(kept))


def test_a_parquet_shard_that_is_not_ours_is_named_in_one_line(photos, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for columns, reason in (({"id": [1, 2]}, 'no "record" column (its columns: id)'),
                            ({"record": [1, 2]}, 'a "record" cell holds int, not JSON text')):
        out = tmp_path / f"foreign-{reason[:5]}"
        out.mkdir()
        pq.write_table(pa.table(columns), out / "part-00000.parquet")
        assert main(["batch", str(photos), "-o", str(out), "--ray", "--format", "parquet", "--quiet"]) == 1
        assert capsys.readouterr().err.strip() == \
            f"captioner: error: {out}/part-00000.parquet: not a readable shard of captioner records: {reason}"


def test_an_empty_source_is_warned_about_and_gs_gives_up_in_seconds_not_minutes(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["batch", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--ray", "--quiet"]) == 0
    assert "warning: no images under" in capsys.readouterr().err
    # no network to Google Cloud Storage here: pyarrow's default would retry for 15 minutes, deaf to SIGTERM
    started = time.monotonic()
    assert main(["batch", "gs://captioner-no-such-bucket/photos", "-o", str(tmp_path / "g"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("captioner: error: gs://captioner-no-such-bucket/photos: cannot list: ")
    assert err.count("\n") == 1
    assert time.monotonic() - started < 120


def test_ray_flags_are_checked_before_ray_starts(photos, tmp_path, capsys, monkeypatch):
    import captioner.pipelines.cli as cli

    with monkeypatch.context() as patch:
        patch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded (or exported) first"))
        for flags, message in ((["--backend", "onnxruntime"], "not available with --ray"),
                               (["--html", str(tmp_path / "r.html")], "not available with --ray"),
                               (["-o", str(tmp_path / "x.csv")], "not CSV"),
                               (["--workers", "8"], "--workers sets the local pipeline's reading processes")):
            assert main(["batch", str(photos), "-o", str(tmp_path / "o"), "--ray", *flags]) == 2
            assert message in capsys.readouterr().err
    assert main(["batch", str(photos), "-o", str(tmp_path / "o"), "--ray", "--format", "csv"]) == 2
    assert "not CSV" in capsys.readouterr().err
    assert main(["batch", str(photos), "-o", str(tmp_path / "o.jsonl"), "--format", "parquet"]) == 2
    assert "use it with --ray" in capsys.readouterr().err
    assert main(["batch", str(photos), "-o", "s3://bucket/x", "--ray", "--merge"]) == 2
    assert "give a local -o" in capsys.readouterr().err
    assert main(["batch", "s3-nonsense://bucket/x", "-o", str(tmp_path / "o"), "--ray"]) == 2
    assert "cannot open this location" in capsys.readouterr().err


def test_names_that_print_alike_are_two_files_and_a_forged_line_stays_one(photos, tmp_path, capsys):
    folder = tmp_path / "alike"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"raw\xff.jpg")  # a name that is not UTF-8: printed as raw\xff.jpg
    shutil.copy(SHARED_SAMPLES / "chelsea.png", raw)
    out = tmp_path / "out"
    assert main(["batch", str(folder), "-o", str(out), "--ray", "--quiet"]) == 0
    shutil.copy(SHARED_SAMPLES / "rocket.jpg", folder / "raw\\xff.jpg")  # the text \xff, backslash and all
    (folder / "evil\nskipped fake.jpg").write_bytes(b"not a photo")
    assert main(["batch", str(folder), "-o", str(out), "--ray", "--quiet", "--merge"]) == 1
    err = capsys.readouterr().err
    assert "1 captioned, 1 failed, 1 already done" in err
    assert not any(line.startswith("skipped fake.jpg") for line in err.splitlines())  # the name's newline escaped
    assert len(read_jsonl(out / "captions.jsonl")) == len(list(iter_records(str(out)))) == 3


def test_ray_refuses_what_would_hang_or_clobber_before_captioning(photos, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "captions.jsonl").write_text("my notes\n")
    assert main(["batch", str(photos), "-o", str(out), "--ray", "--merge"]) == 1
    assert "captions.jsonl: exists and holds no captioner records" in capsys.readouterr().err
    assert (out / "captions.jsonl").read_text() == "my notes\n" and not list(out.glob("part-*"))
    assert main(["batch", str(photos), "-o", str(tmp_path / "gpu"), "--ray", "--gpus-per-actor", "1"]) == 2
    assert "--gpus-per-actor 1: the local Ray runtime has 0 GPUs" in capsys.readouterr().err
    assert main(["batch", str(photos), "-o", str(tmp_path / "cpu"), "--ray", "--cpus-per-actor", "4"]) == 2
    assert "--cpus-per-actor 4: the local Ray runtime has 2 CPUs; an actor would wait" in capsys.readouterr().err
    for value in ("-1", "0"):
        with pytest.raises(SystemExit) as stop:
            main(["batch", str(photos), "-o", str(tmp_path / "o"), "--ray", "--cpus-per-actor", value])
        assert stop.value.code == 2
        assert f"argument --cpus-per-actor: {value} is not in (0, 1024]" in capsys.readouterr().err
    assert main(["batch", str(photos), "-o", str(tmp_path / "o.csv"), "--ray"]) == 2
    assert "not CSV: give -o a folder name" in capsys.readouterr().err


def test_line_separators_in_names_an_unlistable_folder_and_an_upper_case_parquet_output(tmp_path, capsys):
    from conftest import bury_too_deep

    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("para\u2029graph.jpg", "next\x85line.jpg", "line\u2028sep.jpg"):  # str.splitlines() breaks at each
        shutil.copy(SHARED_SAMPLES / "chelsea.png", folder / name)
    bury_too_deep(folder / "deep", "lost.png", (SHARED_SAMPLES / "coffee.png").read_bytes())
    out = tmp_path / "OUT.PARQUET"
    assert main(["batch", str(folder), "-o", str(out), "--ray", "--quiet"]) == 1  # the unlisted folder: a failure
    err = capsys.readouterr().err
    assert "3 captioned, 1 failed, 0 already done" in err
    assert [line for line in err.splitlines() if line.startswith("skipped ")] == [
        line for line in err.splitlines() if "cannot list this folder: File name too long" in line]
    assert [p.suffix for p in out.glob("part-*")] == [".parquet"]  # the name's case does not matter
    jsonl = tmp_path / "out"
    assert main(["batch", str(folder), "-o", str(jsonl), "--ray", "--quiet"]) == 1
    assert main(["batch", str(folder), "-o", str(jsonl), "--ray", "--quiet", "--merge"]) == 1  # the shards read back
    assert "0 captioned, 1 failed, 3 already done" in capsys.readouterr().err
    assert len(read_jsonl(jsonl / "captions.jsonl")) == 3
