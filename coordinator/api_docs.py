"""``/docs``: the API reference as one server-rendered HTML page, without a single script.

FastAPI's default ``/docs`` loads Swagger UI's scripts from a CDN, on the same origin as the
dashboard: a compromised or swapped CDN file would run with the dashboard's privileges. This page
is built from the OpenAPI document on the server, escaped, and served under a CSP that allows no
script at all (``/openapi.json`` stays for tools that want the machine-readable form)."""

from __future__ import annotations

import html
import json
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

DOCS_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; script-src 'none'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
METHODS = ("get", "post", "put", "patch", "delete")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _schema_name(schema: dict | None) -> str:
    if not schema:
        return ""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if schema.get("type") == "array":
        return f"list[{_schema_name(schema.get('items'))}]"
    if "anyOf" in schema:
        return " | ".join(_schema_name(s) or s.get("type", "?") for s in schema["anyOf"])
    return schema.get("type", "") or schema.get("format", "")


def _operation(path: str, method: str, op: dict) -> str:
    params = "".join(
        f"<tr><td><code>{_e(p.get('name'))}</code></td><td>{_e(p.get('in'))}</td>"
        f"<td>{_e(_schema_name(p.get('schema')))}</td><td>{'yes' if p.get('required') else ''}</td>"
        f"<td>{_e(p.get('description', ''))}</td></tr>"
        for p in op.get("parameters", []))
    body = op.get("requestBody", {}).get("content", {})
    body_line = "".join(f"<p>Body: <code>{_e(kind)}</code> {_e(_schema_name(spec.get('schema')))}</p>"
                        for kind, spec in body.items())
    responses = ", ".join(f"<code>{_e(code)}</code> {_e(r.get('description', ''))}"
                          for code, r in sorted(op.get("responses", {}).items()))
    return (f"<section id=\"{_e(op.get('operationId', method + path))}\"><h3><span class=\"m\">{_e(method.upper())}"
            f"</span> <code>{_e(path)}</code></h3><p>{_e(op.get('summary', ''))}</p>"
            f"<pre>{_e(op.get('description', ''))}</pre>"
            + (f"<table><tr><th>parameter</th><th>in</th><th>type</th><th>required</th><th></th></tr>{params}</table>"
               if params else "")
            + body_line + f"<p class=\"r\">Responses: {responses}</p></section>")


def render(spec: dict) -> str:
    """The whole page for an OpenAPI document."""
    by_tag: dict[str, list[str]] = {}
    for path, item in spec.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                op = item[method]
                by_tag.setdefault((op.get("tags") or ["other"])[0], []).append(_operation(path, method, op))
    sections = "".join(f"<h2>{_e(tag)}</h2>{''.join(ops)}" for tag, ops in sorted(by_tag.items()))
    schemas = "".join(f"<details><summary><code>{_e(name)}</code></summary><pre>{_e(json.dumps(s, indent=2))}</pre>"
                      f"</details>" for name, s in sorted(spec.get("components", {}).get("schemas", {}).items()))
    info = spec.get("info", {})
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(info.get('title'))} API"
            f"</title><style>body{{font:15px/1.45 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}}"
            f"pre{{white-space:pre-wrap;background:#f6f6f6;padding:.5rem}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}}.m{{font-weight:700}}"
            f"section{{border-top:1px solid #ddd;margin-top:1rem}}.r{{color:#444}}</style></head><body>"
            f"<h1>{_e(info.get('title'))} {_e(info.get('version'))}</h1><p>{_e(info.get('description', ''))}</p>"
            f"<p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a>.</p>{sections}"
            f"<h2>Schemas</h2>{schemas}</body></html>")


def install(app: FastAPI) -> None:
    """Serve the page at ``/docs`` (rendered once, on first request: the routes are fixed by then)."""
    cache: dict[str, str] = {}

    @app.get("/docs", include_in_schema=False)
    def api_docs() -> HTMLResponse:
        if "page" not in cache:
            cache["page"] = render(app.openapi())
        return HTMLResponse(cache["page"], headers={"Content-Security-Policy": DOCS_CSP,
                                                    "X-Content-Type-Options": "nosniff",
                                                    "Referrer-Policy": "no-referrer"})
