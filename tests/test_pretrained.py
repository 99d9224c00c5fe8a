"""Resolving released weight names and local paths (the download path is exercised with a stand-in hub)."""
import sys
import types

import pytest

from regionclip.weights.pretrained import WEIGHTS, WeightsNotFound, resolve_weights


def test_local_path_wins(tmp_path):
    f = tmp_path / "my.pth"
    f.write_bytes(b"x")
    assert resolve_weights(f) == f
    with pytest.raises(WeightsNotFound, match="not found"):
        resolve_weights(tmp_path / "missing.pth")
    with pytest.raises(WeightsNotFound, match="unknown weights"):
        resolve_weights("no_such_model")


def test_named_file_in_home(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIONCLIP_HOME", str(tmp_path))
    (tmp_path / "rpn_lvis_866.pth").write_bytes(b"x")
    assert resolve_weights("rpn_lvis_866") == tmp_path / "rpn_lvis_866.pth"
    assert resolve_weights("rpn_lvis_866.pth") == tmp_path / "rpn_lvis_866.pth"


def test_drive_only_file_missing_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIONCLIP_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFound) as e:
        resolve_weights("lvis_1203_cls_emb")
    msg = str(e.value)
    assert "pretrained_ckpt/concept_emb/" in msg and str(tmp_path / "lvis_1203_cls_emb.pth") in msg


def test_hf_download_used_and_failure_message(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIONCLIP_HOME", str(tmp_path))
    spec = WEIGHTS["regionclip_pretrained-cc_rn50x4"]
    downloaded = tmp_path / "hf" / "regionclip_r50x4.pth"
    downloaded.parent.mkdir()
    downloaded.write_bytes(b"x")
    calls = []

    def fake_download(repo_id, filename, repo_type=None, cache_dir=None):
        calls.append((repo_id, filename, repo_type))
        return str(downloaded)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    assert resolve_weights("regionclip_pretrained-cc_rn50x4") == downloaded
    assert calls == [(spec.hf_repo, spec.hf_filename, "space")]

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=offline))
    with pytest.raises(WeightsNotFound, match="huggingface.co/spaces/CVPR/regionclip-demo"):
        resolve_weights("regionclip_pretrained-cc_rn50x4")
