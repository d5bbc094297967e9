"""Named POSIX shared-memory segments with owner-tagged names and stale-segment cleanup.

Every segment fastfeed creates is named ``fastfeed.<pid>.<start>.<tag>``: the creating
process's pid and its start time in clock ticks since boot (``/proc/<pid>/stat`` field 22).
The start time tells a live owner apart from an unrelated process that reused the pid, so
:func:`cleanup_stale` can remove, at the next start, every segment whose owner has died without
unlinking it (SIGKILL, OOM killer, power cut of a container...) and ``/dev/shm`` never fills up
over restarts.

We open ``/dev/shm/<name>`` directly (that is what ``shm_open`` does on Linux) instead of using
``multiprocessing.shared_memory``: on Python 3.11 the latter registers every attachment with the
resource tracker, which unlinks segments it does not own and warns at exit.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from functools import lru_cache

__all__ = [
    "SHM_DIR",
    "ShmSpaceError",
    "check_space",
    "reserve",
    "PREFIX",
    "Segment",
    "cleanup_stale",
    "map_file",
    "list_segments",
    "owner_of",
    "process_start_ticks",
    "segment_name",
]

# Where segments live: /dev/shm (what shm_open uses), or FASTFEED_SHM_DIR, any tmpfs or
# hugetlbfs directory every process of the feed can reach (e.g. when a container's
# /dev/shm is too small and cannot be given more).
SHM_DIR = os.environ.get("FASTFEED_SHM_DIR") or "/dev/shm"
PREFIX = "fastfeed."
_MIB = 1 << 20
# A tag is one path component that cannot be mistaken for the pid/start fields.
_TAG_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,199}$")


def process_start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot, or None if it does not exist
    or has already died (a zombie: killed, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    rest = stat[stat.rfind(b")") + 2 :].split()
    # rest[0] is field 3 (state); start time is field 22. A zombie (Z) or dead (X) process
    # still has its /proc entry until it is reaped, but it will never unlink its segments.
    if rest[0] in (b"Z", b"X"):
        return None
    return int(rest[22 - 3])


@lru_cache(maxsize=8)
def _self_ticks(pid: int) -> int:
    # Keyed by pid so a forked child does not reuse its parent's value.
    ticks = process_start_ticks(pid)
    return ticks if ticks is not None else 0


def segment_name(tag: str) -> str:
    """Name of a segment owned by the calling process: ``fastfeed.<pid>.<start>.<tag>``."""
    if not _TAG_RE.match(tag):
        raise ValueError(f"invalid segment tag {tag!r}: use letters, digits, '_', '-', '.'")
    pid = os.getpid()
    return f"{PREFIX}{pid}.{_self_ticks(pid)}.{tag}"


def owner_of(name: str) -> tuple[int, int] | None:
    """(pid, start ticks) encoded in a fastfeed segment name, or None if it is not one."""
    if not name.startswith(PREFIX):
        return None
    parts = name.split(".", 3)
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[1]), int(parts[2])


def _owner_alive(pid: int, ticks: int) -> bool:
    start = process_start_ticks(pid)
    if start is None:
        return False
    # ticks == 0: the creator could not read its own start time; trust the pid alone.
    return ticks == 0 or start == ticks


def list_segments(directory: str = SHM_DIR) -> list[str]:
    """Names of all fastfeed segments currently in ``directory``."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if owner_of(n) is not None)


def cleanup_stale(directory: str = SHM_DIR) -> list[str]:
    """Unlink every fastfeed segment whose owning process is gone; return the names removed.

    Cheap (one ``listdir`` and one ``/proc`` read per owner); run at every start.
    """
    removed = []
    for name in list_segments(directory):
        owner = owner_of(name)
        assert owner is not None
        if not _owner_alive(*owner):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:
                pass  # another process cleaned it up first
    return removed


class ShmSpaceError(OSError):
    """Not enough room in the shared-memory directory for a feed's segments."""


def _mib(n: int) -> str:
    return f"{n / _MIB:,.1f} MiB"


def _how_to_fix() -> str:
    return (f"give {SHM_DIR} more (Docker: docker run --shm-size=1g; Kubernetes: an emptyDir "
            f"with medium: Memory mounted on /dev/shm), point FASTFEED_SHM_DIR at a larger "
            f"tmpfs, or lower workers= (--workers) or ring_capacity=")


def check_space(needed: int, what: str, directory: str | None = None) -> None:
    """Raise :class:`ShmSpaceError` if ``directory`` (SHM_DIR) has fewer than ``needed``
    bytes free, with a message naming the size needed, what needs it and how to give it.

    Segments are sparse files: without this check a too-small /dev/shm (Docker's default
    is 64 MiB) is found only when a page is first touched, as a SIGBUS that kills the
    process that touched it; the supervisor would restart it into the same wall forever."""
    directory = directory or SHM_DIR
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        raise ShmSpaceError(f"shared memory: cannot use {directory} ({exc.strerror or exc}); "
                            f"set FASTFEED_SHM_DIR to a tmpfs directory") from None
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise ShmSpaceError(f"shared memory: {directory} has {_mib(free)} free of "
                            f"{_mib(st.f_blocks * st.f_frsize)}, but {what} need "
                            f"{_mib(needed)}: {_how_to_fix()}")


def reserve(name: str, size: int, directory: str | None = None) -> None:
    """Allocate every page of segment ``name`` now (``posix_fallocate``): the space is then
    the segment's, and no later write can die of SIGBUS because another process filled the
    directory in the meantime. Raises :class:`ShmSpaceError` when there is no room."""
    path = os.path.join(directory or SHM_DIR, name)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG):
            raise ShmSpaceError(f"shared memory: no room in {directory or SHM_DIR} for "
                                f"{_mib(size)} more: {_how_to_fix()}") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def map_file(path: str, size: int, *, create: bool) -> mmap.mmap:
    """Map ``path`` read-write and shared: a new file of ``size`` zero bytes (``create``: it must
    not exist yet, mode 0600, and it is removed again if the mapping fails), or the whole of an
    existing one.  The one place segments are opened: ``Segment`` and the rings use it."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size == 0:
            raise OSError(errno.EINVAL, f"mmap of {path} failed: the file is empty")
        return mmap.mmap(fd, size if create else 0, mmap.MAP_SHARED)
    except BaseException:
        if create:
            os.unlink(path)
        raise
    finally:
        os.close(fd)


class Segment:
    """A named shared-memory segment mapped read-write.

    ``buf`` is a writable memoryview of the whole segment. The creator owns the name and should
    :meth:`unlink` it; attachers only :meth:`close`. Usable as a context manager (the creator's
    exit also unlinks).
    """

    def __init__(self, name: str, size: int, *, create: bool) -> None:
        self.name = name
        self.owner = create
        self._mmap: mmap.mmap | None = map_file(os.path.join(SHM_DIR, name), size, create=create)
        self.size = len(self._mmap)
        self.buf: memoryview | None = memoryview(self._mmap)

    @classmethod
    def create(cls, tag: str, size: int) -> Segment:
        """Create a zero-filled segment of ``size`` bytes named after ``tag`` and this process."""
        if size <= 0:
            raise ValueError("size must be positive")
        cleanup_stale()
        return cls(segment_name(tag), size, create=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map an existing segment by its full name."""
        return cls(name, 0, create=False)

    def close(self) -> None:
        """Unmap. Views still exported keep the mapping alive until they are released."""
        if self.buf is not None:
            try:
                self.buf.release()
            except BufferError:
                pass  # a NumPy array or view still uses it; released with them
            self.buf = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # someone still holds a view; the mapping goes when they drop it
            self._mmap = None

    def unlink(self) -> None:
        """Remove the name; the memory lives on until every process has unmapped it."""
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, size={self.size}, owner={self.owner})"
