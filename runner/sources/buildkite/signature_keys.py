"""Reading the Buildkite verification JWKS file, held to the rule its keys call for.

Public keys (EdDSA, ES256...) only verify: anyone may read them, so the file only has to be safe
from changes by others, like the policy. A shared key (`kty` "oct", HS256) signs as well as it
verifies: whoever can read it can sign any job. A JWKS holding one is therefore read as a secret
file is (a regular file, owned by the agent's account, mode 0600, not through a link).
"""

from __future__ import annotations

from pathlib import Path

from runner.secrets import SecretFileError, check_not_writable_by_others, read_secret_file
from runner.sources.buildkite.signature import Jwks, load_jwks
from runner.tomlsource import read_text_limited

WHAT = "Buildkite signature keys (JWKS)"


def read_verification_jwks(path: Path) -> Jwks:
    """The keys of `path`; raises SecretFileError for a file open to others, InputError (JwksError)
    for one that is not a JWKS."""
    check_not_writable_by_others(path, WHAT)
    jwks = load_jwks(read_text_limited(path), name=str(path))
    shared = jwks.shared_keys()
    if not shared:
        return jwks
    key = shared[0]
    try:
        text = read_secret_file(path, what=WHAT)
    except SecretFileError as exc:
        raise SecretFileError(f"{exc.detail}, since it holds the shared {key.alg} key {key.kid!r} "
                              '(kty "oct"), which can sign jobs as well as check them',
                              path=path, fix=exc.fix) from None
    # The keys are those of the read that passed the secret-file checks, not of the first one.
    return load_jwks(text, name=str(path))
