"""Preprocessing cache: fingerprints, atomic entries, round trip."""

from __future__ import annotations

import numpy as np
import pytest

from stm_dlp.data import cache as K


def test_round_trip_and_mmap(tmp_path, tiny_study):
    K.save_study(tiny_study, tmp_path / "e")
    back = K.load_study(tmp_path / "e")
    np.testing.assert_array_equal(back.frames, tiny_study.frames)
    np.testing.assert_array_equal(back.maps, tiny_study.maps)
    np.testing.assert_array_equal(back.meta["aif_hu"], tiny_study.meta["aif_hu"])
    assert isinstance(back.frames, np.memmap)
    assert back.patient_id == tiny_study.patient_id and back.meta["residue"] == tiny_study.meta["residue"]


def test_fingerprint_changes_with_settings_and_sources(tmp_path):
    a = K.fingerprint({"x": 1, "y": [1, 2]})
    assert a == K.fingerprint({"y": [1, 2], "x": 1})
    assert a != K.fingerprint({"x": 2, "y": [1, 2]})
    (tmp_path / "f.dcm").write_bytes(b"abc")
    fp1 = K.source_fingerprint(tmp_path)
    (tmp_path / "f.dcm").write_bytes(b"abcd")
    assert K.source_fingerprint(tmp_path) != fp1


def test_get_builds_once(tmp_path, tiny_study):
    c = K.StudyCache(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return tiny_study

    c.get({"k": 1}, build)
    c.get({"k": 1}, build)
    c.get({"k": 2}, build)
    assert len(calls) == 2


def test_crash_mid_write_leaves_no_entry(tmp_path, tiny_study, monkeypatch):
    c = K.StudyCache(tmp_path)
    real_save = np.save
    count = {"n": 0}

    def failing_save(fh, arr):
        count["n"] += 1
        if count["n"] == 3:
            raise OSError("disk full")
        real_save(fh, arr)

    monkeypatch.setattr(K.np, "save", failing_save)
    with pytest.raises(OSError):
        c.get({"k": 1}, lambda: tiny_study)
    monkeypatch.setattr(K.np, "save", real_save)
    assert list(tmp_path.iterdir()) == []  # no half entry, no temp dir
    back = c.get({"k": 1}, lambda: tiny_study)
    np.testing.assert_array_equal(back.frames, tiny_study.frames)
