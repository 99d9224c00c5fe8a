"""Weight files users can trust (issue 16): sha256 verification, `regionclip convert` to safetensors with metadata
(detections identical to the original file), safetensors preferred by name, Hub round trip, torch.hub entry point.

The Hub round trip runs offline and is honest about what it fakes: only the *server* side. ``HfApi.create_repo`` /
``upload_folder`` are replaced by a copy of the uploaded folder into the Hugging Face cache layout that a real
download produces (``models--user--repo/{refs/main, snapshots/<commit>/...}``); the download side is the real
``huggingface_hub.hf_hub_download`` with offline mode on (every HTTP request raises), resolving from that cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from _pretrain_helpers import TINY_RPN, write_tiny_openai_clip, write_tiny_rpn

import regionclip.weights.pretrained as pretrained
from regionclip import RegionCLIP
from regionclip.checkpoint.convert import EMBEDDINGS_KEY, file_info
from regionclip.checkpoint.io import (
    CheckpointError,
    file_sha256,
    load_state_dict,
    read_metadata,
    read_sha256_sidecar,
    read_weight_file,
)
from regionclip.cli.main import main
from regionclip.weights.hub import companion_files, convert_file, model_card, parse_hf_uri, push_to_hub
from regionclip.modeling.clip_resnet import ModifiedResNet
from regionclip.modeling.rpn import build_offline_rpn
from regionclip.modeling.text_encoder import CLIPTextTransformer
from regionclip.inference.presets import PRESETS
from regionclip.weights.pretrained import HashMismatchError, HashMismatchWarning, WeightsSpec, resolve_weights
from regionclip.checkpoint.embedding_files import SAFETENSORS_KEY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _convert_subcommand(monkeypatch):
    """`regionclip convert` is listed in cli/main.py's SUBCOMMANDS; until it is, list it for these tests only."""
    import regionclip.cli.main as cli_main

    if "regionclip.cli.convert" not in cli_main.SUBCOMMANDS:
        monkeypatch.setattr(cli_main, "SUBCOMMANDS", [*cli_main.SUBCOMMANDS, "regionclip.cli.convert"])


def _tiny_regionclip(path: Path, seed: int = 0, with_rpn: bool = True) -> Path:
    """A tiny RegionCLIP-layout checkpoint: backbone.* (16-d CLIP ResNet), lang_encoder.*, offline_* RPN keys."""
    torch.manual_seed(seed)
    vis = ModifiedResNet((1, 1, 1, 1), 16, 4, 64, 8)
    with torch.no_grad():  # non-trivial BN statistics so FrozenBN is not an identity
        for name, buf in vis.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape) + 0.5)
    txt = CLIPTextTransformer(width=64, heads=1, layers=1, embed_dim=16)
    sd = {"backbone." + k: v for k, v in vis.state_dict().items()}
    sd.update({"lang_encoder." + k: v for k, v in txt.state_dict().items()})
    if with_rpn:
        sd.update({"offline_" + k: v for k, v in build_offline_rpn(TINY_RPN).state_dict().items()})
    torch.save({"model": sd, "iteration": 7}, path)  # a d2 container with a non-tensor entry, as released
    return path


@pytest.fixture
def tiny_files(tmp_path) -> dict[str, Path]:
    emb = tmp_path / "emb.pth"
    torch.save(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), emb)
    return {"regionclip": _tiny_regionclip(tmp_path / "tiny_regionclip.pth"), "concept_emb": emb}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("REGIONCLIP_HOME", str(h))
    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    return h


def _detect(out: Path, images: list[Path], weights: Path, emb: Path, *extra: str) -> bytes:
    assert main(["detect", *map(str, images), "--weights", str(weights), "--concept-emb", str(emb), "-o", str(out),
                 "--no-vis", "--quiet", "--num-workers", "0", *extra]) == 0
    return (out / "results.json").read_bytes()


# ------------------------------------------------------------------------------------------------ sha256
def test_registered_hash_passes_and_a_flipped_byte_warns_or_errors(tmp_path, home, monkeypatch):
    f = home / "tiny_release.pth"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, f)
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    spec = WeightsSpec("tiny_release", "tiny_release.pth", "regionclip", "regionclip", "test file", sha256=good)
    monkeypatch.setattr(pretrained, "WEIGHTS", {"tiny_release": spec})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a correct file must not even warn
        assert resolve_weights("tiny_release") == f
        assert resolve_weights(f, strict_hash=True) == f  # recognised by its file name when given as a path
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    bad = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.warns(HashMismatchWarning) as rec:
        assert resolve_weights("tiny_release") == f
    msg = str(rec[0].message)
    assert str(f) in msg and good in msg and bad in msg
    with pytest.raises(HashMismatchError, match=f"expected {good}.*got {bad}"):
        resolve_weights("tiny_release", strict_hash=True)


def test_sha256_is_cached_by_size_and_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(3 << 20))
    real = hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_sha256(f) == real
    cache = tmp_path / ".w.bin.sha256-cache.json"
    entry = json.loads(cache.read_text())
    assert entry["sha256"] == real and entry["size"] == f.stat().st_size
    entry["sha256"] = "0" * 64  # prove the cache is what answers while size and mtime are unchanged
    cache.write_text(json.dumps(entry))
    assert file_sha256(f) == "0" * 64
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # any modification moves mtime
    assert file_sha256(f) == real
    assert file_sha256(f, use_cache=False) == real


# ------------------------------------------------------------------------------------------------ convert
def test_convert_keeps_keys_records_metadata_and_sidecar(tmp_path, tiny_files):
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", str(tiny_files["regionclip"]), "-o", str(out)]) == 0
    orig, conv = load_state_dict(tiny_files["regionclip"]), load_state_dict(out)
    assert set(conv) == set(orig) and all(torch.equal(orig[k], conv[k]) for k in orig)  # order: safetensors sorts
    info = file_info(out)
    assert info is not None and info.format == "regionclip" and info.embed_dim == 16 and info.rpn == "fpn"
    assert info.checkpoint_kind == "pretrained" and info.source_file == "tiny_regionclip.pth"
    assert info.source_sha256 == hashlib.sha256(tiny_files["regionclip"].read_bytes()).hexdigest()
    assert json.loads(read_metadata(out)["regionclip.clip_config"])["width"] == 8
    assert read_sha256_sidecar(out) == hashlib.sha256(out.read_bytes()).hexdigest()


def test_converted_weights_give_byte_identical_detections(tmp_path, tiny_files, demo_images, home):
    """GT boxes (coco-gt) and the RPN stored in the file (offline_* keys, lvis-rpn settings): same results.json."""
    conv_w, conv_e = tmp_path / "w.safetensors", tmp_path / "e.safetensors"
    assert main(["convert", str(tiny_files["regionclip"]), "-o", str(conv_w)]) == 0
    assert main(["convert", str(tiny_files["concept_emb"]), "-o", str(conv_e)]) == 0
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({demo_images[0].name: [[100, 100, 900, 700], [1000, 200, 1500, 900]]}))
    images = demo_images[:1]  # one 1920x1080 image: the tiny model still runs at 1333x750 (seconds on 2 cores)
    for mode, extra in (("gt", ["--preset", "coco-gt", "--boxes", str(boxes), "--score-thresh", "0"]),
                        ("rpn", ["--preset", "lvis-rpn", "--score-thresh", "0", "--rpn-score", "sigmoid"])):
        a = _detect(tmp_path / f"a_{mode}", images, tiny_files["regionclip"], tiny_files["concept_emb"], *extra)
        b = _detect(tmp_path / f"b_{mode}", images, conv_w, conv_e, *extra)
        assert len(json.loads(a)) > 0 and a == b


@pytest.mark.slow
def test_full_size_rn50_converted_matches_original_on_parity_gt_boxes(tmp_path, rn50_ckpts, shared_dir, demo_images,
                                                                       home):
    """The seed-0 official-format RN50 checkpoint (400 MB) and the parity GT boxes: byte-identical results.json."""
    conv = tmp_path / "rn50.safetensors"
    assert main(["convert", str(rn50_ckpts["regionclip"]), "-o", str(conv)]) == 0
    assert file_info(conv).architecture == "RN50"
    gt = ["--preset", "coco-gt", "--boxes", str(shared_dir / "parity" / "gt_boxes.json")]
    a = _detect(tmp_path / "a", demo_images, rn50_ckpts["regionclip"], rn50_ckpts["concept_emb"], *gt)
    b = _detect(tmp_path / "b", demo_images, conv, rn50_ckpts["concept_emb"], *gt)
    assert len(json.loads(a)) > 0 and a == b


def test_embedding_file_keeps_names_for_make_vocabulary(tmp_path, tiny_files, home):
    out = tmp_path / "emb.safetensors"
    assert main(["convert", str(tiny_files["concept_emb"]), "--names", "cat,traffic cone,forklift", "-o",
                 str(out)]) == 0
    assert SAFETENSORS_KEY == EMBEDDINGS_KEY  # the same layout embed-concepts writes
    assert file_info(out).class_names == ["cat", "traffic cone", "forklift"]
    model = RegionCLIP.from_pretrained(tiny_files["regionclip"], regions="gt")
    vocab = model.make_vocabulary(class_embeddings=out)
    assert vocab.names == ("cat", "traffic cone", "forklift")
    assert torch.equal(vocab.class_embeddings, read_weight_file(tiny_files["concept_emb"]))
    with pytest.raises(ValueError, match="2 class names for 3 embedding rows"):
        convert_file(tiny_files["concept_emb"], tmp_path / "x.safetensors", class_names=["a", "b"])


def test_rpn_and_openai_files_convert_with_their_architecture(tmp_path, home):
    rpn = write_tiny_rpn(tmp_path / "rpn.pth")
    _, meta = convert_file(rpn, tmp_path / "rpn.safetensors")
    assert meta["regionclip.format"] == "rpn" and meta["regionclip.rpn"] == "fpn"
    assert set(load_state_dict(tmp_path / "rpn.safetensors")) == set(load_state_dict(rpn))
    clip = write_tiny_openai_clip(tmp_path / "clip.pth")
    _, meta = convert_file(clip, tmp_path / "clip.safetensors")
    assert meta["regionclip.format"] == "openai-clip" and meta["regionclip.embed_dim"] == "16"


def test_convert_refuses_what_no_loader_accepts(tmp_path, home, capsys):
    clip_rpn = {"backbone.bottom_up.conv1.weight": torch.zeros(32, 3, 3, 3),  # FPN on a CLIP ResNet trunk whose
                "backbone.bottom_up.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),  # layer2..4 are missing
                "backbone.fpn_lateral2.weight": torch.zeros(256, 256, 1, 1),
                "proposal_generator.rpn_head.objectness_logits.weight": torch.zeros(3, 256, 1, 1)}
    torch.save({"model": clip_rpn}, tmp_path / "clip_rpn.pth")
    with pytest.raises(CheckpointError, match="unsupported RPN.*missing CLIP ResNet stage.*Supported RPN files"):
        convert_file(tmp_path / "clip_rpn.pth", tmp_path / "o.safetensors")
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "junk.pth")
    assert main(["convert", str(tmp_path / "junk.pth"), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert main(["convert", str(tmp_path / "junk.pth"), "-o", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert "cannot convert an unknown checkpoint" in err and "must name a .safetensors file" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_names_prefer_safetensors_in_the_weights_folder(tmp_path, home, tiny_files):
    shutil.copy(tiny_files["regionclip"], home / "regionclip_pretrained-cc_rn50.pth")
    assert resolve_weights("regionclip_pretrained-cc_rn50") == home / "regionclip_pretrained-cc_rn50.pth"
    convert_file(home / "regionclip_pretrained-cc_rn50.pth", home / "regionclip_pretrained-cc_rn50.safetensors")
    assert resolve_weights("regionclip_pretrained-cc_rn50") == home / "regionclip_pretrained-cc_rn50.safetensors"
    assert resolve_weights("regionclip_pretrained-cc_rn50.pth") == home / "regionclip_pretrained-cc_rn50.safetensors"
    # a converted file that is later damaged is caught by its sidecar
    conv = home / "regionclip_pretrained-cc_rn50.safetensors"
    data = bytearray(conv.read_bytes())
    data[-5] ^= 0x01
    conv.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError, match="regionclip_pretrained-cc_rn50.safetensors.sha256"):
        resolve_weights("regionclip_pretrained-cc_rn50", strict_hash=True)


# ------------------------------------------------------------------------------------------------ hub
def _fake_hub(monkeypatch, cache: Path) -> None:
    """Server side only: an upload lands in the HF cache layout a download of that commit produces."""
    import huggingface_hub
    from huggingface_hub import constants

    def create_repo(self, repo_id, **kw):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, revision=None, **kw):
        commit = hashlib.sha1(repo_id.encode() + str(sorted(os.listdir(folder_path))).encode()).hexdigest()
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder_path, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(commit)
        return f"https://huggingface.co/{repo_id}/commit/{commit}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the download side never reaches a network


def test_hub_round_trip_offline(tmp_path, home, tiny_files, demo_images, monkeypatch):
    _fake_hub(monkeypatch, home / "hf")
    rpn = write_tiny_rpn(tmp_path / "rpn.pth", seed=3)
    url = push_to_hub(tiny_files["regionclip"], "someone/tiny-regionclip", rpn=rpn,
                      class_embeddings=tiny_files["concept_emb"], class_names=["cat", "dog", "car"])
    assert url.startswith("https://huggingface.co/someone/tiny-regionclip/commit/")
    path = resolve_weights("hf://someone/tiny-regionclip")
    assert path.name == "model.safetensors" and read_sha256_sidecar(path) is not None
    comp = companion_files(path)
    assert set(comp) == {"rpn", "class_embeddings"}
    assert file_info(comp["class_embeddings"]).class_names == ["cat", "dog", "car"]
    card = (path.parent / "README.md").read_text()
    assert "pipeline_tag: zero-shot-object-detection" in card and "hf://someone/tiny-regionclip" in card
    assert all(p.reported in card for p in PRESETS.values() if p.reported)

    hub_model = RegionCLIP.from_pretrained("hf://someone/tiny-regionclip", rpn_weights=str(comp["rpn"]))
    local_model = RegionCLIP.from_pretrained(tiny_files["regionclip"], rpn_weights=rpn)
    images = [str(demo_images[0])]
    da = local_model.detect(images, vocabulary=local_model.make_vocabulary(class_embeddings=tiny_files["concept_emb"]),
                            score_thresh=0.0, rpn_score="sigmoid")
    db = hub_model.detect(images, vocabulary=hub_model.make_vocabulary(class_embeddings=comp["class_embeddings"]),
                          score_thresh=0.0, rpn_score="sigmoid")
    for a, b in zip(da, db):
        assert len(a) > 0 and torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
        assert b.names[0] in ("cat", "dog", "car")
    assert resolve_weights("hf://someone/tiny-regionclip/rpn.safetensors") == comp["rpn"]
    with pytest.raises(FileNotFoundError, match="hf://someone/other"):
        resolve_weights("hf://someone/other")


def test_parse_hf_uri_and_model_card():
    assert parse_hf_uri("hf://a/b") == ("a/b", None, None)
    assert parse_hf_uri("hf://a/b@v1/sub/x.safetensors") == ("a/b", "sub/x.safetensors", "v1")
    with pytest.raises(ValueError, match="hf://user/repo"):
        parse_hf_uri("hf://only")
    card = model_card({"regionclip.architecture": "RN50x4", "regionclip.checkpoint_kind": "finetuned-lvis"},
                      repo_id="u/r")
    assert "# RegionCLIP RN50x4 (finetuned-lvis)" in card and "866 frequent + common" in card


def test_torch_hub_entry_point(tmp_path, tiny_files, home):
    conv, _ = convert_file(tiny_files["regionclip"], tmp_path / "tiny.safetensors")
    model = torch.hub.load(str(REPO), "regionclip", source="local", weights=str(conv), regions="gt")
    assert isinstance(model, RegionCLIP) and model.weights_path == conv and model.detector.embed_dim == 16
