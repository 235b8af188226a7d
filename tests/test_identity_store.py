"""The template store: private file modes, atomic replace, encryption, clear errors."""
from __future__ import annotations

import dataclasses
import json
import os
import stat

import numpy as np
import pytest

from daemon.identity.store import (
    ModelRef,
    Person,
    StoreError,
    TemplateMismatchError,
    TemplateStore,
    key_from_credential,
    name_problem,
    parse_key,
    slugify,
)

MODEL = ModelRef("ecg_dualtask", "1.2.0", 16)


def person(name: str, seed: int = 0, model: ModelRef = MODEL) -> Person:
    rng = np.random.default_rng(seed)
    return Person(
        id=f"id-{seed}", name=name, slug=slugify(name), created="2026-01-01T00:00:00+00:00", model=model,
        prototypes=rng.normal(size=(2, model.dim)).astype(np.float32), prototype_labels=("rest", "walking"),
        threshold=0.41 + seed / 100, stats={"n_windows": 90.0, "expected_far": 0.01, "min_margin": float("nan")},
    )


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "state" / "identity" / "templates.json"


def test_round_trip_is_exact_and_private(store_path):
    people = {"Zoë": person("Zoë", 1), "Bob": person("Bob", 2)}
    store = TemplateStore(store_path)
    store.save(people)
    assert mode(store_path) == 0o600
    assert mode(store_path.parent) == 0o700
    assert mode(store_path.parent.parent) == 0o700  # state/ too: it was the umask's 0755
    loaded = store.load()
    assert loaded == people
    assert loaded["Zoë"].slug == "zoe"
    assert np.array_equal(loaded["Bob"].prototypes, people["Bob"].prototypes)
    assert [p.name for p in store.list()] == ["Bob", "Zoë"]
    assert list(store_path.parent.iterdir()) == [store_path]  # no temp file left behind


def test_existing_permissive_directory_is_tightened(tmp_path):
    d = tmp_path / "identity"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    TemplateStore(d / "t.json").save({"A": person("A")})
    assert mode(d) == 0o700 and mode(d / "t.json") == 0o600


def test_a_shared_folder_holding_the_store_keeps_its_mode(tmp_path):
    """A store configured into a folder that holds other files (``/home/pi/templates.json``)
    turned that folder to 0700 at every edit, a failed one too; the file's 0600 is what keeps the
    templates private there."""
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o755)
    (d / "notes.txt").write_text("someone else's")
    store = TemplateStore(d / "t.json")
    with pytest.raises(StoreError, match="no enrolled person"):
        store.remove("Nobody")
    store.save({"A": person("A")})
    assert mode(d) == 0o755 and mode(d / "t.json") == 0o600
    (d / "notes.txt").unlink()  # now the store's own folder: made private at the next edit
    store.save({"A": person("A")})
    assert mode(d) == 0o700


def test_enrolling_a_person_of_another_model_again_replaces_them(store_path):
    """After a model update a person is re-enrolled by enrolling them again, without removing
    them first; a person enrolled with the same model is never replaced."""
    store = TemplateStore(store_path)
    old = ModelRef(MODEL.name, "0.9.0", MODEL.dim)
    store.save({"Ann": person("Ann", 1, model=old), "Bob": person("Bob", 2)})
    with pytest.raises(StoreError, match="`biod people remove Ann` first"):
        store.add(person("Ann", 3))
    replaced = store.add(person("Ann", 3), replace_stale=True)
    assert replaced is not None and replaced.model == old
    assert store.load()["Ann"].model == MODEL and set(store.load()) == {"Ann", "Bob"}
    with pytest.raises(StoreError, match="already enrolled"):
        store.add(person("Bob", 4), replace_stale=True)
    store.save({**store.load(), "Jo-Anne": person("Jo-Anne", 5, model=old)})
    with pytest.raises(StoreError, match="'Jo-Anne' is already enrolled"):  # same id, another name: not replaced
        store.add(person("Jo Anne", 6), replace_stale=True)
    assert np.array_equal(store.load()["Bob"].prototypes, person("Bob", 2).prototypes)


def test_a_store_others_can_read_is_restricted_on_load_and_said_so(store_path, caplog):
    store = TemplateStore(store_path)
    store.save({"A": person("A")})
    os.chmod(store_path, 0o644)  # copied in with cp, restored from a backup under umask 022
    with caplog.at_level("WARNING", logger="daemon.identity.store"):
        assert list(store.load()) == ["A"]
    assert mode(store_path) == 0o600
    assert [r.getMessage() for r in caplog.records if "mode 0644" in r.getMessage() and "0600" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="daemon.identity.store"):
        store.load()
    assert not caplog.records  # said once, when it was so


def test_missing_file_is_empty_but_corrupt_file_is_an_error(store_path):
    store = TemplateStore(store_path)
    assert store.load() == {}
    store.save({"A": person("A")})
    good = store_path.read_bytes()
    store_path.write_bytes(good[: len(good) // 2])  # truncated (e.g. restored from a bad copy)
    with pytest.raises(StoreError, match="corrupt.*re-enrol"):
        store.load()
    doc = json.loads(good)
    doc["payload"]["people"][0]["prototypes"]["float32_le_b64"] = "AAAA"  # wrong length
    store_path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="corrupt"):
        store.load()
    store_path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(StoreError, match="not a biod template store"):
        store.load()
    doc["container_version"] = 99
    store_path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="container version 99"):
        store.load()


def test_failed_replace_leaves_the_old_file_intact(store_path, monkeypatch):
    store = TemplateStore(store_path)
    store.save({"A": person("A")})
    before = store_path.read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="previous file is unchanged"):
        store.add(person("B", 3))
    monkeypatch.undo()
    assert store_path.read_bytes() == before
    assert list(store.load()) == ["A"]
    left = sorted(p.name for p in store_path.parent.iterdir())  # temp file removed; the lock stays
    assert left == [f".{store_path.name}.lock", store_path.name]


def test_crash_during_write_leaves_the_old_file_intact(store_path, monkeypatch):
    store = TemplateStore(store_path)
    store.save({"A": person("A")})
    before = store_path.read_bytes()
    real_fsync = os.fsync
    calls = []

    def power_cut(fd):
        calls.append(fd)
        raise KeyboardInterrupt  # the process dies before the rename

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(KeyboardInterrupt):
        store.save({"B": person("B")})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert calls and store_path.read_bytes() == before


def test_encrypted_round_trip_and_plaintext_is_not_on_disk(store_path):
    key = os.urandom(32)
    store = TemplateStore(store_path, key=key)
    people = {"Alice": person("Alice", 4)}
    store.save(people)
    raw = store_path.read_bytes()
    assert b"Alice" not in raw and b"rest" not in raw
    assert json.loads(raw)["encrypted"] is True
    assert TemplateStore(store_path, key=key).load() == people
    assert mode(store_path) == 0o600


def test_encrypted_store_needs_the_right_key(store_path):
    TemplateStore(store_path, key=b"k" * 32).save({"Alice": person("Alice")})
    with pytest.raises(StoreError, match="encrypted but no key was given: fix"):
        TemplateStore(store_path).load()
    with pytest.raises(StoreError, match="encrypted but the key does not decrypt it"):
        TemplateStore(store_path, key=b"x" * 32).load()
    doc = json.loads(store_path.read_text())
    ct = bytearray(__import__("base64").b64decode(doc["ciphertext"]))
    ct[5] ^= 1  # one flipped bit: authenticated encryption notices
    doc["ciphertext"] = __import__("base64").b64encode(bytes(ct)).decode()
    store_path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="does not decrypt"):
        TemplateStore(store_path, key=b"k" * 32).load()


def test_a_plain_store_is_refused_with_a_key_until_its_owner_encrypts_it(store_path):
    """Review finding: with a key configured, a plain file put in place of the encrypted store
    (anyone who can write the SD card) was read silently, enrolling its author under a member's
    name. It is refused; `biod people encrypt` converts the owner's own pre-key store once."""
    key = b"k" * 32
    TemplateStore(store_path, key=key).save({"A": person("A")})
    TemplateStore(store_path).save({"A": person("A", 7)})  # the swap: a plain file, same name
    with pytest.raises(StoreError, match="not encrypted although a key is configured.*biod people encrypt"):
        TemplateStore(store_path, key=key).load()
    with pytest.raises(StoreError, match="not encrypted although a key is configured"):
        TemplateStore(store_path, key=key).add(person("B", 5))
    store = TemplateStore(store_path, key=key)
    assert store.encrypt() == 1
    assert json.loads(store_path.read_text())["encrypted"] is True
    store.add(person("B", 5))
    assert set(store.load()) == {"A", "B"} and store.encrypt() == 2
    with pytest.raises(StoreError, match="no key is configured"):
        TemplateStore(store_path).encrypt()


def test_key_from_systemd_credential(tmp_path, monkeypatch):
    key = os.urandom(32)
    (tmp_path / "biod_templates").write_text(key.hex() + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert key_from_credential("biod_templates") == key
    assert parse_key(__import__("base64").b64encode(key)) == key
    assert parse_key(key) == key
    with pytest.raises(StoreError, match="cannot be read.*LoadCredential=other"):
        key_from_credential("other")
    with pytest.raises(StoreError, match="not a 256-bit key"):
        parse_key(b"short")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(StoreError, match=r"\$CREDENTIALS_DIRECTORY is not set"):
        key_from_credential("biod_templates")


def test_templates_of_another_model_version_are_refused(store_path):
    TemplateStore(store_path).save({"A": person("A"), "B": person("B", 1)})
    newer = ModelRef("ecg_dualtask", "2.0.0", 16)
    with pytest.raises(TemplateMismatchError, match=r"'A'.*'B'.*re-enrol"):
        TemplateStore(store_path, model=newer).load()
    with pytest.raises(TemplateMismatchError, match="re-enrol"):
        TemplateStore(store_path, model=MODEL).add(person("C", 2, model=newer))
    assert set(TemplateStore(store_path, model=MODEL).load()) == {"A", "B"}


def test_templates_of_a_retrained_model_with_the_same_version_are_refused(store_path):
    """Retraining keeps a model's name and version (constants of the training code) but not its
    embedding space: the file hashes (``ModelRef.weights``) tell them apart. A template stored
    before the hash was recorded still loads with the same version (nothing to compare)."""
    trained = dataclasses.replace(MODEL, weights="6e03f0cb37bb+9b2ac24fcd67")
    TemplateStore(store_path).save({"A": person("A", model=trained)})
    assert TemplateStore(store_path).load()["A"].model == trained  # stored and read back
    assert TemplateStore(store_path, model=trained).load()["A"].model == trained
    retrained = dataclasses.replace(MODEL, weights="77aa00112233+9b2ac24fcd67")
    with pytest.raises(TemplateMismatchError, match=r"'A'.*weights 6e03f0cb37bb.*weights 77aa00112233.*re-enrol"):
        TemplateStore(store_path, model=retrained).load()
    TemplateStore(store_path).save({"B": person("B", 1)})  # MODEL: no weights recorded
    assert set(TemplateStore(store_path, model=retrained).load()) == {"B"}


def test_add_rename_remove(store_path):
    store = TemplateStore(store_path)
    store.add(person("Alice"))
    store.add(person("Bob", 1))
    with pytest.raises(StoreError, match="already enrolled"):
        store.add(person("alice", 2))  # same slug
    renamed = store.rename("alice", "Alice Smith")  # found by slug
    assert renamed.slug == "alice_smith" and renamed.id == "id-0"
    with pytest.raises(StoreError, match="already enrolled"):
        store.rename("Bob", "Alice Smith")
    assert store.remove("Bob").name == "Bob"
    with pytest.raises(StoreError, match="no enrolled person named 'Carol'.*Alice Smith"):
        store.remove("Carol")
    assert [p.name for p in store.list()] == ["Alice Smith"]


def test_one_name_rule_for_every_way_a_person_is_named(store_path):
    """``biod calibrate`` and ``biod people rename`` took "unknown" (what events call a stranger),
    a name with a newline and a 300-character one, which only an enrolment from Home Assistant
    refused: the store now refuses them on add and rename, by the rule the MQTT path uses."""
    from daemon.publish.state import EnrolCommandError, parse_enrol_command

    bad = {"unknown": "reserved", "UNKNOWN": "reserved", " Unknown! ": "reserved", "Bob\nSmith": "control character",
           "tab\there": "control character", "x" * 300: "300 characters", "!!!": "no letters or digits",
           "   ": "empty", "a\u2028b": "control character"}
    for name, why in bad.items():
        assert why in (name_problem(name) or ""), name
        with pytest.raises(EnrolCommandError, match=why):  # the MQTT path refuses the same names for the same reason
            parse_enrol_command(json.dumps({"name": name}), None)
    for good in ("Alice", "Zoë O'Neil", "x" * 64, "  Ann  "):
        assert name_problem(good) is None, good

    store = TemplateStore(store_path)
    store.add(person("Alice"))
    for name, why in bad.items():
        with pytest.raises(StoreError, match=why):
            store.rename("Alice", name)
        with pytest.raises(StoreError, match=why):
            store.add(dataclasses.replace(person("Bea", 1), name=name))
    assert [(p.name, p.slug) for p in store.list()] == [("Alice", "alice")]  # nothing changed
    assert store.rename("Alice", "  Alice Smith ").name == "Alice Smith"  # stripped, as from Home Assistant
    store.add(person(" Bob ", 2))
    assert [p.name for p in store.list()] == ["Alice Smith", "Bob"]


def test_person_validates_its_prototypes():
    with pytest.raises(StoreError, match=r"shape \(k>=1, 16\)"):
        Person(id="x", name="A", slug="a", created="", model=MODEL, prototypes=np.zeros((2, 8), np.float32),
               prototype_labels=("a", "b"), threshold=0.5)
    with pytest.raises(StoreError, match="no letters or digits"):
        slugify("!!!")


def _add_many(args) -> None:
    path, worker, barrier = args
    store = TemplateStore(path)
    barrier.wait()
    for k in range(5):
        store.add(person(f"P{worker}-{k}", worker * 10 + k))


def test_concurrent_editors_lose_nobody(store_path):
    """`biod people` in a shell and an enrolment from Home Assistant in the daemon may edit the
    store at once: every read-modify-write holds the lock, so no edit overwrites another."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_add_many, args=((store_path, w, barrier),)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    names = [p.name for p in TemplateStore(store_path).list()]
    assert len(names) == 30 and len(set(names)) == 30
    assert mode(store_path) == 0o600 and mode(store_path.parent / f".{store_path.name}.lock") == 0o600


@pytest.mark.parametrize("damage", ["stats_null", "stats_list", "huge_dim", "huge_shape", "deep_nesting", "same_slug"])
def test_every_damaged_record_is_a_store_error(store_path, damage):
    """Review finding: these records escaped as AttributeError / OverflowError / RecursionError,
    which killed the daemon's store watch and made `biod people list` print a traceback."""
    TemplateStore(store_path).save({"Alice": person("Alice"), "Bob": person("Bob", 2)})
    doc = json.loads(store_path.read_text())
    rec = doc["payload"]["people"][0]
    if damage == "stats_null":
        rec["stats"] = None
    elif damage == "stats_list":
        rec["stats"] = [1, 2]
    elif damage == "huge_dim":
        rec["model"]["dim"] = 1e400
    elif damage == "huge_shape":
        rec["prototypes"]["shape"] = [1e400, 16]
    elif damage == "same_slug":
        doc["payload"]["people"][1]["slug"] = rec["slug"]
    raw = json.dumps(doc).replace("Infinity", "1e400")
    if damage == "deep_nesting":
        raw = raw[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    store_path.write_text(raw)
    with pytest.raises(StoreError, match="corrupt"):
        TemplateStore(store_path).load()


def test_a_temp_file_left_by_a_killed_save_is_removed_by_the_next_edit(store_path):
    """Review finding: a save killed before its rename left a 0600 temp file holding the
    templates (a person removed later stayed in it for ever)."""
    store = TemplateStore(store_path)
    store.save({"Alice": person("Alice"), "Carol": person("Carol", 3)})
    left = store_path.parent / f".{store_path.name}.abc123.tmp"
    left.write_bytes(store_path.read_bytes())
    store.remove("Carol")
    assert not left.exists()
    assert [p.name for p in store_path.parent.iterdir() if "Carol" in p.read_text(errors="replace")] == []


def test_a_symbolic_link_at_the_store_path_is_refused(store_path, tmp_path):
    """Review finding: reading followed the link (and chmodded its target) while a save replaced
    it, so `biod people remove` left the person in the link's target."""
    target = tmp_path / "elsewhere.json"
    TemplateStore(target).save({"Alice": person("Alice")})
    store_path.parent.mkdir(parents=True, exist_ok=True)
    store_path.symlink_to(target)
    store = TemplateStore(store_path)
    with pytest.raises(StoreError, match="symbolic link"):
        store.load()
    with pytest.raises(StoreError, match="symbolic link"):
        store.save({})
    assert set(TemplateStore(target).load()) == {"Alice"}


def test_invisible_formatting_characters_are_not_a_name():
    """Review finding: U+202E (right-to-left override) made '\u202eecilA' display as 'Alice'."""
    from daemon.identity.store import name_problem

    assert name_problem("\u202eecilA") is not None
    assert name_problem("Zoë") is None
