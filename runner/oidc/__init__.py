"""OIDC ID tokens from CI systems and a site's identity provider, verified and turned into the
policy's identity (docs/architecture.md).

Pure: `issuers` (the `[[oidc]]` tables of a config), `jwks` (an issuer's key set read into keys),
`registered` (`iss`, `aud`, `exp`, `nbf`, `iat` against an issuer and a time), `claims` (verified
claims -> `Identity`), `binding` (an audience bound to one job's digest). I/O: `keys` (discovery
and the JWKS fetched and cached per issuer) and `verify` (`TokenVerifier`, which puts them
together). Nothing here is imported by this `__init__`, so a config can read its `[[oidc]]` tables
without the HTTP client.
"""
