"""`pilotfleet fetch --source hf://...` against the test server's Hugging Face API (pilotfleet_fetch.testkit).

The server answers the Hub's revision and tree endpoints and serves `resolve/<commit>/<path>`, redirecting
LFS files to a CDN under another host name; files are checked against the Hub's per-file hashes.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pilotfleet_fetch.testkit import WeightsServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_safetensors(path: Path, tensors: dict[str, int]) -> None:
    """A real safetensors file: header JSON, then each tensor's fp32 data."""
    header, offset = {}, 0
    for name, count in tensors.items():
        header[name] = {"dtype": "F32", "shape": [count], "data_offsets": [offset, offset + 4 * count]}
        offset += 4 * count
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + os.urandom(offset))


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[tuple[WeightsServer, dict[str, Path]]]:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    (repo / "tokenizer.json").write_text('{"version": "1.0"}')
    write_safetensors(repo / "model.safetensors", {"embed.weight": 1000, "lm_head.weight": 1000})
    files = {p.name: p for p in repo.iterdir()}
    with WeightsServer() as srv:
        srv.add_hf_repo("acme/tiny-coder", COMMIT, files)
        srv.faults.token = "hf_token"
        yield srv, files


def fetch(
    tmp_path: Path, srv: WeightsServer, *args: str | Path, token: str | None = "hf_token"
) -> tuple[int, str]:
    env = {**os.environ, "HF_ENDPOINT": srv.hf_endpoint, "PILOTFLEET_TERMINATION_LOG": str(tmp_path / "term")}
    if token:
        env["PILOTFLEET_FETCH_TOKEN"] = token
    (tmp_path / "term").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "pilotfleet_fetch", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return proc.returncode, proc.stderr


def test_hf_repo_at_a_branch_is_pinned_to_its_commit(
    hub: tuple[WeightsServer, dict[str, Path]], tmp_path: Path
) -> None:
    srv, files = hub
    dest = tmp_path / "models" / "tiny"
    code, err = fetch(
        tmp_path, srv, "--source", "hf://acme/tiny-coder", "--revision", "main", "--dest", dest,
        "--backend", "python", "--model-name", "tiny", "--serve-path", "/models/tiny",
    )  # fmt: skip
    assert code == 0, err
    weights = dest / "tiny" / "1" / "hf"
    assert (weights / "model.safetensors").read_bytes() == files["model.safetensors"].read_bytes()
    assert (dest / "tiny" / "1" / "model.py").is_file()
    config = (dest / "tiny" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config
    assert "/models/tiny/tiny/1/hf" in config
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["resolved_revision"] == COMMIT
    assert manifest["tokenizer"] == "tiny/1/tokenizer"
    # The LFS file came from the CDN host, which got no token (the test server only serves it there).
    assert any(path.startswith("/cdn/acme/tiny-coder/") for path, _ in srv.requests)


def test_hf_errors(hub: tuple[WeightsServer, dict[str, Path]], tmp_path: Path) -> None:
    srv, files = hub
    dest = tmp_path / "m"
    code, err = fetch(
        tmp_path, srv, "--source", "hf://acme/tiny-coder", "--dest", dest, "--backend", "python", token=None
    )
    assert code == 11 and "Unauthorized" in err
    code, err = fetch(tmp_path, srv, "--source", "hf://acme/other", "--dest", dest, "--backend", "python")
    assert code == 10 and "NotFound" in err
    code, err = fetch(
        tmp_path,
        srv,
        "--source",
        "hf://acme/tiny-coder",
        "--revision",
        "v9",
        "--dest",
        dest,
        "--backend",
        "python",
    )
    assert code == 10 and "NotFound" in err
    # A shard uploaded cut short: the listing's hashes agree with it, the safetensors header check does not.
    data = files["model.safetensors"].read_bytes()
    files["model.safetensors"].write_bytes(data[:-100])
    srv.add_hf_repo("acme/cut", COMMIT, files)
    code, err = fetch(tmp_path, srv, "--source", "hf://acme/cut", "--dest", dest, "--backend", "python")
    assert code == 15 and "MissingShard" in err and "model.safetensors" in err
    assert not dest.exists()
