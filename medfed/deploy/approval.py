"""A site approves the code it runs: its allow-list of Flower apps, what an app contains, and its
hash-chained run log.

Why. A SuperNode runs whatever Flower app (FAB) reaches it from the SuperLink: the ClientApp in
it reads the site's data, its ledger and its signing key. A site therefore keeps a list of the
apps it agreed to run, by the sha256 of the FAB's bytes, and its SuperExec refuses every other
app before the app is installed or loaded (`medfed.deploy.clientapp_gate`).

What is here (no Flower import, except `build_app_fab`, which must build exactly as Flower does):

* the allow-list, ``KIT/approved-apps.json`` (0600, replaced atomically)::

      {"format": "medfed-approved-apps/1",
       "apps": [{"sha256": "<64 hex>", "medfed_version": "0.1.0", "approved_at": "<UTC ISO 8601>",
                 "approved_by": "<text>", "files": 123}, ...]}

  read afresh for every task (`approved_hashes`), written by `add_approval` (``medfed site
  approve``) and by `write_initial_approvals` (``medfed provision``: each kit ships approving
  exactly the release that provisioned it);
* `release_app_fab` / `release_app_hash`: the FAB that ``medfed run`` of this installed release
  submits (`medfed.deploy.processes.stage_app`, then Flower's own deterministic build: fixed zip
  dates, sorted paths). Its bytes depend on the zlib that compresses them: a site that approves
  ``--release`` trusts that the centre builds with the same release *and* the same zlib; approving
  the exact ``.fab`` file the centre sends (``--fab``) does not depend on that;
* `describe_fab`: a FAB's files and their sha256 (its ``.info/CONTENT`` manifest, verified against
  the zip's contents: a manifest that lies, or a file it does not list, is refused) and the
  version in its ``pyproject.toml``;
* the run log, ``KIT/state/run-log.jsonl`` (0600): one JSON line per run the site executed or
  refused (UTC time, run id, app sha256, sha256 of the run's config, outcome), each carrying the
  hash of the line before it. Appends are serialised with ``flock`` (forked ClientApps append
  concurrently); `verify_run_log` finds edited, deleted, inserted and reordered entries. It holds
  no patient identifiers and no paths. A chain cannot show that its *last* entries, or the
  whole file, were removed: keep a copy of its last hash elsewhere where that matters.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import tomllib
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from medfed.exceptions import ConfigError
from medfed.files import replace_durably

APPROVALS_FILE = "approved-apps.json"
APPROVALS_FORMAT = "medfed-approved-apps/1"
MANIFEST = ".info/CONTENT"
PYPROJECT = "pyproject.toml"
APPROVED, REFUSED = "approved", "refused"
OUTCOMES = (APPROVED, REFUSED)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 1 << 20


def approvals_file(kit_dir: Path) -> Path:
    """A site kit's allow-list of apps."""
    return Path(kit_dir) / APPROVALS_FILE


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ describe a FAB

@dataclass(frozen=True)
class FabFile:
    """One file of a FAB, as its manifest lists it and its bytes confirm."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class FabDescription:
    """What a FAB contains: its own sha256, the project name and version of its pyproject, its files."""

    sha256: str
    project: str
    medfed_version: str
    files: tuple[FabFile, ...]

    def lines(self) -> list[str]:
        """Human-readable: a header, then one line per file (sha256, bytes, path)."""
        head = [f"app sha256:{self.sha256}", f"project {self.project} version {self.medfed_version}, "
                f"{len(self.files)} files (pyproject.toml included):"]
        return head + [f"  {f.sha256}  {f.size:>9}  {f.path}" for f in self.files]


def _bad_fab(why: str) -> ConfigError:
    return ConfigError(f"not a valid Flower app bundle (FAB): {why}")


def describe_fab(fab: bytes) -> FabDescription:
    """The files of ``fab`` with their sha256, and the project name and version of its pyproject.

    Every line of the ``.info/CONTENT`` manifest (``path,sha256,size in bits``) is checked against
    the file's bytes in the zip, and every file in the zip must be in the manifest: a FAB whose
    manifest lies, or that holds files the manifest hides, is refused (ConfigError naming the file)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile as exc:
        raise _bad_fab(f"not a zip archive ({exc})") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise _bad_fab("a file name appears twice in the zip")
        for name in names:
            parts = name.split("/")
            if name.startswith("/") or "\\" in name or ".." in parts or "" in parts:
                raise _bad_fab(f"unsafe file name {name!r}")
        if MANIFEST not in names:
            raise _bad_fab(f"no {MANIFEST} manifest")
        try:
            manifest = archive.read(MANIFEST).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_fab(f"{MANIFEST} is not UTF-8 text") from None
        listed: dict[str, tuple[str, int]] = {}
        for number, line in enumerate(manifest.strip().splitlines(), 1):
            fields = line.rsplit(",", 2)
            if len(fields) != 3 or not _SHA256.fullmatch(fields[1]) or not fields[2].isdigit():
                raise _bad_fab(f"{MANIFEST} line {number} is not 'path,sha256,size in bits': {line[:120]!r}")
            path, digest, listed_bits = fields
            if path in listed or path == MANIFEST:
                raise _bad_fab(f"{MANIFEST} lists {path!r} twice, or lists itself")
            listed[path] = (digest, int(listed_bits))
        files = []
        for path, (digest, bits) in listed.items():
            if path not in names:
                raise _bad_fab(f"its manifest lists {path!r}, which is not in the zip")
            actual, size = _member_sha256(archive, path)
            if actual != digest or size * 8 != bits:
                raise _bad_fab(f"{path!r} does not match its manifest entry (sha256 {actual}, {size} bytes; "
                               f"the manifest says {digest}, {bits // 8} bytes)")
            files.append(FabFile(path, digest, size))
        hidden = sorted(set(names) - set(listed) - {MANIFEST})
        if hidden:
            raise _bad_fab(f"the zip holds files its manifest does not list: {', '.join(hidden[:5])}")
        if PYPROJECT not in listed:
            raise _bad_fab(f"no {PYPROJECT}")
        try:
            project = tomllib.loads(archive.read(PYPROJECT).decode("utf-8")).get("project", {})
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise _bad_fab(f"its {PYPROJECT} is not valid TOML ({exc})") from None
    if not isinstance(project, dict) or not isinstance(project.get("name"), str) \
            or not isinstance(project.get("version"), str):
        raise _bad_fab(f"its {PYPROJECT} has no [project] name and version")
    return FabDescription(sha256_hex(fab), project["name"], project["version"], tuple(files))


def fab_app_id(fab: bytes) -> tuple[str, str]:
    """The ``(fab_id, version)`` Flower derives from a FAB's pyproject (``publisher/name``, version):
    the pair a run must name for its ClientApp to be loaded from this FAB's installed copy."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            config = tomllib.loads(archive.read(PYPROJECT).decode("utf-8"))
        publisher, project = config["tool"]["flwr"]["app"]["publisher"], config["project"]
        return f"{publisher}/{project['name']}", str(project["version"])
    except (zipfile.BadZipFile, KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _bad_fab(f"no publisher, name and version in its {PYPROJECT} ({type(exc).__name__})") from None


def _member_sha256(archive: zipfile.ZipFile, name: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    try:
        with archive.open(name) as member:
            while chunk := member.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # corrupt data, bad CRC
        raise _bad_fab(f"{name!r} cannot be read ({exc})") from None
    return digest.hexdigest(), size


# ------------------------------------------------------------------------------------ this release

def build_app_fab(app_dir: Path) -> bytes:
    """The FAB ``flwr run APP_DIR`` submits for the app folder ``app_dir`` (Flower's own build)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def release_app_fab() -> bytes:
    """The FAB that ``medfed run`` of this installed medfed submits: the app staged as ``medfed run``
    stages it (`medfed.deploy.processes.stage_app`), built as ``flwr run`` builds it."""
    from medfed.deploy.processes import stage_app

    with tempfile.TemporaryDirectory(prefix="medfed-release-") as tmp:
        return build_app_fab(stage_app(Path(tmp) / "app"))


def release_app_hash() -> str:
    """sha256 (hex) of `release_app_fab`."""
    return sha256_hex(release_app_fab())


# ------------------------------------------------------------------------------------ the allow-list

@dataclass(frozen=True)
class Approval:
    """One approved app: the sha256 of its FAB, its version, when (UTC) and by whom, its file count."""

    sha256: str
    medfed_version: str
    approved_at: str
    approved_by: str
    files: int

    @classmethod
    def from_json(cls, raw: object, where: str) -> Approval:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: an entry is not an object")
        missing = [k for k in cls.__dataclass_fields__ if k not in raw]
        if missing:
            raise ConfigError(f"{where}: an entry lacks {', '.join(missing)}")
        sha = raw["sha256"]
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ConfigError(f"{where}: sha256 must be 64 lowercase hex digits; got {str(sha)[:80]!r}")
        for key in ("medfed_version", "approved_at", "approved_by"):
            if not isinstance(raw[key], str):
                raise ConfigError(f"{where}: {key} of app {sha[:16]}… must be text")
        if not isinstance(raw["files"], int) or isinstance(raw["files"], bool) or raw["files"] < 1:
            raise ConfigError(f"{where}: files of app {sha[:16]}… must be a positive integer")
        return cls(sha, raw["medfed_version"], raw["approved_at"], raw["approved_by"], raw["files"])


def load_approvals(path: Path) -> list[Approval]:
    """The apps approved in ``path``; ConfigError (naming the file and what to do) if it is missing,
    not the format above, or writable by others than its owner."""
    path = Path(path)
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: this site has approved no app; approve one with "
                          f"`medfed site approve --kit {path.parent} --release` (or --fab FILE)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise ConfigError(f"{path} is writable by others than its owner (mode {stat.S_IMODE(info.st_mode):o}): "
                          f"anyone could approve an app; run `chmod 600 {path}` and check its entries")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != APPROVALS_FORMAT or not isinstance(raw.get("apps"), list):
        raise ConfigError(f"{path}: not a medfed approved-apps file (expected an object with "
                          f"format {APPROVALS_FORMAT!r} and a list 'apps')")
    return [Approval.from_json(entry, str(path)) for entry in raw["apps"]]


def approved_hashes(path: Path) -> frozenset[str]:
    """The sha256 of every app approved in ``path`` (read now; see `load_approvals` for errors)."""
    return frozenset(a.sha256 for a in load_approvals(path))


def save_approvals(path: Path, approvals: list[Approval]) -> None:
    """Replace ``path`` atomically and durably with ``approvals`` (file mode 0600)."""
    data = json.dumps({"format": APPROVALS_FORMAT, "apps": [asdict(a) for a in approvals]}, indent=1) + "\n"

    def write(tmp: Path) -> None:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(data)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    replace_durably(Path(path), write)


def approval_for(description: FabDescription, approved_by: str, now: str | None = None) -> Approval:
    """The allow-list entry for the app ``description`` describes."""
    if not approved_by.strip():
        raise ConfigError("who approves the app must be named (--by)")
    return Approval(description.sha256, description.medfed_version, now or utc_now(), approved_by.strip(),
                    len(description.files))


def add_approval(path: Path, fab: bytes, approved_by: str, now: str | None = None) -> tuple[Approval, bool]:
    """Approve ``fab`` in the allow-list ``path`` (created if missing). Returns the entry and whether it
    is new (an app already approved keeps its first entry). The FAB is described first: a FAB that is
    not valid (`describe_fab`) is never approved."""
    path = Path(path)
    entry = approval_for(describe_fab(fab), approved_by, now)
    current = load_approvals(path) if path.exists() else []
    for existing in current:
        if existing.sha256 == entry.sha256:
            return existing, False
    save_approvals(path, [*current, entry])
    return entry, True


def write_initial_approvals(kit_dir: Path, fab: bytes) -> None:
    """A new site kit's allow-list: exactly the app ``fab`` (`medfed provision` passes `release_app_fab`)."""
    save_approvals(approvals_file(kit_dir), [approval_for(describe_fab(fab), "medfed provision")])
