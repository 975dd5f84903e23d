"""`/openapi.json`, `/docs` and `/redoc`, against the gateway as it serves.

The document and the app are kept equal: every (method, path) of the app's URL map is documented
(or is only a 405 refusal of a wrong method), every documented one is served, and each operation's `security` is what the route enforces. Real
chat requests and answers, streamed and not, and errors, are checked against the documented schemas.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import jsonschema
import pytest
import trio
from openapi_spec_validator import validate
from quart_trio import QuartTrio
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from engine.gateway import Gateway, run
from tests.chat_stack import settings_for, sse_events
from tests.scripted_miners import DONE, Miners, answer, chunk, vllm_answer
from web.docs import assets_root, load_manifest, script_hash
from web.openapi import documented_routes, package_version, served_routes

ADMIN_KEY = "admin"
DOC_URI = "urn:sn1-gateway:openapi"
UPSTREAM_TAGS = ("GPT Endpoints", "API Management", "Web Retrieval", "Health")


@dataclasses.dataclass
class Served:
    gateway: Gateway
    app: QuartTrio
    miners: Miners
    key: str
    client: httpx.AsyncClient  # no credentials: each test adds what it needs

    async def document(self) -> dict[str, Any]:
        response = await self.client.get("/openapi.json")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        document: dict[str, Any] = response.json()
        return document

    @property
    def auth(self) -> dict[str, str]:
        return {"api-key": self.key}


@pytest.fixture
async def served(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Served]:
    """The gateway as `serve` runs it (admin key set, failed-auth throttling off so that every route can
    be probed without a key), with scripted miners; `app` is the very app it serves."""
    settings = settings_for(tmp_path)
    settings = dataclasses.replace(settings, auth=dataclasses.replace(settings.auth, failed_auth_per_minute=0))
    miners = Miners()
    apps: list[QuartTrio] = []
    with trio.fail_after(30):
        gateway: Gateway = await nursery.start(lambda task_status: run(
            settings, transport=miners.transport(), app_hook=apps.append, task_status=task_status))
    key, _ = await gateway.services.keys.create(1000)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        yield Served(gateway, apps[0], miners, key, client)
    gateway.shutdown()


def concrete(path: str) -> str:
    """A documented path with each parameter filled in."""
    return re.sub(r"\{[^}]+\}", lambda m: str(uuid.uuid4()) if m.group(0) == "{job_id}" else "x", path)


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method.upper(), path): op for path, item in document["paths"].items()
            for method, op in item.items() if method.upper() in {"GET", "POST", "PUT", "DELETE", "PATCH"}}


def schema_validator(document: dict[str, Any], schema: Any) -> jsonschema.Draft202012Validator:
    """A JSON Schema validator for a schema of the document, its `#/components/...` $refs resolved there."""
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(document, default_specification=DRAFT202012))
    resolved = json.loads(json.dumps(schema).replace('"#/', f'"{DOC_URI}#/'))
    return jsonschema.Draft202012Validator(resolved, registry=registry)


def validator(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    return schema_validator(document, {"$ref": f"#/components/schemas/{name}"})


def media_schema(document: dict[str, Any], method: str, path: str, status: str, media: str) -> Any:
    response = document["paths"][path][method]["responses"][status]
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    return response["content"][media]


# --- the document ------------------------------------------------------------------------------------

async def test_the_document_is_valid_openapi_3_1(served: Served) -> None:
    document = await served.document()
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)  # each is valid JSON Schema 2020-12
    assert document["openapi"].startswith("3.1.")
    assert document["info"] == {**document["info"], "title": "sn1-gateway", "version": package_version()}
    tags = [tag["name"] for tag in document["tags"]]
    assert set(UPSTREAM_TAGS) <= set(tags)
    used = {tag for op in operations(document).values() for tag in op["tags"]}
    assert used == set(tags), "every tag is used and every used tag is declared"
    schemes = document["components"]["securitySchemes"]
    assert schemes["api-key"] == {**schemes["api-key"], "type": "apiKey", "in": "header", "name": "api-key"}
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["admin-key"] == {**schemes["admin-key"], "type": "apiKey", "in": "header", "name": "admin-key"}
    too_many = document["components"]["responses"]["TooManyRequests"]
    assert {"Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(too_many["headers"])
    error = document["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}


async def test_the_document_and_the_served_routes_are_equal(served: Served) -> None:
    document = await served.document()
    routes = served_routes(served.app.url_map.iter_rules())
    documented = documented_routes(document)
    assert documented - routes == set(), "documented but not served"
    for method, path in sorted(routes - documented):
        # Only a refusal may be left out: the key routes answer a wrong method with their own 405.
        response = await served.client.request(method, concrete(path))
        assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed", (
            f"{method} {path} is served but not documented")
    for (method, path), op in operations(document).items():
        declared = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{([^}]+)\}", path)), f"{method} {path}: path parameters"


async def test_each_operation_asks_for_the_credentials_its_route_enforces(served: Served) -> None:
    """Without credentials: a route documented as public answers without 401, one documented with
    `api-key`/`bearer` answers 401 `missing_api_key`, one with `admin-key` 401 `invalid_admin_key`."""
    document = await served.document()
    routes = served_routes(served.app.url_map.iter_rules())
    expected_code = {(): None, ("api-key", "bearer"): "missing_api_key", ("admin-key",): "invalid_admin_key"}
    checked = 0
    for (method, path), op in operations(document).items():
        assert (method, path) in routes, f"{method} {path} is documented but not served"
        schemes = tuple(sorted({name for requirement in op["security"] for name in requirement}))
        assert schemes in expected_code, f"{method} {path}: unexpected security {op['security']}"
        response = await served.client.request(method, concrete(path))
        code = expected_code[schemes]
        if code is None:
            assert response.status_code != 401, f"{method} {path} is documented as needing no key"
        else:
            assert response.status_code == 401, f"{method} {path} is documented as needing a key"
            assert response.json()["error"]["code"] == code
            assert "401" in op["responses"]
        checked += 1
    assert checked >= 20


async def test_the_document_describes_what_the_chat_route_takes_and_answers(served: Served) -> None:
    """A real chat request and its answers, non-streamed, streamed with usage and logprobs, and as errors,
    each valid against the schema documented for it."""
    document = await served.document()
    for port in (9001, 9002, 9003):
        served.miners.scripts[port] = vllm_answer(["Hel", "lo"], first_delay=0.01 * (port - 9000))
    request_schema = validator(document, "ChatCompletionRequest")
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")

    body = {"model": "Default", "messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 16, "temperature": 0.5, "seed": 7, "task": "InferenceTask", "logprobs": True,
            "top_logprobs": 2, "sampling_parameters": {"top_k": 40, "repetition_penalty": 1.1},
            "inference_mode": "Reasoning-Fast", "json_format": False, "timeout": 60}
    request_schema.validate(body)
    response = await served.client.post("/v1/chat/completions", json=body, headers=served.auth)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    validator(document, "ChatCompletion").validate(response.json())
    assert response.json()["choices"][0]["logprobs"]["content"], "logprobs were asked for and are described"
    for header in chat["responses"]["200"]["headers"]:
        assert header in response.headers

    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    request_schema.validate(stream_body)
    response = await served.client.post("/v1/chat/completions", json=stream_body, headers=served.auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    event_schema = media_schema(document, "post", "/v1/chat/completions", "200", "text/event-stream")["x-sse-data"]
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and len(events) >= 4
    for event in events[:-1]:
        schema_validator(document, event_schema).validate(event)
    assert "usage" in events[-2] and events[-2]["choices"] == []

    error_schema = validator(document, "Error")
    bad = {**body, "temperature": 5}
    with pytest.raises(jsonschema.ValidationError):
        request_schema.validate(bad)  # the document refuses what the route refuses
    response = await served.client.post("/v1/chat/completions", json=bad, headers=served.auth)
    assert response.status_code == 400 and "400" in chat["responses"]
    error_schema.validate(response.json())
    assert response.json()["error"]["param"] == "temperature"
    with pytest.raises(jsonschema.ValidationError):
        request_schema.validate({**body, "sampling_parameters": {"stop": ["x"]}})
    response = await served.client.post("/v1/chat/completions", json={**body, "sampling_parameters": {"stop": ["x"]}},
                                        headers=served.auth)
    assert response.status_code == 400
    error_schema.validate(response.json())

    served.miners.scripts = {port: 500 for port in (9001, 9002, 9003)}
    response = await served.client.post("/v1/chat/completions", json=body, headers=served.auth)
    assert response.status_code == 502 and "502" in chat["responses"]
    error_schema.validate(response.json())
    assert set(response.json()["error"]["details"]) == {"1", "2", "3"}


async def test_a_429_carries_the_documented_headers(served: Served) -> None:
    document = await served.document()
    key, _ = await served.gateway.services.keys.create(1)
    served.miners.scripts = {port: answer(["ok"]) for port in (9001, 9002, 9003)}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    first = await served.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert first.status_code == 200
    response = await served.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 429
    validator(document, "Error").validate(response.json())
    assert document["paths"]["/v1/chat/completions"]["post"]["responses"]["429"]["$ref"].endswith("/TooManyRequests")
    documented = document["components"]["responses"]["TooManyRequests"]["headers"]
    assert {"Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(documented)
    for header in documented:
        assert int(response.headers[header]) >= 0, header
    assert int(response.headers["Retry-After"]) >= 1


async def test_every_other_answer_matches_its_documented_schema(served: Served) -> None:
    """One real call per route (with what it needs), its 200 checked against the documented 200."""
    document = await served.document()
    results = [{"url": "https://a.example/page", "content": "A page.", "relevant": "It answers."}]
    served.miners.scripts = {port: [(0.0, chunk(json.dumps(results))), (0.0, chunk(None, "stop")), (0.0, DONE)]
                             for port in (9001, 9002, 9003)}
    admin = {"admin-key": ADMIN_KEY}
    created = await served.client.post("/api_management/create-api-key/?rate_limit=5", headers=admin)
    made = created.json()["api_key"]
    calls: list[tuple[str, str, str, dict[str, str], Any]] = [
        ("GET", "/health", "/health", {}, None),
        ("GET", "/openapi.json", "/openapi.json", {}, None),
        ("GET", "/v1/models", "/v1/models", served.auth, None),
        ("GET", "/api_management/whoami", "/api_management/whoami", served.auth, None),
        ("GET", "/api_management/keys", "/api_management/keys", admin, None),
        ("PUT", "/api_management/modify-api-key/{api_key}", f"/api_management/modify-api-key/{made}?rate_limit=6",
         admin, None),
        ("DELETE", "/delete-api-key/{api_key}", f"/delete-api-key/{made}", admin, None),
        ("POST", "/miner_availabilities/miner_availabilities", "/miner_availabilities/miner_availabilities",
         served.auth, [1, 2]),
        ("GET", "/miner_availabilities/get_available_miners", "/miner_availabilities/get_available_miners?k=2",
         served.auth, None),
        ("GET", "/web_retrieval", "/web_retrieval?search_query=pages&n_results=1&max_response_time=5",
         served.auth, None),
        ("POST", "/web_retrieval", "/web_retrieval", served.auth, {"search_query": "pages", "n_results": 1}),
        # after the miners have been asked, so that they have something to report
        ("GET", "/health/ready", "/health/ready", {}, None),
        ("GET", "/metrics", "/metrics", {}, None),
        ("GET", "/status/miners", "/status/miners", {}, None),
    ]
    answered = [("POST", "/api_management/create-api-key/", created)]
    for method, path, url, headers, body in calls:
        kwargs: dict[str, Any] = {"headers": headers} if body is None else {"headers": headers, "json": body}
        answered.append((method, path, await served.client.request(method, url, **kwargs)))
    for method, path, response in answered:
        assert response.status_code == 200, f"{method} {path}: {response.text}"
        documented = document["paths"][path][method.lower()]["responses"]["200"]
        media = response.headers["content-type"].split(";")[0]
        assert media in documented["content"], f"{method} {path} answers {media}"
        for header in documented.get("headers", {}):
            assert header in response.headers, f"{method} {path}: documented header {header} missing"
        if media == "application/json":
            schema_validator(document, documented["content"][media]["schema"]).validate(response.json())
    by_route = {(method, path): response for method, path, response in answered}
    assert by_route["POST", "/web_retrieval"].json()["results"] == results
    assert set(by_route["GET", "/status/miners"].json()["miners"]) == {"1", "2", "3"}


# --- the pages and their files ------------------------------------------------------------------------

class Links(HTMLParser):
    """Every URL a page makes the browser load, and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        for attribute in ("src", "href", "spec-url", "data", "poster", "srcset"):
            if named.get(attribute):
                self.urls.append(str(named[attribute]))
        self._in_script = tag == "script" and not named.get("src")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data)


def inline_urls(script: str) -> list[str]:
    return re.findall(r"""(?:url|href|src)\s*:\s*["']([^"']+)["']""", script)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_pages_load_everything_from_the_gateway(served: Served, page: str) -> None:
    response = await served.client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    links = Links()
    links.feed(response.text)
    urls = links.urls + [u for script in links.inline for u in inline_urls(script)]
    assert urls, "the page loads its viewer"
    origin = urlsplit(served.gateway.url)
    page_url = served.gateway.url + page
    manifest = load_manifest(assets_root())
    kinds = set()
    for url in urls:
        absolute = urlsplit(urljoin(page_url, url))
        assert (absolute.scheme, absolute.netloc) == (origin.scheme, origin.netloc), f"{url} is not the gateway's"
        fetched = await served.client.get(absolute.geturl())
        assert fetched.status_code == 200, url
        if absolute.path == "/openapi.json":
            kinds.add("spec")
            continue
        package, version, name = absolute.path.removeprefix("/docs/assets/").split("/")
        assert manifest[package].version == version
        assert hashlib.sha256(fetched.content).hexdigest() == manifest[package].files[name]
        assert fetched.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert fetched.headers["content-type"].split(";")[0] in {"text/javascript", "text/css"}
        kinds.add(fetched.headers["content-type"].split(";")[0])
    assert "spec" in kinds and "text/javascript" in kinds
    csp = response.headers["content-security-policy"]
    directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert directives["default-src"] == "'none'"
    for sources in directives.values():
        assert not re.search(r"https?:|\*|//", sources), f"the policy lets the page load from elsewhere: {sources}"
    for script in links.inline:
        assert script_hash(script) in directives["script-src"], "an inline script the browser would block"


async def test_the_viewer_files_are_cached_compressed_and_revalidated(served: Served) -> None:
    path = "/docs/assets/swagger-ui/{}/swagger-ui-bundle.js".format(load_manifest(assets_root())["swagger-ui"].version)
    plain = await served.client.get(path, headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    raw = await served.client.send(served.client.build_request("GET", path, headers={"Accept-Encoding": "gzip"}),
                                   stream=True)
    compressed = await raw.aread()  # httpx decodes; the wire size is the header
    assert raw.headers["content-encoding"] == "gzip"
    assert int(raw.headers["content-length"]) < len(plain.content) // 2
    assert compressed == plain.content
    again = await served.client.get(path, headers={"If-None-Match": plain.headers["etag"],
                                                   "Accept-Encoding": "identity"})
    assert again.status_code == 304 and again.content == b""
    stale = await served.client.get("/docs/assets/swagger-ui/0.0.1/swagger-ui-bundle.js")
    assert stale.status_code == 404 and stale.json()["error"]["code"] == "not_found"
    unlisted = await served.client.get(path.rsplit("/", 1)[0] + "/package.json")
    assert unlisted.status_code == 404


def test_the_vendored_files_are_those_recorded_with_their_licences() -> None:
    root = assets_root()
    manifest = json.loads(root.joinpath("assets.json").read_text())
    assert set(manifest) == {"swagger-ui", "redoc"}
    for package, entry in manifest.items():
        folder = root.joinpath(package)
        present = {item.name for item in folder.iterdir()}
        assert present == set(entry["files"]), f"{package}: files not recorded, or recorded and missing"
        for name, digest in entry["files"].items():
            assert hashlib.sha256(folder.joinpath(name).read_bytes()).hexdigest() == digest, name
        assert entry["licence_files"] and set(entry["licence_files"]) <= present
        assert any(name.endswith(".js") for name in present)


# --- routes being added elsewhere: checked once this build serves them ------------------------------

JOBS = "/v1/chat/completions/jobs"


async def test_the_jobs_routes_answer_as_documented(served: Served) -> None:
    document = await served.document()
    served.miners.scripts = {port: answer(["An", " answer"]) for port in (9001, 9002, 9003)}
    created = await served.client.post(JOBS, json={"messages": [{"role": "user", "content": "hi"}]},
                                       headers=served.auth)
    assert created.status_code == 202, created.text
    validator(document, "ChatJob").validate(created.json())
    assert created.json()["status"] == "pending"
    job = f"{JOBS}/{created.json()['job_id']}"
    with trio.fail_after(10):
        while True:
            got = await served.client.get(job, headers=served.auth)
            assert got.status_code == 200, got.text
            validator(document, "ChatJobResult").validate(got.json())
            if got.json()["status"] in ("completed", "failed"):
                break
            await trio.sleep(0.05)
    assert got.json()["status"] == "completed" and got.json()["result"]
    unknown = await served.client.get(f"{JOBS}/{uuid.uuid4()}", headers=served.auth)
    assert unknown.status_code == 404
    validator(document, "Error").validate(unknown.json())
    deleted = await served.client.delete(job, headers=served.auth)
    assert str(deleted.status_code) in document["paths"][f"{JOBS}/{{job_id}}"]["delete"]["responses"]
    assert (await served.client.get(job, headers=served.auth)).status_code == 404


async def test_the_status_page_answers_as_documented(served: Served) -> None:
    page = await served.client.get("/status")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    data = await served.client.get("/status/data", headers={"admin-key": ADMIN_KEY})
    assert data.status_code == 200 and isinstance(data.json(), dict)
