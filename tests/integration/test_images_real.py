"""Image verification against real SIF files built, signed and verified by the installed Apptainer."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.policy.model import Image
from sandbox import images
from sandbox.images import DigestCache, DigestMismatch, SignatureInvalid, VerifiedImage, verify_image

APPTAINER = shutil.which("apptainer")
REQUIRED = bool(os.environ.get("CI") or os.environ.get("HPC_RUNNER_TEST_CLUSTER"))
COMMAND_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def apptainer() -> str:
    if APPTAINER is None:
        message = "apptainer is not on PATH (deploy/dev/setup.sh installs it)"
        if REQUIRED:
            pytest.fail(f"{message}, and CI or HPC_RUNNER_TEST_CLUSTER is set")
        pytest.skip(f"{message}; set CI or HPC_RUNNER_TEST_CLUSTER to make this a failure")
    return APPTAINER


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private HOME: building and key handling must not touch the real user's ~/.apptainer."""
    return tmp_path_factory.mktemp("home")


def run_apptainer(apptainer: str, home: Path, *args: str, keys: Path | None = None) -> str:
    env = {**os.environ, "HOME": str(home), "APPTAINER_CACHEDIR": str(home / "cache")}
    if keys is not None:
        env["APPTAINER_KEYSDIR"] = str(keys)
    result = subprocess.run([apptainer, *args], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT_S, check=False)
    if result.returncode != 0:
        pytest.fail(f"apptainer {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def sif(apptainer: str, home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SIF built from a directory: seconds to make, but a real SIF with a squashfs partition."""
    base = tmp_path_factory.mktemp("sif")
    rootfs = base / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "os-release").write_text('NAME="hpc-runner test image"\n')
    (rootfs / "bin").mkdir()
    (rootfs / "bin" / "payload").write_bytes(os.urandom(64 * 1024))
    path = base / "test.sif"
    run_apptainer(apptainer, home, "build", str(path), str(rootfs))
    return path


def sha256sum(path: Path) -> str:
    """The digest as an admin would compute it, independently of the code under test."""
    result = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
    return result.stdout.split()[0]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def copy_of(sif: Path, directory: Path, name: str = "copy.sif") -> Path:
    target = directory / name
    shutil.copyfile(sif, target)
    return target


@pytest.fixture(autouse=True)
def cache_fresh_images(monkeypatch: pytest.MonkeyPatch) -> None:
    # The images were written seconds ago; let the digest cache remember them all the same.
    monkeypatch.setattr(images, "RACY_SECONDS", 0.0)


# --- sha256 pins ---------------------------------------------------------------------------------

def test_a_real_sif_passes_its_pin(sif: Path) -> None:
    digest = sha256sum(sif)
    verified = verify_image(Image("test", str(sif), sha256=digest))
    assert verified == VerifiedImage("test", str(sif), digest, None)


def test_a_one_byte_change_is_a_mismatch_naming_both_digests(sif: Path, tmp_path: Path) -> None:
    changed = copy_of(sif, tmp_path)
    expected = sha256sum(sif)
    flip_byte(changed, changed.stat().st_size // 2)
    found = sha256sum(changed)
    assert found != expected
    with pytest.raises(DigestMismatch) as caught:
        verify_image(Image("test", str(changed), sha256=expected))
    assert str(caught.value) == (f"image 'test' ({changed}): sha256 mismatch: expected {expected}, "
                                 f"found {found}")


def test_the_cache_hashes_once_and_again_after_a_change(sif: Path, tmp_path: Path,
                                                        hash_calls: list[str]) -> None:
    image_path = copy_of(sif, tmp_path)
    image = Image("test", str(image_path), sha256=sha256sum(sif))
    cache_path = tmp_path / "state" / "image-digests.json"
    for _ in range(3):
        verify_image(image, cache=DigestCache(cache_path))
    assert hash_calls == [str(image_path)]
    flip_byte(image_path, 100)
    with pytest.raises(DigestMismatch):
        verify_image(image, cache=DigestCache(cache_path))
    assert len(hash_calls) == 2


# --- signed_by pins ------------------------------------------------------------------------------

def new_key(apptainer: str, home: Path, keys: Path, name: str) -> str:
    """A PGP key pair made non-interactively (an empty password); returns its fingerprint."""
    run_apptainer(apptainer, home, "key", "newpair", "--name", name, "--email", f"{name}@example.org",
                  "--comment", "hpc-runner test", "--password", "", "--push=false", "--bit-length", "2048",
                  keys=keys)
    listing = run_apptainer(apptainer, home, "key", "list", keys=keys)
    fingerprints: list[str] = re.findall(r"Fingerprint:\s+([0-9A-F]{40})", listing)
    assert len(fingerprints) == 1, listing
    return fingerprints[0]


class Signing:
    def __init__(self, apptainer: str, home: Path, base: Path) -> None:
        self.apptainer = apptainer
        self.home = home
        self.keys = base / "keys"
        self.other_keys = base / "other-keys"
        self.fingerprint = new_key(apptainer, home, self.keys, "signer")
        self.other_fingerprint = new_key(apptainer, home, self.other_keys, "other")

    def sign(self, path: Path, keys: Path) -> None:
        run_apptainer(self.apptainer, self.home, "sign", "--keyidx", "0", str(path), keys=keys)

    def fs_partition(self, path: Path) -> tuple[int, int]:
        listing = run_apptainer(self.apptainer, self.home, "sif", "list", str(path))
        found = re.search(r"\|(\d+)-(\d+)\s*\|FS", listing)
        assert found, listing
        return int(found.group(1)), int(found.group(2))


@pytest.fixture(scope="module")
def signing(apptainer: str, home: Path, tmp_path_factory: pytest.TempPathFactory) -> Signing:
    return Signing(apptainer, home, tmp_path_factory.mktemp("signing"))


@pytest.fixture
def keyring(signing: Signing, monkeypatch: pytest.MonkeyPatch) -> Iterator[Signing]:
    """verify_image runs apptainer with the agent's environment: point it at the test keyring."""
    monkeypatch.setenv("APPTAINER_KEYSDIR", str(signing.keys))
    yield signing


def test_a_sif_signed_by_the_pinned_key_passes(sif: Path, tmp_path: Path, keyring: Signing,
                                               apptainer: str) -> None:
    signed = copy_of(sif, tmp_path)
    keyring.sign(signed, keyring.keys)
    verified = verify_image(Image("test", str(signed), signed_by=keyring.fingerprint), apptainer=apptainer)
    assert verified == VerifiedImage("test", str(signed), None, keyring.fingerprint)


def test_an_unsigned_sif_is_refused(sif: Path, keyring: Signing, apptainer: str) -> None:
    with pytest.raises(SignatureInvalid, match="signature not found"):
        verify_image(Image("test", str(sif), signed_by=keyring.fingerprint), apptainer=apptainer)


def test_a_sif_signed_by_another_key_is_refused(sif: Path, tmp_path: Path, keyring: Signing,
                                                apptainer: str) -> None:
    signed = copy_of(sif, tmp_path)
    keyring.sign(signed, keyring.other_keys)
    with pytest.raises(SignatureInvalid) as caught:
        verify_image(Image("test", str(signed), signed_by=keyring.fingerprint), apptainer=apptainer)
    assert f"expected signer {keyring.fingerprint}" in str(caught.value)
    assert "unknown entity" in str(caught.value)


def test_a_tampered_signed_sif_is_refused_though_its_signer_is_listed(sif: Path, tmp_path: Path,
                                                                       keyring: Signing,
                                                                       apptainer: str) -> None:
    signed = copy_of(sif, tmp_path)
    keyring.sign(signed, keyring.keys)
    start, end = keyring.fs_partition(signed)
    flip_byte(signed, (start + end) // 2)
    with pytest.raises(SignatureInvalid) as caught:
        verify_image(Image("test", str(signed), signed_by=keyring.fingerprint), apptainer=apptainer)
    message = str(caught.value)
    assert f"expected signer {keyring.fingerprint}, found {keyring.fingerprint}" in message
    assert "integrity compromised" in message
