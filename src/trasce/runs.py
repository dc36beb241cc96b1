"""Output folders that can be resumed and never lose finished work.

Layout of a run folder ``DIR``::

    DIR/run.json          every generation setting, package versions and when the run was created
    DIR/manifest.jsonl    one JSON object per finished image, appended as soon as the image exists
    DIR/requested.jsonl   the image files each session was asked to make, so that a reader can tell
                          a finished run from one that stopped part-way
    DIR/images/<case>.png           one image per prompt
    DIR/images/<case>_<k>.png       several images per prompt, k = 0 .. n-1

An image counts as done only when it is both on disk and in the manifest. The writer's order is
therefore: save the image atomically (:func:`atomic_save_image`), then :meth:`RunFolder.append_manifest`.
A process killed between the two leaves an image without a manifest line, which is simply made
again (and overwritten) on resume; a process killed while saving leaves no file under the final name,
only a hidden ``.<name>.<random>.tmp`` that :meth:`RunFolder.remove_stale_temp_files` can clear.

Several processes (``--process-index`` / ``--num-processes``) may share one folder: images have
distinct names, and manifest lines are appended under an exclusive ``flock`` with one ``write`` each.
"""

from __future__ import annotations

import io
import json
import os
import platform
import secrets
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trasce.data import check_case_name
from trasce.sampler import DEFAULT_LAZY_TOLERANCE

try:  # Unix only; on other systems appends are still single O_APPEND writes, just not locked.
    import fcntl
except ImportError:  # pragma: no cover - exercised only off Unix
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "IMAGES_DIR",
    "MANIFEST_NAME",
    "REQUESTED_NAME",
    "RUN_JSON_NAME",
    "VOLATILE_SETTINGS",
    "RunFolder",
    "RunFolderError",
    "append_lines",
    "atomic_save_image",
    "atomic_write_bytes",
    "package_versions",
]

IMAGES_DIR = "images"
MANIFEST_NAME = "manifest.jsonl"
RUN_JSON_NAME = "run.json"
REQUESTED_NAME = "requested.jsonl"
IMAGE_SUFFIX = ".png"
# What `trasce evaluate JUDGE` writes into a run folder; judgements of images that --overwrite deletes.
VERDICTS_NAME = "verdicts-{judge}.jsonl"
SUMMARY_NAME = "summary-{judge}.json"
REPORT_NAME = "report-{judge}.html"

# Settings that may change between the sessions of one run without changing any image: which slice
# or shard a process works on, how many prompts share a batch or a denoiser call, whether the backward
# pass recomputes activations, whether the denoiser is compiled, where it runs, how much it prints.
# Also where the rows come from and their default seed and CFG scale: the prompt, seed and scale
# that made each image are in its manifest line, and `trasce generate` holds them to its row.
VOLATILE_SETTINGS: tuple[str, ...] = (
    "prompts",
    "prompt",
    "seed",
    "guidance_scale",
    "start",
    "end",
    "batch_size",
    "one_call",
    "gradient_checkpointing",
    "compile_mode",
    "quiet",
    "device",
    "process_index",
    "num_processes",
    "world",  # follows from the model, and run folders made before it was recorded lack it
)

# Settings added after run folders already existed, with the value that a run.json written without
# them implies: such a run resumes when the new setting has that value.
LATER_SETTINGS: dict[str, Any] = {"steer_window": [0.0, 1.0], "safety_checker": False,
                                  "lazy_tolerance": DEFAULT_LAZY_TOLERANCE,  # (trasce benchmark's)
                                  "prompt_column": None}

# Settings that a run.json written before them lacks, or that a session could not read (a hub id out of the
# cache has no revision): compared only where both sessions recorded a value.
COMPARED_WHEN_KNOWN: frozenset[str] = frozenset({"model_revision"})
# Settings that name what another setting identifies: equal where that one is known and equal (the same
# weights under another path: `--model ./m1` for `m1`, or a folder moved).
NAMED_BY: dict[str, str] = {"model": "model_revision"}

# Packages whose versions can change the pixels; recorded in run.json so a result can be reproduced.
_VERSIONED_PACKAGES: tuple[str, ...] = ("torch", "diffusers", "transformers", "trasce")
_TEMP_SUFFIX = ".tmp"
_SHOW_CHARS = 80
# Stands for "key not present" when comparing settings, distinct from any JSON value (None included).
_MISSING = object()


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (e.g. resumed with different settings)."""


def _file_above(path: Path) -> Path | None:
    """The nearest existing folder above ``path`` when it is a file (nothing can be written below it)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_path(path: str | Path, option: str, folder: bool) -> None:
    """``ValueError`` naming ``option`` unless ``path`` can be written as a ``folder`` (else a file): it is
    not the other kind, and no folder above it is a file."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; give a folder (a new or empty one for a new run)")
    if not folder and path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file's path")
    blocking = _file_above(path)
    if blocking is not None:
        raise ValueError(f"{option} {path}: {blocking} is a file, not a folder")


def _holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` is a trasce run folder: a run.json that trasce wrote, or a manifest whose first
    line is one of trasce's (other tools name their files so too)."""
    try:
        run = json.loads((folder / RUN_JSON_NAME).read_text(encoding="utf-8"))
        if isinstance(run, dict) and isinstance(run.get("settings"), dict) and "trasce" in (run.get("versions") or {}):
            return True
    except (OSError, ValueError):
        pass
    try:
        with open(folder / MANIFEST_NAME, "rb") as handle:
            first = _parse_manifest_line(handle.readline())
    except OSError:
        return False
    return first is not None and {"case", "prompt"} <= first.keys()


def check_run_place(path: str | Path, command: str, holds_runs: bool, option: str = "--out") -> None:
    """``RunFolderError`` where ``command`` would mix its output with another run's: ``path`` lies inside
    a run folder, or, for a command that writes one run folder per method (``holds_runs``: trasce
    benchmark, trasce demo) is one, or for one that writes a single run holds such folders below it."""
    path = Path(path)
    check_output_path(path, option, folder=True)
    for place in Path(os.path.abspath(path)).parents:  # "a/../b" lies in the folder of a, not in a
        if _holds_a_run(place):
            raise RunFolderError(f"{option} {path} lies inside {place}, another run's folder; give {command} a "
                                 "folder of its own")
    if not path.is_dir():
        return
    if holds_runs and _holds_a_run(path):
        raise RunFolderError(f"{option} {path} holds a single run (trasce generate's or attack's); {command} writes a "
                             "folder per method in it: give it a folder of its own")
    if not holds_runs:
        below = next((p.parent for pattern in ("*", "*/*") for p in sorted(path.glob(f"{pattern}/{RUN_JSON_NAME}"))
                      if _holds_a_run(p.parent)), None)
        if below is not None:
            raise RunFolderError(f"{option} {path} holds other runs' folders ({below.relative_to(path)}); give "
                                 f"{command} a folder of its own")


@contextmanager
def failing_together(state) -> Iterator[None]:
    """A block that may fail in some processes only (the main process's check of ``run.json``, one
    process's damaged image): every process of ``state`` (accelerate's) then stops with the first
    failure's message, where the others would wait at the next barrier until the connection broke.
    With several processes, the end of the block is a barrier."""
    error: Exception | None = None
    try:
        yield
    except (RunFolderError, ValueError, OSError) as caught:  # the failures a user can cause
        error = caught
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        messages = gather_object([None if error is None else str(error)])
        first = next((message for message in messages if message is not None), None)
        if first is not None and error is None:
            raise RunFolderError(first)
    if error is not None:
        raise error


def refuse_several_processes(command: str, why: str) -> None:
    """Stop ``command`` started as several processes (``accelerate launch``, ``torchrun``), saying ``why``."""
    processes = os.environ.get("WORLD_SIZE", "1")
    if processes.isdigit() and int(processes) > 1:
        raise ValueError(f"{command} runs in one process; it was started as {processes} processes (accelerate "
                         f"launch), {why}")


# --------------------------------------------------------------------------------------------------
# Atomic files


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; without it a power cut can undo the ``os.replace``."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    # Hidden, random and in the same folder: same file system (so os.replace is atomic), never
    # mistaken for a result by a glob on '*.png', and unique across concurrent processes.
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either the old file or all of the new one.

    The bytes go to a temporary file in the same folder, are fsynced, and the file is renamed over
    ``path`` with :func:`os.replace`. If anything fails (or the process is killed) the final name is
    untouched; on an exception the temporary file is removed as well. The parent folder is created
    if needed. The file gets the usual permissions (0o666 less the umask), not ``mkstemp``'s 0o600,
    so results stay readable by others on shared machines.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_name(path)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        # BaseException too: a Ctrl-C mid-write should not leave temp files behind either.
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


#: What to do about a damaged run.json: the images (or prompts) it describes are worth keeping.
RUN_JSON_REMEDY = ("restore it from a copy to keep what the folder holds, or run into a new output folder "
                   "(--overwrite would discard it)")

_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # a PNG's last chunk: IEND, empty, and its checksum


def whole_image(path: Path) -> bool:
    """Whether ``path`` is a file, and, for a PNG, one that ends as PNG files end (a copy or disk that
    stopped part-way leaves one cut short; trasce's own writes are atomic)."""
    try:
        with open(path, "rb") as file:
            if path.suffix.lower() != ".png":
                return True
            file.seek(0, os.SEEK_END)
            if file.tell() < len(_PNG_END):
                return False
            file.seek(-len(_PNG_END), os.SEEK_END)
            return file.read() == _PNG_END
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


def atomic_save_image(path: str | Path, image: Image, format: str | None = None) -> None:
    """Save a PIL image atomically (see :func:`atomic_write_bytes`).

    The image is encoded in memory first, so an encoding error leaves nothing on disk. ``format``
    defaults to the one PIL associates with the file's extension (PNG for ``.png``).
    """
    path = Path(path)
    if format is None:
        from PIL import Image as PILImage

        format = PILImage.registered_extensions().get(path.suffix.lower())
        if format is None:
            raise ValueError(f"{path}: cannot tell the image format from the extension {path.suffix!r}")
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# JSON helpers


def _json_default(value: Any) -> Any:
    """Make the values settings usually hold JSON-able: paths, tuples' cousins, numpy/torch scalars."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    item = getattr(value, "item", None)
    if callable(item):  # numpy and torch scalars
        try:
            return item()
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{type(value).__name__} value {value!r} cannot be written to JSON")


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default, indent=indent)


def _normalise(value: Any) -> Any:
    """``value`` as it will read back from JSON (tuples become lists, paths strings, ...)."""
    return json.loads(_dumps(value))


def _show(value: Any) -> str:
    text = _dumps(value) if value is not _MISSING else "<not set>"
    if len(text) > _SHOW_CHARS:
        text = text[: _SHOW_CHARS - 3] + "..."
    return text


def package_versions() -> dict[str, str | None]:
    """Python and package versions, read from installed metadata (nothing is imported)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions.get("trasce") is None:
        # Running from a source checkout that was not pip-installed.
        import trasce

        versions["trasce"] = getattr(trasce, "__version__", None)
    return versions


def source_commit(root: Path | None = None) -> str | None:
    """The git commit of the checkout at ``root`` (default: the one trasce runs from), ending in
    ``+dirty`` when tracked files differ from it; ``None`` outside a checkout (an installed copy).
    Benchmark results record it, so that a figure can be traced to the code that measured it."""
    root = Path(__file__).resolve().parents[2] if root is None else root
    if not (root / ".git").exists():
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------------------------------
# Run folders


def append_lines(path: Path, lines: Sequence[str], header: str | None = None) -> None:
    """Append text lines to ``path`` in one ``os.write`` under an exclusive ``flock``, fsynced.

    Safe with several processes appending at once (``O_APPEND`` plus the lock). ``header`` goes
    first when the file is empty. If an earlier crash left a last line without its newline, a
    newline is written first so the new lines stay readable (readers skip the fragment).
    """
    # O_RDWR rather than O_WRONLY only so that the last byte can be checked with pread.
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            text = "\n" if size and os.pread(fd, 1, size - 1) != b"\n" else ""
            if header is not None and size == 0:
                text += header
            text += "".join(lines)
            view = memoryview(text.encode("utf-8"))
            while view:  # regular files take it all in one write; loop in case they do not
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RunFolder:
    """One output folder of ``trasce generate``.

    Creating the object writes nothing (a path that is a file is refused); the folder and ``images/``
    are made by the first write. All paths in the manifest are relative to the folder
    (``images/12.png``) so a folder can be moved or copied elsewhere and still resumed or evaluated.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} is a file, not a folder; give a folder (a new or empty one for a new "
                                 "run)")
        blocking = _file_above(self.path)
        if blocking is not None:
            raise RunFolderError(f"{self.path}: {blocking} is a file, not a folder")
        self.images_dir = self.path / IMAGES_DIR
        self.manifest_path = self.path / MANIFEST_NAME
        self.run_json_path = self.path / RUN_JSON_NAME

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- image names ---------------------------------------------------------------------------

    def image_file(self, case: str, k: int = 0, images_per_prompt: int = 1) -> str:
        """The manifest's ``file`` for image ``k`` of ``case``: ``images/<case>.png`` or
        ``images/<case>_<k>.png`` when there are several images per prompt."""
        why = check_case_name(case)
        if why is not None:
            raise ValueError(f"{case!r} cannot be used as an image name: {why}")
        if images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be 1 or more, got {images_per_prompt}")
        if not 0 <= k < images_per_prompt:
            raise ValueError(f"image index k must be between 0 and {images_per_prompt - 1}, got {k}")
        stem = case if images_per_prompt == 1 else f"{case}_{k}"
        return f"{IMAGES_DIR}/{stem}{IMAGE_SUFFIX}"

    def image_path(self, case: str, k: int = 0, images_per_prompt: int = 1) -> Path:
        """Path of image ``k`` of ``case``: :attr:`path` joined with :meth:`image_file`."""
        return self.path / self.image_file(case, k, images_per_prompt)

    # -- manifest ------------------------------------------------------------------------------

    def append_manifest(self, record: Mapping[str, Any]) -> None:
        """Append one record as one JSON line, flushed and fsynced before returning.

        Safe with several processes appending at once: the file is opened ``O_APPEND``, each line is
        written with one ``os.write`` while holding an exclusive ``flock``. If an earlier crash left
        a last line without its newline, a newline is written first so the new record stays
        readable (the fragment is then skipped by :meth:`read_manifest`).
        """
        file = record.get("file")
        if not isinstance(file, str) or not file:
            raise ValueError(f"a manifest record needs a 'file' (like 'images/12.png'), got {file!r}")
        self.path.mkdir(parents=True, exist_ok=True)
        append_lines(self.manifest_path, [_dumps(dict(record)) + "\n"])

    def read_manifest(self) -> list[dict[str, Any]]:
        """All manifest records, the last one kept when a ``file`` appears more than once.

        A line that is not a JSON object with a ``file`` is skipped instead of failing: a truncated
        last line is what a crash mid-append leaves (and what another process's unfinished append
        looks like), and it must not stop a resume. Such lines anywhere but at the end cannot come
        from this writer except after a crash, so they are reported with a ``RuntimeWarning``.
        Records are returned in the order of their (last) appearance.
        """
        try:
            handle = open(self.manifest_path, "rb")  # noqa: SIM115 - closed below, lock held while open
        except FileNotFoundError:
            return []
        with handle:
            if fcntl is not None:
                # Shared lock: see whole lines only, never another process's half-finished append.
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            data = handle.read()  # closing the file releases the lock

        lines = data.split(b"\n")
        records: dict[str, dict[str, Any]] = {}
        bad_lines: list[int] = []
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            record = _parse_manifest_line(raw)
            if record is None:
                # The final chunk (no trailing newline) is the crash case and is dropped silently.
                if number != len(lines):
                    bad_lines.append(number)
                continue
            file = record["file"]
            records.pop(file, None)  # re-insert so order follows the last occurrence
            records[file] = record
        if bad_lines:
            warnings.warn(
                f"{self.manifest_path}: skipped {len(bad_lines)} unreadable line(s) (first: line {bad_lines[0]}), "
                "as a crash leaves them; an image such a line recorded counts as made only where a later line "
                "records it again (trasce generate makes the others again); this warning comes at every reading "
                "until the line is deleted",
                RuntimeWarning,
                stacklevel=2,
            )
        return list(records.values())

    def done(self) -> set[str]:
        """Manifest ``file`` names (like ``images/12.png``) whose image is also on disk.

        A manifest line whose image is missing or cut short (``whole_image``) is not done (the image was
        deleted or damaged); an image without a manifest line is not done either and will be overwritten
        by the next run.
        """
        return set(self._done_records())

    def _done_records(self) -> dict[str, dict[str, Any]]:
        """The manifest lines of :meth:`done`'s images, by ``file``."""
        return {r["file"]: r for r in self.read_manifest() if whole_image(self.path / r["file"])}

    # -- what the run is to make -----------------------------------------------------------------

    def record_requested(self, files: Iterable[str]) -> None:
        """Add ``files`` (manifest names, ``images/12.png``) to those the run was asked to make.

        Each session of ``trasce generate`` calls it with every image of its rows (all processes' shares),
        so the union over sessions is what the folder should hold when finished, whichever slices
        (``--start``/``--end``) or grown prompt files the sessions took. Only names not yet recorded are
        appended, as one line under the file's own lock, so resuming adds nothing (two sessions starting at
        once may both append a name; the reader takes the union).
        """
        new = sorted(set(files) - (self.requested() or set()))
        if new:
            self.path.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            append_lines(self.path / REQUESTED_NAME, [_dumps({"files": new, "utc": stamp}) + "\n"])

    def requested(self) -> set[str] | None:
        """Every file :meth:`record_requested` recorded; ``None`` when nothing was (a folder made before
        trasce recorded it, or by hand). A line cut short by a crash is skipped: its session's next run
        records its files again."""
        try:
            with open(self.path / REQUESTED_NAME, "rb") as handle:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
                data = handle.read()
        except FileNotFoundError:
            return None
        files: set[str] = set()
        for raw in data.split(b"\n"):
            try:
                record = json.loads(raw) if raw.strip() else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and isinstance(record.get("files"), list):
                files.update(file for file in record["files"] if isinstance(file, str))
        return files

    def done_for(self, rows: Sequence[Any], n: int, source: str, describe: Callable[[Any], str],
                 extra_ok: bool = False) -> set[str]:
        """:meth:`done`, after holding every done image to the row it was made for.

        ``rows`` are all the rows of the run's prompt source (with ``case``, ``prompt``, ``seed`` and
        ``guidance_scale``), ``n`` images each; ``source`` names it and ``describe(row)`` names a row.
        Which rows a run holds may change between sessions (a prompt file that moved or grew, another
        ``--start``/``--end``), so ``run.json`` does not pin the source. Instead, a done image whose
        row is gone, or whose row now gives another prompt, seed or CFG scale, is a
        :class:`RunFolderError`. With ``extra_ok``, an image whose row is gone is left alone instead
        (a set that shrank: ``trasce benchmark --n-target 3`` after 6 keeps the other three).
        """
        records = self._done_records()
        rows_by_file = {self.image_file(row.case, k, n): row for row in rows for k in range(n)}
        for file in sorted(records):
            record, row = records[file], rows_by_file.get(file)
            if row is None and extra_ok:
                continue
            then = f"{record.get('prompt')!r} (seed {record.get('seed')}, CFG {record.get('guidance_scale')})"
            if row is None:
                # Not --overwrite first: a second prompt file sent to the folder of a first would delete its images.
                raise RunFolderError(
                    f"{self.path / file} was made from prompt {then}, which is in none of the rows of {source}; "
                    "use a new output folder, or one prompt file that holds every row (--start/--end take a part "
                    "of it), or --overwrite to discard the images already made")
            now = {"prompt": row.prompt, "seed": row.seed, "guidance_scale": row.guidance_scale}
            if {key: record.get(key) for key in now} != now:
                raise RunFolderError(
                    f"{self.path / file} was made from prompt {then}, but {describe(row)} now gives {row.prompt!r} "
                    f"(seed {row.seed}, CFG {row.guidance_scale}); use a new output folder, or delete that image to "
                    "make it again from the row as it is now, or --overwrite to discard the images already made")
        return set(records)

    # -- run.json ------------------------------------------------------------------------------

    def read_run_json(self) -> dict[str, Any] | None:
        """The stored ``run.json``, or ``None`` when there is none yet."""
        try:
            text = self.run_json_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as error:
            raise RunFolderError(f"{self.run_json_path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at "
                                 f"offset {error.start}); {RUN_JSON_REMEDY}") from error
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise RunFolderError(
                f"{self.run_json_path} is not valid JSON ({error.msg} at line {error.lineno}); {RUN_JSON_REMEDY}"
            ) from error
        if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
            raise RunFolderError(f"{self.run_json_path} has no 'settings' object; {RUN_JSON_REMEDY}")
        return data

    def write_run_json(
        self,
        settings: Mapping[str, Any],
        force: bool = False,
        volatile: Iterable[str] = VOLATILE_SETTINGS,
        check_only: bool = False,
    ) -> dict[str, Any]:
        """Record the run's settings in ``run.json``, or check them against the stored ones.

        ``run.json`` holds ``{"settings": ..., "versions": {python, torch, diffusers, transformers,
        trasce}, "created_utc": ...}``. When it already exists:

        * same settings (ignoring the keys in ``volatile``): the file is left as it is, so it keeps
          the time and versions of the run's first session; a ``RuntimeWarning`` is issued if the
          package versions have changed since, because images may then differ slightly;
        * different settings: :class:`RunFolderError` naming the first differing key (in sorted
          order) with both values, unless ``force`` is true, in which case the file is replaced.

        When it does not exist but finished images do (``run.json`` lost, or not copied with the
        folder), :class:`RunFolderError` too unless ``force``: the settings those images were made
        with cannot be checked, and resuming would mix them with images of the new settings.

        ``force`` does not touch the manifest or images: call :meth:`reset` as well, or the images
        of the old settings still count as done. Returns the contents of ``run.json`` afterwards.
        ``check_only`` raises as above but writes nothing (returning ``{}`` where there is no ``run.json``), so
        that a command with several folders refuses before any of them records settings it then refuses.
        """
        new_settings = _normalise(dict(settings))
        versions = package_versions()
        if not force:
            old = self.read_run_json()
            done = len(self._done_records()) if old is None else 0
            if done:
                raise RunFolderError(
                    f"{self.path} holds {done} finished image{'s' if done > 1 else ''} ({MANIFEST_NAME}) but no "
                    f"{RUN_JSON_NAME}, so the settings they were made with cannot be checked; restore "
                    f"{RUN_JSON_NAME} (from where the folder was copied), or use a new output folder, or "
                    "--overwrite to discard the images already made")
            if old is not None:
                key = _first_difference(old["settings"], new_settings, frozenset(volatile))
                if key is not None:
                    before = old["settings"].get(key, LATER_SETTINGS.get(key, _MISSING))
                    after = new_settings.get(key, LATER_SETTINGS.get(key, _MISSING))
                    # Within a group of settings (trasce benchmark's method_settings), the one that differs.
                    inner = (_first_difference(before, after, frozenset())
                             if isinstance(before, dict) and isinstance(after, dict) else None)
                    if inner is not None:
                        key, before, after = f"{key}.{inner}", before.get(inner, _MISSING), after.get(inner, _MISSING)
                    raise RunFolderError(
                        f"{self.path} holds a run with different settings: {key!r} was "
                        f"{_show(before)}, now {_show(after)}; use a new output folder or --overwrite"
                    )
                old_versions = old.get("versions")
                if isinstance(old_versions, dict) and old_versions != versions:
                    changed = sorted(k for k in versions if old_versions.get(k) != versions[k])
                    warnings.warn(
                        f"{self.run_json_path}: package versions changed since the run started "
                        f"({', '.join(f'{k} {old_versions.get(k)} -> {versions[k]}' for k in changed)}); "
                        "new images may differ slightly from the earlier ones",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                return old
        if check_only:
            return {}
        content = {
            "settings": new_settings,
            "versions": versions,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_bytes(self.run_json_path, (_dumps(content, indent=2) + "\n").encode("utf-8"))
        return content

    # -- housekeeping --------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget all finished work: delete the manifest, the requested images, ``images/*.png``, temporary
        files, and the verdicts, summaries and reports that ``trasce evaluate`` wrote about those images.

        For ``--overwrite``. The manifest goes first, so a crash half-way leaves a folder in which
        nothing counts as done (the safe direction). ``run.json`` is left for
        :meth:`write_run_json` with ``force=True`` to replace. A folder that holds files but neither
        ``run.json`` nor a manifest is no run folder, and is refused (``RunFolderError``) untouched.
        """
        is_run = self.run_json_path.is_file() or self.manifest_path.is_file()
        if not is_run and self.path.is_dir() and any(self.path.iterdir()):
            raise RunFolderError(f"{self.path} holds files but no {RUN_JSON_NAME} or {self.manifest_path.name}: it is "
                                 "not a trasce output folder, and --overwrite deletes only a run's files; give --out "
                                 "a new or empty folder")
        self.manifest_path.unlink(missing_ok=True)
        (self.path / REQUESTED_NAME).unlink(missing_ok=True)
        for name in (VERDICTS_NAME, SUMMARY_NAME, REPORT_NAME):
            for judged in self.path.glob(name.format(judge="*")):
                judged.unlink(missing_ok=True)
        if self.images_dir.is_dir():
            for entry in self.images_dir.iterdir():
                if entry.is_file() and (entry.suffix == IMAGE_SUFFIX or _is_temp(entry)):
                    entry.unlink(missing_ok=True)

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> list[Path]:
        """Delete temporary files left by killed processes; returns what was removed.

        Only files older than ``older_than_s`` are touched, because a younger one may belong to
        another process that is about to rename it into place.
        """
        removed: list[Path] = []
        cutoff = time.time() - older_than_s
        for folder in (self.path, self.images_dir):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                try:
                    if _is_temp(entry) and entry.is_file() and entry.stat().st_mtime < cutoff:
                        entry.unlink()
                        removed.append(entry)
                except FileNotFoundError:  # another process renamed or removed it meanwhile
                    continue
        return removed


def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(_TEMP_SUFFIX)


def _parse_manifest_line(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        return None
    return record


def _first_difference(old: Mapping[str, Any], new: Mapping[str, Any], volatile: frozenset[str]) -> str | None:
    """First key (sorted) whose value differs between two settings dicts, ignoring ``volatile``.

    A key of ``LATER_SETTINGS`` that one side lacks has its default value there; a key of
    ``COMPARED_WHEN_KNOWN`` counts only where both sides hold a value; a key of ``NAMED_BY`` only where
    the key it names does not settle it.
    """
    for key in sorted((set(old) | set(new)) - volatile):
        if key in COMPARED_WHEN_KNOWN and (old.get(key) is None or new.get(key) is None):
            continue
        identity = NAMED_BY.get(key)
        if identity is not None and old.get(identity) is not None and old.get(identity) == new.get(identity):
            continue
        missing = LATER_SETTINGS.get(key, _MISSING)
        if old.get(key, missing) != new.get(key, missing):
            return key
    return None
