"""Output folders hold only what the tool wrote: a manifest of the files a run wrote.

A results folder (`bench --out`, `scan-model --out`) carries `.mlshift-manifest.json`: the
files the tool wrote there (paths relative to the folder) and the subfolders it created
(`figures`, `.cache`). The rules:

- `claim(folder)` before anything is written: refused in one `ConfigError` when the folder is
  the filesystem root, the home folder, the folder holding the package (the checkout, or
  site-packages), a folder above any of them, or one of `protected`; when it is a file, FIFO
  or device; or when it holds an entry that its manifest does not list (a non-empty folder
  without a manifest holds only foreign files, unless it is provably a results folder of an
  earlier version: `adopt_legacy`).
- `record(folder, files, folders)` adds to the manifest, atomically, before or right after
  the files are written.
- `remove_listed(folder, keep, under)` removes files the manifest lists (under one listed
  subfolder) that this run did not write again: only listed regular files (never a symlink,
  never by pattern), inside the folder; nothing else is ever deleted.
- `clean_temps(folder)` removes a hard-killed writer's temp files (`files.atomic_path`'s
  `.<name>.<pid>-<random>.tmp`, its process gone): at the top level only those of listed
  names, and inside the subfolders the manifest says the tool created.

Entries inside a listed subfolder that the manifest does not list are left alone (a figure
written just before a crash; a file a user dropped there): never deleted, never refused.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from mlshift_jax.core.errors import ConfigError, DataError
from mlshift_jax.core.files import clean_stale_temps, file_kind, write_text
from mlshift_jax.core.provenance import PACKAGE_HOME

MANIFEST = ".mlshift-manifest.json"
FORMAT = "mlshift-output-manifest"
MAX_BYTES = 4 << 20
MAX_ENTRIES = 100_000


def _relative(entry, where: str) -> str:
    """A manifest entry: a relative POSIX path inside the folder (no '..', not absolute)."""
    if not isinstance(entry, str) or not entry or "\x00" in entry or "\\" in entry:
        raise DataError(f"{where}: expected relative paths, found {entry!r}")
    p = PurePosixPath(entry)
    if p.is_absolute() or any(part in ("..", ".", "") for part in p.parts) \
            or str(p) != entry:
        raise DataError(f"{where}: expected relative paths inside the folder, found {entry!r}")
    return entry


def read(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest {"files": set, "folders": set}, None when it has none; DataError
    in one line for a manifest that is not one (too big, bad JSON, paths leaving the folder)."""
    path = Path(folder) / MANIFEST
    where = str(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{where}: expected the output manifest (a regular file), found "
                        f"{file_kind(st.st_mode)}")
    if st.st_size > MAX_BYTES:
        raise DataError(f"{where}: expected a manifest of at most {MAX_BYTES} bytes, found "
                        f"{st.st_size}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: expected the output manifest (JSON), found bad JSON "
                        f"({type(e).__name__})") from None
    if not (isinstance(data, dict) and data.get("format") == FORMAT
            and isinstance(data.get("files"), list) and isinstance(data.get("folders"), list)
            and len(data["files"]) + len(data["folders"]) <= MAX_ENTRIES):
        raise DataError(f"{where}: expected an output manifest {{format: {FORMAT!r}, files: "
                        "[...], folders: [...]}, found something else")
    return {"files": {_relative(f, where) for f in data["files"]},
            "folders": {_relative(f, where) for f in data["folders"]}}


def _write(folder: Path, manifest: dict) -> None:
    payload = {"format": FORMAT, "version": 1,
               "about": "files mlshift wrote here; it deletes or overwrites only these",
               "files": sorted(manifest["files"]), "folders": sorted(manifest["folders"])}
    write_text(folder / MANIFEST, json.dumps(payload, indent=1) + "\n")


def _is_temp_of(name: str, listed: set[str]) -> bool:
    """`.<target>.<pid>-<random>.tmp` of a listed target (files.atomic_path's temp names)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    stem = name[1:-len(".tmp")]
    target, _, _ = stem.rpartition(".")
    return target in listed


def _protected(resolved: Path, protected: Iterable[Path]) -> str | None:
    places = [(Path("/"), "the filesystem root"), (Path.home(), "your home folder"),
              (PACKAGE_HOME, "the folder holding mlshift_jax")]
    places += [(Path(p), "a protected folder") for p in protected]
    for place, name in places:
        try:
            place = place.resolve()
        except OSError:
            continue
        if resolved == place:
            return name
        if resolved in place.parents:
            return f"a folder above {name} ({place})"
    return None


def claim(folder: str | os.PathLike, *, flag: str = "--out",
          protected: Iterable[str | os.PathLike] = ()) -> Path:
    """`folder` as a Path if the tool may write there (see the module docstring); else one
    ConfigError naming the flag, the folder and what is there."""
    folder = Path(folder)
    resolved = folder.expanduser().resolve()
    why = _protected(resolved, [Path(p) for p in protected])
    if why is not None:
        raise ConfigError(f"{flag} {folder}: refusing {why}; give a results folder of its own "
                          "(new, empty, or written by mlshift)")
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return folder
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{flag} {folder}: expected a folder, found {file_kind(st.st_mode)}")
    names = sorted(os.listdir(folder))
    if not names:
        return folder
    try:
        manifest = read(folder)
    except DataError as e:
        raise ConfigError(f"{flag} {folder}: {e}") from None
    if manifest is None:
        manifest = adopt_legacy(folder, names)
    if manifest is None:
        raise ConfigError(f"{flag} {folder}: expected a new, empty or mlshift-written folder, "
                          f"found {len(names)} entries it did not write (no {MANIFEST}), "
                          f"e.g. {names[0]!r}; choose another folder")
    top_files = {f for f in manifest["files"] if "/" not in f}
    top_folders = {f.split("/")[0] for f in manifest["folders"]}
    foreign = []
    for name in names:
        if name == MANIFEST or name in top_folders and (folder / name).is_dir():
            continue
        if name in top_files and not (folder / name).is_dir():
            continue
        if _is_temp_of(name, top_files | {MANIFEST}):
            continue
        foreign.append(name)
    if foreign:
        raise ConfigError(f"{flag} {folder}: holds {len(foreign)} entries mlshift did not "
                          f"write (not in {MANIFEST}), e.g. {foreign[0]!r}; move them or "
                          "choose another folder")
    return folder


LEGACY_FILES = ("tables.md", "records.csv", "run.json")
LEGACY_FOLDERS = ("figures", ".cache")


def adopt_legacy(folder: Path, names: list[str]) -> dict | None:
    """A results folder an earlier version wrote (before manifests) as its manifest, written
    now; None unless it provably is one: only tables.md, records.csv, run.json, figures/ and
    .cache/ at the top, run.json a run record (its "determinism" and "out_dir" keys), and
    the figures listed only where tables.md links them (others stay, unlisted, untouched)."""
    if not set(names) <= {*LEGACY_FILES, *LEGACY_FOLDERS} or "run.json" not in names:
        return None
    if any((folder / n).is_symlink() or (folder / n).is_dir() != (n in LEGACY_FOLDERS)
           for n in names):
        return None
    try:
        if (folder / "run.json").stat().st_size > MAX_BYTES:
            return None
        info = json.loads((folder / "run.json").read_text())
        tables = (folder / "tables.md").read_text() if "tables.md" in names else ""
    except (OSError, ValueError, RecursionError, UnicodeDecodeError):
        return None
    if not (isinstance(info, dict) and "determinism" in info and "out_dir" in info):
        return None
    files = {n for n in names if n in LEGACY_FILES}
    figures = folder / "figures"
    if figures.is_dir():
        files |= {f"figures/{p.name}" for p in figures.iterdir()
                  if p.suffix == ".png" and p.is_file() and not p.is_symlink()
                  and f"(figures/{p.name})" in tables}
    manifest = {"files": files, "folders": {n for n in names if n in LEGACY_FOLDERS}}
    _write(folder, manifest)
    return manifest


def record(folder: str | os.PathLike, files: Iterable[str | os.PathLike] = (),
           folders: Iterable[str] = ()) -> None:
    """Add `files` (paths inside `folder`, as `folder / name`) and `folders` to the
    manifest, written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read(folder) or {"files": set(), "folders": set()}
    base = folder.resolve()
    for f in files:
        try:
            rel = Path(f).resolve().relative_to(base)
        except ValueError:
            raise ConfigError(f"{folder}: expected files inside it, found {f}") from None
        manifest["files"].add(_relative(rel.as_posix(), str(folder / MANIFEST)))
    manifest["folders"] |= {_relative(d, str(folder / MANIFEST)) for d in folders}
    _write(folder, manifest)


def remove_listed(folder: str | os.PathLike, keep: Iterable[str | os.PathLike], *,
                  under: str) -> list[Path]:
    """Remove the files the manifest lists under subfolder `under` that are not in `keep`
    (those this run wrote); only regular files, never symlinks. Returns the paths removed."""
    folder = Path(folder)
    manifest = read(folder)
    if manifest is None:
        return []
    base = folder.resolve()
    kept = {Path(k).resolve() for k in keep}
    removed = []
    for rel in sorted(manifest["files"]):
        if not rel.startswith(under.rstrip("/") + "/"):
            continue
        path = folder / rel
        if path.resolve() in kept:
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            manifest["files"].discard(rel)
            continue
        if not stat.S_ISREG(st.st_mode) or base not in path.resolve().parents:
            continue  # a symlink or something else planted there: left alone, still listed
        path.unlink()
        manifest["files"].discard(rel)
        removed.append(path)
    _write(folder, manifest)
    return removed


def clean_temps(folder: str | os.PathLike) -> list[Path]:
    """Stale temp files of listed names at the top level, and any stale temp inside the
    subfolders the manifest says the tool created (see `files.clean_stale_temps`)."""
    folder = Path(folder)
    manifest = read(folder)
    if manifest is None:
        return []
    names = {f for f in manifest["files"] if "/" not in f} | {MANIFEST}
    removed = clean_stale_temps(folder, recursive=False, names=names)
    for sub in sorted(manifest["folders"]):
        path = folder / sub
        if path.is_dir() and not path.is_symlink():
            removed += clean_stale_temps(path)
    return removed
