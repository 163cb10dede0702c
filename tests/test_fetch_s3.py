"""`pilotfleet fetch` from a real S3-compatible server: moto's server mode, with signature checks on.

moto lives in its own virtualenv under the cache (built once from PyPI): its botocore pins python-dateutil
< 3 while our kubernetes client needs >= 3, so it cannot share the project's environment. With
`INITIAL_NO_AUTH_ACTION_COUNT` moto lets the first IAM calls through (to create our user and key), then
checks the SigV4 signature and the IAM policy of every request, as AWS does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from pilotfleet_fetch.sources import sigv4_headers
from pilotfleet_fetch.testkit import make_archive, make_ft_checkpoint, sha256_of
from pilotfleet_serve.cache import cache_dir, cache_lock
from pilotfleet_serve.procs import StartError, free_port, port_open, start

MOTO_VERSION = "5.2.5"
REGION = "us-east-1"


def moto_venv() -> Path:
    """The cached virtualenv with moto's server, installed on first use."""
    root = cache_dir() / "venv" / f"moto-{MOTO_VERSION}"
    with cache_lock(f"moto-{MOTO_VERSION}"):
        if not (root / ".installed").exists():
            venv.create(root, with_pip=True, clear=True)
            proc = subprocess.run(
                [
                    root / "bin" / "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    f"moto[server]=={MOTO_VERSION}",
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                pytest.fail(f"cannot install moto[server]=={MOTO_VERSION} from PyPI: {proc.stderr[-2000:]}")
            (root / ".installed").touch()
    return root


@dataclass
class S3:
    endpoint: str
    access_key: str
    secret_key: str

    def request(self, method: str, path: str, body: bytes = b"", secret: str | None = None) -> httpx.Response:
        url = self.endpoint + path
        headers = sigv4_headers(
            method,
            url,
            access_key=self.access_key,
            secret_key=secret or self.secret_key,
            region=REGION,
            payload_sha256=hashlib.sha256(body).hexdigest(),
        )
        return httpx.request(method, url, content=body, headers=headers, timeout=60)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
        }


def _iam(endpoint: str, params: dict[str, str]) -> str:
    body = "&".join(f"{k}={quote(v, safe='')}" for k, v in {**params, "Version": "2010-05-08"}.items())
    headers = sigv4_headers(
        "POST",
        endpoint + "/",
        access_key="AKIDBOOTSTRAP",
        secret_key="bootstrap",
        region=REGION,
        service="iam",
        payload_sha256=hashlib.sha256(body.encode()).hexdigest(),
        extra_headers={"content-type": "application/x-www-form-urlencoded"},
    )
    resp = httpx.post(endpoint + "/", content=body, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.text


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    root = moto_venv()
    port = free_port()
    log_dir = tmp_path_factory.mktemp("moto")
    proc = start(
        "moto",
        [root / "bin" / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        log_dir,
        env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"},
    )
    try:
        try:
            proc.wait_until(lambda: port_open(port), timeout=60, what="listening")
        except StartError as exc:
            pytest.fail(str(exc))
        endpoint = f"http://127.0.0.1:{port}"
        _iam(endpoint, {"Action": "CreateUser", "UserName": "fetcher"})
        keys = _iam(endpoint, {"Action": "CreateAccessKey", "UserName": "fetcher"})
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        _iam(
            endpoint,
            {
                "Action": "PutUserPolicy",
                "UserName": "fetcher",
                "PolicyName": "s3",
                "PolicyDocument": json.dumps(policy),
            },
        )
        access = re.search(r"<AccessKeyId>(.+?)</AccessKeyId>", keys)
        secret = re.search(r"<SecretAccessKey>(.+?)</SecretAccessKey>", keys)
        assert access and secret, keys
        server = S3(endpoint, access.group(1), secret.group(1))
        assert server.request("PUT", "/weights").status_code == 200
        yield server
    finally:
        proc.stop()


def fetch(
    tmp_path: Path, env: dict[str, str], *args: str | Path
) -> tuple[subprocess.CompletedProcess[str], str]:
    term = tmp_path / "termination-log"
    term.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "pilotfleet_fetch", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PILOTFLEET_TERMINATION_LOG": str(term), **env},
        timeout=120,
    )
    return proc, term.read_text()


def test_fetch_an_archive_from_s3_with_signed_requests(s3: S3, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_ft_checkpoint(src / "fastertransformer" / "1", tp=2)
    arc = make_archive(src, tmp_path / "codegen-2gpu.tar.zst", "codegen-2gpu")
    assert s3.request("PUT", "/weights/fauxpilot/codegen-2gpu.tar.zst", arc.read_bytes()).status_code == 200
    dest = tmp_path / "m"
    source = "s3://weights/fauxpilot/codegen-2gpu.tar.zst"
    proc, _ = fetch(
        tmp_path, s3.env(), "--source", source, "--sha256", sha256_of(arc), "--dest", dest, "--tp", "2"
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["source"] == source
    assert manifest["sha256"] == sha256_of(arc)
    assert (dest / "fastertransformer" / "1" / "2-gpu" / "config.ini").is_file()


def test_fetch_a_prefix_of_plain_files_from_s3(s3: S3, tmp_path: Path) -> None:
    ckpt = make_ft_checkpoint(tmp_path / "src", tp=1)
    for file in ckpt.iterdir():
        assert (
            s3.request("PUT", f"/weights/codegen%20mono/1-gpu/{file.name}", file.read_bytes()).status_code
            == 200
        )
    dest = tmp_path / "m"
    proc, _ = fetch(tmp_path, s3.env(), "--source", "s3://weights/codegen mono/", "--dest", dest)
    assert proc.returncode == 0, proc.stderr
    published = dest / "fastertransformer" / "1" / "1-gpu"
    assert sorted(p.name for p in published.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    assert (published / "model.wte.bin").read_bytes() == (ckpt / "model.wte.bin").read_bytes()


def test_s3_wrong_secret_and_missing_key(s3: S3, tmp_path: Path) -> None:
    assert s3.request("PUT", "/weights/small.bin", b"x" * 100).status_code == 200
    dest = tmp_path / "m"
    proc, term = fetch(
        tmp_path,
        {**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong"},
        "--source",
        "s3://weights/small.bin",
        "--dest",
        dest,
    )
    assert proc.returncode == 11, proc.stderr
    assert json.loads(term)["reason"] == "Unauthorized"
    assert not dest.exists()
    proc, term = fetch(tmp_path, s3.env(), "--source", "s3://weights/nope.tar.zst", "--dest", dest)
    assert proc.returncode == 10, proc.stderr
    assert json.loads(term)["reason"] == "NotFound"
    assert not dest.exists()
