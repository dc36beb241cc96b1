"""Tests for trasce.runs: atomic files, the manifest's resume semantics and run.json checks."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

import pytest

from trasce import runs
from trasce.runs import RunFolder, RunFolderError, atomic_save_image, atomic_write_bytes, check_run_place


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert temp_files(tmp_path) == []


def test_atomic_write_uses_umask_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_crash_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(runs.os, "replace", crash)
    target = tmp_path / "images" / "12.png"
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_bytes(target, b"data" * 1000)
    assert not target.exists()
    assert temp_files(tmp_path) == []


def test_atomic_write_crash_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "run.json"
    atomic_write_bytes(target, b"old")

    def crash(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_atomic_write_crash_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(tmp_path / "a.png", b"abc")
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_image(tmp_path: Path) -> None:
    from PIL import Image

    image = Image.new("RGB", (8, 4), (10, 20, 30))
    target = tmp_path / "images" / "0.png"
    atomic_save_image(target, image)
    with Image.open(target) as loaded:
        assert loaded.format == "PNG"
        assert loaded.size == (8, 4)
        assert loaded.getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(ValueError, match="image format"):
        atomic_save_image(tmp_path / "x.unknown", image)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["0.png", "images"]


# --------------------------------------------------------------------------------------------------
# Image names


def test_image_paths(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    assert not folder.path.exists()  # constructing touches nothing
    assert folder.images_dir == tmp_path / "run" / "images"
    assert folder.image_file("12") == "images/12.png"
    assert folder.image_path("12", 0, 1) == tmp_path / "run" / "images" / "12.png"
    assert folder.image_path("12", 2, 3) == tmp_path / "run" / "images" / "12_2.png"
    assert folder.image_file("00003", 0, 4) == "images/00003_0.png"


@pytest.mark.parametrize(("case", "k", "n", "message"), [
    ("../x", 0, 1, "'../x' cannot be used as an image name: case name contains a path separator ('/' or '\\')"),
    ("a", 1, 1, "image index k must be between 0 and 0, got 1"),
    ("a", -1, 2, "image index k must be between 0 and 1, got -1"),
    ("a", 0, 0, "images_per_prompt must be 1 or more, got 0"),
])
def test_image_path_errors(tmp_path: Path, case: str, k: int, n: int, message: str) -> None:
    with pytest.raises(ValueError) as error:
        RunFolder(tmp_path).image_path(case, k, n)
    assert str(error.value) == message


# --------------------------------------------------------------------------------------------------
# Manifest and resume


def record(folder: RunFolder, case: str, **extra: object) -> dict[str, object]:
    return {"file": folder.image_file(case), "case": case, "k": 0, "prompt": f"p{case}", **extra}


def make_image(folder: RunFolder, case: str) -> None:
    from PIL import Image

    atomic_save_image(folder.image_path(case), Image.new("RGB", (2, 2)))


def test_manifest_round_trip(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    assert folder.read_manifest() == []
    assert folder.done() == set()
    rec = record(folder, "1", seed=3, settings={"mode": "trasce", "tuple": (1, 2), "out": Path("x")})
    folder.append_manifest(rec)
    (read,) = folder.read_manifest()
    assert read["file"] == "images/1.png"
    assert read["settings"] == {"mode": "trasce", "tuple": [1, 2], "out": "x"}
    # one sorted-key JSON object per line
    line = folder.manifest_path.read_text().splitlines()[0]
    assert json.loads(line) == read
    assert list(json.loads(line)) == sorted(read)


def test_manifest_needs_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'file'"):
        RunFolder(tmp_path).append_manifest({"case": "1"})


def test_done_needs_both_image_and_manifest_line(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    make_image(folder, "both")
    folder.append_manifest(record(folder, "both"))
    folder.append_manifest(record(folder, "line-only"))  # image missing (deleted or lost)
    make_image(folder, "image-only")  # crash between saving and recording
    make_image(folder, "cut")
    folder.append_manifest(record(folder, "cut"))
    whole = folder.image_path("cut").read_bytes()
    folder.image_path("cut").write_bytes(whole[:-1])  # a copy that stopped one byte short
    assert folder.done() == {"images/both.png"}


def test_truncated_last_line_is_ignored_and_repaired(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    for case in ("1", "2"):
        make_image(folder, case)
        folder.append_manifest(record(folder, case))
    make_image(folder, "3")
    with folder.manifest_path.open("ab") as handle:  # a crash in the middle of an append
        handle.write(json.dumps(record(folder, "3")).encode()[:20])
    assert folder.done() == {"images/1.png", "images/2.png"}

    # The next append must not be glued onto the fragment (that would lose it too).
    folder.append_manifest(record(folder, "3"))
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable line"):
        assert folder.done() == {"images/1.png", "images/2.png", "images/3.png"}


def test_same_file_twice_keeps_the_last(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.append_manifest(record(folder, "1", seed=1))
    folder.append_manifest(record(folder, "2", seed=2))
    folder.append_manifest(record(folder, "1", seed=3))
    assert [(r["case"], r["seed"]) for r in folder.read_manifest()] == [("2", 2), ("1", 3)]


def test_lines_without_file_are_skipped(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.path.mkdir(exist_ok=True)
    folder.manifest_path.write_text('[1, 2]\n{"case": "x"}\n\n{"file": "images/a.png"}\n')
    with pytest.warns(RuntimeWarning, match="skipped 2 unreadable"):
        assert folder.read_manifest() == [{"file": "images/a.png"}]


def _append_many(path: str, worker: int, count: int) -> None:
    folder = RunFolder(path)
    for i in range(count):
        # Long lines (~6 kB, beyond PIPE_BUF) make interleaving likely if the locking were wrong.
        folder.append_manifest({"file": f"images/{worker}_{i}.png", "worker": worker, "pad": "x" * 6000})


def test_concurrent_appends_from_two_processes(tmp_path: Path) -> None:
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    context = multiprocessing.get_context(method)
    workers = [context.Process(target=_append_many, args=(str(tmp_path), w, 200)) for w in range(2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
        assert process.exitcode == 0
    lines = RunFolder(tmp_path).manifest_path.read_text().splitlines()
    assert len(lines) == 400
    parsed = [json.loads(line) for line in lines]
    assert {(p["worker"], p["file"]) for p in parsed} == {
        (w, f"images/{w}_{i}.png") for w in range(2) for i in range(200)
    }
    assert len(RunFolder(tmp_path).read_manifest()) == 400


# --------------------------------------------------------------------------------------------------
# run.json


SETTINGS = {"mode": "trasce", "steps": 50, "concept": "nudity", "start": 0, "batch_size": 4}


def test_run_json_is_written_with_versions(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    content = folder.write_run_json({**SETTINGS, "lambdas": (1.0, 2.0)})
    stored = json.loads(folder.run_json_path.read_text())
    assert stored == content
    assert stored["settings"]["lambdas"] == [1.0, 2.0]
    assert set(stored["versions"]) == {"python", "torch", "diffusers", "transformers", "trasce"}
    assert stored["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert stored["created_utc"].endswith("+00:00")
    assert temp_files(tmp_path) == []


def test_run_json_same_settings_resume(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    first = folder.write_run_json(SETTINGS)
    before = folder.run_json_path.read_bytes()
    # volatile keys may change between sessions; tuples and lists read back the same
    again = folder.write_run_json({**SETTINGS, "start": 100, "batch_size": 1, "device": "cuda:1", "process_index": 1})
    assert again == first
    assert folder.run_json_path.read_bytes() == before  # first session's record is kept


def test_run_json_mismatch(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_run_json(SETTINGS)
    with pytest.raises(RunFolderError) as info:
        folder.write_run_json({**SETTINGS, "steps": 30, "mode": "sd"})
    message = str(info.value)
    # first differing key in sorted order is 'mode'
    assert '\'mode\' was "trasce", now "sd"' in message
    assert "use a new output folder or --overwrite" in message
    with pytest.raises(RunFolderError, match=r"'extra' was <not set>, now 1"):
        folder.write_run_json({**SETTINGS, "extra": 1})
    with pytest.raises(RunFolderError, match=r"'steps' was 50, now <not set>"):
        folder.write_run_json({k: v for k, v in SETTINGS.items() if k != "steps"})
    # a caller-defined volatile set
    folder.write_run_json({**SETTINGS, "steps": 30}, volatile=("steps",))


def test_run_json_written_before_a_setting_existed_resumes_at_its_default(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_run_json(SETTINGS)  # a run.json from before steer_window was recorded
    folder.write_run_json({**SETTINGS, "steer_window": (0.0, 1.0)})  # the default: every step, as before
    with pytest.raises(RunFolderError, match=r"'steer_window' was \[0.0, 1.0\], now \[0.5, 1.0\]"):
        folder.write_run_json({**SETTINGS, "steer_window": (0.5, 1.0)})


def test_run_json_force_overwrites(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_run_json(SETTINGS)
    folder.write_run_json({**SETTINGS, "steps": 30}, force=True)
    assert json.loads(folder.run_json_path.read_text())["settings"]["steps"] == 30
    folder.write_run_json({**SETTINGS, "steps": 30})  # now consistent


def test_finished_images_without_run_json_are_refused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.append_manifest(record(folder, "gone"))  # a line whose image is missing: nothing counts as done
    folder.write_run_json(SETTINGS)
    folder.run_json_path.unlink()
    make_image(folder, "1")
    folder.append_manifest(record(folder, "1"))
    with pytest.raises(RunFolderError) as info:
        folder.write_run_json({**SETTINGS, "steps": 30})
    assert str(info.value) == (
        f"{tmp_path} holds 1 finished image (manifest.jsonl) but no run.json, so the settings they were made with "
        "cannot be checked; restore run.json (from where the folder was copied), or use a new output folder, or "
        "--overwrite to discard the images already made")
    assert not folder.run_json_path.exists()
    folder.write_run_json(SETTINGS, force=True)
    folder.write_run_json(SETTINGS)  # resumes once run.json is back


def test_run_json_corrupt(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.run_json_path.write_text("{not json")
    with pytest.raises(RunFolderError) as error:
        folder.write_run_json(SETTINGS)
    assert str(error.value) == (f"{folder.run_json_path} is not valid JSON (Expecting property name enclosed in double "
                                "quotes at line 1); restore it from a copy to keep what the folder holds, or run "
                                "into a new output folder (--overwrite would discard it)")
    folder.run_json_path.write_bytes(b'{"settings": "\xff"}')
    with pytest.raises(RunFolderError, match=r"run.json is not UTF-8 text \(byte 0xff at offset 14\); restore"):
        folder.write_run_json(SETTINGS)
    folder.write_run_json(SETTINGS, force=True)
    assert folder.read_run_json() is not None


def test_run_json_version_change_warns(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_run_json(SETTINGS)
    stored = json.loads(folder.run_json_path.read_text())
    stored["versions"]["diffusers"] = "0.0.1"
    folder.run_json_path.write_text(json.dumps(stored))
    with pytest.warns(RuntimeWarning, match="diffusers 0.0.1 ->"):
        folder.write_run_json(SETTINGS)


# --------------------------------------------------------------------------------------------------
# Housekeeping


def test_reset(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.write_run_json(SETTINGS)
    make_image(folder, "1")
    folder.append_manifest(record(folder, "1"))
    (folder.images_dir / ".1.png.abc.tmp").write_bytes(b"")
    (folder.images_dir / "notes.txt").write_text("keep me")
    for judged in ("verdicts-toy.jsonl", "summary-toy.json", "verdicts-nudenet.jsonl", "summary-nudenet.json"):
        (tmp_path / judged).write_text("{}")
    (tmp_path / "notes.json").write_text("keep me too")
    folder.record_requested(["images/1.png"])
    folder.reset()
    assert folder.requested() is None
    assert folder.done() == set()
    assert sorted(p.name for p in folder.images_dir.iterdir()) == ["notes.txt"]
    # Verdicts about the deleted images go with them: evaluate would reuse them for new images of the same name.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "notes.json", "run.json"]


def test_a_file_is_no_run_folder(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFolderError, match=rf"^{re.escape(str(tmp_path / 'afile'))} is a file, not a folder; give a "
                                             r"folder \(a new or empty one for a new run\)$"):
        RunFolder(tmp_path / "afile")


def test_reset_refuses_a_folder_that_is_no_run(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "images").mkdir(parents=True)
    (photos / "images" / "holiday.png").write_bytes(b"png")
    (photos / "verdicts-mine.jsonl").write_text("{}")
    with pytest.raises(RunFolderError, match=rf"^{re.escape(str(photos))} holds files but no run.json or "
                                             r"manifest.jsonl: it is not a trasce output folder, and --overwrite "
                                             r"deletes only a run's files; give --out a new or empty folder$"):
        RunFolder(photos).reset()
    assert sorted(p.name for p in photos.rglob("*")) == ["holiday.png", "images", "verdicts-mine.jsonl"]
    RunFolder(tmp_path / "new").reset()  # nothing there: nothing to refuse


def test_requested_images_are_the_union_of_every_sessions_and_resuming_adds_nothing(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    assert folder.requested() is None and not folder.path.exists()  # nothing recorded: unknown, not empty
    folder.record_requested(["images/1.png", "images/0.png"])
    folder.record_requested(["images/1.png", "images/0.png"])  # the same session resumed
    path = folder.path / runs.REQUESTED_NAME
    assert len(path.read_text().splitlines()) == 1
    folder.record_requested(["images/2.png", "images/1.png"])  # another slice, overlapping
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["files"] for line in lines] == [["images/0.png", "images/1.png"], ["images/2.png"]]
    path.write_text(path.read_text() + '{"files": ["images/3.p')  # a crash mid-append: that line is skipped
    assert folder.requested() == {"images/0.png", "images/1.png", "images/2.png"}


def test_remove_stale_temp_files(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.images_dir.mkdir()
    old = folder.images_dir / ".1.png.aaaa.tmp"
    new = folder.images_dir / ".2.png.bbbb.tmp"
    for path in (old, new):
        path.write_bytes(b"")
    an_hour_ago = time.time() - 7200
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert folder.remove_stale_temp_files() == [old]
    assert new.exists()


def test_source_commit_names_the_checkouts_commit_and_whether_tracked_files_changed(tmp_path: Path) -> None:
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert runs.source_commit(tmp_path) is None  # no checkout: an installed copy
    git("init", "-q")
    (tmp_path / "a.py").write_text("one\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "one")
    commit = git("rev-parse", "HEAD")
    assert len(commit) == 40
    (tmp_path / "untracked.txt").write_text("not part of the code\n")
    assert runs.source_commit(tmp_path) == commit
    (tmp_path / "a.py").write_text("two\n")
    assert runs.source_commit(tmp_path) == commit + "+dirty"


def test_a_run_folder_is_refused_inside_another_run_but_not_beside_it(tmp_path: Path, monkeypatch) -> None:
    run = RunFolder(tmp_path / "a")
    run.write_run_json({"steps": 2})
    with pytest.raises(RunFolderError, match=r"^--out .*a/b lies inside .*a, another run's folder"):
        check_run_place(tmp_path / "a" / "b", "trasce generate", holds_runs=False)
    # From inside the run, "../c" lies beside it, not in it.
    monkeypatch.chdir(run.path)
    check_run_place("../c", "trasce generate", holds_runs=False)
    check_run_place(Path("..") / "bench", "trasce benchmark", holds_runs=True)
    # Other tools name their files run.json and manifest.jsonl too: only trasce's count.
    other = tmp_path / "dataset"
    other.mkdir()
    (other / "manifest.jsonl").write_text('{"audio_filepath": "a.wav", "duration": 1.0}\n')
    (other / "run.json").write_text('{"settings": {}}\n')
    check_run_place(other / "runs" / "x", "trasce generate", holds_runs=False)
    (other / "manifest.jsonl").write_text('{"file": "images/1.png", "case": "1", "prompt": "a"}\n')
    with pytest.raises(RunFolderError, match="lies inside"):
        check_run_place(other / "runs" / "x", "trasce generate", holds_runs=False)
