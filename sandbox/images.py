"""Resolve and verify a catalogue image before every run: the job gets exactly the image the policy pinned.

Image trust is ours to enforce: Apptainer's own execution controls do not apply when unprivileged user
namespaces are enabled, so a site cannot be assumed to check anything. A `sha256` pin is checked by
hashing the image here; a `signed_by` pin by `apptainer verify`, with only local keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import InfrastructureError
from runner.policy.model import Image

__all__ = [
    "BLOCK_SIZE",
    "TREE_DIGEST_SHELL",
    "DigestCache",
    "DigestMismatch",
    "ImageError",
    "ImageMissing",
    "SignatureInvalid",
    "VerifiedImage",
    "check_verify_output",
    "sha256_file",
    "tree_digest",
    "verify_image",
]

BLOCK_SIZE = 1 << 20
CACHE_VERSION = 1
# A file changed twice within one timestamp tick keeps its mtime and ctime; such a change would be
# invisible to the cache, so a file modified this recently is hashed but not remembered. Two seconds
# covers the coarsest timestamps in use (FAT, some network file systems).
RACY_SECONDS = 2.0
VERIFY_TIMEOUT_SECONDS = 900.0

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class VerifiedImage:
    """An image that matched its pin; `path` is resolved, so a symlink swapped later cannot redirect."""

    name: str
    path: str
    sha256: str | None
    signer: str | None


class ImageError(InfrastructureError):
    """A catalogue image cannot be used: the job is not started (exit 125)."""


class ImageMissing(ImageError):
    """The pinned path does not exist."""


class DigestMismatch(ImageError):
    """The image's content is not what the policy pinned."""


class SignatureInvalid(ImageError):
    """The image is not signed, or not validly, by the pinned key."""


def _where(image: Image) -> str:
    return f"image {image.name!r} ({image.path})"


# --- hashing -------------------------------------------------------------------------------------


def sha256_file(path: str) -> str:
    """The sha256 of a file's content, read in 1 MiB blocks so a 10 GB image needs no memory."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


# The same definition as `tree_digest`, computed with bash and GNU find, sort, stat and sha256sum
# only, so that an admin can pin a sandbox directory without hpc-runner: save this text as
# tree-digest.sh and run `cd /path/to/sandbox && bash tree-digest.sh`. (Slower: a process per entry.)
TREE_DIGEST_SHELL = r"""
find . -print0 | LC_ALL=C sort -z | while IFS= read -r -d '' p; do
  t=$(find "$p" -maxdepth 0 -printf %y)
  find "$p" -maxdepth 0 -printf '%p\0%y\0%m\0'
  case $t in
    f) sha256sum <"$p" | cut -c1-64 | tr -d '\n' ;;
    l) find "$p" -maxdepth 0 -printf %l ;;
    b|c) stat -c %t:%T "$p" | tr -d '\n' ;;
  esac
  printf '\0'
done | sha256sum | cut -c1-64
"""


def tree_digest(root: str) -> str:
    """The sha256 pin of a sandbox directory.

    Every entry below `root`, and `root` itself, gives one record of four NUL-terminated fields:
    its path relative to `root` as `find .` prints it (`.`, `./etc/hostname`), its type as find's
    `%y` (`d`, `f`, `l`, `b`, `c`, `p`, `s`), its permission bits (`mode & 0o7777`) in octal
    without leading zeros as find's `%m`, and a value: the hex sha256 of a regular file's content,
    a symlink's target, a device's major:minor in hex as `stat -c %t:%T`, else empty. The records,
    sorted by the bytes of their paths, are hashed together; the result is the hex sha256.
    Owners and timestamps are left out, so a copy of the tree keeps its digest; symlinks are
    never followed. `TREE_DIGEST_SHELL` computes the same value with standard tools.
    """
    digest = hashlib.sha256()
    base = os.fsencode(root)
    for relative in sorted(_tree_paths(base)):
        digest.update(_tree_record(base, relative))
    return digest.hexdigest()


def _tree_paths(base: bytes) -> Iterator[bytes]:
    yield b"."
    for directory, dirs, files in os.walk(base, onerror=_raise):
        relative = os.path.relpath(directory, base)
        prefix = b"./" if relative == b"." else b"./" + relative + b"/"
        for name in dirs + files:
            yield prefix + name


def _raise(error: OSError) -> None:
    raise error


_TYPE_LETTERS = (
    (stat.S_ISDIR, b"d"), (stat.S_ISREG, b"f"), (stat.S_ISLNK, b"l"), (stat.S_ISBLK, b"b"),
    (stat.S_ISCHR, b"c"), (stat.S_ISFIFO, b"p"), (stat.S_ISSOCK, b"s"),
)


def _tree_record(base: bytes, relative: bytes) -> bytes:
    path = os.path.join(base, relative)
    info = os.lstat(path)
    letter = next(letter for test, letter in _TYPE_LETTERS if test(info.st_mode))
    if letter == b"f":
        value = _sha256_regular(path).encode()
    elif letter == b"l":
        value = os.readlink(path)
    elif letter in (b"b", b"c"):
        value = f"{os.major(info.st_rdev):x}:{os.minor(info.st_rdev):x}".encode()
    else:
        value = b""
    mode = f"{stat.S_IMODE(info.st_mode):o}".encode()
    return b"\0".join((relative, letter, mode, value)) + b"\0"


def _sha256_regular(path: bytes) -> str:
    # O_NOFOLLOW: an entry seen as a file must not be swapped for a symlink out of the tree.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    digest = hashlib.sha256()
    with open(fd, "rb", buffering=0) as handle:
        while block := handle.read(BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


# --- the digest cache ----------------------------------------------------------------------------


def _identity(info: os.stat_result) -> dict[str, int]:
    # ctime as well as mtime: mtime can be set back by whoever can write the file, ctime cannot.
    return {"dev": info.st_dev, "ino": info.st_ino, "size": info.st_size,
            "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}


class DigestCache:
    """File digests remembered across runs, so that a 10 GB image is hashed once, not per job.

    An entry is keyed by the file's resolved path and holds the device, inode, size, mtime and
    ctime it was hashed at; any difference means a re-hash. The JSON file is replaced atomically
    (temporary file, then rename), so concurrent agents lose at worst an entry, never the file;
    a file that cannot be parsed, or that someone else could have written, is ignored and rewritten.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def get(self, realpath: str, info: os.stat_result) -> str | None:
        """The remembered digest of this file, if it is unchanged since it was hashed."""
        with self._lock:
            entry = self._load().get(realpath)
        if not isinstance(entry, dict) or entry.get("file") != _identity(info):
            return None
        digest = entry.get("sha256")
        return digest if isinstance(digest, str) else None

    def put(self, realpath: str, info: os.stat_result, sha256: str) -> None:
        """Remember a digest; the file on disk is re-read first so other writers' entries survive."""
        with self._lock:
            entries = self._load()
            entries[realpath] = {"file": _identity(info), "sha256": sha256}
            self._store(entries)

    def _load(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return {}
        with open(fd, "rb") as handle:
            if not _trustworthy(os.fstat(handle.fileno())):
                return {}
            try:
                document = json.loads(handle.read())
            except ValueError:
                return {}
        if not isinstance(document, dict) or document.get("version") != CACHE_VERSION:
            return {}
        entries = document.get("entries")
        return dict(entries) if isinstance(entries, dict) else {}

    def _store(self, entries: dict[str, Any]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = json.dumps({"version": CACHE_VERSION, "entries": entries}, sort_keys=True)
        # mkstemp creates the file with mode 0600 in the target directory, so the rename is atomic.
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with open(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _trustworthy(info: os.stat_result) -> bool:
    # Whoever can write the cache can make a tampered image pass its pin.
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


# --- verification --------------------------------------------------------------------------------


def verify_image(image: Image, *, cache: DigestCache | None = None, apptainer: str = "apptainer",
                 run: Runner = subprocess.run) -> VerifiedImage:
    """Check that the catalogue image at `image.path` is what its pin says, or raise an ImageError.

    A SIF (or any regular file) pinned by sha256 is hashed through `cache`; a sandbox directory
    pinned by sha256 is hashed with `tree_digest` every time, as it can change deep inside without
    its own metadata changing. A `signed_by` pin needs a SIF file and `apptainer verify --local`.
    """
    realpath = os.path.realpath(image.path)
    info = _stat_image(image, realpath)
    if image.signed_by is not None:
        if not stat.S_ISREG(info.st_mode):
            raise SignatureInvalid(f"{_where(image)}: signed_by pins work only for SIF files; "
                                   "pin a sandbox directory with sha256")
        signer = _verify_signature(image, realpath, apptainer, run)
        return VerifiedImage(image.name, realpath, None, signer)
    if image.sha256 is None:
        raise ImageError(f"{_where(image)}: no sha256 or signed_by pin")
    found = _digest(image, realpath, info, cache)
    if found != image.sha256.lower():
        raise DigestMismatch(f"{_where(image)}: sha256 mismatch: expected {image.sha256.lower()}, "
                             f"found {found}")
    return VerifiedImage(image.name, realpath, found, None)


def _stat_image(image: Image, realpath: str) -> os.stat_result:
    try:
        info = os.stat(realpath)
    except FileNotFoundError:
        raise ImageMissing(f"{_where(image)}: no such file or directory; build or fetch the image "
                           "there, or correct the path in the policy") from None
    except OSError as exc:
        raise ImageError(f"{_where(image)}: cannot stat: {exc.strerror}") from None
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise ImageError(f"{_where(image)}: neither a SIF file nor a sandbox directory")
    return info


def _digest(image: Image, realpath: str, info: os.stat_result, cache: DigestCache | None) -> str:
    try:
        if stat.S_ISDIR(info.st_mode):
            return tree_digest(realpath)
        return _cached_file_digest(realpath, info, cache)
    except OSError as exc:
        where = f" {exc.filename!r}" if exc.filename else ""
        raise ImageError(f"{_where(image)}: cannot read{where}: {exc.strerror}") from None


def _cached_file_digest(realpath: str, info: os.stat_result, cache: DigestCache | None) -> str:
    if cache is not None and (known := cache.get(realpath, info)) is not None:
        return known
    digest = sha256_file(realpath)
    after = os.stat(realpath)
    # Remember only a digest that belongs to one settled version of the file.
    settled = _identity(after) == _identity(info) and not _recently_changed(after)
    if cache is not None and settled:
        cache.put(realpath, after, digest)
    return digest


def _recently_changed(info: os.stat_result) -> bool:
    newest = max(info.st_mtime_ns, info.st_ctime_ns) / 1e9
    return newest > time.time() - RACY_SECONDS


def _verify_signature(image: Image, realpath: str, apptainer: str, run: Runner) -> str:
    argv = [apptainer, "verify", "--local", "--json", realpath]
    try:
        result = run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
                     timeout=VERIFY_TIMEOUT_SECONDS)
    except FileNotFoundError:
        raise ImageError(f"{_where(image)}: cannot check its signature: {apptainer} not found; "
                         "install Apptainer or set the sandbox's apptainer path") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{_where(image)}: apptainer verify did not finish within "
                         f"{VERIFY_TIMEOUT_SECONDS:g}s") from None
    return check_verify_output(image, result.returncode, result.stdout, result.stderr)


def check_verify_output(image: Image, returncode: int, stdout: str, stderr: str) -> str:
    """The pinned signer's fingerprint if `apptainer verify --local --json` vouches for the image.

    Apptainer 1.4 prints `{"Signatures": N, "SignerKeys": [{"Signer": {"Partition", "Name",
    "Fingerprint" (lowercase hex), "KeyLocal", "KeyCheck", "DataCheck"}}, ...]}` with one entry
    per signed object, and exits 0 only if every signature is valid. It still lists signers when it
    fails (a tampered partition shows `DataCheck: false`), so the exit status decides first; then
    the pinned key must have signed, with both checks passing, every object that was verified.
    """
    assert image.signed_by is not None
    expected = image.signed_by.upper()
    signers = _parse_signers(stdout)
    found = sorted({fingerprint for fingerprint, _, _ in signers if fingerprint})
    described = ", ".join(found) or "none"
    if returncode != 0:
        reason = _apptainer_reason(stderr) or f"apptainer verify exited with status {returncode}"
        raise SignatureInvalid(f"{_where(image)}: signature not valid: expected signer {expected}, "
                               f"found {described}: {reason}")
    partitions = {partition for _, partition, _ in signers}
    vouched = {partition for fingerprint, partition, valid in signers if fingerprint == expected and valid}
    if not signers or vouched != partitions:
        raise SignatureInvalid(f"{_where(image)}: not signed by the pinned key: expected signer "
                               f"{expected}, found {described}")
    return expected


def _parse_signers(stdout: str) -> list[tuple[str, str, bool]]:
    """(uppercase fingerprint, partition, key and data checks passed) for each signed object."""
    try:
        document = json.loads(stdout)
    except ValueError:
        return []
    keys = document.get("SignerKeys") if isinstance(document, dict) else None
    signers = []
    for entry in keys if isinstance(keys, list) else []:
        signer = entry.get("Signer") if isinstance(entry, dict) else None
        if not isinstance(signer, dict):
            continue
        fingerprint = str(signer.get("Fingerprint") or "").upper()
        valid = signer.get("KeyCheck") is True and signer.get("DataCheck") is True
        signers.append((fingerprint, str(signer.get("Partition", "")), valid))
    return signers


def _apptainer_reason(stderr: str) -> str:
    """Apptainer's own explanation: its FATAL line, without the level prefix."""
    for line in reversed(stderr.splitlines()):
        if line.startswith("FATAL:"):
            return line.removeprefix("FATAL:").strip()
    return ""
