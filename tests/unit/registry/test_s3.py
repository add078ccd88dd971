"""The registry on S3-compatible storage, against moto's S3 server on loopback, with the real registry code."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from registry import CorruptArtifact, PublishConflict, Registry, StagedFile, StorageBackend
from registry.backend import PrepareCommit
from registry.paths import CURRENT_FILE

from .helpers import expert_tensors, publish_task, router_tensors

pytest.importorskip("boto3")
pytest.importorskip("moto")

from botocore.exceptions import ClientError

from registry.s3 import S3Backend, parse_s3_url
from registry.verify import verify_registry

PREFIX = "care/registry"


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"care-{uuid.uuid4().hex[:12]}"
    _client(s3_endpoint).create_bucket(Bucket=name)
    return name


def _client(s3_endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def make_backend(s3_endpoint: str, bucket: str, tmp_path: Path) -> Callable[..., S3Backend]:
    def make(cache: str = "cache", cls: type[S3Backend] = S3Backend, **kwargs: Any) -> S3Backend:
        return cls.from_url(f"s3://{bucket}/{PREFIX}", cache_dir=tmp_path / cache, endpoint_url=s3_endpoint, **kwargs)

    return make


def _keys(backend: S3Backend) -> list[str]:
    listed = backend.client.list_objects_v2(Bucket=backend.bucket, Prefix=f"{PREFIX}/")
    return sorted(str(item["Key"])[len(PREFIX) + 1 :] for item in listed.get("Contents", []))


def _count_gets(backend: S3Backend) -> list[str]:
    """Record the key of every GetObject the backend's client sends from now on."""
    keys: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        keys.append(str(params["Key"])[len(PREFIX) + 1 :])

    backend.client.meta.events.register("provide-client-params.s3.GetObject", record)
    return keys


def test_urls_split_into_bucket_and_prefix() -> None:
    assert parse_s3_url("s3://care/registry/") == ("care", "registry")
    assert parse_s3_url("s3://care") == ("care", "")
    for bad in ("care/registry", "http://care/registry", "s3:///registry", "s3://care/x?versionId=1"):
        with pytest.raises(ValueError, match="s3://bucket/prefix"):
            parse_s3_url(bad)


def test_the_server_honours_conditional_writes(make_backend: Callable[..., S3Backend]) -> None:
    # What the publish protocol relies on: If-None-Match: * creates once, If-Match replaces only the ETag it names.
    client, bucket = (backend := make_backend()).client, backend.bucket
    first = client.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as created_twice:
        client.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert created_twice.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    client.put_object(Bucket=bucket, Key="k", Body=b"3", IfMatch=first["ETag"])
    with pytest.raises(ClientError) as stale:
        client.put_object(Bucket=bucket, Key="k", Body=b"4", IfMatch=first["ETag"])
    assert stale.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"3"


def test_versions_published_to_s3_read_back_through_a_fresh_server(make_backend: Callable[..., S3Backend]) -> None:
    backend = make_backend("publisher")
    assert isinstance(backend, StorageBackend)
    publisher = Registry(backend)
    assert publisher.current_version() is None and publisher.list_versions() == []
    v1 = publish_task(publisher, None, "t1", seed=1)
    v2 = publish_task(publisher, v1, "t2", seed=2)
    v3 = publish_task(publisher, v2, "t3", seed=3)

    # Only published objects remain: no staging object of a finished publish, CURRENT names the last version.
    assert not [key for key in _keys(backend) if key.startswith(".")]
    assert backend.client.get_object(Bucket=backend.bucket, Key=f"{PREFIX}/{CURRENT_FILE}")["Body"].read() == b"3\n"

    server = Registry(make_backend("server"))  # another host: an empty cache
    assert server.current_version() == 3
    assert server.list_versions() == [1, 2, 3]
    manifest = server.latest_manifest()
    assert manifest == v3
    server.verify(manifest)
    experts = manifest.task("t2").files["experts"]
    routers = manifest.task("t2").files["routers"]
    got, want = server.open_tensors(experts), expert_tensors(2)
    assert set(got) == set(want) and all(torch.equal(got[key], want[key]) for key in want)
    assert torch.equal(server.load_tensors(routers)["router.0.gate.weight"], router_tensors(2)["router.0.gate.weight"])
    assert server.read_metadata(experts) == {"task_id": "t2"}
    state = server.load_trainer_state(3)
    assert state is not None and state.metadata == {"kind": "stats"}
    # The memory-mapped files are real local files in the server's cache.
    assert server.backend.local_path(experts).is_file()
    assert str(server.backend.local_path(experts)).startswith(str(server.backend.cache_root))


def test_a_corrupted_object_is_refused_with_the_registrys_error(make_backend: Callable[..., S3Backend]) -> None:
    publisher = Registry(make_backend("publisher"))
    v1 = publish_task(publisher, None, "t1", seed=1)
    experts = v1.task("t1").files["experts"]
    routers = v1.task("t1").files["routers"]
    client, bucket = publisher.backend.client, publisher.backend.bucket
    original = client.get_object(Bucket=bucket, Key=f"{PREFIX}/{experts}")
    damaged = bytearray(original["Body"].read())
    damaged[-1] ^= 0xFF

    # Bytes replaced in the store (the metadata of the new object no longer matches): refused at download.
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{experts}", Body=bytes(damaged), Metadata=original["Metadata"])
    server = Registry(make_backend("server"))
    with pytest.raises(CorruptArtifact, match=r"tasks/0001-t1/experts\.safetensors .*altered or damaged") as caught:
        server.verify(server.load_manifest(1))
    assert caught.value.relpath == experts
    assert not (server.backend.cache_root / experts).exists()  # nothing unverified enters the cache

    # Bytes and their metadata both forged: the download passes, the manifest's sha256 does not.
    forged = bytes(damaged)
    client.put_object(
        Bucket=bucket, Key=f"{PREFIX}/{routers}", Body=forged, Metadata={"sha256": hashlib.sha256(forged).hexdigest()}
    )
    other = Registry(make_backend("other"))
    with pytest.raises(CorruptArtifact, match=r"routers\.safetensors .*manifest records") as forged_caught:
        other.verify(other.load_manifest(1), [routers])
    assert forged_caught.value.relpath == routers


def test_the_read_through_cache_serves_second_reads(make_backend: Callable[..., S3Backend]) -> None:
    publisher = Registry(make_backend("publisher"))
    v1 = publish_task(publisher, None, "t1", seed=1)
    backend = make_backend("server")
    gets = _count_gets(backend)
    server = Registry(backend)
    manifest = server.load_manifest(1)
    server.verify(manifest)
    first = sorted(key for key in gets if key != CURRENT_FILE)
    assert first == sorted([manifest.name, *v1.files])
    assert backend.downloads == len(first)

    gets.clear()
    server.verify(server.load_manifest(1))
    for relpath in v1.files:
        server.load_tensors(relpath)
        server.open_tensors(relpath)
    assert set(gets) == {CURRENT_FILE}  # CURRENT is always read from the store, nothing else twice
    assert backend.downloads == len(first)

    # A second process on the same host shares the cache directory.
    neighbour = make_backend("server")
    neighbour_gets = _count_gets(neighbour)
    Registry(neighbour).verify(Registry(neighbour).load_manifest(1))
    assert set(neighbour_gets) == {CURRENT_FILE} and neighbour.downloads == 0


class _RacingBackend(S3Backend):
    """Waits at a barrier after ``prepare`` passed, so two publishers both decide to publish the same version."""

    barrier: threading.Barrier

    def commit_version(self, version: int, *, prepare: PrepareCommit, manifest: StagedFile, timeout_s: float) -> None:
        def prepare_then_wait() -> Sequence[StagedFile]:
            files = prepare()
            self.barrier.wait(timeout=30)
            return files

        super().commit_version(version, prepare=prepare_then_wait, manifest=manifest, timeout_s=timeout_s)


def test_two_publishers_racing_for_one_version_exactly_one_wins(make_backend: Callable[..., S3Backend]) -> None:
    v1 = publish_task(Registry(make_backend("seed")), None, "t1", seed=1)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def publish(name: str) -> None:
        backend = make_backend(name, cls=_RacingBackend)
        backend.barrier = barrier
        registry = Registry(backend)
        try:
            outcomes[name] = publish_task(registry, registry.load_manifest(1), f"{name}-task", seed=len(name))
        except Exception as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=publish, args=(name,)) for name in ("a", "bb")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)

    winners = [name for name, outcome in outcomes.items() if not isinstance(outcome, Exception)]
    losers = [outcome for outcome in outcomes.values() if isinstance(outcome, Exception)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert isinstance(losers[0], PublishConflict)
    assert (losers[0].expected, losers[0].current) == (1, 2)

    reader = Registry(make_backend("reader"))
    assert reader.current_version() == 2
    v2 = reader.load_manifest(2)
    assert v2 == outcomes[winners[0]]
    assert [task.task_id for task in v2.tasks] == ["t1", f"{winners[0]}-task"]
    reader.verify(v2)  # the winner's files, none of the loser's bytes
    assert not [key for key in _keys(reader.backend) if key.startswith(".")]
    # The loser rebuilds on the winner's version and publishes the next one.
    loser = "bb" if winners == ["a"] else "a"
    v3 = publish_task(Registry(make_backend(loser)), v2, f"{loser}-task", seed=len(loser))
    assert v3.version == 3 and v3.parent == 2 and v1.tasks[0] == v3.tasks[0]


class _DiesAfterClaim(S3Backend):
    """A publisher that stops right after claiming its version (before copying its files and moving CURRENT)."""

    def _copy(self, source_key: str, relpath: str) -> None:
        raise ConnectionError("publisher lost")


def test_a_version_claimed_by_a_publisher_that_died_is_finished_by_the_next(
    make_backend: Callable[..., S3Backend],
) -> None:
    v1 = publish_task(Registry(make_backend("seed")), None, "t1", seed=1)
    with pytest.raises(ConnectionError):
        publish_task(Registry(make_backend("dead", cls=_DiesAfterClaim)), v1, "t2", seed=2)
    reader = Registry(make_backend("reader"))
    assert reader.current_version() == 1  # claimed, not visible
    assert any(key.startswith(".staging/") for key in _keys(reader.backend))

    # The next publisher loses the claim of version 2, finishes it as claimed, and learns it must rebuild on it.
    with pytest.raises(PublishConflict) as lost:
        publish_task(Registry(make_backend("next")), v1, "t3", seed=3)
    assert (lost.value.expected, lost.value.current) == (1, 2)
    v2 = reader.load_manifest(2)
    assert [task.task_id for task in v2.tasks] == ["t1", "t2"]
    Registry(make_backend("fresh")).verify(v2)
    v3 = publish_task(Registry(make_backend("next")), v2, "t3", seed=3)
    assert v3.version == 3
    # Once nothing is claimed and unfinished, the dead publisher's staging objects can be swept.
    backend = make_backend("sweeper")
    assert backend.sweep_staging(older_than_s=0.0)
    assert not [key for key in _keys(backend) if key.startswith(".")]


def test_verify_registry_downloads_and_checks_every_object(make_backend: Callable[..., S3Backend]) -> None:
    publisher = Registry(make_backend("publisher"))
    v2 = publish_task(publisher, publish_task(publisher, None, "t1", seed=1), "t2", seed=2)
    report = verify_registry(make_backend("verify-1"))
    assert report.ok and (report.current, report.versions) == (2, 2)
    assert report.files == len(v2.files) + 3  # version 2's files, version 1's classifier, two trainer states

    classifier = v2.version_files["classifier"]
    client, bucket = publisher.backend.client, publisher.backend.bucket
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{classifier}", Body=b"not a safetensors file")
    report = verify_registry(make_backend("verify-2"))
    assert [problem.relpath for problem in report.problems] == [classifier]
