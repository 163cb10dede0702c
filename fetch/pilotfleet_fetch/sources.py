"""Turn a `--source` string into the list of files to download: HTTPS URLs, S3 objects, Hugging Face repos.

S3 is spoken as plain HTTPS signed with AWS Signature V4 (a few lines of hmac) rather than through boto3:
botocore pins python-dateutil < 3 while the kubernetes client we also need pins >= 3, and plain HTTP lets S3
objects go through the same download engine (Range resume, concurrent ranges, stall timeout) as URLs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import httpx

from pilotfleet_fetch.errors import FetchError, NotFound, Unauthorized, Unreachable

log = logging.getLogger(__name__)

HeaderFactory = Callable[[str, str], dict[str, str]]
"""Given (method, url), the headers that authenticate one request (S3 signs each request anew)."""

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
_METADATA_ATTEMPTS = 4


@dataclass(frozen=True)
class Digest:
    """An expected digest: sha256 of the bytes, or git's blob sha1 (what the Hub lists for small files)."""

    algorithm: Literal["sha256", "git-sha1"]
    hexdigest: str


def _no_headers(_method: str, _url: str) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class RemoteFile:
    """One file to download and where it goes in the payload tree."""

    url: str
    path: str
    """Relative path of the file in the downloaded tree (its name for a single file or archive)."""
    size: int | None = None
    expected: Digest | None = None
    auth: HeaderFactory = field(default=_no_headers, compare=False, repr=False)
    same_host_auth_only: bool = True
    """Drop the auth headers when a redirect leaves the original host (the Hub redirects to a CDN)."""


@dataclass(frozen=True)
class ResolvedSource:
    """What a source turned into: the files, plus the identity recorded in the manifest."""

    source: str
    """The source without credentials, as recorded in the manifest."""
    revision: str | None
    files: list[RemoteFile]
    single: bool
    """One file named by the user (so it may be an archive and `--sha256` applies to it)."""


@dataclass(frozen=True)
class Credentials:
    """Secrets from the environment; read once by the CLI and passed down."""

    token: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    aws_region: str = "us-east-1"
    s3_endpoint: str | None = None
    hf_endpoint: str = DEFAULT_HF_ENDPOINT

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Credentials:
        """Read the variables documented in docs/fetch.md."""
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(
            token=env.get("PILOTFLEET_FETCH_TOKEN") or None,
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
            aws_region=region,
            s3_endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            hf_endpoint=(env.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/"),
        )


def error_for_status(status: int, what: str) -> FetchError | None:
    """Map an HTTP status to the failure users see; None for success and for statuses worth retrying."""
    if status < 400 or status == 429 or status >= 500:
        return None
    if status in (401, 403):
        return Unauthorized(f"{what}: HTTP {status} (check the credentials)")
    if status in (404, 410):
        return NotFound(f"{what}: HTTP {status}")
    return FetchError(f"{what}: unexpected HTTP {status}")


def resolve(source: str, *, revision: str | None, sha256: str | None, creds: Credentials) -> ResolvedSource:
    """Resolve `source` into files; raises NotFound/Unauthorized/Unreachable as the server answers."""
    scheme = urlsplit(source).scheme
    expected = Digest("sha256", sha256.lower()) if sha256 else None
    if scheme in ("http", "https"):
        return _resolve_url(source, expected, creds)
    if scheme == "s3":
        return _resolve_s3(source, expected, creds)
    if scheme == "hf":
        if sha256:
            raise FetchError("--sha256 applies to a single file; Hugging Face files carry their own hashes")
        return _resolve_hf(source, revision or "main", creds)
    raise FetchError(f"unsupported source {source!r}: use https://, s3:// or hf://")


def _bearer(token: str | None) -> HeaderFactory:
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def factory(_method: str, _url: str) -> dict[str, str]:
        return dict(headers)

    return factory


def _basename(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise FetchError(f"cannot tell a file name from {path!r}")
    return name


def canonical(source: str) -> str:
    """The source as recorded in manifests: no user info, query or fragment (they may carry credentials)."""
    parts = urlsplit(source)
    if parts.scheme == "hf":
        return f"hf://{parts.netloc}{parts.path}".rstrip("/")
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname or "")
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


def _resolve_url(url: str, expected: Digest | None, creds: Credentials) -> ResolvedSource:
    name = _basename(urlsplit(url).path)
    file = RemoteFile(url=url, path=name, expected=expected, auth=_bearer(creds.token))
    return ResolvedSource(source=canonical(url), revision=None, files=[file], single=True)


# --- Hugging Face -----------------------------------------------------------------------------------------


def _get_json(
    client: httpx.Client, url: str, headers: dict[str, str], what: str
) -> tuple[Any, httpx.Response]:
    """GET a small JSON document, retrying transient failures a few times."""
    last: Exception | None = None
    for attempt in range(_METADATA_ATTEMPTS):
        try:
            resp = client.get(url, headers=headers)
        except httpx.HTTPError as exc:
            last = exc
        else:
            err = error_for_status(resp.status_code, what)
            if err is not None:
                raise err
            if resp.status_code < 400:
                try:
                    return resp.json(), resp
                except json.JSONDecodeError as exc:
                    raise FetchError(f"{what}: the server's answer is not JSON") from exc
            last = RuntimeError(f"HTTP {resp.status_code}")
        time.sleep(0.5 * 2**attempt)
    raise Unreachable(f"{what}: {last}")


def _resolve_hf(source: str, revision: str, creds: Credentials) -> ResolvedSource:
    parts = urlsplit(source)
    repo = f"{parts.netloc}{parts.path}".strip("/")
    if repo.count("/") != 1:
        raise FetchError(f"Hugging Face source must be hf://owner/repo, got {source!r}")
    headers = _bearer(creds.token)("GET", "")
    base = creds.hf_endpoint
    with httpx.Client(timeout=60.0, follow_redirects=True) as client:
        info, _ = _get_json(
            client,
            f"{base}/api/models/{repo}/revision/{quote(revision, safe='')}",
            headers,
            f"hf://{repo}@{revision}",
        )
        commit = str(info.get("sha") or revision)
        entries: list[dict[str, Any]] = []
        url: str | None = f"{base}/api/models/{repo}/tree/{commit}?recursive=true"
        while url:
            page, resp = _get_json(client, url, headers, f"hf://{repo}@{commit} file list")
            entries.extend(e for e in page if e.get("type") == "file")
            # The Hub pages long listings with an RFC 8288 Link header.
            url = resp.links.get("next", {}).get("url")
    if commit != revision:
        log.info("hf://%s: revision %s is commit %s", repo, revision, commit)
    files = []
    for entry in sorted(entries, key=lambda e: str(e["path"])):
        lfs = entry.get("lfs")
        digest = Digest("sha256", str(lfs["oid"])) if lfs else Digest("git-sha1", str(entry["oid"]))
        files.append(
            RemoteFile(
                url=f"{base}/{repo}/resolve/{commit}/{quote(str(entry['path']))}",
                path=str(entry["path"]),
                size=int(entry["size"]),
                expected=digest,
                auth=_bearer(creds.token),
            )
        )
    if not files:
        raise NotFound(f"hf://{repo}@{commit} has no files")
    return ResolvedSource(source=f"hf://{repo}", revision=commit, files=files, single=False)


# --- S3 ---------------------------------------------------------------------------------------------------


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_headers(
    method: str,
    url: str,
    *,
    access_key: str,
    secret_key: str,
    region: str,
    session_token: str | None = None,
    now: dt.datetime | None = None,
    payload_sha256: str = "UNSIGNED-PAYLOAD",
    extra_headers: Mapping[str, str] | None = None,
    service: str = "s3",
) -> dict[str, str]:
    """Return the headers (Authorization, x-amz-*) that sign one request with AWS Signature Version 4.

    `url` must already be encoded the way it will be sent (path segments and query values percent-encoded);
    `extra_headers` are sent and signed too.
    """
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port and (parts.scheme, parts.port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{parts.port}"
    headers = {"host": host, "x-amz-date": stamp, "x-amz-content-sha256": payload_sha256}
    if session_token:
        headers["x-amz-security-token"] = session_token
    for name, value in (extra_headers or {}).items():
        headers[name.lower()] = value
    signed = sorted(headers)
    canonical_headers = "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in signed)
    # Query parameters: sorted by name, each name and value in S3's strict percent-encoding.
    pairs = []
    for item in filter(None, parts.query.split("&")):
        key, _, value = item.partition("=")
        pairs.append((key, value))
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted(pairs))
    canonical_request = "\n".join(
        [method, parts.path or "/", canonical_query, canonical_headers, ";".join(signed), payload_sha256]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    signing_key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        signing_key = _hmac(signing_key, part)
    signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = {name: value for name, value in headers.items() if name != "host"}
    out["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    return out


def s3_auth(creds: Credentials) -> HeaderFactory:
    """A header factory signing each request with the S3 credentials (unsigned when there are none)."""
    access, secret = creds.aws_access_key_id, creds.aws_secret_access_key
    if not (access and secret):
        return _no_headers

    def factory(method: str, url: str) -> dict[str, str]:
        return sigv4_headers(
            method,
            url,
            access_key=access,
            secret_key=secret,
            region=creds.aws_region,
            session_token=creds.aws_session_token,
        )

    return factory


def s3_object_url(creds: Credentials, bucket: str, key: str) -> str:
    """Path-style URL of an object (works with AWS and every S3-compatible server)."""
    endpoint = (creds.s3_endpoint or f"https://s3.{creds.aws_region}.amazonaws.com").rstrip("/")
    return f"{endpoint}/{quote(bucket, safe='')}/{quote(key, safe='/~')}"


def _list_s3(creds: Credentials, bucket: str, prefix: str) -> list[tuple[str, int]]:
    auth = s3_auth(creds)
    base = s3_object_url(creds, bucket, "")
    found: list[tuple[str, int]] = []
    token: str | None = None
    ns = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
    with httpx.Client(timeout=60.0) as client:
        while True:
            params = {"list-type": "2", "prefix": prefix}
            if token:
                params["continuation-token"] = token
            query = urlencode(sorted(params.items()), quote_via=lambda s, *_: quote(s, safe="~"))
            url = f"{base}?{query}"
            try:
                resp = client.get(url, headers=auth("GET", url))
            except httpx.HTTPError as exc:
                raise Unreachable(f"s3://{bucket}/{prefix}: {exc}") from exc
            err = error_for_status(resp.status_code, f"s3://{bucket}/{prefix}")
            if err is not None:
                raise err
            if resp.status_code >= 400:
                raise Unreachable(f"s3://{bucket}/{prefix}: HTTP {resp.status_code}")
            root = ET.fromstring(resp.content)
            for item in root.findall("s3:Contents", ns):
                key = item.findtext("s3:Key", default="", namespaces=ns)
                if not key.endswith("/"):
                    found.append((key, int(item.findtext("s3:Size", default="0", namespaces=ns))))
            token = root.findtext("s3:NextContinuationToken", default="", namespaces=ns) or None
            if not token:
                return found


def _resolve_s3(source: str, expected: Digest | None, creds: Credentials) -> ResolvedSource:
    parts = urlsplit(source)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket:
        raise FetchError(f"S3 source must be s3://bucket/key, got {source!r}")
    auth = s3_auth(creds)
    clean = f"s3://{bucket}/{key}"
    if key and not key.endswith("/"):
        file = RemoteFile(
            url=s3_object_url(creds, bucket, key), path=_basename(key), expected=expected, auth=auth
        )
        return ResolvedSource(source=clean, revision=None, files=[file], single=True)
    if expected:
        raise FetchError("--sha256 applies to a single object, not to an S3 prefix")
    objects = _list_s3(creds, bucket, key)
    if not objects:
        raise NotFound(f"{clean}: no objects under this prefix")
    files = [
        RemoteFile(url=s3_object_url(creds, bucket, name), path=name[len(key) :], size=size, auth=auth)
        for name, size in sorted(objects)
    ]
    return ResolvedSource(source=clean, revision=None, files=files, single=False)
