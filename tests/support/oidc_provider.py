"""A small OpenID Connect provider on loopback, for single sign-on tests.

A real HTTP server (a thread of the test process, on 127.0.0.1 and a free port): the
discovery document, the JWKS, an authorize endpoint (a tiny form with one button per
known person, or an automatic approval of one of them), and a token endpoint that checks
the client's credentials, the code (single use), the redirect URI and the PKCE verifier
(S256), and answers an ID token signed with RS256 by joserfc.

Tests make it misbehave on purpose: `claim_overrides` changes the next ID tokens' claims
(another `aud`, `iss`, an old `exp`, `email_verified: false`...), `sign_with_other_key`
signs them with a key the JWKS does not hold.

    with LocalOidcProvider() as idp:
        idp.add_user("alice@acme.test")
        ... configure a connection with idp.issuer, idp.client_id, idp.client_secret ...

The platform may fetch it only under the operator's allow-lists for identity providers
(`idp.settings()`: MANTLE_SSO_ALLOWED_HTTP / _PRIVATE naming its loopback host and port);
without them it is refused like any tenant's loopback destination, which tests check too.
"""

from __future__ import annotations

import base64
import html
import json
import secrets
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.jwk import RSAKey


class LocalOidcProvider:
    def __init__(
        self,
        *,
        client_id: str = "mantle-console",
        client_secret: str | None = None,
        auth_method: str = "client_secret_basic",
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret or "idp-secret-" + secrets.token_urlsafe(16)
        self.auth_method = auth_method
        self.key = RSAKey.generate_key(2048, parameters={"kid": "local-1", "use": "sig"})
        # Same key id, another key: a token it signs must fail the signature check.
        self.other_key = RSAKey.generate_key(2048, parameters={"kid": "local-1", "use": "sig"})
        self.sign_with_other_key = False
        self.users: dict[str, dict[str, Any]] = {}
        self.auto_approve: str | None = None
        self.claim_overrides: dict[str, Any] = {}
        self.redirect_uris: set[str] = set()  # empty: any (the tests' server picks its port)
        self.token_requests: list[dict[str, Any]] = []
        self._codes: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def settings(self) -> dict[str, Any]:
        """The operator's settings under which the platform may reach this provider."""
        host = f"127.0.0.1:{self._server.server_address[1]}"
        return {"MANTLE_SSO_ALLOWED_PRIVATE": [host], "MANTLE_SSO_ALLOWED_HTTP": [host]}

    def add_user(
        self, email: str, *, name: str = "", email_verified: bool = True, sub: str = ""
    ) -> None:
        self.users[email] = {
            "sub": sub or "sub-" + secrets.token_hex(6),
            "email": email,
            "email_verified": email_verified,
            "name": name or email.split("@")[0].title(),
        }

    def start(self) -> LocalOidcProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalOidcProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the protocol -------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": [self.auth_method],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "email", "profile"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}

    def authorization_error(self, query: Mapping[str, str]) -> str | None:
        if query.get("client_id") != self.client_id:
            return "unknown client_id"
        if query.get("response_type") != "code":
            return "response_type must be code"
        if self.redirect_uris and query.get("redirect_uri") not in self.redirect_uris:
            return "redirect_uri is not registered"
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return "PKCE S256 is required"
        if "openid" not in query.get("scope", "").split():
            return "scope must include openid"
        return None

    def approve(self, query: Mapping[str, str], email: str) -> str:
        """The redirect (with a new code) that approves `email` for this request."""
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = {
                "email": email,
                "nonce": query.get("nonce", ""),
                "redirect_uri": query["redirect_uri"],
                "challenge": query["code_challenge"],
                "client_id": query["client_id"],
            }
        sep = "&" if "?" in query["redirect_uri"] else "?"
        answer = urlencode({"code": code, "state": query.get("state", "")})
        return f"{query['redirect_uri']}{sep}{answer}"

    def token(self, form: Mapping[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        self.token_requests.append({"form": dict(form), "authorization": bool(authorization)})
        client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
        if self.auth_method == "client_secret_basic":
            if not authorization.startswith("Basic "):
                return 401, {"error": "invalid_client"}
            pair = base64.b64decode(authorization[6:]).decode()
            client_id, _, client_secret = (unquote(p) for p in pair.partition(":"))
        if client_id != self.client_id or client_secret != self.client_secret:
            return 401, {"error": "invalid_client"}
        if form.get("grant_type") != "authorization_code":
            return 400, {"error": "unsupported_grant_type"}
        with self._lock:
            issued = self._codes.pop(form.get("code", ""), None)  # single use
        if issued is None or issued["client_id"] != client_id:
            return 400, {"error": "invalid_grant"}
        if form.get("redirect_uri") != issued["redirect_uri"]:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri"}
        if create_s256_code_challenge(form.get("code_verifier", "")) != issued["challenge"]:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verifier"}
        person = self.users[issued["email"]]
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": person["sub"],
            "aud": self.client_id,
            "exp": now + 300,
            "iat": now,
            "auth_time": now,
            "nonce": issued["nonce"],
            "email": person["email"],
            "email_verified": person["email_verified"],
            "name": person["name"],
        }
        claims.update(self.claim_overrides)
        key = self.other_key if self.sign_with_other_key else self.key
        id_token = jwt.encode({"alg": "RS256", "kid": "local-1"}, claims, key)
        return 200, {
            "access_token": secrets.token_urlsafe(24),
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": id_token,
        }


def _handler_for(idp: LocalOidcProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def _json(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _html(self, status: int, text: str) -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("location", location)
            self.send_header("content-length", "0")
            self.end_headers()

        def _form(self) -> dict[str, str]:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length).decode()
            return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            if url.path == "/.well-known/openid-configuration":
                self._json(200, idp.discovery())
            elif url.path == "/jwks":
                self._json(200, idp.jwks())
            elif url.path == "/authorize":
                error = idp.authorization_error(query)
                if error is not None:
                    self._html(400, f"<p>{html.escape(error)}</p>")
                elif idp.auto_approve is not None:
                    self._redirect(idp.approve(query, idp.auto_approve))
                else:
                    hidden = "".join(
                        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                        for k, v in query.items()
                    )
                    buttons = "".join(
                        f'<button type="submit" name="email" value="{html.escape(e)}">'
                        f"Sign in as {html.escape(e)}</button>"
                        for e in idp.users
                    )
                    self._html(
                        200,
                        "<!doctype html><title>Local IdP</title><h1>Local identity provider"
                        f'</h1><form method="post" action="/authorize">{hidden}{buttons}</form>',
                    )
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            form = self._form()
            if url.path == "/authorize":
                error = idp.authorization_error(form)
                if error is not None or form.get("email") not in idp.users:
                    self._html(400, f"<p>{html.escape(error or 'unknown person')}</p>")
                else:
                    self._redirect(idp.approve(form, form["email"]))
            elif url.path == "/token":
                status, body = idp.token(form, self.headers.get("authorization", ""))
                self._json(status, body)
            else:
                self._json(404, {"error": "not_found"})

    return Handler
