"""`GET /openapi.json`, `GET /docs` (Swagger UI) and `GET /redoc` (ReDoc). No key needed, as upstream.

A gateway may run with no Internet access, so nothing these pages use comes from elsewhere: the
viewers' files are vendored in `web/static/docs/` (with their licences, and `assets.json` recording
each file's version and sha256) and served here under a path that holds the version, cached for a
year. The pages' Content-Security-Policy lets the browser load nothing from another origin: ReDoc's
sidebar would otherwise fetch its vendor's logo from a CDN (it hides the image when that fails).
Files are read on first use, off the event loop, and kept with a gzip copy.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from importlib.resources.abc import Traversable

import trio
from quart import Blueprint, Response, request

from web.errors import ApiError
from web.openapi import TITLE, openapi_document, package_version
from wire import jsonio

ASSET_CACHE_CONTROL = "public, max-age=31536000, immutable"
PAGE_CACHE_CONTROL = "no-cache"
MANIFEST = "assets.json"
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
TEXT = "text/plain; charset=utf-8"
GZIP_MIN_BYTES = 1024
SWAGGER_UI = "swagger-ui"
REDOC = "redoc"
SPEC_URL = "openapi.json"  # relative, like every URL on the pages: they work behind a path prefix too

SWAGGER_INIT = (
    f'window.ui = SwaggerUIBundle({{url: "{SPEC_URL}", dom_id: "#swagger-ui", deepLinking: true, '
    'validatorUrl: null, presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"});'
)
SWAGGER_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} API: Swagger UI</title>
<link rel="stylesheet" href="{css}">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{js}"></script>
<script>{init}</script>
</body>
</html>
"""
REDOC_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} API: ReDoc</title>
<style>body {{ margin: 0; padding: 0; }}</style>
</head>
<body>
<redoc spec-url="{spec}"></redoc>
<script src="{js}"></script>
</body>
</html>
"""


def script_hash(script: str) -> str:
    """The CSP source that allows exactly this inline script."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def content_security_policy(*scripts: str) -> str:
    """Same origin only. Styles may be inline (both viewers set them from script); ReDoc's search runs in
    a worker made from a blob; Swagger UI shows downloaded images as blobs."""
    return "; ".join((
        "default-src 'none'",
        " ".join(("script-src 'self'", *map(script_hash, scripts))),
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    ))


@dataclass(frozen=True, slots=True)
class Vendored:
    """One vendored package, as `assets.json` records it."""

    package: str
    version: str
    files: Mapping[str, str]  # file name -> sha256 (hex)


@dataclass(frozen=True, slots=True)
class Asset:
    data: bytes
    gzipped: bytes | None
    content_type: str
    etag: str


def assets_root() -> Traversable:
    return files("web").joinpath("static", "docs")


def load_manifest(root: Traversable) -> dict[str, Vendored]:
    entries = json.loads(root.joinpath(MANIFEST).read_text(encoding="utf-8"))
    return {name: Vendored(name, entry["version"], dict(entry["files"])) for name, entry in entries.items()}


@dataclass
class DocAssets:
    """The vendored files of one app: looked up by (package, version, name), read once when first asked."""

    root: Traversable
    manifest: Mapping[str, Vendored]
    loaded: dict[tuple[str, str], Asset] = field(default_factory=dict)

    def url(self, package: str, name: str) -> str:
        vendored = self.manifest[package]
        if name not in vendored.files:
            raise KeyError(f"{name} is not a vendored file of {package}")
        return f"docs/assets/{package}/{vendored.version}/{name}"

    async def get(self, package: str, version: str, name: str) -> Asset | None:
        vendored = self.manifest.get(package)
        if vendored is None or vendored.version != version or name not in vendored.files:
            return None
        found = self.loaded.get((package, name))
        if found is None:
            found = await trio.to_thread.run_sync(self._read, vendored, name)
            self.loaded[(package, name)] = found
        return found

    def _read(self, vendored: Vendored, name: str) -> Asset:
        data = self.root.joinpath(vendored.package, name).read_bytes()
        suffix = name[name.rfind("."):] if "." in name else ""
        gzipped = gzip.compress(data, compresslevel=6, mtime=0) if len(data) >= GZIP_MIN_BYTES else None
        return Asset(data, gzipped, CONTENT_TYPES.get(suffix, TEXT), vendored.files[name][:32])


def page_response(html: str, csp: str) -> Response:
    return Response(html, content_type="text/html; charset=utf-8", headers={
        "Cache-Control": PAGE_CACHE_CONTROL,
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    })


def accepts_gzip() -> bool:
    return request.accept_encodings["gzip"] > 0


def blueprint() -> Blueprint:
    bp = Blueprint("docs", __name__)
    assets = DocAssets(assets_root(), load_manifest(assets_root()))
    version = package_version()
    swagger_html = SWAGGER_PAGE.format(title=TITLE, css=assets.url(SWAGGER_UI, "swagger-ui.css"),
                                       js=assets.url(SWAGGER_UI, "swagger-ui-bundle.js"), init=SWAGGER_INIT)
    redoc_html = REDOC_PAGE.format(title=TITLE, spec=SPEC_URL, js=assets.url(REDOC, "redoc.standalone.js"))
    swagger_csp = content_security_policy(SWAGGER_INIT)
    redoc_csp = content_security_policy()
    encoded = jsonio.dumps(openapi_document(version=version))

    @bp.get("/openapi.json")
    async def openapi() -> Response:
        return Response(encoded, content_type="application/json", headers={"Cache-Control": PAGE_CACHE_CONTROL})

    @bp.get("/docs")
    async def swagger_ui() -> Response:
        return page_response(swagger_html, swagger_csp)

    @bp.get("/redoc")
    async def redoc() -> Response:
        return page_response(redoc_html, redoc_csp)

    @bp.get("/docs/assets/<package>/<version>/<name>")
    async def asset(package: str, version: str, name: str) -> Response:
        found = await assets.get(package, version, name)
        if found is None:
            raise ApiError(404, f"Unknown path {request.path}.", code="not_found")
        gzipped = found.gzipped if accepts_gzip() else None
        etag = f'"{found.etag}{"" if gzipped is None else "-gz"}"'
        headers = {"Cache-Control": ASSET_CACHE_CONTROL, "ETag": etag, "Vary": "Accept-Encoding",
                   "X-Content-Type-Options": "nosniff"}
        if etag in request.headers.get("If-None-Match", ""):
            return Response(b"", status=304, headers=headers)
        if gzipped is not None:
            headers["Content-Encoding"] = "gzip"
        return Response(found.data if gzipped is None else gzipped, content_type=found.content_type,
                        headers=headers)

    return bp
