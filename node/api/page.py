"""The administrator's web page at ``/``: one HTML file, a script and a style sheet, all served by the node.

Hospital networks are offline, so nothing is fetched from anywhere else: no CDN, no web font. The page
asks for an API token once per browser session and reads everything from ``/api/v1`` with it; the
server decides what a token may see (patient names only for ``admin``) and do (actions only for ``admin``).
The files themselves are public: they hold no data.
"""

from pathlib import Path

from fastapi import APIRouter, HTTPException, Response

STATIC_DIR = Path(__file__).parent / "static"

#: Only what the page needs: its own script, style and API; no inline script or style, no frames.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # A new version of the node serves its new page at once.
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _serve(path: Path) -> Response:
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


def page_router(static_dir: Path = STATIC_DIR) -> APIRouter:
    """``GET /`` (the page) and ``GET /static/{name}`` (its assets), outside the OpenAPI schema.

    Only the files in ``static_dir`` with a known type are served, by exact name: a request cannot
    name a path outside it.
    """
    router = APIRouter(include_in_schema=False)
    assets = {p.name: p for p in static_dir.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}

    @router.get("/")
    def index() -> Response:
        return _serve(assets["index.html"])

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        path = assets.get(name)
        if path is None:
            raise HTTPException(404, f"no file {name!r} in the page's assets")
        return _serve(path)

    return router
