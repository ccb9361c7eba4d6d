"""`hpc-runner demo` as a new user of the service account would first run it."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from conftest import SERVICE_USER, Cluster, as_service_user

# The demo builds its image on first use (seconds here); a slow CI machine gets much longer.
DEMO_TIMEOUT_S = 300


def test_demo_builds_its_image_on_first_use_and_shows_all_four_outcomes(
    cluster: Cluster, service_tmp: Path
) -> None:
    # A home of its own: the first use, with no image cached yet under ~/.cache.
    home = service_tmp / "home"
    home.mkdir(mode=0o700)
    account = pwd.getpwnam(SERVICE_USER)
    os.chown(home, account.pw_uid, account.pw_gid)

    # runuser sets HOME to the account's own home: set it after the switch.
    result = as_service_user(["env", f"HOME={home}", "hpc-runner", "demo"], cwd=home, timeout=DEMO_TIMEOUT_S)

    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    image = home / ".cache" / "hpc-runner" / "demo.sif"
    assert f"building the demo image {image}" in result.stderr
    assert image.is_file()
    out = result.stdout
    for line in (
        "ok   hello.toml           as expected",
        "ok   mpi-allreduce.toml   as expected",
        "ok   denied.toml          as expected",
        "ok   walltime.toml        as expected",
    ):
        assert line in out
    assert "hello from the sandbox\nworking directory: /work\n" in out
    assert "outcome: succeeded (exit status 0)" in out
    assert "world size 2\nallreduce sum 3\n" in out
    assert "rank 0 of 1" not in out
    assert "reason: grant 'local-user': the job asks for network access and the grant has network = false" \
        in out
    assert "outcome: denied" in out
    assert "hpc-runner: walltime of 3s exceeded; sent SIGTERM" in out
    assert "outcome: timed_out" in out
