"""Artifacts in the FAKE W&B backend (tests/fakes/wandb_server.py): the state and the GraphQL
answers for logging, resolving and downloading artifact versions. Not W&B: it keeps everything in
memory, checks no permissions, and answers only the operations listed here, in the shapes the real
client parses (the SDK validates answers with pydantic models; ``wandb-core``'s Go client
dereferences fields without checking, so a missing one is a crash, not an error).

Logging a version (``run.log_artifact``; observed with wandb 0.31.0, sent by ``wandb-core``):

1. ``CreateArtifact``: a new version in state ``PENDING`` of collection ENTITY/PROJECT/NAME, with
   the requested aliases kept aside. Answer: its id, state, and the collection's latest version.
2. ``CreateArtifactManifest`` (``includeUpload: false``): a manifest record for it.
3. ``CreateArtifactFiles``: one upload URL per file (``PUT /artifact-files/<id>/<name>``); the
   fake checks each upload against the MD5 the client declared (HTTP 400 on a mismatch, as a
   bucket checking ``Content-MD5`` would).
4. ``CreateArtifactManifest`` (``includeUpload: true``): the upload URL of ``wandb_manifest.json``
   (``PUT /artifact-manifests/<id>``).
5. ``CommitArtifact``: refused unless the manifest and every file it lists were uploaded; then the
   version gets the next ``versionIndex`` (``vN``), its requested aliases, and ``latest`` (the
   server moves ``latest`` to the newest version by itself, as W&B does). An alias names one
   version of a collection: attaching it moves it.
6. ``UseArtifact``: records that a run used (or produced) a version.
7. ``ArtifactByID`` (the SDK, in ``wait()``): the committed version with its ``versionIndex``.

Resolving and downloading (``wandb.Api().artifact("E/P/NAME:ALIAS")``, ``run.use_artifact``):

- ``ArtifactMembershipByName`` with ``NAME:ALIAS`` or ``NAME:vN``; only committed versions of a
  collection that exists are found: anything else answers ``artifactCollectionMembership: null``
  (the SDK then raises ``ValueError: artifact membership ... not found``).
- ``ArtifactType`` (wandb-core, before logging) and ``ProjectArtifactType``.
- ``FetchArtifactManifest``: ``currentManifest.file.directUrl`` -> ``GET /artifact-manifests/<id>``.
- ``GetArtifactMembershipFileUrls``: one ``directUrl`` per file ->
  ``GET /artifact-files/<id>/<name>``, served from the version's own uploads.
- ``ProjectArtifacts``: the committed versions of a collection (``Api().artifacts(type, name)``).
- ``ProjectArtifactCollection``: a collection of a type, or null (``Api().artifact_collection_exists``).

A project exists once an artifact was logged in it; unknown projects, collections, types and
versions answer null where W&B does, never an error.

Tests reach in through ``FakeArtifacts``: ``versions(entity, project, name)``,
``find(entity, project, "NAME:ALIAS")``, ``files`` of a version (name -> bytes as received), and
``corrupt(entity, project, "NAME:ALIAS", path)``, after which that file of that version is served
with its first byte flipped (the manifest still lists the original digest).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import quote

ARTIFACT_OPERATIONS = (
    "ArtifactType", "ProjectArtifactType", "CreateArtifact", "CreateArtifactManifest",
    "CreateArtifactFiles", "CommitArtifact", "UseArtifact", "ArtifactByID",
    "ArtifactMembershipByName", "FetchArtifactManifest", "GetArtifactMembershipFileUrls",
    "ProjectArtifacts", "ProjectArtifactCollection",
)


def _gql_id(kind: str, number: int) -> str:
    """W&B ids are base64 of ``Kind:number``; the client decodes some of them."""
    return base64.b64encode(f"{kind}:{number}".encode()).decode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class ArtifactVersion:
    """One version of a collection, as the fake holds it."""

    id: str
    entity: str
    project: str
    collection: str
    type: str
    digest: str
    metadata: str | None
    description: str | None
    requested_aliases: list[str]
    run_name: str | None
    created_at: str = field(default_factory=_now)
    state: str = "PENDING"
    version_index: int | None = None
    manifest_id: str | None = None
    manifest: bytes | None = None  # wandb_manifest.json as uploaded
    declared_manifest_md5: str | None = None
    declared_md5: dict[str, str] = field(default_factory=dict)  # name -> base64 MD5 the client declared
    files: dict[str, bytes] = field(default_factory=dict)  # name -> bytes as received
    corrupted: set[str] = field(default_factory=set)
    used_by: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return f"v{self.version_index}"

    def manifest_entries(self) -> dict[str, Any]:
        return json.loads(self.manifest)["contents"] if self.manifest else {}

    def served(self, name: str) -> bytes:
        data = self.files[name]
        return bytes([data[0] ^ 0xFF]) + data[1:] if name in self.corrupted and data else data


@dataclass
class Collection:
    entity: str
    project: str
    name: str
    type: str
    versions: list[ArtifactVersion] = field(default_factory=list)
    aliases: dict[str, ArtifactVersion] = field(default_factory=dict)

    def committed(self) -> list[ArtifactVersion]:
        return sorted((v for v in self.versions if v.state == "COMMITTED"), key=lambda v: v.version_index)

    def aliases_of(self, version: ArtifactVersion) -> list[str]:
        return [alias for alias, held in self.aliases.items() if held is version]


class FakeArtifacts:
    """Artifact collections of the fake backend; ``url`` is where its files are served."""

    def __init__(self, url: str):
        self.url = url
        self.collections: dict[tuple[str, str, str], Collection] = {}
        self.by_id: dict[str, ArtifactVersion] = {}
        self._serial = 0
        self.log: Callable[[str], None] | None = None  # told of each commit and corruption

    # ---- for tests ------------------------------------------------------------------------
    def versions(self, entity: str, project: str, name: str) -> list[ArtifactVersion]:
        """Committed versions of ENTITY/PROJECT/NAME, oldest first ([] if there is none)."""
        collection = self.collections.get((entity, project, name))
        return collection.committed() if collection else []

    def aliases(self, entity: str, project: str, name: str) -> dict[str, str]:
        """alias -> version (``vN``) in ENTITY/PROJECT/NAME."""
        collection = self.collections.get((entity, project, name))
        return {a: v.version for a, v in collection.aliases.items()} if collection else {}

    def find(self, entity: str, project: str, name_and_alias: str) -> ArtifactVersion | None:
        name, _, alias = name_and_alias.partition(":")
        collection = self.collections.get((entity, project, name))
        if collection is None:
            return None
        if re.fullmatch(r"v\d+", alias or ""):
            return next((v for v in collection.committed() if v.version == alias), None)
        return collection.aliases.get(alias or "latest")

    def corrupt(self, entity: str, project: str, name_and_alias: str, path: str) -> ArtifactVersion:
        """Serve file ``path`` of that version with its first byte flipped from now on."""
        version = self.find(entity, project, name_and_alias)
        if version is None or path not in version.files:
            raise KeyError(f"no file {path!r} in {entity}/{project}/{name_and_alias}")
        version.corrupted.add(path)
        if self.log:
            self.log(f"corrupting {entity}/{project}/{version.collection}:{version.version} {path}")
        return version

    def describe(self) -> dict[str, Any]:
        """Every collection: its type, aliases and committed versions with their files' SHA-256."""
        return {f"{c.entity}/{c.project}/{c.name}": {
            "type": c.type, "aliases": {a: v.version for a, v in c.aliases.items()},
            "versions": {v.version: {"metadata": json.loads(v.metadata or "null"),
                                     "files": {n: hashlib.sha256(d).hexdigest() for n, d in sorted(v.files.items())},
                                     "corrupted": sorted(v.corrupted)} for v in c.committed()}}
            for c in self.collections.values()}

    # ---- shapes ---------------------------------------------------------------------------
    def _project(self, entity: str, project: str) -> dict[str, Any]:
        return {"id": _gql_id("Project", abs(hash((entity, project))) % 10**6),
                "internalId": _gql_id("Project", 1), "name": project, "entity": {"name": entity}}

    def _collection_info(self, v: ArtifactVersion) -> dict[str, Any]:
        return {"__typename": "ArtifactSequence", "name": v.collection,
                "project": self._project(v.entity, v.project)}

    def _alias_list(self, v: ArtifactVersion) -> list[dict[str, Any]]:
        collection = self.collections[(v.entity, v.project, v.collection)]
        return [{"__typename": "ArtifactAlias", "id": _gql_id("ArtifactAlias", i), "alias": alias,
                 "artifactCollection": self._collection_info(v)}
                for i, alias in enumerate(collection.aliases_of(v))]

    def artifact(self, v: ArtifactVersion) -> dict[str, Any]:
        """An ``Artifact`` node with every field of the SDK's ``ArtifactFragment``."""
        entries = v.manifest_entries()
        return {
            "__typename": "Artifact", "id": v.id, "artifactSequence": self._collection_info(v),
            "versionIndex": v.version_index, "artifactType": {"name": v.type},
            "description": v.description, "metadata": v.metadata, "ttlDurationSeconds": -2,
            "ttlIsInherited": True, "tags": [], "historyStep": None, "state": v.state,
            "size": sum(int(e.get("size") or 0) for e in entries.values()), "digest": v.digest,
            "digestAlgorithm": "MANIFEST_MD5", "commitHash": None, "fileCount": len(entries),
            "createdAt": v.created_at, "updatedAt": v.created_at, "aliases": self._alias_list(v),
        }

    def _membership(self, v: ArtifactVersion) -> dict[str, Any]:
        return {"__typename": "ArtifactCollectionMembership", "id": _gql_id("Membership", 0),
                "versionIndex": v.version_index, "createdAt": v.created_at,
                "aliases": self._alias_list(v), "artifactCollection": self._collection_info(v),
                "artifact": self.artifact(v)}

    def _file_edge(self, v: ArtifactVersion, name: str) -> dict[str, Any]:
        return {"node": {"__typename": "File", "name": name,
                         "directUrl": f"{self.url}/artifact-files/{quote(v.id, safe='')}/{quote(name)}"}}

    # ---- GraphQL --------------------------------------------------------------------------
    def graphql(self, op: str, v: dict[str, Any]) -> dict[str, Any]:
        return getattr(self, f"_op_{op}")(v)

    def _op_ArtifactType(self, v: dict[str, Any]) -> dict[str, Any]:
        found = self.find(v.get("entity") or "", v.get("project") or "", v["name"])
        if found is None:
            return {"project": None}
        return {"project": {"artifact": {"artifactType": {"name": found.type}}}}

    def _op_ProjectArtifactType(self, v: dict[str, Any]) -> dict[str, Any]:
        known = any(c.type == v["type"] for c in self.collections.values()
                    if (c.entity, c.project) == (v["entity"], v["project"]))
        return {"project": {"artifactType": {"__typename": "ArtifactType", "id": _gql_id("ArtifactType", 1),
                                             "name": v["type"], "description": None,
                                             "createdAt": _now()} if known else None}}

    def _op_CreateArtifact(self, v: dict[str, Any]) -> dict[str, Any]:
        spec = v["input"]
        for required in ("entityName", "projectName", "artifactTypeName", "artifactCollectionName", "digest"):
            if not spec.get(required):
                raise ValueError(f"CreateArtifact without {required}")
        key = (spec["entityName"], spec["projectName"], spec["artifactCollectionName"])
        collection = self.collections.setdefault(key, Collection(*key, spec["artifactTypeName"]))
        if collection.type != spec["artifactTypeName"]:
            raise ValueError(f"artifact {key} has type {collection.type}, not {spec['artifactTypeName']}")
        latest = collection.committed()[-1] if collection.committed() else None
        self._serial += 1
        version = ArtifactVersion(
            id=_gql_id("Artifact", self._serial), entity=key[0], project=key[1], collection=key[2],
            type=collection.type, digest=spec["digest"], metadata=spec.get("metadata"),
            description=spec.get("description"), run_name=spec.get("runName"),
            requested_aliases=[a["alias"] for a in spec.get("aliases") or []])
        collection.versions.append(version)
        self.by_id[version.id] = version
        return {"createArtifact": {"artifact": {
            "id": version.id, "state": version.state,
            "artifactSequence": {"latestArtifact": {"id": latest.id} if latest else None}}}}

    def _op_CreateArtifactManifest(self, v: dict[str, Any]) -> dict[str, Any]:
        version = self.by_id[v["artifactID"]]
        version.manifest_id = version.manifest_id or _gql_id("ArtifactManifest", self._serial)
        if v.get("includeUpload"):
            version.declared_manifest_md5 = v["digest"]
        upload = {"uploadUrl": f"{self.url}/artifact-manifests/{quote(version.id, safe='')}", "uploadHeaders": []} \
            if v.get("includeUpload") else {"uploadUrl": None, "uploadHeaders": []}
        return {"createArtifactManifest": {"artifactManifest": {
            "id": version.manifest_id, "file": {"id": _gql_id("File", self._serial), **upload}}}}

    def _op_CreateArtifactFiles(self, v: dict[str, Any]) -> dict[str, Any]:
        edges = []
        for spec in v["input"]["artifactFiles"]:
            version = self.by_id[spec["artifactID"]]
            if version.state != "PENDING":
                raise ValueError(f"files added to {version.state} artifact {version.id}")
            version.declared_md5[spec["name"]] = spec["md5"]
            edges.append({"node": {
                "id": _gql_id("File", len(version.declared_md5)), "name": spec["name"],
                "displayName": spec["name"].rsplit("/", 1)[-1],
                "uploadUrl": f"{self.url}/artifact-files/{quote(version.id, safe='')}/{quote(spec['name'])}",
                "uploadHeaders": [], "storagePath": None, "uploadMultipartUrls": None,
                "artifact": {"id": version.id}}})
        return {"createArtifactFiles": {"files": {"edges": edges}}}

    def _op_CommitArtifact(self, v: dict[str, Any]) -> dict[str, Any]:
        version = self.by_id[v["artifactID"]]
        if version.manifest is None:
            raise ValueError(f"commit of {version.id} before its manifest was uploaded")
        missing = [name for name in version.manifest_entries() if name not in version.files]
        if missing:
            raise ValueError(f"commit of {version.id} with files never uploaded: {missing}")
        collection = self.collections[(version.entity, version.project, version.collection)]
        if version.state != "COMMITTED":
            done = collection.committed()
            version.version_index = done[-1].version_index + 1 if done else 0
            version.state = "COMMITTED"
            for alias in [*version.requested_aliases, "latest"]:
                collection.aliases[alias] = version
            if self.log:
                self.log(f"committed {version.entity}/{version.project}/{version.collection}:"
                         f"{version.version} aliases {collection.aliases_of(version)} "
                         f"({len(version.files)} files)")
        return {"commitArtifact": {"artifact": {"id": version.id, "digest": version.digest}}}

    def _op_UseArtifact(self, v: dict[str, Any]) -> dict[str, Any]:
        spec = v.get("input") or v
        version = self.by_id[spec.get("artifactID") or spec.get("artifactId")]
        version.used_by.append(spec.get("runName") or "")
        return {"useArtifact": {"artifact": {
            "id": version.id, "digest": version.digest, "description": version.description,
            "state": version.state, "createdAt": version.created_at, "metadata": version.metadata}}}

    def _op_ArtifactByID(self, v: dict[str, Any]) -> dict[str, Any]:
        version = self.by_id.get(v["id"])
        return {"artifact": self.artifact(version) if version else None}

    def _op_ArtifactMembershipByName(self, v: dict[str, Any]) -> dict[str, Any]:
        version = self.find(v["entity"], v["project"], v["name"])
        if not self._project_exists(v["entity"], v["project"]):
            return {"project": None}
        return {"project": {"artifactCollectionMembership": self._membership(version) if version else None}}

    def _op_FetchArtifactManifest(self, v: dict[str, Any]) -> dict[str, Any]:
        version = self.by_id.get(v["id"])
        if version is None or version.manifest is None:
            return {"artifact": None}
        return {"artifact": {"currentManifest": {
            "file": {"directUrl": f"{self.url}/artifact-manifests/{quote(version.id, safe='')}"}}}}

    def _op_GetArtifactMembershipFileUrls(self, v: dict[str, Any]) -> dict[str, Any]:
        version = self.find(v["entity"], v["project"], f"{v['collection']}:{v['alias']}")
        if version is None:
            return {"project": None}
        names = sorted(version.manifest_entries())
        start = int(v.get("cursor") or 0)
        page = names[start:start + (v.get("perPage") or 50)]
        end = start + len(page)
        return {"project": {"artifactCollection": {"__typename": "ArtifactSequence", "artifactMembership": {
            "files": {"pageInfo": {"__typename": "PageInfo", "endCursor": str(end), "hasNextPage": end < len(names)},
                      "edges": [self._file_edge(version, name) for name in page]}}}}}

    def _op_ProjectArtifactCollection(self, v: dict[str, Any]) -> dict[str, Any]:
        if not self._project_exists(v["entity"], v["project"]):
            return {"project": None}
        c = self.collections.get((v["entity"], v["project"], v["name"]))
        if c is None or c.type != v["type"]:
            return {"project": {"artifactType": None}}
        created = c.versions[0].created_at
        return {"project": {"artifactType": {"artifactCollection": {
            "__typename": "ArtifactSequence", "id": _gql_id("ArtifactSequence", 1), "name": c.name,
            "description": None, "createdAt": created, "updatedAt": created,
            "project": self._project(c.entity, c.project), "type": {"name": c.type}, "tags": {"edges": []}}}}}

    def _project_exists(self, entity: str, project: str) -> bool:
        return any(c.entity == entity and c.project == project for c in self.collections.values())

    def _op_ProjectArtifacts(self, v: dict[str, Any]) -> dict[str, Any]:
        if not self._project_exists(v["entity"], v["project"]):
            return {"project": None}
        collection = self.collections.get((v["entity"], v["project"], v["collection"]))
        if collection is None or collection.type != v["type"]:
            return {"project": {"artifactType": None}}
        versions = collection.committed()
        return {"project": {"artifactType": {"artifactCollection": {"__typename": "ArtifactSequence", "artifacts": {
            "totalCount": len(versions),
            "pageInfo": {"__typename": "PageInfo", "endCursor": None, "hasNextPage": False},
            "edges": [{"version": version.version, "node": self.artifact(version)} for version in versions]}}}}}

    # ---- file routes ----------------------------------------------------------------------
    def put_file(self, artifact_id: str, name: str, data: bytes) -> tuple[int, str]:
        version = self.by_id.get(artifact_id)
        if version is None or name not in version.declared_md5:
            return 404, f"no upload was requested for {artifact_id}/{name}"
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        if md5 != version.declared_md5[name]:
            return 400, f"{name}: MD5 {md5} of the upload is not the declared {version.declared_md5[name]}"
        version.files[name] = data
        return 200, ""

    def put_manifest(self, artifact_id: str, data: bytes) -> tuple[int, str]:
        version = self.by_id.get(artifact_id)
        if version is None:
            return 404, f"no artifact {artifact_id}"
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        if md5 != version.declared_manifest_md5:
            return 400, f"wandb_manifest.json: MD5 {md5} is not the declared {version.declared_manifest_md5}"
        contents = json.loads(data).get("contents")
        if not isinstance(contents, dict):
            return 400, "wandb_manifest.json has no contents"
        version.manifest = data
        return 200, ""

    def get_file(self, artifact_id: str, name: str) -> bytes | None:
        version = self.by_id.get(artifact_id)
        if version is None or version.state != "COMMITTED" or name not in version.files:
            return None
        return version.served(name)

    def get_manifest(self, artifact_id: str) -> bytes | None:
        version = self.by_id.get(artifact_id)
        return version.manifest if version is not None else None
