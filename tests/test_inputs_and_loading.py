"""Bad input gets a clear error; odd-but-valid input has documented behaviour. Tiny checkpoints, CPU, seconds."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from regionclip import RegionCLIP
from regionclip.checkpoint.io import CheckpointError
from regionclip.config import InputConfig
from regionclip.data.images import ImageReadError, load_image, resize_image, resized_shape
from regionclip.factory import load_detector
from regionclip.modeling.clip_resnet import ModifiedResNet


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    m = ModifiedResNet((1, 1, 1, 1), 16, 2, 64, 8)
    sd = {"backbone." + k: v for k, v in m.state_dict().items()}
    p = tmp_path / "tiny_regionclip.pth"
    torch.save({"model": sd}, p)
    return p


@pytest.fixture
def tiny_model(tiny_ckpt):
    model = RegionCLIP.from_pretrained(tiny_ckpt, preset="coco-gt")
    model.pipeline.input_cfg = InputConfig(min_size=64, max_size=128)
    return model


def test_tiny_checkpoint_loads_strictly(tiny_ckpt):
    det, info = load_detector(tiny_ckpt, use_rpn=False)
    assert info.report.ok and len(info.report.loaded) > 0
    assert det.pooler_resolution == 4 and det.embed_dim == 16 and det.rpn is None


def test_rpn_file_given_as_weights(tmp_path):
    p = tmp_path / "rpn.pth"
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
                          "proposal_generator.rpn_head.conv.weight": torch.zeros(256, 256, 3, 3)}}, p)
    with pytest.raises(CheckpointError, match="rpn-weights"):
        load_detector(p)


def test_unexpected_keys_strict_and_non_strict(tiny_ckpt, tmp_path):
    sd = torch.load(tiny_ckpt, weights_only=True)["model"]
    sd["roi_heads.something_new.weight"] = torch.zeros(3)
    p = tmp_path / "extra.pth"
    torch.save({"model": sd}, p)
    with pytest.raises(CheckpointError, match="something_new"):
        load_detector(p, use_rpn=False)
    _, info = load_detector(p, use_rpn=False, strict=False)
    assert info.report.unexpected == ["roi_heads.something_new.weight"]


def test_shape_mismatch_reported(tiny_ckpt, tmp_path):
    sd = torch.load(tiny_ckpt, weights_only=True)["model"]
    sd["backbone.layer2.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    p = tmp_path / "bad.pth"
    torch.save({"model": sd}, p)
    with pytest.raises(CheckpointError, match="SHAPE MISMATCH"):
        load_detector(p, use_rpn=False)


def test_not_a_weight_file(tmp_path):
    p = tmp_path / "garbage.pth"
    p.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="is not a checkpoint file"):
        load_detector(p)


def test_concept_embeddings_errors(tiny_model, tmp_path):
    wrong_dim = tmp_path / "emb640.pth"
    torch.save(torch.randn(3, 640), wrong_dim)
    with pytest.raises(ValueError, match=r"640-d.*16-d"):
        tiny_model.set_vocabulary(["a", "b", "c"], wrong_dim)
    rows = tmp_path / "emb.pth"
    torch.save(torch.randn(4, 16), rows)
    with pytest.raises(ValueError, match="4 rows but the vocabulary has 3 names"):
        tiny_model.set_vocabulary("a,b,c", rows)
    with pytest.raises(ValueError, match="empty"):
        tiny_model.set_vocabulary(" , ,", rows)
    one = tmp_path / "one.pth"
    torch.save(torch.randn(16), one)  # the original saved a 1-concept file as [D]
    assert tiny_model.set_vocabulary(["cat"], one) == ["cat"]


def test_detect_without_vocabulary_or_rpn_is_clear(tiny_model, demo_images):
    assert tiny_model.vocabulary is None
    with pytest.raises(ValueError, match="no vocabulary"):
        tiny_model.detect([demo_images[0]], boxes=[[[0, 0, 100, 100]]])
    tiny_model.set_vocabulary(["a", "b"], torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="no region proposal network"):
        tiny_model.detect([demo_images[0]])


def test_degenerate_and_outside_boxes(tiny_model, demo_images):
    tiny_model.set_vocabulary(["a", "b"], torch.randn(2, 16))
    with pytest.raises(ValueError, match="zero or negative width"):
        tiny_model.detect([demo_images[0]], boxes=[[[10, 10, 10, 50]]])
    with pytest.raises(ValueError, match="outside"):
        tiny_model.detect([demo_images[0]], boxes=[[[5000, 10, 5100, 50]]])
    with pytest.raises(ValueError, match=r"\[R, 4\]"):
        tiny_model.detect([demo_images[0]], boxes=[[[1, 2, 3]]])
    # boxes sticking out of the image are clipped, like the original's GT boxes
    d = tiny_model.detect([demo_images[0]], boxes=[[[-50, -50, 300, 300]]])[0]
    assert len(d) >= 1 and float(d.boxes.min()) >= 0


def test_corrupt_image(tmp_path):
    p = tmp_path / "broken.jpg"
    data = open(__import__("regionclip").assets.demo_image_paths()[0], "rb").read()
    p.write_bytes(data[:200])
    with pytest.raises(ImageReadError, match="broken.jpg"):
        load_image(p)
    with pytest.raises(ImageReadError, match="not found"):
        load_image(tmp_path / "missing.jpg")


def test_grayscale_rgba_and_exif(tmp_path):
    gray = Image.fromarray(np.full((20, 30), 128, np.uint8), mode="L")
    assert load_image(gray).shape == (3, 20, 30)
    rgba = Image.fromarray(np.zeros((20, 30, 4), np.uint8), mode="RGBA")
    assert load_image(rgba).shape == (3, 20, 30)  # alpha dropped without compositing, as the original
    # EXIF orientation 6 (rotate 90° CW to display): stored 20x30 (HxW) -> displayed 30x20
    img = Image.fromarray(np.random.randint(0, 255, (20, 30, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    p = tmp_path / "rot.jpg"
    p.write_bytes(buf.getvalue())
    assert load_image(p).shape == (3, 30, 20)


def test_resize_rule_matches_detectron2():
    assert resized_shape(1080, 1920, 800, 1333) == (750, 1333)  # spec §13
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert resized_shape(1000, 100, 800, 1333) == (1333, 133)  # long side capped, rounded half up
    img = torch.zeros(3, 1080, 1920, dtype=torch.uint8)
    assert resize_image(img).shape == (3, 750, 1333)


def test_user_boxes_scaled_like_the_original_mapper(tiny_model, demo_images):
    """Integer boxes are truncated after scaling (detectron2 scales them in an integer array); floats are not."""
    pipe = tiny_model.pipeline
    pipe.input_cfg = InputConfig()  # 1920x1080 -> 1333x750, as the parity fixtures
    p = pipe.prepare(demo_images[0])
    ints = pipe.user_regions([[540, 660, 1290, 1080]], p).boxes
    floats = pipe.user_regions([[540.0, 660.0, 1290.0, 1080.0]], p).boxes
    s = 1333 / 1920, 750 / 1080
    assert ints.tolist() == [[float(int(540 * s[0])), float(int(660 * s[1])), float(int(1290 * s[0])), 750.0]]
    torch.testing.assert_close(floats, torch.tensor([[540 * s[0], 660 * s[1], 1290 * s[0], 750.0]]))


def test_rpn_inside_regionclip_checkpoint_and_rpn_file_override(tmp_path, demo_images):
    """The README demo runs the RPN stored in the RegionCLIP file (offline_* keys); a separate RPN file replaces
    exactly those weights and nothing else (spec §3.5)."""
    from regionclip.config import ClipResNetConfig, DetectorConfig, RPNConfig
    from regionclip.factory import build_detector

    torch.manual_seed(0)
    rpn_cfg = RPNConfig.fpn(resnet_layers=(1, 1, 1, 1), stem_out_channels=8, width_per_group=4, res2_out_channels=16,
                            fpn_out_channels=16, post_nms_topk=50)
    det = build_detector(DetectorConfig(clip=ClipResNetConfig(layers=(1, 1, 1, 1), width=8, embed_dim=16, heads=2,
                                                              image_resolution=64), rpn=rpn_cfg))
    with torch.no_grad():
        for p in det.rpn.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {"backbone." + k: v for k, v in det.backbone.state_dict().items()}
    sd.update({"offline_" + k: v for k, v in det.rpn.state_dict().items()})  # backbone.* / proposal_generator.*
    main_file = tmp_path / "regionclip_with_rpn.pth"
    torch.save({"model": sd}, main_file)
    loaded, info = load_detector(main_file, rpn_overrides={"post_nms_topk": 50})  # NMS settings are not in files
    assert info.report.ok and loaded.rpn is not None
    img = load_image(demo_images[0])[:, :200, :300]
    ref = det.rpn([img.float()])[0]
    got = loaded.rpn([img.float()])[0]
    torch.testing.assert_close(got.boxes, ref.boxes)
    torch.testing.assert_close(got.objectness_logits, ref.objectness_logits)
    # a separate d2 RPN file (other weights) overrides the stored RPN; the CLIP backbone is untouched
    other = {k: v + 0.01 for k, v in det.rpn.state_dict().items()}
    rpn_file = tmp_path / "rpn.pth"
    torch.save({"model": {**other, "roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 4)}}, rpn_file)
    loaded2, info2 = load_detector(main_file, rpn_file, rpn_overrides={"post_nms_topk": 50})
    for k, v in other.items():
        torch.testing.assert_close(loaded2.rpn.state_dict()[k], v)
    for k, v in det.backbone.state_dict().items():
        assert torch.equal(loaded2.backbone.state_dict()[k], v)
    assert any("roi_heads.box_predictor.cls_score.weight" in k for k in info2.report.ignored)


def test_openai_clip_resnet_file_is_the_plain_clip_baseline(tmp_path, demo_images, monkeypatch):
    """An OpenAI CLIP ResNet state dict (visual.* + top-level text keys) loads through the explicit rename table:
    region classification with plain CLIP, vocabulary from its own text tower."""
    from regionclip.modeling.text_encoder import CLIPTextTransformer

    monkeypatch.setenv("REGIONCLIP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    vis = ModifiedResNet((1, 1, 1, 1), 16, 2, 64, 8)
    txt = CLIPTextTransformer(width=64, heads=1, layers=1, embed_dim=16)
    sd = {"visual." + k: v for k, v in vis.state_dict().items()}
    sd.update(txt.state_dict())
    sd["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "RN_tiny_openai.pt"
    torch.save(sd, path)
    model = RegionCLIP.from_pretrained(path, fuse=False)  # unfused: the loaded weights are the file's, unchanged
    assert model.loaded.report.ok and "logit_scale" in model.loaded.report.ignored
    for k, v in vis.state_dict().items():
        assert torch.equal(model.detector.backbone.state_dict()[k], v)
    model.pipeline.input_cfg = InputConfig(min_size=64, max_size=128)
    names = model.set_vocabulary("cat,dog")
    d = model.detect([demo_images[0]], boxes=[[[0, 0, 900, 700]]])[0]
    assert names == ["cat", "dog"] and len(d) >= 1
