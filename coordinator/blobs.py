"""Content-addressed blob store on the filesystem: ``<root>/<sha[:2]>/<sha>``.

Writes go to a temp file in the store and are renamed into place, so a blob is either absent or
complete; the name is the sha256 of the bytes, verified before the rename.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import hashlib
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from shared.tensors import map_tensors


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait


@functools.cache
def _sync_file_range():  # noqa: ANN202
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a just-written byte range to disk without waiting for it
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that the ``fsync`` which makes an upload
    durable finds most of the body already written while the rest was being received. Only a
    hint: a no-op where unsupported; durability still comes from ``fsync_file``."""
    function = _sync_file_range()
    if function is not None and length > 0:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def fsync_file(path: Path) -> None:
    """Flush a file's data (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobNotFound(KeyError):
    pass


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise BlobNotFound(sha256)
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        try:
            return self.path(sha256).is_file()
        except BlobNotFound:
            return False

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.exists(sha):
            return sha
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self._move_into_place(Path(tmp), sha)
        return sha

    def temp_file(self) -> tuple[int, Path]:
        """A new temp file inside the store (same filesystem, so adopting it is a rename)."""
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        return fd, Path(tmp)

    def adopt(self, tmp: Path, sha256: str, synced: bool = False) -> str:
        """Move a fully written temp file whose sha256 the caller computed into the store, durably
        (fsynced first, unless the caller says it has fsynced it: ``synced``)."""
        if self.exists(sha256):
            tmp.unlink(missing_ok=True)
            return sha256
        if not synced:
            fsync_file(tmp)
        self._move_into_place(tmp, sha256)
        return sha256

    def get_bytes(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFound(sha256) from exc

    def map_tensors(self, sha256: str, *, strict: bool = True) -> dict[str, np.ndarray]:
        """A stored safetensors blob as read-only memory-mapped arrays (``shared.tensors``): the
        data is paged in as it is used, not read and copied whole."""
        try:
            return map_tensors(self.path(sha256), strict=strict)
        except FileNotFoundError as exc:
            raise BlobNotFound(sha256) from exc

    def _move_into_place(self, tmp: Path, sha256: str) -> None:
        """Rename a durable temp file into place, and make the new name durable too."""
        dest = self.path(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        fsync_file(dest.parent)


class InlineAdapters:
    """Adapter versions as the base64 text a lease answer carries inline (``TaskAssignment.
    inline_adapters``), the few most recent kept: at a round's opening every held lease of the round
    names the same new version, so it is read and encoded once. A blob is content-addressed, so a
    kept text never goes stale. ``max_bytes`` 0 (or less) inlines nothing. At most ``keep`` texts and
    ``keep_chars`` characters in all are kept (the oldest go first)."""

    def __init__(self, blobs: BlobStore, max_bytes: int, keep: int = 16, keep_chars: int = 64 << 20) -> None:
        self.blobs, self.max_bytes, self.keep, self.keep_chars = blobs, max_bytes, keep, keep_chars
        self._texts: dict[str, str] = {}   # sha256 -> base64 text ("" for a blob over max_bytes or gone)
        self._chars = 0
        self._lock = threading.Lock()

    def cached(self, sha256: str) -> str | None:
        """The kept text (\"\": not inlined), or None when the blob must be read first (``load``)."""
        with self._lock:
            return self._texts.get(sha256)

    def load(self, sha256: str) -> str:
        """Read and encode the blob (a file read: not in the event loop), and keep its text."""
        text = ""
        if self.max_bytes > 0:
            try:
                if self.blobs.path(sha256).stat().st_size <= self.max_bytes:
                    text = base64.b64encode(self.blobs.get_bytes(sha256)).decode("ascii")
            except (OSError, BlobNotFound):   # gone (retention): the worker's download says so clearly
                text = ""
        with self._lock:
            self._chars += len(text) - len(self._texts.pop(sha256, ""))
            self._texts[sha256] = text
            while len(self._texts) > 1 and (len(self._texts) > self.keep or self._chars > self.keep_chars):
                self._chars -= len(self._texts.pop(next(iter(self._texts))))
        return text
