"""`[[oidc]]` tables trusting an issuer emulator, read through the agent config's own parser."""

from __future__ import annotations

from fakes.oidc_issuer import OidcIssuerEmulator

from runner.config import parse_config_text
from runner.oidc.issuers import OidcIssuer

AUDIENCE = "hpc-runner"


def trusted(issuer: OidcIssuerEmulator, kind: str = "github", **keys: str) -> OidcIssuer:
    """The one `[[oidc]]` table trusting `issuer` for tokens of `kind` (a Buildkite table pins the
    emulator's organisation unless `organization` says otherwise)."""
    if kind == "buildkite":
        keys.setdefault("organization", "acme-inc")
    fields = {"name": f"test-{kind}", "issuer": issuer.url, "audience": AUDIENCE, "kind": kind, **keys}
    text = "[[oidc]]\n" + "".join(f'{key} = "{value}"\n' for key, value in fields.items())
    (table,) = parse_config_text(text, "config.toml").oidc
    return table
