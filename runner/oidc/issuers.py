"""The issuers whose ID tokens are trusted: the top-level `[[oidc]]` tables of a config.

```toml
[[oidc]]
name = "github"                                      # for messages and the audit log
issuer = "https://token.actions.githubusercontent.com"
audience = "hpc-runner"                              # what a token's `aud` must be
kind = "github"                                      # github | buildkite | gitlab | generic
# jwks_uri = "https://..."                           # default: from the issuer's discovery document
# organization = "clima"                             # buildkite: the one organisation trusted
# username_claim = "preferred_username"              # generic: default preferred_username, else sub
# groups_claim = "groups"                            # generic
```

Read as strictly as the rest of a config: unknown keys, wrong types and bad values are errors that
name the file, the line and the field. Two tables whose tokens would hold the same principals are
refused: a policy could not tell their users apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from runner.fields import Table
from runner.urls import config_https_url

IssuerKind = Literal["github", "buildkite", "gitlab", "generic"]
ISSUER_KINDS: tuple[IssuerKind, ...] = ("github", "buildkite", "gitlab", "generic")

DEFAULT_USERNAME_CLAIMS = ("preferred_username", "sub")
DEFAULT_GROUPS_CLAIM = "groups"

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_AUDIENCE = r"[^\s\x00-\x1f\x7f]{1,256}"
_CLAIM = r"[^\s\x00-\x1f\x7f]{1,256}"
# A Buildkite organisation slug, as the Buildkite source reads one.
_ORGANIZATION = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
# The principals' source of each kind's tokens.
_PRINCIPAL_SOURCE = {"github": "github", "buildkite": "buildkite", "gitlab": "gitlab", "generic": "idp"}


@dataclass(frozen=True)
class OidcIssuer:
    name: str
    issuer: str                             # exactly as tokens' `iss` must spell it
    audience: str
    kind: IssuerKind
    jwks_uri: str | None = None             # None: the `jwks_uri` of the issuer's discovery document
    organization: str | None = None         # buildkite: the pinned organisation slug
    username_claims: tuple[str, ...] = DEFAULT_USERNAME_CLAIMS   # generic: the first one present
    groups_claim: str = DEFAULT_GROUPS_CLAIM                     # generic

    @property
    def discovery_url(self) -> str:
        """Where OpenID Connect Discovery says the issuer describes itself."""
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


def parse_oidc_tables(root: Table, key: str = "oidc") -> tuple[OidcIssuer, ...]:
    """The `[[key]]` array of tables under `root`, each an issuer; errors name file, line, field."""
    issuers: list[OidcIssuer] = []
    for table in root.tables(key):
        issuer = _parse_issuer(table)
        _check_distinct(table, issuer, issuers)
        issuers.append(issuer)
    return tuple(issuers)


def issuer_url(value: object) -> str:
    # Kept as written: a token's `iss` must equal it exactly, trailing '/' and all.
    text = config_https_url(value)
    if urlsplit(text).query:
        raise ValueError(f"{text!r} must not have a query: an issuer is a plain https:// URL")
    return text


def _parse_issuer(table: Table) -> OidcIssuer:
    name = table.string("name", pattern=_NAME, what="a name (letters, digits, '.', '_', '-')")
    issuer = table.converted("issuer", issuer_url)
    audience = table.string("audience", pattern=_AUDIENCE, what="an audience (one word, no spaces)")
    kind: str = table.string("kind")
    if kind not in ISSUER_KINDS:
        allowed = " or ".join(f'"{k}"' for k in ISSUER_KINDS)
        raise table.error("kind", f"must be {allowed}, got {kind!r}")
    jwks_uri = table.converted("jwks_uri", config_https_url, None)
    organization = table.string("organization", None, pattern=_ORGANIZATION,
                                what="a Buildkite organisation slug")
    username_claim = table.string("username_claim", None, pattern=_CLAIM, what="a claim name")
    groups_claim = table.string("groups_claim", None, pattern=_CLAIM, what="a claim name")
    table.finish()
    if kind == "buildkite" and organization is None:
        raise table.error("organization", "is required with kind = \"buildkite\": every Buildkite "
                                          "organisation's tokens come from the same issuer, so the one "
                                          "trusted must be named")
    for field, value, only in (("organization", organization, "buildkite"),
                               ("username_claim", username_claim, "generic"),
                               ("groups_claim", groups_claim, "generic")):
        if value is not None and kind != only:
            raise table.error(field, f'is only used with kind = "{only}" (kind is "{kind}")')
    return OidcIssuer(name, issuer, audience, kind,
                      jwks_uri=jwks_uri, organization=organization,
                      username_claims=(username_claim,) if username_claim else DEFAULT_USERNAME_CLAIMS,
                      groups_claim=groups_claim or DEFAULT_GROUPS_CLAIM)


def _check_distinct(table: Table, issuer: OidcIssuer, earlier: list[OidcIssuer]) -> None:
    for other in earlier:
        if other.name == issuer.name:
            raise table.error("name", f"another [[oidc]] table is already named {issuer.name!r}")
        if other.issuer == issuer.issuer and not (issuer.kind == other.kind == "buildkite"
                                                  and issuer.organization != other.organization):
            raise table.error("issuer", f"{issuer.issuer!r} is already trusted as {other.name!r}")
        # Buildkite principals name their organisation; those of the other kinds name nothing
        # of their issuer, so two issuers of one kind would each speak for the other's names.
        if other.kind == issuer.kind and issuer.kind != "buildkite":
            raise table.error("kind", f"{other.name!r} is already a {issuer.kind} issuer: the tokens "
                                      f"of both would hold the same {_PRINCIPAL_SOURCE[issuer.kind]}: "
                                      "principals, which a policy could not tell apart")
