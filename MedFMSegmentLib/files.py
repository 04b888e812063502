"""File helpers shared by every writer: atomic writes, safe names, output checks, leftovers.

One way to write a file: into a uniquely named hidden temporary beside the target (same folder,
so the final ``os.replace`` is atomic), renamed into place only when complete. Temporary names
carry the writing process's id, ``.NAME.PID-HEX.partial[.EXT]``, so a later run can tell the
leftovers of a killed writer from those of a live one and sweep only the former.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError

__all__ = ["new_sibling", "process_alive", "atomic_path", "atomic_write_bytes", "atomic_write_text", "safe_name",
           "unique_names", "check_output_file", "check_output_folder", "refuse_overlap", "sweep_leftovers",
           "is_own_temporary", "temporary_name"]

#: :func:`new_sibling`'s names: ``.NAME.PID-HEX12`` then the caller's suffix.
_SIBLING_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{12}(?P<suffix>.*)$")


def temporary_name(name: str) -> tuple[str, int, str] | None:
    """``(target name, writer's process id, suffix)`` of a :func:`new_sibling` name; None for any
    other name. Sweeps use it to tell a killed writer's leftovers from a live one's."""
    match = _SIBLING_PATTERN.match(name)
    return None if match is None else (match["name"], int(match["pid"]), match["suffix"])


def _is_partial_suffix(suffix: str) -> bool:
    """The suffixes of the files this module writes: none, or ``.partial`` (and an extension)."""
    return suffix == "" or suffix.startswith(".partial")


def new_sibling(path: Path, suffix: str = "", directory: bool = False) -> Path:
    """Create a new, uniquely named hidden file (or folder) beside ``path`` and return its path.

    Unlike ``tempfile.mkstemp``/``mkdtemp`` (modes 0600/0700), it gets the permissions an ordinary
    new file or folder gets (0666/0777 less the umask), so what is renamed into place from it is
    as readable as any other output of the user. The name holds this process's id (see
    :func:`sweep_leftovers`).
    """
    path = Path(path)
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}{suffix}"
        try:
            if directory:
                os.mkdir(candidate, 0o777)
            else:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, extension: str = "") -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path``; rename it onto ``path`` when the block succeeds.

    Args:
        path: The final file.
        extension: Appended to the temporary name (``.nii.gz``...) for writers that pick the format
            from the name.
    """
    path = Path(path)
    tmp = new_sibling(path, suffix=f".partial{extension}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (complete or not at all)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def safe_name(name: str, default: str = "case") -> str:
    """A file-system-safe file name stem: ASCII letters, digits, ``._-``; never hidden, never empty."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or default


def unique_names(names: Iterable[str]) -> list[str]:
    """Make names unique (case-insensitively, for case-insensitive file systems), deterministically.

    A name keeps its value when it is the first of its kind; later duplicates get ``_2``, ``_3``...
    choosing only suffixes that no other name in the whole list already uses, so
    ``img, img, img_2`` becomes ``img, img_3, img_2`` (never two ``img_2``).
    """
    names = list(names)
    taken = {n.lower() for n in names}
    seen: set[str] = set()
    result = []
    for name in names:
        candidate = name
        if candidate.lower() in seen:
            number = 2
            while f"{name}_{number}".lower() in taken:
                number += 1
            candidate = f"{name}_{number}"
            taken.add(candidate.lower())
        seen.add(candidate.lower())
        result.append(candidate)
    return result


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def refuse_overlap(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike]) -> None:
    """Raise :class:`InputError` when an output is an input, lies inside an input folder, or holds one.

    Paths are compared after resolving symlinks, so ``-o link_to_input`` is refused too. Input
    folders refuse outputs anywhere inside them; an output folder is refused when it is an input.
    """
    resolved_inputs = [_resolved(p) for p in inputs]
    for output in outputs:
        out = _resolved(output)
        for source in resolved_inputs:
            if out == source:
                raise InputError(f"output {output} is the input {source}: choose another output path")
            if source.is_dir() and source in out.parents:
                raise InputError(f"output {output} lies inside the input folder {source}: "
                                 "choose an output outside the inputs")


def check_output_file(path: str | os.PathLike) -> Path:
    """Check, before any work, that a file can be written at ``path``; raise :class:`InputError` if not."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {path} is a folder: give a file name")
    _check_writable_folder(path.parent, create=False)
    return path


def check_output_folder(path: str | os.PathLike, create: bool = True) -> Path:
    """Check (and create when missing) an output folder; raise :class:`InputError` if it is unusable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path} is a file: give a folder")
    _check_writable_folder(path, create=create)
    return path


def _check_writable_folder(folder: Path, create: bool) -> None:
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"output folder {folder} cannot be made: {parent} is a file")
            break
    if not folder.exists():
        if not create:
            raise InputError(f"output folder does not exist: {folder}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None
    try:  # a real probe: os.access is wrong for root, ACLs and read-only mounts
        os.unlink(new_sibling(folder / "write-check", suffix=".partial"))
    except OSError as exc:
        raise InputError(f"cannot write in output folder {folder}: {exc.strerror or exc}") from None


def is_own_temporary(path: Path) -> bool:
    """Whether ``path`` is named like one of this tool's temporaries (see :func:`new_sibling`)."""
    parts = temporary_name(path.name)
    return parts is not None and _is_partial_suffix(parts[2])


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie counts as gone; one owned by another
    user counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if os.name == "posix":
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def sweep_leftovers(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete the temporaries a killed writer left in ``folder``; nothing else is touched.

    Only entries named like :func:`new_sibling`'s temporaries whose process is gone are removed
    (a live writer's are kept), and with ``names`` only those of these target names.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    wanted = None if names is None else set(names)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        parts = temporary_name(entry.name)
        if parts is None or not _is_partial_suffix(parts[2]) or (wanted is not None and parts[0] not in wanted):
            continue
        if process_alive(parts[1]):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed
