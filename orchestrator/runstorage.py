"""Run storage: where every file that a process other than its writer reads lives.

Checkpoints (last, best), stage-1 and teacher checkpoints, prediction images and the per-variant
files of a variant ``KEY`` live under ``ROOT/KEY/``, where ROOT is the run storage:

- a local folder (the default ``.bnnctl/runs`` of the working directory, or any path), or
- any fsspec URL: ``s3://bucket/prefix`` (s3fs), ``gs://bucket/prefix`` (gcsfs), ``file:///nfs/...``.
  Credentials and endpoints come from each node's environment, as the URL's library reads them
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``FSSPEC_S3_ENDPOINT_URL`` for an S3-compatible
  server, ...): no node needs to see another node's disk.

With a URL, a worker trains in a local scratch folder and uploads after every checkpoint; each file
becomes visible in storage only when complete (an object store's PUT is atomic; on a folder the file
is written under a temporary name and renamed). Dependencies (stage 1's last checkpoint, a teacher's
best) and the files of an interrupted run (resume after a lost node) are downloaded first.

Results and the state database hold locations *relative to the root* (``KEY/best.pt``), so a copied
folder or a bucket seen from another machine keeps working.
"""
from __future__ import annotations

import errno
import os
import tempfile
import time
from pathlib import Path

from .urls import mask_text as mask

DEFAULT_ROOT = Path(".bnnctl") / "runs"
#: files a variant writes that are kept in storage (checkpoints first: a resume needs them)
SYNCED = ("best.pt", "last.pt", "predictions.png")


class StorageError(Exception):
    """Storage failed; the message names the URL, credentials masked (raised on workers, reported as
    the variant's error). ``machine``: the failure is the node's (no credentials, no network, no
    storage package, a refused request), not the config's: the variant is retried, elsewhere when
    the backend can; False for a full disk and for a dependency that is not in storage."""

    def __init__(self, message: str, machine: bool = True) -> None:
        super().__init__(message)
        self.machine = machine


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def normalize(location: str | os.PathLike | None) -> str:
    """The storage root as given by --storage / $BNNCTL_STORAGE / the spec: a URL stays a URL; a
    path (or file:// URL) becomes an absolute path of this machine."""
    if location is None or str(location) == "":
        location = os.environ.get("BNNCTL_STORAGE") or DEFAULT_ROOT
    location = str(location)
    if is_url(location):
        return location.rstrip("/")
    if location.startswith("file://"):
        location = location.removeprefix("file://")
    return str(Path(location).expanduser().resolve())


class RunStorage:
    """A run storage root (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = normalize(root)
        self.remote = is_url(self.root)
        self._fs = None

    def __repr__(self) -> str:
        return f"RunStorage({self.root!r})"

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            protocol = self.root.split("://", 1)[0] if self.remote else "file"
            try:
                self._fs = fsspec.filesystem(protocol)
            except (ImportError, ValueError) as err:
                raise StorageError(f"cannot open the run storage {mask(self.root)}: {err} (install the package "
                                   f"for {protocol}://, e.g. s3fs or gcsfs)") from None
        return self._fs

    def location(self, rel: str) -> str:
        """The full URL or path of ``rel`` (relative to the root)."""
        return f"{self.root}/{rel}" if self.remote else str(Path(self.root) / rel)

    def local_dir(self, key: str) -> Path | None:
        """The variant's folder when storage is a local folder (the run writes there directly)."""
        return None if self.remote else Path(self.root) / key

    def has_room(self, nbytes: int = 1 << 20) -> bool | None:
        """Whether ``nbytes`` can be written under a local root now (a probe file, removed again);
        None for a URL (the driver cannot tell: its workers write to their own scratch disks)."""
        if self.remote:
            return None
        probe = Path(self.root) / f".room-{os.getpid()}"
        try:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * nbytes)
                f.flush()
                os.fsync(f.fileno())
            return True
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            raise
        finally:
            probe.unlink(missing_ok=True)

    def probe(self) -> None:
        """Write a small file under the root and delete it again, as this machine's credentials allow
        (a driver's pre-flight check; folders it had to make are removed again: no trace); raises
        StorageError naming the masked URL and the cause."""
        import shutil
        import uuid

        rel = f".bnnctl-probe-{uuid.uuid4().hex[:12]}"
        made = None if self.remote else _first_missing(Path(self.root))
        try:
            if self.remote:
                self.fs.pipe_file(self.location(rel), b"bnnctl")
                self.fs.rm_file(self.location(rel))
            else:
                Path(self.root).mkdir(parents=True, exist_ok=True)
                Path(self.location(rel)).write_bytes(b"bnnctl")
                Path(self.location(rel)).unlink()
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - OSError, fsspec, s3fs, botocore...: one message
            cause = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
            if isinstance(err, OSError) and err.strerror:
                cause = f"{err.strerror} ({err.filename})" if err.filename else err.strerror
            else:
                cause = f"{cause} ({type(err).__name__})"
            raise StorageError(f"{mask(self.root)}: {mask(cause)[:300]}") from None
        finally:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)

    def download(self, rel: str, dest: Path) -> bool:
        """Copy ``rel`` to ``dest`` (atomically); False when it is not in storage."""
        src = self.location(rel)
        try:
            if not self.fs.exists(src):
                return False
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + ".part")
            self.fs.get_file(src, str(part))
            os.replace(part, dest)
            return True
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - fsspec, s3fs, botocore...: each becomes one message
            raise self._error(err, rel) from None

    def upload(self, src: Path, rel: str) -> None:
        """Put ``src`` at ``rel``; it becomes visible only complete."""
        dest = self.location(rel)
        try:
            if self.remote:
                self.fs.put_file(str(src), dest)  # an object store's PUT is atomic
            else:
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
                part = dest + ".part"
                self.fs.put_file(str(src), part)
                os.replace(part, dest)
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - fsspec, s3fs, botocore...: each becomes one message
            raise self._error(err, rel) from None

    def local_copy(self, rel: str, cache: Path | None = None) -> Path | None:
        """A local path holding ``rel`` (for the driver and the dashboard): the file itself for a
        folder, a copy in the storage cache for a URL (see :class:`StorageCache`); None when it is
        not there."""
        if not self.remote:
            p = Path(self.location(rel))
            return p if p.exists() else None
        return StorageCache(cache).copy(self, rel)

    def _error(self, err: Exception, rel: str) -> StorageError:
        where = mask(self.location(rel))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageError(f"no space left on device at {where}", machine=False)
        cause = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        return StorageError(f"run storage {where}: {type(err).__name__}: {mask(cause)[:300]}")


class StorageCache:
    """This machine's copies of files of URL storages, for the driver and the dashboard.

    A file ``KEY/NAME`` of storage ROOT lives at ``CACHE/<hash of ROOT>/KEY/NAME`` (KEY: the
    variant's identity), so two storages never share a copy; each root's folder names its (masked)
    URL in ``ROOT``. Bounded: after each download, files unused for ``max_age_s`` go, then the least
    recently used ones until the cache holds at most ``max_bytes`` (the file just fetched stays).
    ``CACHE`` is ``$BNNCTL_CACHE`` or ``<tmp>/bnnctl-storage-cache``; the bounds
    ``$BNNCTL_CACHE_MAX_MB`` (default 2048) and ``$BNNCTL_CACHE_MAX_DAYS`` (default 7).
    ``bnnctl cache clean`` empties it."""

    def __init__(self, folder: Path | None = None, max_bytes: int | None = None, max_age_s: float | None = None):
        env = os.environ
        self.folder = Path(folder or env.get("BNNCTL_CACHE") or Path(tempfile.gettempdir()) / "bnnctl-storage-cache")
        self.max_bytes = max_bytes if max_bytes is not None else int(float(env.get("BNNCTL_CACHE_MAX_MB", 2048)) * 2**20)
        self.max_age_s = max_age_s if max_age_s is not None else float(env.get("BNNCTL_CACHE_MAX_DAYS", 7)) * 86400

    def root_folder(self, root: str) -> Path:
        import hashlib

        return self.folder / hashlib.sha256(root.encode()).hexdigest()[:16]

    def copy(self, storage: RunStorage, rel: str) -> Path | None:
        folder = self.root_folder(storage.root)
        dest = folder / rel
        if dest.exists():
            os.utime(dest)  # recently used
            return dest
        if not storage.download(rel, dest):
            return None
        if not (folder / "ROOT").exists():
            (folder / "ROOT").write_text(mask(storage.root) + "\n")
        self.prune(keep=dest)
        return dest

    def files(self) -> list[tuple[Path, os.stat_result]]:
        if not self.folder.is_dir():
            return []
        return [(f, f.stat()) for f in self.folder.rglob("*") if f.is_file() and f.name != "ROOT"
                and not f.name.endswith(".part")]

    def prune(self, keep: Path | None = None) -> tuple[int, int]:
        """Apply the bounds; returns (files, bytes) removed."""
        now, removed, freed = time.time(), 0, 0
        files = sorted(self.files(), key=lambda fs: fs[1].st_mtime)
        total = sum(st.st_size for _, st in files)
        for f, st in files:
            if f == keep or (now - st.st_mtime <= self.max_age_s and total <= self.max_bytes):
                continue
            f.unlink(missing_ok=True)
            removed, freed, total = removed + 1, freed + st.st_size, total - st.st_size
        return removed, freed

    def clean(self) -> tuple[int, int]:
        """Remove every copy; returns (files, bytes) removed."""
        import shutil

        files = self.files()
        shutil.rmtree(self.folder, ignore_errors=True)
        return len(files), sum(st.st_size for _, st in files)

    def roots(self) -> list[tuple[str, int, int]]:
        """(masked storage URL, files, bytes) of each storage with copies here."""
        out = []
        for folder in sorted(p for p in self.folder.glob("*") if p.is_dir()) if self.folder.is_dir() else []:
            files = [f for f in folder.rglob("*") if f.is_file() and f.name != "ROOT"]
            name = (folder / "ROOT").read_text().strip() if (folder / "ROOT").exists() else folder.name
            out.append((name, len(files), sum(f.stat().st_size for f in files)))
        return out


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what a ``mkdir -p`` would create)."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def relative(storage: RunStorage, path: str | None) -> str | None:
    """A result's file path as a location relative to the storage root (paths already relative, and
    absolute paths outside it, are returned unchanged)."""
    if path is None or storage.remote or not os.path.isabs(path):
        return path
    try:
        return Path(path).resolve().relative_to(storage.root).as_posix()
    except ValueError:
        return path


def resolve(storage: RunStorage, rel: str | None) -> Path | None:
    """A local path for a result's file location (relative to the storage root, or an absolute path
    written by an older bnnctl)."""
    if not rel:
        return None
    if os.path.isabs(rel):
        return Path(rel) if Path(rel).exists() else None
    return storage.local_copy(rel)
