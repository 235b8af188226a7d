"""The biometric template store: one file on the hub holding every enrolled person.

WHY this shape:

* Templates are personal (biometric) data. They live only on the hub, in ONE file with mode
  0600 inside a directory with mode 0700, so nothing else on the box can read them and a
  backup/restore or a "forget everybody" is one file.
* Writes are atomic (temp file in the same directory, fsync, ``os.replace``, fsync of the
  directory): a power cut during ``biod calibrate`` leaves either the old store or the new
  one, never a truncated file and never silently nobody.
* The file may be encrypted with AES-256-GCM (``cryptography`` package) using a key handed
  over by systemd (``LoadCredential=`` -> ``$CREDENTIALS_DIRECTORY/<name>``), so a copied SD
  card does not leak the templates. The header is authenticated (AAD), so it cannot be
  swapped either.
* Every person records the embedding model (name, version, dimension) it was enrolled with.
  Embeddings of two model versions live in different spaces: comparing them gives
  meaningless scores, so mismatching templates are refused with a "re-enrol" message rather
  than silently mis-identifying people.
* A corrupt or undecryptable file is an error naming the file and the fix; it is never
  treated as an empty store (that would make the next ``save`` destroy every enrolment).

Container (UTF-8 JSON, one object)::

    {"format": "biod-templates", "container_version": 1, "encrypted": false,
     "payload": {"people": [...]}}
    {"format": "biod-templates", "container_version": 1, "encrypted": true,
     "cipher": "AES-256-GCM", "nonce": "<b64>", "ciphertext": "<b64 of the payload JSON>"}

Prototypes are stored as base64 of little-endian float32 (exact round trip, compact).
A person may also carry a ``gait`` template (``GaitTemplate``: the gait model it was made
with and one unit prototype); the key is optional, so stores written before gait identity
existed load unchanged (no gait template), and older biods ignore it.

Template adaptation (``identity.adapt``) adds prototypes whose label starts with
``adapted-`` and the stats ``enrol_threshold`` / ``n_adaptations``: no new key, so the
container version is unchanged; an older biod reads such a file and simply scores with all
prototypes (it never adds or drops adapted ones).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import glob
import json
import logging
import os
import re
import stat
import tempfile
import unicodedata
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from daemon.durable import fsync_dir, probe_writable, write_all_and_sync
from daemon.events import UNKNOWN

__all__ = [
    "CONTAINER_VERSION",
    "GaitTemplate",
    "ModelRef",
    "Person",
    "StoreError",
    "TemplateMismatchError",
    "TemplateStore",
    "check_compatible",
    "stale_persons",
    "key_from_credential",
    "name_problem",
    "new_person_id",
    "slugify",
]

FORMAT = "biod-templates"
CONTAINER_VERSION = 1
CIPHER = "AES-256-GCM"
log = logging.getLogger(__name__)

_RESTORE = "restore it from a backup, or move it aside and re-enrol everybody with `biod calibrate`"


class StoreError(Exception):
    """The template store cannot be read or written; the message names the file and the fix."""


class TemplateMismatchError(StoreError):
    """Templates were made with another embedding model than the one loaded now."""


@dataclass(frozen=True)
class ModelRef:
    """The embedding model a template belongs to (from the model manifest).

    ``weights``: the sha256 prefixes of the model file(s) the embedding comes from ("" when not
    known: templates stored before it was recorded, gait models). WHY: retraining keeps a
    model's name and version (they are constants of the training code), but not its embedding
    space; templates of the old weights scored against the new ones were accepted silently."""

    name: str
    version: str
    dim: int
    weights: str = ""

    def __str__(self) -> str:
        return f"{self.name} {self.version} (D={self.dim}{', weights ' + self.weights if self.weights else ''})"

    def accepts(self, other: "ModelRef") -> bool:
        """Whether embeddings of ``other`` can be scored against this model's: the same name,
        version and dimension, and the same weights where both know theirs."""
        return ((self.name, self.version, self.dim) == (other.name, other.version, other.dim)
                and (not self.weights or not other.weights or self.weights == other.weights))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version, "dim": self.dim}
        if self.weights:  # absent key = not recorded (stores before it was)
            out["weights"] = self.weights
        return out

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> "ModelRef":
        return cls(str(m["name"]), str(m["version"]), int(m["dim"]), str(m.get("weights", "")))


def _b64(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "float32_le_b64": base64.b64encode(a.tobytes()).decode()}


def _from_b64(d: dict[str, Any]) -> np.ndarray:
    shape = tuple(int(s) for s in d["shape"])
    raw = base64.b64decode(d["float32_le_b64"], validate=True)
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


@dataclass(frozen=True, eq=False)
class GaitTemplate:
    """A person's gait template: one unit prototype (k,) in the space of gait ``model``.

    ``n_windows``: walking windows it was built from; ``self_score``: median pooled cosine of
    those windows to it (same session, optimistic; for display and audits only).
    """

    model: ModelRef
    prototype: np.ndarray
    n_windows: int
    self_score: float = float("nan")

    def __post_init__(self) -> None:
        proto = np.asarray(self.prototype, dtype=np.float32).ravel()
        if proto.shape != (self.model.dim,) or not np.all(np.isfinite(proto)):
            raise StoreError(f"gait template: prototype must be {self.model.dim} finite values for {self.model}, got shape {proto.shape}")
        norm = float(np.linalg.norm(proto))
        if norm <= 1e-12:
            raise StoreError("gait template: prototype is all zeros")
        if abs(norm - 1.0) > 1e-5:
            proto = (proto / norm).astype(np.float32)
        proto = proto.copy()
        proto.setflags(write=False)
        object.__setattr__(self, "prototype", proto)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GaitTemplate):
            return NotImplemented
        same_score = self.self_score == other.self_score or (self.self_score != self.self_score and other.self_score != other.self_score)
        return (self.model == other.model and self.n_windows == other.n_windows and same_score
                and bool(np.array_equal(self.prototype, other.prototype)))

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.to_json(),
                "prototype": _b64(self.prototype), "n_windows": int(self.n_windows),
                "self_score": None if self.self_score != self.self_score else float(self.self_score)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "GaitTemplate":
        score = d.get("self_score")
        return cls(model=ModelRef.from_json(d["model"]), prototype=_from_b64(d["prototype"]),
                   n_windows=int(d["n_windows"]), self_score=float("nan") if score is None else float(score))


@dataclass(frozen=True, eq=False)
class Person:
    """One enrolled person.

    ``prototypes`` (k, D) float32, rows L2-normalised; ``prototype_labels`` says what each row
    is (an activity such as ``rest`` or ``walking``, or ``cluster-<i>`` from k-means).
    ``threshold`` is this person's open-set acceptance threshold on the engine's smoothed
    cosine score. ``stats`` holds the enrolment quality numbers (n windows, median
    self-similarity, expected FAR/FRR, min margin to other persons) for display and audits.
    ``gait``: optional gait template (None: ECG only; gait never identifies on its own).
    """

    id: str
    name: str
    slug: str
    created: str
    model: ModelRef
    prototypes: np.ndarray
    prototype_labels: tuple[str, ...]
    threshold: float
    stats: dict[str, float] = field(default_factory=dict)
    gait: GaitTemplate | None = None

    def __post_init__(self) -> None:
        protos = np.asarray(self.prototypes, dtype=np.float32)
        if protos.ndim != 2 or protos.shape[0] == 0 or protos.shape[1] != self.model.dim:
            raise StoreError(
                f"person {self.name!r}: prototypes must have shape (k>=1, {self.model.dim}), got {protos.shape}"
            )
        if len(self.prototype_labels) != protos.shape[0]:
            raise StoreError(f"person {self.name!r}: {protos.shape[0]} prototypes but {len(self.prototype_labels)} labels")
        if not np.all(np.isfinite(protos)):
            raise StoreError(f"person {self.name!r}: prototypes contain NaN/inf")
        if not (np.isfinite(self.threshold) and -1.0 <= float(self.threshold) <= 1.0):
            # NaN compares false both ways: a NaN threshold named this person for every wearer
            raise StoreError(f"person {self.name!r}: threshold {self.threshold!r} is not a cosine in [-1, 1]; "
                             "re-enrol this person with `biod calibrate`")
        norms = np.linalg.norm(protos, axis=1, keepdims=True)
        if not np.allclose(norms, 1.0, atol=1e-5):  # normalise once; re-normalising is not bit-stable
            protos = (protos / np.maximum(norms, 1e-12)).astype(np.float32)
        protos = protos.copy()
        protos.setflags(write=False)
        object.__setattr__(self, "prototypes", protos)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Person):
            return NotImplemented
        return (
            self._meta() == other._meta()
            and self.prototypes.shape == other.prototypes.shape
            and bool(np.array_equal(self.prototypes, other.prototypes))
            and self.gait == other.gait
        )

    def _meta(self) -> tuple[Any, ...]:
        stats = tuple((k, "nan" if v != v else v) for k, v in sorted(self.stats.items()))  # nan == nan here
        return (self.id, self.name, self.slug, self.created, self.model, self.prototype_labels, self.threshold, stats)

    def to_json(self) -> dict[str, Any]:
        protos = np.ascontiguousarray(self.prototypes, dtype="<f4")
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "slug": self.slug,
            "created": self.created,
            "model": self.model.to_json(),
            "prototypes": {"shape": list(protos.shape), "float32_le_b64": base64.b64encode(protos.tobytes()).decode()},
            "prototype_labels": list(self.prototype_labels),
            "threshold": float(self.threshold),
            "stats": {k: float(v) for k, v in self.stats.items()},
        }
        if self.gait is not None:  # absent key = no gait template (stores before gait identity)
            out["gait"] = self.gait.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Person":
        shape = tuple(int(s) for s in d["prototypes"]["shape"])
        raw = base64.b64decode(d["prototypes"]["float32_le_b64"], validate=True)
        protos = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
        return cls(
            id=str(d["id"]), name=str(d["name"]), slug=str(d["slug"]), created=str(d["created"]),
            model=ModelRef.from_json(d["model"]),
            prototypes=protos, prototype_labels=tuple(str(x) for x in d["prototype_labels"]),
            threshold=float(d["threshold"]), stats=_stats_from_json(d.get("stats", {})),
            gait=GaitTemplate.from_json(d["gait"]) if d.get("gait") is not None else None,
        )


def _stats_from_json(stats: object) -> dict[str, float]:
    if not isinstance(stats, dict):
        raise TypeError(f"stats must be an object, got {type(stats).__name__}")
    return {str(k): float(v) for k, v in stats.items()}


def slugify(name: str) -> str:
    """ASCII, lower-case, ``[a-z0-9_]``: safe as an MQTT topic level and a Home Assistant id."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")
    if not slug:
        raise StoreError(f"name {name!r} has no letters or digits to build an id from; use a name with at least one of A-Z, 0-9")
    return slug[:48]


NAME_MAX = 64  # characters; Home Assistant's enrol-name text entity allows the same (homeassistant.py)
# Unicode categories refused in a name: C0/C1 controls (newline, tab, escape), lone surrogates
# (cannot be encoded for MQTT), line/paragraph separators (break a log line like a newline)
# Cf: invisible formatting (U+202E right-to-left override shows "\u202eecilA" as "Alice")
_NAME_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def name_problem(name: object) -> str | None:
    """Why ``name`` (before stripping) cannot be a person's name, else None.

    THE one name rule, for every way a person gets or changes a name (``biod calibrate``, an
    enrolment from Home Assistant, ``biod people rename``): the stripped name is 1-64
    characters, has no control characters, has a letter or digit (its slug is the person's id
    in topics and entity ids) and is not ``unknown`` in any spelling. WHY each: a newline in a
    name splits log lines and the tab-separated ``biod people list``; ``unknown`` is what events
    and the ``wearer`` topic say for a stranger (its slug, ``unknown``, too), so an enrolled
    "Unknown" could not be told from one. Callers strip the name before they store it."""
    if not isinstance(name, str):
        return f"a name must be text, got {type(name).__name__} {name!r:.80}"
    name = name.strip()
    if not name:
        return f"the name is empty: give the person's name (1-{NAME_MAX} characters)"
    if any(unicodedata.category(c) in _NAME_BAD_CATEGORIES for c in name):
        return (f"the name {name!r:.100} contains a control character or an invisible formatting one (a newline, a tab, a "
                "right-to-left override or similar): type it on one line with visible characters only")
    if len(name) > NAME_MAX:
        return f"the name {name[:20]!r}... is {len(name)} characters long: use at most {NAME_MAX}"
    try:
        slug = slugify(name)
    except StoreError as exc:
        return str(exc)
    if slug == UNKNOWN:
        return f"{name!r} is reserved: '{UNKNOWN}' is what biod calls a wearer it does not recognise; choose another name"
    return None


def new_person_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def stale_persons(people: Iterable[Person], model: ModelRef) -> list[Person]:
    """The persons whose templates were made with another embedding model than ``model``."""
    return [p for p in people if not model.accepts(p.model)]


def check_compatible(people: dict[str, Person], model: ModelRef) -> None:
    """Refuse templates made with another embedding model: their scores would be meaningless."""
    bad = stale_persons(people.values(), model)
    if bad:
        listed = ", ".join(f"{p.name!r} ({p.model})" for p in bad)
        raise TemplateMismatchError(
            f"templates of {listed} were made with another ECG model than the one loaded now "
            f"({model}); embeddings of different model versions cannot be compared: "
            f"re-enrol each of them with `sudo biod calibrate --name NAME` (it replaces their old templates), or "
            f"reinstall the model they were made with; until then they are not identified, everyone else is"
        )


def key_from_credential(name: str, directory: str | os.PathLike[str] | None = None) -> bytes:
    """Read a 256-bit AES key from ``$CREDENTIALS_DIRECTORY/<name>``.

    Accepted encodings: 32 raw bytes, 64 hex digits, or base64 of 32 bytes (trailing newline ok),
    so ``openssl rand -hex 32 > key`` and ``systemd-creds encrypt`` both work.
    """
    base = directory if directory is not None else os.environ.get("CREDENTIALS_DIRECTORY")
    if not base:
        raise StoreError(
            "the template store is configured as encrypted but $CREDENTIALS_DIRECTORY is not set: "
            "fix: on an installed hub run the command as `sudo biod ...` (it reads the keys in "
            "/etc/biod/credentials), or export CREDENTIALS_DIRECTORY=<folder holding the key file "
            f"{name}>; the service gets it from the unit's LoadCredential={name}:<path>"
        )
    path = Path(base) / name
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StoreError(
            f"the template store is encrypted but its key {path} cannot be read ({exc.strerror}): "
            f"fix: put the store's key there (the service gets it from the unit's "
            f"LoadCredential={name}:<path>); without the key the enrolled persons cannot be read"
        ) from None
    return parse_key(raw, str(path))


def parse_key(raw: bytes, source: str = "key") -> bytes:
    if len(raw) == 32:
        return raw
    text = raw.strip()
    if re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text.decode())
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == 32:
        return decoded
    raise StoreError(
        f"{source}: not a 256-bit key (want 32 raw bytes, 64 hex digits or base64 of 32 bytes, got {len(raw)} bytes): "
        "fix: restore the key file from your backup. Only if no template was ever encrypted with it (a new "
        "hub), create one with `openssl rand -hex 32`: a new key cannot read templates saved under the old "
        "one, and everyone would have to enrol again"
    )


def _aesgcm(key: bytes, path: Path) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise StoreError(
            f"{path}: the template store is encrypted but the `cryptography` package is not installed: "
            "fix: pip install cryptography (it is a biod dependency) or run without a store key"
        ) from None
    if len(key) != 32:
        raise StoreError(f"{path}: the template store key must be 32 bytes (AES-256), got {len(key)}: fix: restore the key from your backup (a new key cannot read these templates: everyone would "
                         "have to enrol again)")
    return AESGCM(key)


def _header(encrypted: bool) -> dict[str, Any]:
    h: dict[str, Any] = {"format": FORMAT, "container_version": CONTAINER_VERSION, "encrypted": encrypted}
    if encrypted:
        h["cipher"] = CIPHER
    return h


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


class TemplateStore:
    """Load and atomically save the household's templates.

    ``key`` (32 bytes) turns on AES-256-GCM encryption for every save, and a plain store is then
    refused (anyone who can write the SD card could otherwise put a plain file with their own
    template under a member's name in place of the encrypted one): ``encrypt`` converts a store
    written before the key was set, once, on the owner's command. ``model``,
    when given, makes ``load``/``add`` refuse templates from another embedding model.
    Operations are read-modify-write of the whole (small) file; run one writer at a time
    (``biod calibrate`` while the daemon only reads, then signals a reload).
    """

    def __init__(self, path: str | os.PathLike[str], key: bytes | None = None, *, model: ModelRef | None = None) -> None:
        self.path = Path(path)
        self.key = key
        self.model = model
        if key is not None:
            _aesgcm(key, self.path)  # fail at construction, not at the first save

    # ---- reading -------------------------------------------------------------------------
    def load(self, *, plain_with_key: bool = False) -> dict[str, Person]:
        """All persons by display name; ``{}`` only when the file does not exist yet.
        ``plain_with_key``: read a plain store although a key is set (``encrypt`` only)."""
        self._refuse_link()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read the template store ({exc.strerror}): fix: check the file and its directory belong to the biod user") from None
        self._restrict()
        payload = self._decode(raw, plain_with_key)
        try:
            people = [Person.from_json(d) for d in payload["people"]]
        except StoreError as exc:
            raise StoreError(f"{self.path}: the template store is corrupt ({exc}): {_RESTORE}") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, binascii.Error) as exc:
            # every way a hand-edited or damaged record can fail to be read is a StoreError: the
            # daemon's store watch and `biod people` report it, they must not die of it
            raise StoreError(f"{self.path}: the template store is corrupt (bad person record: {exc!r}): {_RESTORE}") from None
        out = {p.name: p for p in people}
        if len(out) != len(people) or len({p.slug for p in people}) != len(people):
            # two records with one slug load, but every later save refuses them
            raise StoreError(f"{self.path}: the template store is corrupt (duplicate names): {_RESTORE}")
        if self.model is not None:
            check_compatible(out, self.model)
        return out

    def _refuse_link(self) -> None:
        """A symbolic link at the store path is refused: reading followed it and the chmod to 0600
        changed its target, but a save replaced the link with a plain file, so the target kept a
        removed person's templates for ever."""
        try:
            link = self.path.is_symlink()
        except OSError as exc:  # a folder on the way the biod user cannot enter: say so, no traceback
            raise StoreError(f"{self.path}: cannot reach the template store ({exc.strerror}): fix: give its "
                             "directory to the biod user and run biod commands as `sudo biod ...`") from None
        if link:
            raise StoreError(f"{self.path} is a symbolic link (to {os.readlink(self.path)}): the template store must be a "
                             "regular file in its own directory: fix: move the file itself there and set the store path to it")

    def _restrict(self) -> None:
        """Templates are personal data: a store that other users of the hub can read (copied in
        with ``cp``, restored from a backup, a umask of 022) is set back to 0600, and said so."""
        try:
            mode = stat.S_IMODE(self.path.stat().st_mode)
            if not mode & 0o077:
                return
            os.chmod(self.path, 0o600)
            log.warning("%s: the template store was mode %04o, readable by other users of the hub; set it to 0600",
                        self.path, mode)
        except OSError as exc:
            log.warning("%s: the template store is readable by other users of the hub and cannot be restricted (%s): "
                        "fix: chown it to the biod user and chmod 0600 it", self.path, exc.strerror)

    def _decode(self, raw: bytes, plain_with_key: bool = False) -> dict[str, Any]:
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise StoreError(f"{self.path}: the template store is corrupt (not JSON: {exc}): {_RESTORE}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StoreError(f"{self.path}: not a biod template store (no format={FORMAT!r}): point the store path at the right file or {_RESTORE}")
        version = doc.get("container_version")
        if version != CONTAINER_VERSION:
            raise StoreError(
                f"{self.path}: template store container version {version!r} is not supported by this biod "
                f"(supports {CONTAINER_VERSION}): upgrade biod, or {_RESTORE}"
            )
        encrypted = doc.get("encrypted")
        if encrypted is False and self.key is not None and not plain_with_key:
            raise StoreError(
                f"{self.path}: the template store is not encrypted although a key is configured. A plain file put "
                "in place of the encrypted one would enrol anyone under a member's name, so it is not read: if it "
                "is your own store from before the key was set, encrypt it once with `biod people encrypt`; "
                f"otherwise {_RESTORE}")
        if encrypted is False:
            payload = doc.get("payload")
        elif encrypted is True:
            payload = self._decrypt(doc)
        else:
            raise StoreError(f"{self.path}: the template store is corrupt (no 'encrypted' flag): {_RESTORE}")
        if not isinstance(payload, dict) or not isinstance(payload.get("people"), list):
            raise StoreError(f"{self.path}: the template store is corrupt (no people list): {_RESTORE}")
        return payload

    def _decrypt(self, doc: dict[str, Any]) -> Any:
        if self.key is None:
            raise StoreError(
                f"{self.path}: the template store is encrypted but no key was given: fix: pass the key credential "
                "(LoadCredential= in the unit and the store key credential name in the config)"
            )
        if doc.get("cipher") != CIPHER:
            raise StoreError(f"{self.path}: the template store uses cipher {doc.get('cipher')!r}, this biod knows only {CIPHER}: upgrade biod")
        aes = _aesgcm(self.key, self.path)
        from cryptography.exceptions import InvalidTag

        try:
            nonce = base64.b64decode(doc["nonce"], validate=True)
            ct = base64.b64decode(doc["ciphertext"], validate=True)
        except (KeyError, TypeError, binascii.Error, ValueError):
            raise StoreError(f"{self.path}: the template store is corrupt (bad nonce/ciphertext encoding): {_RESTORE}") from None
        try:
            plain = aes.decrypt(nonce, ct, _aad(_header(True)))
        except (InvalidTag, ValueError):
            raise StoreError(
                f"{self.path}: the template store is encrypted but the key does not decrypt it (wrong key, or the file was altered): "
                f"fix: give the key it was written with; if that key is lost, {_RESTORE}"
            ) from None
        try:
            return json.loads(plain.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise StoreError(f"{self.path}: the template store decrypts but its content is corrupt: {_RESTORE}") from None

    # ---- writing -------------------------------------------------------------------------
    def save(self, people: dict[str, Person]) -> None:
        """Atomically replace the file with ``people`` (mode 0600, directory 0700)."""
        names = {p.slug for p in people.values()}
        if len(names) != len(people):
            raise StoreError("two persons share a slug; give them distinguishable names")
        payload = {"people": [p.to_json() for p in sorted(people.values(), key=lambda p: p.slug)]}
        body = json.dumps(payload, separators=(",", ":")).encode()
        if self.key is None:
            doc: dict[str, Any] = {**_header(False), "payload": payload}
        else:
            nonce = os.urandom(12)
            ct = _aesgcm(self.key, self.path).encrypt(nonce, body, _aad(_header(True)))
            doc = {**_header(True), "nonce": base64.b64encode(nonce).decode(), "ciphertext": base64.b64encode(ct).decode()}
        self._atomic_write(json.dumps(doc, indent=None, separators=(",", ":")).encode() + b"\n")

    def _ensure_private_dir(self) -> Path:
        directory = self.path.parent
        try:
            # Every folder created here is private, not just the last: mkdir(parents=True) gives
            # the parents the umask's 0755, and a state_dir made that way fails `biod doctor`.
            missing = []
            d = directory
            while not d.exists():
                missing.append(d)
                d = d.parent
            for d in reversed(missing):
                d.mkdir(mode=0o700, exist_ok=True)
                os.chmod(d, 0o700)
            mode = stat.S_IMODE(directory.stat().st_mode)
            if mode != 0o700 and self._holds_only_the_store(directory):
                os.chmod(directory, 0o700)
        except OSError as exc:
            raise StoreError(
                f"{directory}: cannot create or restrict the template directory to 0700 ({exc.strerror}): "
                "fix: give it to the biod user (StateDirectory= in the unit) and keep the store in its own directory"
            ) from None
        return directory

    def _holds_only_the_store(self, directory: Path) -> bool:
        """Whether ``directory`` is the store's own folder: nothing in it but the store and its
        lock and temp files. WHY: only such a folder is made private. A store configured into a
        shared folder (``identity.store_path: /home/pi/templates.json``) used to turn that folder
        to 0700 at every edit, even a failed one (review, 2026-11-24); there the file's own 0600
        is what keeps the templates private."""
        ours = (self.path.name, f".{self.path.name}.")
        return all(e.name == ours[0] or e.name.startswith(ours[1]) for e in os.scandir(directory))

    def _atomic_write(self, data: bytes) -> None:
        self._refuse_link()
        directory = self._ensure_private_dir()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            try:
                os.fchmod(fd, 0o600)
                write_all_and_sync(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise StoreError(f"{self.path}: cannot write the template store ({exc.strerror}); the previous file is unchanged: fix: check free space and permissions") from None
            raise
        try:  # the rename is durable only once the directory is
            fsync_dir(directory)
        except OSError as exc:
            raise StoreError(f"{self.path}: the template store was written but its directory could not be synced "
                             f"({exc.strerror}); a power cut now may bring back the previous file: fix: check the disk") from None

    # ---- edits ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _edit_lock(self) -> Iterator[None]:
        """Exclusive lock around a read-modify-write: ``biod people`` in a shell and an
        enrolment from Home Assistant inside the daemon may edit at the same moment, and the
        later save would silently drop the other's change. ``flock`` on a side file (the store
        itself is replaced by rename on every save, so it cannot carry the lock)."""
        directory = self._ensure_private_dir()
        lock = directory / f".{self.path.name}.lock"
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"{lock}: cannot open the store's lock file ({exc.strerror}): fix: give the "
                             "template directory and its files to the biod user (run biod commands as "
                             "`sudo biod ...`, not as root)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_stale_temp_files(directory)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def check_writable(self) -> None:
        """StoreError unless a save would work now: the private directory can be made and a file
        written in it (what every save does first). WHY: ``biod calibrate`` asks a person for
        90 s of recording and only then saved; on a read-only or root-owned store the enrolment
        was lost after the person had done it."""
        with self._edit_lock():
            directory = self.path.parent
            try:
                probe_writable(directory, f".{self.path.name}.")
            except OSError as exc:
                raise StoreError(f"{directory}: cannot write the template store there ({exc.strerror}): fix: give "
                                 "the directory to the biod user and run biod commands as `sudo biod ...`") from None

    def _remove_stale_temp_files(self, directory: Path) -> None:
        """Delete temp files a writer killed before its rename left behind: they hold templates
        (a removed person's too) that nothing else would ever delete. Every edit holds the lock,
        so under it no other writer's temp file can be in flight."""
        for tmp in directory.glob(f".{glob.escape(self.path.name)}.*.tmp"):
            try:
                tmp.unlink()
                log.info("%s: removed %s, left by a save that did not finish", self.path, tmp.name)
            except OSError as exc:
                log.warning("%s: cannot remove %s, left by a save that did not finish (%s): remove it by hand",
                            self.path, tmp, exc.strerror)

    def encrypt(self) -> int:
        """Encrypt a store written before the key was set (``biod people encrypt``); returns how
        many persons it holds. Already encrypted: nothing changes."""
        if self.key is None:
            raise StoreError("no key is configured: set identity.store_key_credential (deploy/install.sh makes the key) first")
        with self._edit_lock():
            people = self.load(plain_with_key=True)
            self.save(people)
        return len(people)

    def list(self) -> list[Person]:
        """Persons sorted by display name."""
        return sorted(self.load().values(), key=lambda p: p.name.casefold())

    def add(self, person: Person, *, replace_stale: bool = False) -> Person | None:
        """Add a new person; refuses a name/slug already taken (remove or rename first) and a
        name the one name rule refuses (``name_problem``).

        ``replace_stale``: a person of exactly that name whose templates were made with another
        ECG model than ``person``'s is replaced (and returned; only the same name: "Jo Anne" must
        not replace a stale "Jo-Anne"); an enrolment is how such a person is
        re-enrolled after a model update, without removing them first. Otherwise None."""
        if (problem := name_problem(person.name)) is not None:
            raise StoreError(f"cannot enrol {person.name!r:.100}: {problem}")
        if person.name != person.name.strip():
            person = replace(person, name=person.name.strip())
        if self.model is not None:
            check_compatible({person.name: person}, self.model)
        with self._edit_lock():
            people = self.load()
            clash = [p for p in people.values() if p.slug == person.slug or p.name == person.name]
            replaced = None
            if clash:
                if not (replace_stale and len(clash) == 1 and clash[0].name == person.name
                        and not person.model.accepts(clash[0].model)):
                    raise StoreError(f"a person named {clash[0].name!r} is already enrolled: choose another name, or "
                                     f"`biod people remove {clash[0].name}` first to re-enrol")
                replaced = people.pop(clash[0].name)
            people[person.name] = person
            self.save(people)
            return replaced

    def _find(self, people: dict[str, Person], name: str) -> Person:
        if name in people:
            return people[name]
        try:
            slug = slugify(name)
        except StoreError:
            slug = None
        for p in people.values():
            if p.slug == slug:
                return p
        known = ", ".join(sorted(people)) or "nobody is enrolled"
        raise StoreError(f"no enrolled person named {name!r} (enrolled: {known})")

    def rename(self, old: str, new: str) -> Person:
        """Give ``old`` (a name or its slug) the name ``new``, stripped; refuses a name the one
        name rule refuses (``name_problem``) or one already enrolled."""
        if (problem := name_problem(new)) is not None:
            raise StoreError(f"cannot rename {old!r:.100} to {new!r:.100}: {problem}")
        new = new.strip()
        with self._edit_lock():
            people = self.load()
            person = self._find(people, old)
            new_slug = slugify(new)
            if any(p.slug == new_slug and p.id != person.id for p in people.values()):
                raise StoreError(f"cannot rename {person.name!r} to {new!r}: that name is already enrolled")
            del people[person.name]
            renamed = replace(person, name=new, slug=new_slug)
            people[new] = renamed
            self.save(people)
            return renamed

    def update_templates(self, person: Person) -> Person | None:
        """Save an adapted ``person`` (same id: new prototypes, labels, threshold, stats).

        Returns the stored person, or None when that enrolment is gone (removed or re-enrolled
        meanwhile: an adaptation must never bring a template back). A rename made meanwhile is
        kept. Holds the edit lock like every other edit.
        """
        if self.model is not None:
            check_compatible({person.name: person}, self.model)
        with self._edit_lock():
            people = self.load()
            current = next((p for p in people.values() if p.id == person.id), None)
            if current is None:
                return None
            updated = replace(current, prototypes=person.prototypes, prototype_labels=person.prototype_labels,
                              threshold=person.threshold, stats=dict(person.stats))
            people[current.name] = updated
            self.save(people)
            return updated

    def remove(self, name: str) -> Person:
        with self._edit_lock():
            people = self.load()
            person = self._find(people, name)
            del people[person.name]
            self.save(people)
            return person
