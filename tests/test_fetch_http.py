"""`pilotfleet fetch` as a real process against a real local HTTP server (pilotfleet_fetch.testkit).

Each test runs the fetch command exactly as the Job does (a subprocess; exit code, termination message,
what lands in `--dest`), with the server misbehaving the way real weight hosts do.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pilotfleet_fetch.testkit import WeightsServer, make_archive, make_ft_checkpoint, sha256_of

MiB = 1 << 20


@pytest.fixture
def server() -> Iterator[WeightsServer]:
    with WeightsServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small FT checkpoints, FauxPilot-style: `<name>/fastertransformer/1/<tp>-gpu/`."""
    root = tmp_path_factory.mktemp("archives")
    out = {}
    for tp in (1, 2):
        src = root / f"src{tp}"
        make_ft_checkpoint(src / "fastertransformer" / "1", tp=tp)
        out[f"tp{tp}.tar.zst"] = make_archive(src, root / f"tp{tp}.tar.zst", f"codegen-{tp}gpu")
        out[f"tp{tp}.tar.gz"] = make_archive(src, root / f"tp{tp}.tar.gz", f"codegen-{tp}gpu")
    return out


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 96 MiB of incompressible FT weights, for kill-and-resume."""
    root = tmp_path_factory.mktemp("big")
    make_ft_checkpoint(
        root / "src" / "fastertransformer" / "1", tp=1, layers=30, hidden=256, inter=1024, vocab=1024
    )
    return make_archive(root / "src", root / "big.tar.zst", "codegen-big")


def fetch_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "pilotfleet_fetch", *(str(a) for a in args)]


def run_fetch(
    tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], dict[str, str] | None]:
    """Run the fetch command; return the process and the termination message it wrote, if any."""
    term = tmp_path / "termination-log"
    term.write_text("")
    full_env = {**os.environ, "PILOTFLEET_TERMINATION_LOG": str(term), **(env or {})}
    proc = subprocess.run(fetch_cmd(*args), capture_output=True, text=True, env=full_env, timeout=timeout)
    text = term.read_text().strip()
    return proc, (json.loads(text) if text else None)


def assert_failed(
    proc: subprocess.CompletedProcess[str], message: dict[str, str] | None, reason: str, code: int, dest: Path
) -> None:
    assert proc.returncode == code, proc.stderr
    assert message is not None and message["reason"] == reason, (message, proc.stderr)
    assert reason in proc.stderr
    assert not dest.exists(), "a failed fetch left something at --dest"


def test_fetch_tar_zst_publishes_a_verified_ft_repository(
    server: WeightsServer, archives: dict[str, Path], tmp_path: Path
) -> None:
    arc = archives["tp2.tar.zst"]
    url = server.publish("codegen.tar.zst", arc)
    dest = tmp_path / "models" / "codegen"
    proc, message = run_fetch(
        tmp_path, "--source", url, "--sha256", sha256_of(arc), "--dest", dest, "--tp", "2",
        "--serve-path", "/models/codegen",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert message is None
    config = (dest / "fastertransformer" / "config.pbtxt").read_text()
    assert 'key: "tensor_para_size" value: { string_value: "2" }' in config
    assert (
        'key: "model_checkpoint_path" value: { string_value: "/models/codegen/fastertransformer/1/2-gpu" }'
        in config
    )
    assert 'key: "decoder_layers" value: { string_value: "2" }' in config
    shards = dest / "fastertransformer" / "1" / "2-gpu"
    assert (shards / "config.ini").is_file()
    assert (shards / "model.layers.1.attention.query_key_value.weight.1.bin").is_file()
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_of(arc)
    assert manifest["source"] == url
    assert manifest["tensor_para_size"] == 2
    listed = {f["path"]: f["size"] for f in manifest["files"]}
    on_disk = {str(p.relative_to(dest)): p.stat().st_size for p in dest.rglob("*") if p.is_file()}
    on_disk.pop("manifest.json")
    assert listed == on_disk
    # Staging is gone after success; nothing else was left beside --dest.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["codegen"]


def test_tar_gz_and_tokenizer_beside_the_model(
    server: WeightsServer, archives: dict[str, Path], tmp_path: Path
) -> None:
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    url = server.publish("m.tar.gz", archives["tp1.tar.gz"])
    tok_url = server.publish("tokenizer.json", tok)
    dest = tmp_path / "m"
    proc, _ = run_fetch(tmp_path, "--source", url, "--dest", dest, "--tokenizer", tok_url)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "fastertransformer" / "1" / "tokenizer" / "tokenizer.json").read_text() == tok.read_text()
    assert json.loads((dest / "manifest.json").read_text())["tokenizer"] == "fastertransformer/1/tokenizer"


@pytest.mark.parametrize("concurrency", [1, 4])
def test_sigkill_mid_download_then_resume_fetches_under_one_percent_again(
    server: WeightsServer, big_archive: Path, tmp_path: Path, concurrency: int
) -> None:
    size = big_archive.stat().st_size
    url = server.publish("big.tar.zst", big_archive)
    dest = tmp_path / "big"
    args = ["--source", url, "--sha256", sha256_of(big_archive), "--dest", str(dest)]
    args += ["--concurrency", str(concurrency)]
    server.faults.rate = 40 * MiB / concurrency  # slow enough to kill it halfway
    proc = subprocess.Popen(fetch_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while server.sent("big.tar.zst") < 0.4 * size:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the download did not get going"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()
    first = server.sent("big.tar.zst")
    assert first < size, "the first run finished before it was killed"
    assert not dest.exists()
    server.faults.rate = None
    proc2, _ = run_fetch(tmp_path, *args)
    assert proc2.returncode == 0, proc2.stderr
    assert "resuming" in proc2.stderr
    fetched_again = server.sent("big.tar.zst") - size
    assert fetched_again <= 0.01 * size, (
        f"{fetched_again} bytes fetched twice ({100 * fetched_again / size:.2f}%)"
    )
    assert json.loads((dest / "manifest.json").read_text())["sha256"] == sha256_of(big_archive)


def test_dropped_connections_are_resumed(server: WeightsServer, big_archive: Path, tmp_path: Path) -> None:
    url = server.publish("drop.tar.zst", big_archive)
    server.faults.drop_after, server.faults.drop_count = 3 * MiB, 3
    dest = tmp_path / "d"
    proc, _ = run_fetch(
        tmp_path, "--source", url, "--sha256", sha256_of(big_archive), "--dest", dest, "--concurrency", "1"
    )
    assert proc.returncode == 0, proc.stderr
    gets = [r for r in server.requests if r[0] == "/files/drop.tar.zst"]
    assert len(gets) >= 5  # probe, three dropped attempts, the rest
    assert server.sent("drop.tar.zst") <= big_archive.stat().st_size + 1
    assert (dest / "manifest.json").is_file()


def test_a_stall_is_retried(server: WeightsServer, archives: dict[str, Path], tmp_path: Path) -> None:
    arc = archives["tp1.tar.zst"]
    url = server.publish("stall.tar.zst", arc)
    server.faults.stall_after, server.faults.stall_count = 100_000, 1
    dest = tmp_path / "s"
    args = ("--source", url, "--sha256", sha256_of(arc), "--dest", dest, "--stall-timeout", "1")
    # A wait bounded well below the default stall timeout (60 s): a fetch that ignored the option fails.
    proc, _ = run_fetch(tmp_path, *args, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "TimeoutError" in proc.stderr  # the retry was logged
    assert (dest / "manifest.json").is_file()


def test_a_server_that_keeps_stalling_fails_with_stalled(
    server: WeightsServer, archives: dict[str, Path], tmp_path: Path
) -> None:
    url = server.publish("stall.tar.zst", archives["tp1.tar.zst"])
    server.faults.stall_after, server.faults.stall_count = 1000, -1
    dest = tmp_path / "s"
    proc, message = run_fetch(
        tmp_path, "--source", url, "--dest", dest, "--stall-timeout", "0.5", "--retries", "2"
    )
    assert_failed(proc, message, "Stalled", 16, dest)
    # A transient failure keeps the partial download for the next attempt.
    assert any(p.name.endswith(".part") for p in (tmp_path / ".s.fetch").rglob("*"))


def test_404_and_401(server: WeightsServer, archives: dict[str, Path], tmp_path: Path) -> None:
    dest = tmp_path / "x"
    proc, message = run_fetch(tmp_path, "--source", server.url("missing.tar.zst"), "--dest", dest)
    assert_failed(proc, message, "NotFound", 10, dest)
    assert "404" in message["message"] if message else False

    url = server.publish("private.tar.zst", archives["tp1.tar.zst"])
    server.faults.token = "s3cret"
    proc, message = run_fetch(tmp_path, "--source", url, "--dest", dest)
    assert_failed(proc, message, "Unauthorized", 11, dest)
    proc, message = run_fetch(
        tmp_path, "--source", url, "--dest", dest, env={"PILOTFLEET_FETCH_TOKEN": "s3cret"}
    )
    assert proc.returncode == 0, proc.stderr


def test_wrong_sha256_fails_and_cleans_up(
    server: WeightsServer, archives: dict[str, Path], tmp_path: Path
) -> None:
    url = server.publish("m.tar.zst", archives["tp1.tar.zst"])
    dest = tmp_path / "m"
    proc, message = run_fetch(tmp_path, "--source", url, "--sha256", "0" * 64, "--dest", dest)
    assert_failed(proc, message, "ChecksumMismatch", 12, dest)
    assert sha256_of(archives["tp1.tar.zst"]) in proc.stderr
    assert not (tmp_path / ".m.fetch").exists()


@pytest.mark.parametrize("name", ["tp1.tar.zst", "tp1.tar.gz"])
def test_truncated_archive_is_bad_archive(
    server: WeightsServer, archives: dict[str, Path], tmp_path: Path, name: str
) -> None:
    cut = tmp_path / name
    data = archives[name].read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    url = server.publish(name, cut)
    dest = tmp_path / "m"
    proc, message = run_fetch(tmp_path, "--source", url, "--sha256", sha256_of(cut), "--dest", dest)
    assert_failed(proc, message, "BadArchive", 14, dest)


def test_path_traversal_is_refused(server: WeightsServer, tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"owned"))
    url = server.publish("evil.tar.gz", evil)
    dest = tmp_path / "m"
    proc, message = run_fetch(tmp_path, "--source", url, "--dest", dest)
    assert_failed(proc, message, "BadArchive", 14, dest)
    assert not list(tmp_path.parent.rglob("escaped.txt"))


def test_missing_shards_for_the_gpu_count(
    server: WeightsServer, archives: dict[str, Path], tmp_path: Path
) -> None:
    url = server.publish("tp1.tar.zst", archives["tp1.tar.zst"])
    dest = tmp_path / "m"
    proc, message = run_fetch(tmp_path, "--source", url, "--dest", dest, "--tp", "2")
    assert_failed(proc, message, "MissingShard", 15, dest)
    assert "2-gpu" in proc.stderr

    src = tmp_path / "broken"
    ckpt = make_ft_checkpoint(src / "fastertransformer" / "1", tp=2)
    (ckpt / "model.layers.1.mlp.dense_4h_to_h.weight.1.bin").unlink()
    url = server.publish("broken.tar.zst", make_archive(src, tmp_path / "broken.tar.zst", "broken"))
    proc, message = run_fetch(tmp_path, "--source", url, "--dest", dest, "--tp", "2")
    assert_failed(proc, message, "MissingShard", 15, dest)
    assert "model.layers.1.mlp.dense_4h_to_h.weight.1.bin" in proc.stderr


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a volume that fills up. Mounting needs root; without it the test fails, loudly."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_before_and_while_extracting(
    server: WeightsServer, small_volume: Path, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * MiB))
    dest = small_volume / "m"
    proc, message = run_fetch(tmp_path, "--source", server.publish("big.bin", big), "--dest", dest)
    assert_failed(proc, message, "DiskFull", 13, dest)

    # Fits when compressed, not when extracted: zeros compress to almost nothing.
    src = tmp_path / "zeros"
    make_ft_checkpoint(src / "fastertransformer" / "1", tp=1)
    (src / "fastertransformer" / "1" / "1-gpu" / "padding.bin").write_bytes(bytes(8 * MiB))
    arc = make_archive(src, tmp_path / "zeros.tar.zst", "zeros")
    assert arc.stat().st_size < MiB
    proc, message = run_fetch(tmp_path, "--source", server.publish("zeros.tar.zst", arc), "--dest", dest)
    assert_failed(proc, message, "DiskFull", 13, dest)
    assert not (small_volume / ".m.fetch").exists(), "the staging area was not cleared to free the volume"


def test_verified_copy_is_reused_and_a_failed_update_keeps_it(
    server: WeightsServer, archives: dict[str, Path], tmp_path: Path
) -> None:
    arc = archives["tp1.tar.zst"]
    url = server.publish("m.tar.zst", arc)
    dest = tmp_path / "m"
    args = ["--source", url, "--sha256", sha256_of(arc), "--dest", str(dest)]
    proc, _ = run_fetch(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    manifest = (dest / "manifest.json").read_text()
    before = len(server.requests)

    proc, _ = run_fetch(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert "already holds a verified copy" in proc.stderr
    assert len(server.requests) == before, "a reused copy must not touch the network"
    assert (dest / "manifest.json").read_text() == manifest

    # A damaged copy is not reused.
    shard = next((dest / "fastertransformer" / "1" / "1-gpu").glob("model.wte.bin"))
    shard.write_bytes(b"short")
    proc, _ = run_fetch(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert "already holds" not in proc.stderr
    assert len(server.requests) > before

    # An update from a bad source fails and leaves the good copy exactly as it was.
    digest = hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest()
    bad = server.publish("bad.tar.zst", archives["tp2.tar.zst"])
    proc, message = run_fetch(tmp_path, "--source", bad, "--dest", dest)
    assert proc.returncode == 15 and message and message["reason"] == "MissingShard"
    assert hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest() == digest
    assert (dest / "fastertransformer" / "1" / "1-gpu" / "config.ini").is_file()

    # And a good new source replaces it.
    new = server.publish("new.tar.gz", archives["tp1.tar.gz"])
    proc, _ = run_fetch(tmp_path, "--source", new, "--dest", dest)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((dest / "manifest.json").read_text())["source"] == new
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m")) == []


def test_server_without_range_support(server: WeightsServer, big_archive: Path, tmp_path: Path) -> None:
    url = server.publish("norange.tar.zst", big_archive)
    server.faults.ranges = False
    server.faults.drop_after, server.faults.drop_count = 5 * MiB, 1
    dest = tmp_path / "n"
    proc, _ = run_fetch(tmp_path, "--source", url, "--sha256", sha256_of(big_archive), "--dest", dest)
    assert proc.returncode == 0, proc.stderr
    assert all(r[1] is None or r[1] == "bytes=0-0" for r in server.requests)
    assert (dest / "manifest.json").is_file()
    shutil.rmtree(dest)
