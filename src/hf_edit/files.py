"""General file helpers: content hashes, telling local paths from Hub ids, atomic writes, hf_edit's cache folders."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

__all__ = ["atomic_write", "file_sha256", "hf_edit_cache_dir", "looks_like_local_path"]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def looks_like_local_path(text: str, suffixes: Collection[str]) -> bool:
    """A string meant as a local path rather than a Hub id ``owner/name[:config]``: it starts like a path, has
    more than one ``/``, uses the OS separator, or ends in one of ``suffixes``."""
    return (text.startswith((".", "/", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)
            or Path(text).suffix.lower() in suffixes)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file next to ``path``, then move it into place with ``os.replace``.

    Readers see either the old file or the complete new one, never a partial file; the temporary file is removed
    if ``write`` raises.  The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def hf_edit_cache_dir(kind: str) -> Path:
    """hf_edit's cache folder for ``kind`` (e.g. ``"stats"``): ``$HF_EDIT_CACHE/<kind>`` if set, else
    ``$HF_HOME/hf_edit/<kind>`` (``~/.cache/huggingface`` by default).  Read from the environment on every call;
    nothing is created."""
    root = os.environ.get("HF_EDIT_CACHE")
    if not root:
        root = os.path.join(os.environ.get("HF_HOME", os.path.join("~", ".cache", "huggingface")), "hf_edit")
    return Path(root).expanduser() / kind
