"""
lib/files.py: how this project writes and reads files safely, in one place: atomic writes (a crash leaves
the old file or the complete new one), whole folders replaced at once, run-folder locks and the marker
that keeps the project's own folders out of every corpus, streamed hashing, download-once, and the one
JSON-lines reader every program uses. docs/files.md describes the guarantees.
"""

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from errors import FileFormatError, UserError


# ----------------------------------------------------------------------------------------------------
# Files: atomic writes and streamed hashing

def atomic_write(path, data, before_replace=None):
    """Write bytes (or a list of bytes-like chunks) to `path` so that a crash leaves either the old file
    or the complete new one.

    tmp file in the same folder -> write, flush, fsync -> os.replace -> fsync the folder. (A rename is
    atomic only within one file system, hence the same folder.) `before_replace` is a hook for tests.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming_errors(path), open(tmp, "wb") as f:
            for chunk in (data if isinstance(data, list) else [data]):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def naming_errors(path):
    """Inside: an OSError that names no file (a full disk, [Errno 28]; a file size limit, [Errno 27]) gets
    `path`, so its one-line message says which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def file_mode():
    """The mode open() gives a new file: 0o666 less the umask (0o644 with the usual umask 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_folder(dest, write, force=False, what="--out"):
    """Write a folder whole: write(tmp) fills a new folder beside dest, which then takes dest's place, so
    that dest never holds a mix of old and new files. dest must be missing or empty (this project's marker
    and lock aside) unless force; with force its old content goes, all of it. A folder that holds folders,
    or the current folder or one above it, is never replaced. Returns dest (a Path)."""
    import shutil
    dest = Path(dest).expanduser()
    recover_folder(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{what} {dest} is a file; expected a folder")
    old = sorted(p.name for p in dest.iterdir() if p.name not in (OUTPUT_MARK, LOCK_NAME)) if dest.is_dir() else []
    if old and not force:
        raise UserError(f"{what} {dest} is not empty (it holds {', '.join(old[:3])}{' ...' if len(old) > 3 else ''}); "
                        f"pass --force to replace it whole, or choose a new folder")
    if old and (any((dest / n).is_dir() for n in old) or dest.resolve() in (Path.cwd(), *Path.cwd().parents)):
        raise UserError(f"{what} {dest} holds folders (or is the current folder): --force replaces only a folder "
                        f"of files; remove it yourself if it should go")
    tmp, trash = (dest.with_name(f".{dest.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if dest.exists():
            with locked_folder(dest, what):             # not while a train.py writes it
                os.replace(dest, trash)
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def recover_folder(dest):
    """Tidy what an earlier write_folder of dest left when its process was killed: its half-written
    .NAME.tmp-PID goes; its .NAME.old-PID (the previous dest, moved aside just before the new one took its
    place) goes too, or, if it was killed between the two renames and dest is missing, becomes dest again.
    Only the folders of processes that are gone: a live one's are its work in progress."""
    import shutil
    for kind in ("tmp", "old"):
        for p in sorted(dest.parent.glob(f".{dest.name}.{kind}-*")):
            pid = p.name.rpartition("-")[2]
            if not pid.isdigit() or not p.is_dir() or (int(pid) != os.getpid() and process_alive(int(pid))):
                continue
            if kind == "old" and not dest.exists():
                os.replace(p, dest)
                print(f"note: {dest} was missing after an interrupted write; restored it from {p.name}",
                      file=sys.stderr)
            else:
                shutil.rmtree(p, ignore_errors=True)


def remove_stale_temp_files(folder, pattern):
    """Delete the temporary files (`pattern`, named ...tmp-<pid>) that a killed process left in folder:
    this process's own, or those whose process is gone. Another live process's file is its work in
    progress and stays. Example: ".train.bin.tmp-18682" stays while process 18682 runs."""
    for tmp in Path(folder).glob(pattern):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)                                 # signal 0: only asks whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:                             # it exists, under another user
        return True
    return True


def fetch_once(url, path, what, otherwise, log=print):
    """The file at `path`, downloaded from `url` the first time (atomically: a failed download leaves
    nothing). `what` names it in the messages; `otherwise` says what to do when the download fails."""
    path = Path(path)
    if path.is_file():
        return path
    import urllib.request
    try:
        log(f"downloading {what} from {url} ...")
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except Exception as e:
        raise UserError(f"could not download {what} ({e.__class__.__name__}: {e}); {otherwise}") from None
    atomic_write(path, data)
    return path


def read_jsonl(path):
    """The records of a JSON-lines file, as (line number, "path, line N" for messages, the parsed value),
    blank lines skipped. UserError for a file that cannot be opened; FileFormatError for one that is not
    UTF-8 or has a line that is not JSON. What a record must hold is the caller's to check."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as e:
                    raise FileFormatError(f"{path}, line {n}: not valid JSON ({e})") from None
                except RecursionError:                  # e.g. 10^5 nested [ ]
                    raise FileFormatError(f"{path}, line {n}: not usable JSON (nested too deeply)") from None
                yield n, f"{path}, line {n}", value
        except UnicodeDecodeError as e:
            raise FileFormatError(f"{path} is not UTF-8 text ({e})") from None


# ----------------------------------------------------------------------------------------------------
# The project's own folders: a marker that keeps them out of every corpus, and a lock per run folder

OUTPUT_MARK = ".gpt-numpy-output"       # in data/ and in every run's out dir: never read as a corpus
LOCK_NAME = ".lock"                     # in a run's out dir while a process writes it


def mark_output_folder(folder):
    """Mark a folder this project writes (the data caches, a run's out dir), so that find_sources leaves it
    out of a corpus (`--data .` would otherwise train on its own checkpoints' logs and caches)."""
    mark = Path(folder) / OUTPUT_MARK
    if not mark.exists():
        with naming_errors(mark):
            mark.write_text("written by train.py / export.py of gpt-numpy: data.find_sources leaves this folder "
                            "out of every corpus\n")


@contextmanager
def locked_folder(folder, what="--out-dir"):
    """Hold an exclusive advisory lock (flock) on folder/.lock while inside, or raise UserError at once if
    another process holds it. The kernel drops the lock when its process ends, killed or not, so a
    crashed run never leaves its folder locked. (No-op where fcntl is missing.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(folder) / LOCK_NAME
    with naming_errors(path):
        f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "?"
            raise UserError(f"{what} {folder} is in use by another process (pid {owner}); wait for it to finish, "
                            f"or choose another {what}") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()                                       # releases the lock


def fsync_dir(folder):
    """Make a rename in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path, text):
    atomic_write(path, text.encode("utf-8"))


def file_sha256(path):
    """sha256 of a file's bytes, read 1 MB at a time. (tokenize_files hashes while it reads, through
    bpe.read_text_blocks, so a corpus is read once when its ids are written.)"""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def text_sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


