"""The whole fetch: reuse check, download, extract, verify, lay out the repository, publish."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilotfleet_fetch import archive
from pilotfleet_fetch.download import Downloaded, DownloadSettings, download, ensure_space
from pilotfleet_fetch.errors import BadCheckpoint, FetchError
from pilotfleet_fetch.progress import Progress
from pilotfleet_fetch.publish import build_manifest, publish, reusable, staging_dir
from pilotfleet_fetch.repository import (
    TOKENIZER_FILES,
    RepositorySpec,
    place_tokenizer,
    write_ft_repository,
    write_hf_repository,
    write_tokenizer_model,
)
from pilotfleet_fetch.sources import Credentials, ResolvedSource, canonical, resolve
from pilotfleet_fetch.verify import verify_ft, verify_hf

log = logging.getLogger(__name__)

BACKENDS = ("fastertransformer", "python")


@dataclass(frozen=True)
class FetchRequest:
    """Everything `pilotfleet fetch` was asked to do."""

    source: str
    dest: Path
    sha256: str | None = None
    revision: str | None = None
    backend: str = "fastertransformer"
    repository: RepositorySpec = field(default_factory=RepositorySpec)
    tokenizer: str | None = None
    tokenizer_sha256: str | None = None

    def key(self) -> dict[str, Any]:
        """What makes two fetches the same: a published copy with this key is reused."""
        spec = self.repository
        return {
            "source": canonical(self.source),
            "revision": self.revision,
            "sha256": self.sha256.lower() if self.sha256 else None,
            "backend": self.backend,
            "tensor_para_size": spec.tp,
            "model_name": spec.model_name,
            "serve_path": str(spec.serve_path),
            "max_seq_len": spec.max_seq_len,
            "decoupled": spec.decoupled,
            "dtype": spec.dtype,
            "tokenizer_model": spec.tokenizer_model,
            "tokenizer": canonical(self.tokenizer) if self.tokenizer else None,
            "tokenizer_sha256": self.tokenizer_sha256,
        }


@dataclass(frozen=True)
class FetchResult:
    """What happened."""

    dest: Path
    reused: bool
    transferred: int
    """Bytes received over the network by this run."""
    manifest: dict[str, Any]


def _fetch_all(
    resolved: ResolvedSource, into: Path, settings: DownloadSettings, progress: Progress
) -> list[Downloaded]:
    return [download(f, into / f.path, settings, progress) for f in resolved.files]


def _tree(resolved: ResolvedSource, downloads: list[Downloaded], download_dir: Path, work: Path) -> Path:
    """The files to verify: an archive's extracted contents, or the downloaded files themselves."""
    if not (resolved.single and archive.kind_of(downloads[0].path) is not archive.Kind.PLAIN):
        return download_dir
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    ensure_space(work, downloads[0].size, "extracting the archive")
    archive.extract(downloads[0].path, tree)
    # The archive is no longer needed once extracted; free its space before the repository is built.
    downloads[0].path.unlink()
    return tree


def _tokenizer_files(
    req: FetchRequest,
    creds: Credentials,
    work: Path,
    settings: DownloadSettings,
    progress: Progress,
    tree: Path,
) -> list[Path]:
    if req.tokenizer is None:
        return [p for p in sorted(tree.rglob("*")) if p.name in TOKENIZER_FILES and p.is_file()]
    resolved = resolve(req.tokenizer, revision=None, sha256=req.tokenizer_sha256, creds=creds)
    got = _fetch_all(resolved, work / "tokenizer", settings, progress)
    if resolved.single and archive.kind_of(got[0].path) is not archive.Kind.PLAIN:
        out = work / "tokenizer-tree"
        shutil.rmtree(out, ignore_errors=True)
        return [out / p for p in archive.extract(got[0].path, out)]
    return [d.path for d in got]


def _write_tokenizer_model(repo: Path, tokenizer_dir: Path | None, spec: RepositorySpec) -> None:
    """Add the Triton model that serves tokenizer.json, when asked for; without the file that is an error."""
    if spec.tokenizer_model is None:
        return
    if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").is_file():
        raise BadCheckpoint(
            f"no tokenizer.json in the weights for Triton model {spec.tokenizer_model!r}; "
            "name the tokenizer files with --tokenizer"
        )
    served = spec.serve_path / tokenizer_dir.relative_to(repo) / "tokenizer.json"
    write_tokenizer_model(repo, spec.tokenizer_model, served)


def run_fetch(
    req: FetchRequest, creds: Credentials, settings: DownloadSettings, progress: Progress
) -> FetchResult:
    """Fetch, verify and publish `req`; reuse a verified copy already at `req.dest`.

    Raises a FetchError subclass on failure; `req.dest` is then untouched (no partial model is ever there).
    """
    if req.backend not in BACKENDS:
        raise FetchError(f"unknown backend {req.backend!r}; one of {', '.join(BACKENDS)}")
    key = req.key()
    existing = reusable(req.dest, key)
    if existing is not None:
        log.info("%s already holds a verified copy of %s; nothing to download", req.dest, key["source"])
        return FetchResult(req.dest, True, 0, existing)
    work = staging_dir(req.dest)
    work.mkdir(parents=True, exist_ok=True)
    try:
        resolved = resolve(req.source, revision=req.revision, sha256=req.sha256, creds=creds)
        sizes = [f.size for f in resolved.files]
        total = None if None in sizes else sum(s or 0 for s in sizes)
        progress.begin(resolved.source, total)
        download_dir = work / "download"
        downloads = _fetch_all(resolved, download_dir, settings, progress)
        tree = _tree(resolved, downloads, download_dir, work)
        repo = work / "repo"
        shutil.rmtree(repo, ignore_errors=True)
        tokenizer = _tokenizer_files(req, creds, work, settings, progress, tree)
        progress.report(finished=True)
        extra: dict[str, Any] = {"backend": req.backend, "tensor_para_size": req.repository.tp}
        if req.backend == "fastertransformer":
            ckpt = verify_ft(tree, req.repository.tp)
        else:
            checkpoint = verify_hf(tree)
        # Tokenizer files are copied first: the checkpoint (which may hold them) moves next.
        tokenizer_dir = place_tokenizer(tokenizer, repo / req.repository.model_name)
        extra["tokenizer"] = str(tokenizer_dir.relative_to(repo)) if tokenizer_dir else None
        _write_tokenizer_model(repo, tokenizer_dir, req.repository)
        if req.backend == "fastertransformer":
            write_ft_repository(repo, ckpt, req.repository)
        else:
            write_hf_repository(repo, checkpoint, req.repository)
        manifest = build_manifest(
            repo,
            key,
            [{"path": d.path.name, "size": d.size, "sha256": d.sha256} for d in downloads],
            {"resolved_revision": resolved.revision, **extra},
        )
        publish(repo, req.dest, manifest)
    except FetchError as exc:
        if exc.permanent:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.info("keeping %s so the next attempt resumes", work)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return FetchResult(req.dest, False, sum(d.transferred for d in downloads), manifest)
