"""The embedded default policy: this user may run the demo image, within small caps."""

from __future__ import annotations

import json
import os
import pwd
from importlib import resources
from pathlib import Path

from runner.config import AgentConfig
from runner.embedded.image import build_demo_image, default_image_path, sha256_of


def _toml_string(value: str) -> str:
    # A JSON string of printable text is a valid TOML basic string.
    return json.dumps(value)


def render_default_policy(*, user: str, image_path: Path, image_sha256: str) -> str:
    template = resources.files("runner.bundled").joinpath("default-policy.toml").read_text()
    return (template.replace('"{image_path}"', _toml_string(str(image_path)))
            .replace("{image_sha256}", image_sha256)
            .replace("{user}", user))


def embedded_policy_path(config: AgentConfig) -> Path:
    return config.state_dir / "embedded-policy.toml"


def ensure_embedded_policy(config: AgentConfig, *, image: Path | None = None,
                           progress: bool = True) -> Path:
    """Write the default policy for this user and the demo image (built on first use)."""
    image = image or Path(os.environ.get("HPC_RUNNER_DEMO_IMAGE") or default_image_path())
    build_demo_image(image, apptainer=config.sandbox.apptainer, progress=progress)
    # The user from the process's uid, as the local queue identifies users; never $USER.
    user = pwd.getpwuid(os.geteuid()).pw_name
    text = render_default_policy(user=user, image_path=image.resolve(),
                                 image_sha256=sha256_of(image))
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = embedded_policy_path(config)
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(partial, path)
    return path
