"""Image verification: digest pins, the digest cache, directory digests and `apptainer verify` output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner.errors import InfrastructureError
from runner.policy.model import Image
from sandbox import images
from sandbox.images import (
    TREE_DIGEST_SHELL,
    DigestCache,
    DigestMismatch,
    ImageError,
    ImageMissing,
    SignatureInvalid,
    VerifiedImage,
    tree_digest,
    verify_image,
)

OLD = 1_600_000_000  # a timestamp far enough in the past that a file counts as settled

# --- `apptainer verify --local --json` output, as recorded from Apptainer 1.4.5 -------------------
# Key 1 made with `apptainer key newpair --name "CI Test" --comment test --email ci@example.org
# --password "" --push=false -b 2048`; key 2 likewise as "Other <o@example.org>".

KEY1 = "0F56574E5CB0295E77327F976677DC5F048B02AC"
KEY2 = "3B93127725506857127857CAD3AC5F505D9A529C"
KEY1_NAME = "CI Test (test) <ci@example.org>"
KEY2_NAME = "Other <o@example.org>"
# The objects a signature covers, in the order Apptainer lists them.
PARTITIONS = ("Def.FILE", "JSON.Generic", "FS")


def signed_by(name: str, fingerprint: str, *, partitions: tuple[str, ...] = PARTITIONS,
              key_known: bool = True, intact: tuple[str, ...] = PARTITIONS) -> list[dict[str, Any]]:
    """One key's `SignerKeys` entries, an entry per object it signed; `intact` are the objects whose
    data still matches the signature."""
    return [{"Signer": {"Partition": partition, "Name": name, "Fingerprint": fingerprint,
                        "KeyLocal": key_known, "KeyCheck": key_known, "DataCheck": partition in intact}}
            for partition in partitions]


def verify_json(signatures: int, signer_keys: list[dict[str, Any]]) -> str:
    """The output as `apptainer verify --json` prints it, byte for byte as recorded: Go's two-space
    indent, `<` and `>` escaped, `null` for no signer keys, a final newline."""
    text = json.dumps({"Signatures": signatures, "SignerKeys": signer_keys or None}, indent=2)
    return text.replace("<", "\\u003c").replace(">", "\\u003e") + "\n"


# Signed with key 1, verified with key 1 in the keyring: exit 0.
SIGNED_BY_KEY1 = verify_json(1, signed_by(KEY1_NAME, KEY1.lower()))

# The same image with one byte of its squashfs partition flipped: exit 255, signer still listed.
TAMPERED = verify_json(1, signed_by(KEY1_NAME, KEY1.lower(), intact=("Def.FILE", "JSON.Generic")))
TAMPERED_STDERR = ("INFO:    Verifying image with PGP key material\n"
                   "FATAL:   Failed to verify container: integrity: data object integrity compromised: 3\n")

# Signed with key 1, verified with an empty keyring: exit 255.
UNKNOWN_KEY = verify_json(1, [])
UNKNOWN_KEY_STDERR = ("INFO:    Verifying image with PGP key material\n"
                      "FATAL:   Failed to verify container: integrity: signature object 4 not valid: "
                      "openpgp: signature made by unknown entity\n")

# Not signed at all: exit 255.
UNSIGNED = verify_json(0, [])
UNSIGNED_STDERR = ("INFO:    Verifying image with PGP key material\n"
                   "FATAL:   Failed to verify container: integrity: signature not found for object group 1\n")

# Signed by key 1 then key 2, only key 1 in the keyring: key 1 is listed, but exit 255.
SECOND_SIGNER_UNKNOWN_STDERR = ("INFO:    Verifying image with PGP key material\n"
                                "FATAL:   Failed to verify container: integrity: signature object 5 not "
                                "valid: openpgp: signature made by unknown entity\n")

# Signed by key 1 and key 2, both in the keyring: exit 0, each key listed for each object.
BOTH_SIGNERS = verify_json(2, signed_by(KEY1_NAME, KEY1.lower()) + signed_by(KEY2_NAME, KEY2.lower()))

# Signed by key 2 only, verified with both keys in the keyring: exit 0, a valid but wrong signer.
ONLY_KEY2 = verify_json(1, signed_by(KEY2_NAME, KEY2.lower()))

# Signed with a PEM key (`apptainer sign --key rsa.pem`), verified with `--key rsa.pub`: exit 0 but
# no PGP key behind it. Without --key (as we run it) the exit status is 255 and nothing is listed.
PEM_WITH_KEY = verify_json(1, signed_by("unknown", "", partitions=("Def.FILE", "FS"), key_known=False))
PEM_STDERR = ("INFO:    Verifying image with PGP key material\n"
              "FATAL:   Failed to verify container: integrity: key material not provided for DSSE "
              "envelope signature\n")


class FakeApptainer:
    """Stands in for `subprocess.run`, answering `apptainer verify` with a recorded output."""

    def __init__(self, returncode: int, stdout: str, stderr: str = "") -> None:
        self.result = (returncode, stdout, stderr)
        self.calls: list[tuple[list[str], dict[str, Any]]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append((argv, kwargs))
        returncode, stdout, stderr = self.result
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_sif(tmp_path: Path, data: bytes = b"SIF_MAGIC" + bytes(range(256)) * 100) -> Path:
    path = tmp_path / "clima-ci.sif"
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))
    return path


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written by a test are seconds old at most: let the cache remember them anyway."""
    monkeypatch.setattr(images, "RACY_SECONDS", 0.0)


# --- sha256 pins on files ------------------------------------------------------------------------

def test_a_file_matching_its_pin_is_verified(tmp_path: Path) -> None:
    path = make_sif(tmp_path)
    digest = sha256_of(path.read_bytes())
    verified = verify_image(Image("clima-ci", str(path), sha256=digest))
    assert verified == VerifiedImage("clima-ci", str(path), digest, None)


def test_a_mismatch_names_the_image_the_path_and_both_full_digests(tmp_path: Path) -> None:
    path = make_sif(tmp_path)
    expected = "9f2c" + "0" * 60
    with pytest.raises(DigestMismatch) as caught:
        verify_image(Image("clima-ci", str(path), sha256=expected))
    found = sha256_of(path.read_bytes())
    assert str(caught.value) == (f"image 'clima-ci' ({path}): sha256 mismatch: expected {expected}, "
                                 f"found {found}")
    assert isinstance(caught.value, InfrastructureError)


def test_a_missing_image_says_where_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "clima-ci.sif"
    with pytest.raises(ImageMissing) as caught:
        verify_image(Image("clima-ci", str(path), sha256="0" * 64))
    message = str(caught.value)
    assert str(path) in message
    assert "'clima-ci'" in message
    assert "build or fetch" in message


def test_a_symlinked_image_is_resolved_to_the_file_that_was_checked(tmp_path: Path) -> None:
    path = make_sif(tmp_path)
    link = tmp_path / "current.sif"
    link.symlink_to(path)
    verified = verify_image(Image("clima-ci", str(link), sha256=sha256_of(path.read_bytes())))
    assert verified.path == str(path)


def test_neither_file_nor_directory_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="neither a SIF file nor a sandbox directory"):
        verify_image(Image("clima-ci", str(fifo), sha256="0" * 64))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_image_is_an_image_error(tmp_path: Path) -> None:
    path = make_sif(tmp_path)
    path.chmod(0)
    with pytest.raises(ImageError, match="cannot read"):
        verify_image(Image("clima-ci", str(path), sha256="0" * 64))


def test_files_are_hashed_in_one_mebibyte_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * images.BLOCK_SIZE + 17)
    path = make_sif(tmp_path, data)
    expected = sha256_of(data)
    sizes: list[int] = []
    real_sha256 = hashlib.sha256

    class Recording:
        def __init__(self) -> None:
            self.real = real_sha256()

        def update(self, block: bytes) -> None:
            sizes.append(len(block))
            self.real.update(block)

        def hexdigest(self) -> str:
            return self.real.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Recording)
    assert images.sha256_file(str(path)) == expected
    assert sizes == [images.BLOCK_SIZE] * 3 + [17]


# --- the digest cache ----------------------------------------------------------------------------

def test_the_cache_avoids_hashing_an_unchanged_file_again(tmp_path: Path, settled: None,
                                                          hash_calls: list[str]) -> None:
    path = make_sif(tmp_path)
    image = Image("clima-ci", str(path), sha256=sha256_of(path.read_bytes()))
    cache = DigestCache(tmp_path / "state" / "digests.json")
    for _ in range(3):
        verify_image(image, cache=cache)
    assert len(hash_calls) == 1
    # A new cache object (a restarted agent) reads what the first one wrote.
    verify_image(image, cache=DigestCache(tmp_path / "state" / "digests.json"))
    assert len(hash_calls) == 1


def test_the_cache_file_is_private(tmp_path: Path, settled: None) -> None:
    path = make_sif(tmp_path)
    cache_path = tmp_path / "state" / "digests.json"
    verify_image(Image("clima-ci", str(path), sha256=sha256_of(path.read_bytes())),
                 cache=DigestCache(cache_path))
    assert stat.S_IMODE(cache_path.stat().st_mode) == 0o600
    assert [entry.name for entry in cache_path.parent.iterdir()] == ["digests.json"]


@pytest.mark.parametrize("change", ["same size new content", "append", "replace file", "touch"])
def test_a_changed_file_is_hashed_again(tmp_path: Path, settled: None, hash_calls: list[str],
                                        change: str) -> None:
    path = make_sif(tmp_path)
    original = path.read_bytes()
    cache = DigestCache(tmp_path / "digests.json")
    image = Image("clima-ci", str(path), sha256=sha256_of(original))
    verify_image(image, cache=cache)
    if change == "same size new content":
        with open(path, "r+b") as handle:
            handle.seek(100)
            handle.write(b"\x00" if original[100] else b"\x01")
        os.utime(path, (OLD, OLD))  # even with the old mtime restored, the ctime gives it away
    elif change == "append":
        with open(path, "ab") as handle:
            handle.write(b"x")
    elif change == "replace file":
        replacement = tmp_path / "new.sif"
        replacement.write_bytes(original)
        os.utime(replacement, (OLD, OLD))
        os.replace(replacement, path)
    else:
        os.utime(path, (OLD + 1, OLD + 1))
    if change in ("replace file", "touch"):
        verify_image(image, cache=cache)
    else:
        with pytest.raises(DigestMismatch):
            verify_image(image, cache=cache)
    assert len(hash_calls) == 2


def test_a_recently_modified_file_is_not_remembered(tmp_path: Path, hash_calls: list[str]) -> None:
    # Two writes within one timestamp tick would leave every key of the cache unchanged.
    path = tmp_path / "fresh.sif"
    path.write_bytes(b"just built")
    image = Image("fresh", str(path), sha256=sha256_of(b"just built"))
    cache = DigestCache(tmp_path / "digests.json")
    verify_image(image, cache=cache)
    verify_image(image, cache=cache)
    assert len(hash_calls) == 2


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"version": 99, "entries": {}}',
                                     b'{"version": 1, "entries": {"x": 3}}', b"\xff\xfe"])
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path, settled: None, hash_calls: list[str],
                                                 content: bytes) -> None:
    path = make_sif(tmp_path)
    cache_path = tmp_path / "digests.json"
    cache_path.write_bytes(content)
    cache_path.chmod(0o600)
    image = Image("clima-ci", str(path), sha256=sha256_of(path.read_bytes()))
    verify_image(image, cache=DigestCache(cache_path))
    document = json.loads(cache_path.read_text())
    assert document["entries"][str(path)]["sha256"] == image.sha256
    verify_image(image, cache=DigestCache(cache_path))
    assert len(hash_calls) == 1


def test_a_cache_entry_planted_in_a_group_writable_file_is_ignored(tmp_path: Path, settled: None,
                                                                  hash_calls: list[str]) -> None:
    path = make_sif(tmp_path)
    cache_path = tmp_path / "digests.json"
    pinned = sha256_of(b"the image the policy pinned")
    # Someone who could write the cache claims the tampered file has the pinned digest.
    DigestCache(cache_path).put(str(path), os.stat(path), pinned)
    cache_path.chmod(0o660)
    with pytest.raises(DigestMismatch):
        verify_image(Image("clima-ci", str(path), sha256=pinned), cache=DigestCache(cache_path))
    assert len(hash_calls) == 1


def test_concurrent_writers_never_leave_a_corrupt_cache(tmp_path: Path) -> None:
    cache_path = tmp_path / "digests.json"
    files = []
    for index in range(8):
        file = tmp_path / f"image{index}.sif"
        file.write_bytes(str(index).encode())
        files.append(file)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(file: Path) -> None:
        try:
            cache = DigestCache(cache_path)
            for round_ in range(40):
                cache.put(str(file), os.stat(file), f"{round_:064x}")
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads(cache_path.read_bytes())
            except FileNotFoundError:
                pass
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=writer, args=(file,)) for file in files]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    stop.set()
    watcher.join(60)
    assert errors == []
    entries = json.loads(cache_path.read_text())["entries"]
    assert set(entries) <= {str(file) for file in files}
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".digests.json.")]


# --- directory images ----------------------------------------------------------------------------

def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("container\n")
    (root / "etc" / "empty").write_bytes(b"")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"\x7fELF...")
    (root / "bin" / "tool").chmod(0o4755)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "a-b").write_text("sorts before a/ by name, after it by bytes of the path")
    (root / "a").mkdir()
    (root / "a" / "b").write_text("nested")
    (root / "with space and\nnewline").write_text("odd names are fine")
    (root / "link-to-file").symlink_to("etc/hostname")
    (root / "link-to-dir").symlink_to("/etc")
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo")
    return root


def shell_tree_digest(root: Path) -> str:
    result = subprocess.run(["bash", "-c", TREE_DIGEST_SHELL], cwd=root, capture_output=True, text=True,
                            check=True)
    return result.stdout.strip()


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("bash", "find", "sort", "sha256sum", "stat")),
                    reason="needs bash and GNU find, sort, stat and sha256sum")
def test_the_tree_digest_matches_the_documented_shell_recipe(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "rootfs")
    if os.geteuid() == 0:
        (root / "dev").mkdir()
        os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    assert tree_digest(str(root)) == shell_tree_digest(root)


def test_a_directory_matching_its_pin_is_verified_and_resolved(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "rootfs")
    digest = tree_digest(str(root))
    link = tmp_path / "sandbox"
    link.symlink_to(root)
    verified = verify_image(Image("dir", str(link), sha256=digest))
    assert verified == VerifiedImage("dir", str(root), digest, None)


def replace_symlink(root: Path) -> None:
    (root / "dangling").unlink()
    (root / "dangling").symlink_to("elsewhere")


def file_to_directory(root: Path) -> None:
    (root / "etc" / "empty").unlink()
    (root / "etc" / "empty").mkdir()


CHANGES: dict[str, Callable[[Path], object]] = {
    "content deep inside": lambda root: (root / "a" / "b").write_text("nestee"),
    "mode bits": lambda root: (root / "etc" / "hostname").chmod(0o600),
    "setuid bit": lambda root: (root / "bin" / "tool").chmod(0o755),
    "symlink target": replace_symlink,
    "new empty file": lambda root: (root / "etc" / "new").write_bytes(b""),
    "rename": lambda root: (root / "etc" / "empty").rename(root / "etc" / "empty2"),
    "file becomes directory": file_to_directory,
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_change_inside_a_directory_is_caught(tmp_path: Path, change: str) -> None:
    root = make_tree(tmp_path / "rootfs")
    image = Image("dir", str(root), sha256=tree_digest(str(root)))
    cache = DigestCache(tmp_path / "digests.json")
    verify_image(image, cache=cache)
    CHANGES[change](root)
    with pytest.raises(DigestMismatch, match="sha256 mismatch: expected"):
        verify_image(image, cache=cache)
    assert not (tmp_path / "digests.json").exists()


def test_timestamps_do_not_change_the_tree_digest(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "rootfs")
    before = tree_digest(str(root))
    os.utime(root / "etc" / "hostname", (OLD, OLD))
    os.utime(root / "a", (OLD, OLD))
    assert tree_digest(str(root)) == before
    (root / "fifo").unlink()
    without_fifo = tree_digest(str(root))
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    os.utime(copy / "etc" / "hostname", (OLD + 7, OLD + 7))
    assert tree_digest(str(copy)) == without_fifo


def test_a_directory_pinned_by_signature_is_refused(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "rootfs")
    run = FakeApptainer(0, SIGNED_BY_KEY1)
    with pytest.raises(SignatureInvalid, match="signed_by pins work only for SIF files"):
        verify_image(Image("dir", str(root), signed_by=KEY1), run=run)
    assert run.calls == []


# --- signed_by pins ------------------------------------------------------------------------------

def signed(tmp_path: Path, fingerprint: str = KEY1) -> Image:
    return Image("clima-ci", str(make_sif(tmp_path)), signed_by=fingerprint)


def test_a_valid_signature_by_the_pinned_key_is_accepted(tmp_path: Path) -> None:
    image = signed(tmp_path)
    run = FakeApptainer(0, SIGNED_BY_KEY1)
    verified = verify_image(image, apptainer="/opt/apptainer/bin/apptainer", run=run)
    assert verified == VerifiedImage("clima-ci", image.path, None, KEY1)
    argv, kwargs = run.calls[0]
    assert argv == ["/opt/apptainer/bin/apptainer", "verify", "--local", "--json", image.path]
    assert kwargs["stdin"] == subprocess.DEVNULL
    assert kwargs["check"] is False


def test_the_fingerprint_is_compared_without_regard_to_case(tmp_path: Path) -> None:
    image = signed(tmp_path, KEY1.lower())
    assert verify_image(image, run=FakeApptainer(0, SIGNED_BY_KEY1)).signer == KEY1


def test_one_of_several_valid_signers_may_be_the_pinned_one(tmp_path: Path) -> None:
    assert verify_image(signed(tmp_path, KEY2), run=FakeApptainer(0, BOTH_SIGNERS)).signer == KEY2


@pytest.mark.parametrize(("returncode", "stdout", "stderr", "found", "reason"), [
    (0, ONLY_KEY2, "", KEY2, "not signed by the pinned key"),
    (255, TAMPERED, TAMPERED_STDERR, KEY1, "data object integrity compromised: 3"),
    (255, UNKNOWN_KEY, UNKNOWN_KEY_STDERR, "none", "signature made by unknown entity"),
    (255, UNSIGNED, UNSIGNED_STDERR, "none", "signature not found for object group 1"),
    (255, SIGNED_BY_KEY1, SECOND_SIGNER_UNKNOWN_STDERR, KEY1, "signature object 5 not valid"),
    (0, PEM_WITH_KEY, "", "none", "not signed by the pinned key"),
    (255, UNSIGNED, PEM_STDERR, "none", "key material not provided for DSSE envelope signature"),
    (0, "", "", "none", "not signed by the pinned key"),
    (0, "garbage", "", "none", "not signed by the pinned key"),
    (1, "", "", "none", "apptainer verify exited with status 1"),
])
def test_anything_but_a_valid_signature_by_the_pinned_key_is_refused(
        tmp_path: Path, returncode: int, stdout: str, stderr: str, found: str, reason: str) -> None:
    image = signed(tmp_path, KEY1)
    with pytest.raises(SignatureInvalid) as caught:
        verify_image(image, run=FakeApptainer(returncode, stdout, stderr))
    message = str(caught.value)
    assert f"image 'clima-ci' ({image.path})" in message
    assert f"expected signer {KEY1}" in message
    assert f"found {found}" in message
    assert reason in message


def test_the_pinned_key_must_have_signed_every_verified_object(tmp_path: Path) -> None:
    # Key 1 vouches for the definition file only; key 2 for everything.
    document = json.loads(BOTH_SIGNERS)
    document["SignerKeys"] = [entry for entry in document["SignerKeys"]
                              if entry["Signer"]["Fingerprint"] == KEY2.lower()
                              or entry["Signer"]["Partition"] == "Def.FILE"]
    with pytest.raises(SignatureInvalid, match="not signed by the pinned key"):
        verify_image(signed(tmp_path, KEY1), run=FakeApptainer(0, json.dumps(document)))


def test_a_missing_apptainer_is_an_image_error(tmp_path: Path) -> None:
    def absent(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    with pytest.raises(ImageError, match="apptainer not found"):
        verify_image(signed(tmp_path), run=absent)


def test_a_hanging_apptainer_is_an_image_error(tmp_path: Path) -> None:
    def hanging(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, kwargs["timeout"])

    with pytest.raises(ImageError, match="did not finish"):
        verify_image(signed(tmp_path), run=hanging)


def test_a_missing_signed_image_is_missing_before_apptainer_runs(tmp_path: Path) -> None:
    run = FakeApptainer(0, SIGNED_BY_KEY1)
    with pytest.raises(ImageMissing):
        verify_image(Image("clima-ci", str(tmp_path / "gone.sif"), signed_by=KEY1), run=run)
    assert run.calls == []


def test_the_tree_digest_does_not_depend_on_how_the_root_is_spelled(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "rootfs")
    assert tree_digest(str(root) + "/") == tree_digest(str(root))
