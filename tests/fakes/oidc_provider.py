"""A site's OpenID Connect provider that people log in at: oidc-provider-mock (Authlib's own
authorization server in a Flask app), served on 127.0.0.1 by werkzeug in a thread.

It serves discovery, its key set, the authorization endpoint (a form: POST `sub` to log in as that
user, or `action=deny` to refuse), the token endpoint (each code redeemed once) and userinfo. The
users given have the claims given, and its ID tokens carry them with the login's nonce.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import oidc_provider_mock
from werkzeug.serving import make_server


@contextmanager
def running_provider(users: Mapping[str, Mapping[str, object]]) -> Iterator[str]:
    """The provider's issuer URL while it runs; `users` maps each subject to its claims."""
    app = oidc_provider_mock.app(
        require_nonce=True,
        user_claims=[oidc_provider_mock.User(sub=sub, claims=dict(claims)) for sub, claims in users.items()])
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
