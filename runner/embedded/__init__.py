"""The embedded default: a policy and an image that make the agent useful with no config."""

from runner.embedded.image import build_demo_image, default_image_path, sha256_of
from runner.embedded.policy import embedded_policy_path, ensure_embedded_policy, render_default_policy

__all__ = ["build_demo_image", "default_image_path", "embedded_policy_path", "ensure_embedded_policy",
           "render_default_policy", "sha256_of"]
