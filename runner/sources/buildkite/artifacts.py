"""A job's collected outputs uploaded as its Buildkite artifacts, as buildkite-agent uploads a
step's `artifact_paths` once its command has ended.

The outputs are the files the agent collected into the job's directory (`outputs/<path>`) when it
ended, each with the digest its provenance record names. They are created on Buildkite in batches
(`POST /jobs/{id}/artifacts`), each sent to the storage its upload instructions name as a form
upload, then marked `finished` or `error` (`PUT /jobs/{id}/artifacts`). Every request is bounded
by a timeout and retried as its endpoint's policy says; an artifact that cannot be read or sent is
one line in the job's log and its state `error`, never a reason for the job not to finish.

The files are opened beneath the job's directory one name at a time, none through a link, and a
file whose digest is no longer the record's is not uploaded: what Buildkite gets is what was
recorded.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import mimetypes
import os
import secrets
import stat
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from runner.job import OutputFile
from runner.logging_setup import get_logger
from runner.metrics import ci_request
from runner.provenance.outputs import matches
from runner.sources.buildkite import protocol
from runner.sources.buildkite.client import USER_AGENT, AgentSession, ApiError
from runner.sources.buildkite.protocol import Artifact, UploadInstructions

log = get_logger("runner.sources.buildkite")

READ_BYTES = 1024 * 1024
# Storage uploads under way at once (buildkite-agent's default upload concurrency is 10; a login
# node's uplink is shared with everyone's jobs).
UPLOADS_AT_ONCE = 4
# A storage upload may take its request timeout plus a second per MiB: slow, but never forever.
UPLOAD_BYTES_PER_SECOND = 1024 * 1024
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class ArtifactResult:
    """How one output ended: `finished`, or `error` with why (for the job's log)."""

    path: str
    state: str
    why: str | None = None

    @property
    def line(self) -> str | None:
        return None if self.why is None else f"hpc-runner: artifact {self.path} not uploaded: {self.why}\n"


class Unreadable(Exception):
    """A collected output that cannot be uploaded as recorded."""


class UploadFailed(Exception):
    """The storage did not take a file, after every try."""


def open_beneath(root: Path, relative: str) -> int:
    """A descriptor of the regular file `relative` under `root`, no component followed if a link."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise Unreadable("its path is not a plain relative path")
    fd = os.open(root, _DIRECTORY_FLAGS)
    try:
        for part in parts[:-1]:
            inner = os.open(part, _DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
        file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Unreadable("a link stands in its path") from None
        raise Unreadable(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise Unreadable("it is not a regular file")
    return file_fd


def describe(root: Path, output: OutputFile, patterns: Sequence[str]) -> Artifact:
    """The artifact of one collected output: its digests read from the collected copy, which must
    still be what the record says."""
    fd = open_beneath(root, output.path)
    sha1, sha256, size = hashlib.sha1(), hashlib.sha256(), 0
    try:
        while chunk := os.read(fd, READ_BYTES):
            sha1.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
    except OSError as exc:
        raise Unreadable(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if sha256.hexdigest() != output.sha256 or size != output.size:
        raise Unreadable("its content is no longer what the job's record says")
    if size > protocol.MAX_FORM_UPLOAD_BYTES:
        raise Unreadable(f"{size} bytes is more than Buildkite's storage takes in one upload")
    glob = next((p for p in patterns if matches(p, output.path)), "")
    content_type = mimetypes.guess_type(output.path, strict=False)[0] or protocol.FALLBACK_CONTENT_TYPE
    return Artifact(path=output.path, absolute_path=str(root / output.path), glob_path=glob,
                    file_size=size, sha1sum=sha1.hexdigest(), sha256sum=sha256.hexdigest(),
                    content_type=content_type)


class Uploader:
    """Uploads one job's outputs with the job's token."""

    def __init__(self, session: AgentSession, job_id: str, job_token: str) -> None:
        self._session = session
        self._job_id = job_id
        self._token = job_token
        self._limit = asyncio.Semaphore(UPLOADS_AT_ONCE)

    async def upload(self, outputs: Sequence[OutputFile], root: Path,
                     patterns: Sequence[str] = ()) -> list[ArtifactResult]:
        """Every output's result, in the order given."""
        results: dict[str, ArtifactResult] = {}
        described: list[Artifact] = []
        for output in outputs:
            try:
                described.append(await asyncio.to_thread(describe, root, output, patterns))
            except Unreadable as exc:
                results[output.path] = ArtifactResult(output.path, "error", str(exc))
        for start in range(0, len(described), protocol.ARTIFACT_BATCH_SIZE):
            batch = described[start:start + protocol.ARTIFACT_BATCH_SIZE]
            for result in await self._batch(batch, root):
                results[result.path] = result
        return [results[o.path] for o in outputs]

    async def _batch(self, batch: list[Artifact], root: Path) -> list[ArtifactResult]:
        # One id per batch, kept across its retries: Buildkite answers a repeated create with the
        # artifacts it already made.
        request = protocol.create_artifacts(self._job_id, str(uuid.uuid4()), batch)
        try:
            answer = await self._session.call(request, job_token=self._token)
            planned = protocol.parse_artifact_batch(answer.data, len(batch))
        except (ApiError, protocol.ProtocolError) as exc:
            log.warning("Buildkite did not create the job's artifacts", job=self._job_id, error=str(exc))
            return [ArtifactResult(a.path, "error", f"Buildkite did not create it: {exc}") for a in batch]
        results = await asyncio.gather(*(self._one(artifact, instructions, root)
                                         for artifact, (_, instructions) in zip(batch, planned, strict=True)))
        states = [(artifact_id, result.state)
                  for (artifact_id, _), result in zip(planned, results, strict=True)]
        try:
            await self._session.call(protocol.update_artifacts(self._job_id, states), job_token=self._token)
        except ApiError as exc:
            log.warning("Buildkite did not take the artifacts' states", job=self._job_id, error=str(exc))
            why = f"uploaded, but Buildkite did not record it as finished: {exc}"
            return [r if r.why else ArtifactResult(r.path, "error", why) for r in results]
        return list(results)

    async def _one(self, artifact: Artifact, instructions: UploadInstructions, root: Path) -> ArtifactResult:
        async with self._limit:
            try:
                await self._store(artifact, instructions, root)
            except (Unreadable, UploadFailed) as exc:
                log.warning("artifact not uploaded", job=self._job_id, path=artifact.path, error=str(exc))
                return ArtifactResult(artifact.path, "error", str(exc))
            except Exception as exc:
                # Not a failure the retry rules know (a request aiohttp refuses to send): this
                # artifact fails, the others and the job's finish go on.
                log.exception("artifact not uploaded", job=self._job_id, path=artifact.path)
                return ArtifactResult(artifact.path, "error", f"{type(exc).__name__}: {exc}")
        log.info("artifact uploaded", job=self._job_id, path=artifact.path, bytes=artifact.file_size)
        return ArtifactResult(artifact.path, "finished")

    async def _store(self, artifact: Artifact, instructions: UploadInstructions, root: Path) -> None:
        form = protocol.upload_form(instructions, artifact, secrets.token_hex(30))
        policy = self._session.policy("artifact_upload")
        timeout = aiohttp.ClientTimeout(total=self._session.timeout_s
                                        + artifact.file_size / UPLOAD_BYTES_PER_SECOND)
        attempt = 0
        while True:
            attempt += 1
            status, message = await self._send(form, artifact, root, timeout)
            if status is not None and 200 <= status < 300:
                return
            delay = protocol.next_delay(policy, attempt, status, rng=self._session.rng)
            where = f"storage answered HTTP {status}" if status is not None else "storage did not answer"
            if delay is None:
                raise UploadFailed(f"{where}: {message} (after {attempt} attempt(s))")
            log.info("artifact upload failed; retrying", job=self._job_id, path=artifact.path, status=status,
                     error=message, attempt=attempt, retry_in=round(delay, 2))
            await self._session.sleep(delay)

    async def _send(self, form: protocol.UploadForm, artifact: Artifact, root: Path,
                    timeout: aiohttp.ClientTimeout) -> tuple[int | None, str]:
        fd = await asyncio.to_thread(open_beneath, root, artifact.path)
        try:
            if os.fstat(fd).st_size != artifact.file_size:
                raise Unreadable("its size changed since it was recorded")
            # The storage is not Buildkite's API: no token and no Buildkite- headers go there.
            headers = {"Content-Type": form.content_type, "User-Agent": USER_AGENT,
                       "Content-Length": str(form.content_length(artifact.file_size))}
            try:
                async with self._session.http.request(form.method, form.url, headers=headers,
                                                      data=_body(form, fd, artifact.file_size),
                                                      timeout=timeout) as response:
                    raw = await response.read()
                    ci_request("buildkite", "artifact_upload", response.status)
                    return response.status, raw[:200].decode("utf-8", "replace").strip()
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                ci_request("buildkite", "artifact_upload", None)
                return None, str(exc) or type(exc).__name__
        finally:
            os.close(fd)


async def _body(form: protocol.UploadForm, fd: int, size: int) -> AsyncIterator[bytes]:
    yield form.head
    offset = 0
    while offset < size:
        chunk = await asyncio.to_thread(os.pread, fd, min(READ_BYTES, size - offset), offset)
        if not chunk:
            raise OSError(errno.EIO, "the file ended before its recorded size")
        offset += len(chunk)
        yield chunk
    yield form.tail
