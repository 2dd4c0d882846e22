from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from helpers_model import tiny_config, tiny_model

from wsiseg.card import ModelConfig, ModelLoadError, load_card
from wsiseg.detections import TileDetections, fill_holes, paste_masks, resolve_overlaps
from wsiseg.inference import (
    MaskRCNNPredictor,
    infer_batches,
    raw_detections,
    select_device,
)
from wsiseg.model import build_model, load_model


def test_save_load_round_trip(tmp_path):
    path, model, card = tiny_model(tmp_path, classes=("tumour", "lymphocyte"))
    loaded, card2 = load_model(path)
    assert card2.class_names == ["tumour", "lymphocyte"]
    assert card2.classes[0].color == card.classes[0].color and card2.mpp == card.mpp
    assert card2.config == card.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert (tmp_path / "tiny.json").exists()  # human-readable card beside the weights
    assert path.stat().st_mode & 0o044 == 0o044  # others can read a shared model (safetensors alone writes 0600)


def test_half_precision_storage(tmp_path):
    from wsiseg.model import save_model

    path, model, card = tiny_model(tmp_path)
    half = save_model(model, card, tmp_path / "half.safetensors", half=True)
    assert half.stat().st_size < path.stat().st_size * 0.6
    loaded, _ = load_model(half)
    w = dict(loaded.named_parameters())["backbone.body.conv1.weight"]
    assert w.dtype == torch.float32
    assert torch.allclose(w, dict(model.named_parameters())["backbone.body.conv1.weight"], atol=1e-2)


def test_pickles_are_refused(tmp_path):
    evil = tmp_path / "model.safetensors"
    evil.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(evil)
    with pytest.raises(ModelLoadError, match="no such model"):
        load_model(tmp_path / "missing.safetensors")


def test_card_without_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(ModelLoadError, match="model card"):
        load_card(p)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_backbones_build_without_downloads(backbone):
    cfg = ModelConfig(backbone=backbone, anchor_sizes=(16, 32, 64, 128, 256), tile_size=128, fpn_channels=64,
                      box_head_dim=128, mask_head_channels=32)
    m = build_model(cfg)
    frozen = [n for n, mod in m.named_modules() if type(mod).__name__ == "FrozenBatchNorm2d"]
    assert frozen == []  # trains from scratch: real normalisation layers
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 128, 128)])[0]
    assert out["masks"].shape[1:] == (1, 128, 128) and out["boxes"].shape[1] == 4


def test_the_model_never_rescales_its_input():
    # tiles of any size (a slide's tiles, training crops smaller than them) are at the model's resolution
    m = build_model(ModelConfig(tile_size=256, fpn_channels=32, box_head_dim=32, mask_head_channels=16, width=8))
    x = torch.rand(3, 96, 160)
    for mode in (m.train, m.eval):
        mode()
        images, _ = m.transform([x])
        assert images.image_sizes == [(96, 160)]
        assert torch.allclose(images.tensors[0, :, :96, :160], m.transform.normalize(x))


def test_select_device_cpu():
    d = select_device("cpu")
    assert d.device.type == "cpu" and d.autocast_dtype == torch.bfloat16 and d.channels_last and not d.pin_memory
    assert select_device("cpu", "fp32").autocast_dtype is None
    with pytest.raises(ValueError, match="fp16"):
        select_device("cpu", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            select_device("cuda")
        assert select_device("auto").device.type == "cpu"


def test_infer_batches_runs_streams_at_once_and_keeps_the_order():
    import threading
    import time

    class Slow:
        streams = 2

        def __init__(self):
            self.running = self.most = 0
            self.lock = threading.Lock()
            self.threads_seen = set()

        def infer(self, tiles):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            self.threads_seen.add(torch.get_num_threads())
            time.sleep(0.05 if int(tiles[0, 0, 0, 0]) % 2 else 0.01)  # odd batches finish last
            with self.lock:
                self.running -= 1
            return [int(tiles[0, 0, 0, 0])]

    before = torch.get_num_threads()
    p = Slow()
    batches = ((k, np.full((1, 2, 2, 3), k, np.uint8)) for k in range(9))
    got = [(k, out) for k, _, out in infer_batches(p, batches)]
    assert got == [(k, [k]) for k in range(9)]
    assert p.most == 2 and p.threads_seen == {max(1, before // 2)}
    assert torch.get_num_threads() == before  # restored
    p.streams = 1
    assert [k for k, _, _ in infer_batches(p, ((k, np.full((1, 2, 2, 3), k, np.uint8)) for k in range(3)))] == [0, 1, 2]
    assert p.most == 2 and torch.get_num_threads() == before


def test_two_cpu_streams_give_the_same_detections_as_one(tmp_path):
    import dataclasses

    path, _, _ = tiny_model(tmp_path)
    model, card = load_model(path)
    one = MaskRCNNPredictor(model, card, dataclasses.replace(select_device("cpu", "fp32"), streams=1))
    two = MaskRCNNPredictor(model, card, dataclasses.replace(select_device("cpu", "fp32"), streams=2))
    tiles = (np.random.default_rng(0).random((6, 128, 128, 3)) * 255).astype(np.uint8)
    batches = [(i, tiles[i : i + 2]) for i in range(0, 6, 2)]
    a = [out for _, _, out in infer_batches(one, batches)]
    b = [out for _, _, out in infer_batches(two, batches)]
    for xa, xb in zip(a, b):
        for ra, rb in zip(xa, xb):
            np.testing.assert_allclose(ra.boxes, rb.boxes, atol=0.5)
            np.testing.assert_allclose(ra.scores, rb.scores, atol=0.02)


def test_predictor_outputs_tile_detections(tmp_path):
    path, _, _ = tiny_model(tmp_path)
    model, card = load_model(path)
    pred = MaskRCNNPredictor(model, card, select_device("cpu"))
    tiles = (np.random.default_rng(0).random((3, 128, 128, 3)) * 255).astype(np.uint8)
    dets = pred.predict(tiles)
    assert len(dets) == 3
    for d in dets:
        assert len(d) > 0  # score threshold 0: random weights still propose nuclei
        assert d.boxes.dtype == np.int32 and (d.boxes[:, 2] <= 128).all() and (d.boxes[:, 0] >= 0).all()
        for b, m in zip(d.boxes, d.masks):
            assert m.shape == (b[3] - b[1], b[2] - b[0]) and m.dtype == bool and m.any()
        # overlaps resolved: painting all masks never writes a pixel twice
        canvas = np.zeros((128, 128), int)
        for b, m in zip(d.boxes, d.masks):
            canvas[b[1] : b[3], b[0] : b[2]] += m
        assert canvas.max() <= 1
    # bf16 autocast and fp32 agree on the boxes that both find
    fp32 = MaskRCNNPredictor(model, card, select_device("cpu", "fp32")).forward(tiles[:1])[0]
    assert fp32["masks"].shape[1:] == (1, 28, 28)


def test_raw_detections_of_a_batch_split_back_per_tile():
    g = torch.Generator().manual_seed(0)

    def tile(n):
        return {"boxes": torch.rand(n, 4, generator=g) * 200, "scores": torch.rand(n, generator=g),
                "labels": torch.randint(1, 5, (n,), generator=g), "masks": torch.rand(n, 1, 28, 28, generator=g)}

    raw = [tile(3), tile(0), tile(5)]
    out = raw_detections(raw)
    assert [len(r) for r in out] == [3, 0, 5]
    for d, r in zip(raw, out):
        assert np.array_equal(r.boxes, d["boxes"].numpy()) and r.boxes.dtype == np.float32
        assert np.array_equal(r.scores, d["scores"].numpy()) and r.scores.dtype == np.float32
        assert np.array_equal(r.labels, d["labels"].numpy() - 1) and r.labels.dtype == np.int32
        assert np.array_equal(r.mask_probs, d["masks"][:, 0].numpy()) and r.mask_probs.shape[1:] == (28, 28)
    assert raw_detections([]) == []


def test_paste_masks_geometry():
    prob = np.ones((1, 28, 28), np.float32)
    boxes, masks = paste_masks(prob, np.array([[10.0, 20.0, 30.0, 25.0]]), (64, 64))
    assert tuple(boxes[0]) == (10, 20, 30, 25)
    assert masks[0].shape == (5, 20) and masks[0].all()


@pytest.mark.parametrize("box", [(10.0, 20.0, 50.0, 60.0), (3.3, 7.6, 17.9, 40.2), (30.0, 5.0, 90.0, 25.0)])
def test_paste_masks_puts_the_shape_where_the_box_says(box):
    yy, xx = np.mgrid[:28, :28]
    prob = (((xx + 0.5 - 10) / 7) ** 2 + ((yy + 0.5 - 17) / 10) ** 2 < 1).astype(np.float32)  # off-centre ellipse
    ib, masks = paste_masks(prob[None], np.array([box]), (96, 128))
    ours = np.zeros((96, 128), bool)
    x0, y0, x1, y1 = ib[0]
    ours[y0:y1, x0:x1] = masks[0]
    # the same ellipse in image coordinates, sampled at pixel centres
    bx0, by0, bx1, by1 = box
    u = (np.arange(128) + 0.5 - bx0) / (bx1 - bx0) * 28
    v = (np.arange(96) + 0.5 - by0) / (by1 - by0) * 28
    ref = ((u[None, :] - 10) / 7) ** 2 + ((v[:, None] - 17) / 10) ** 2 < 1
    iou = (ours & ref).sum() / (ours | ref).sum()
    assert iou > 0.9, iou
    cy, cx = np.argwhere(ours).mean(0)
    ry, rx = np.argwhere(ref).mean(0)
    assert abs(cy - ry) < 0.5 and abs(cx - rx) < 0.5


def test_resolve_overlaps_gives_pixels_to_higher_score():
    a = np.ones((10, 10), bool)
    det = TileDetections(np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.int32), np.array([0.6, 0.9], np.float32),
                         np.array([0, 0], np.int32), [a, a.copy()])
    out = resolve_overlaps(det)
    assert len(out) == 2
    by_score = sorted(zip(out.scores.tolist(), (int(m.sum()) for m in out.masks)))
    assert by_score[1][1] == 100 and by_score[0][1] == 50


def test_resolve_overlaps_drops_a_detection_left_with_less_than_half_of_its_mask():
    # a lower-scoring detection mostly inside a higher-scoring one is the same nucleus found twice: its
    # leftover sliver is not a nucleus of its own; one that keeps half of its mask or more stays
    big, small = np.ones((10, 10), bool), np.ones((10, 4), bool)
    for x0, kept in ((8, 2 / 4), (9, 3 / 4), (7, 1 / 4)):
        det = TileDetections(np.array([[0, 0, 10, 10], [x0, 0, x0 + 4, 10]], np.int32),
                             np.array([0.9, 0.8], np.float32), np.array([0, 0], np.int32), [big, small.copy()])
        out = resolve_overlaps(det)
        assert len(out) == (2 if kept >= 0.5 else 1), x0
        assert int(out.masks[0].sum()) == 100 and out.scores[0] == np.float32(0.9)
    assert len(resolve_overlaps(det, min_kept=0.0)) == 2  # the rule can be turned off


def test_fill_holes_matches_scipy():
    from scipy.ndimage import binary_fill_holes

    rng = np.random.default_rng(0)
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    assert fill_holes(ring).all()
    for _ in range(200):
        m = rng.random(tuple(rng.integers(1, 30, 2))) < rng.uniform(0.2, 0.9)
        np.testing.assert_array_equal(fill_holes(m), binary_fill_holes(m))


def test_heap_trimmer_trims_at_the_watermark_only():
    from wsiseg.inference import HeapTrimmer, _malloc_trim, _rss_bytes

    rss = [100, 150, 229, 231, 120, 200, 249, 251, 140]
    calls = []
    t = HeapTrimmer(slack_mb=0, rss=lambda: rss.pop(0) * 2**20, trim=calls.append)
    t.slack = 130 * 2**20
    t()  # first call sets the limit: 100 + 130
    t(), t()  # 150, 229: under the limit
    assert calls == []
    t()  # 231 > 230: trims, and the new limit is the trimmed size (120) + 130
    assert calls == [0] and t.limit == 250 * 2**20
    t(), t()  # 200, 249
    assert calls == [0]
    t()  # 251: trims again
    assert calls == [0, 0] and t.trims == 2
    import sys

    if sys.platform.startswith("linux"):
        assert _rss_bytes() > 0 and _malloc_trim() is not None


def _monuseg_tiles(data_dir) -> np.ndarray:
    """Two 256 px tiles of a MoNuSeg image, for tests that run the default model."""
    from PIL import Image

    img = np.asarray(Image.open(data_dir / "monuseg-train" / "images" / "TCGA-21-5784-01Z-00-DX1.png").convert("RGB"))
    return np.stack([img[:256, :256], img[300:556, 500:756]])


def test_prefilter_keeps_the_same_detections(data_dir):
    """Dropping boxes below the score threshold before the mask head changes no detection that is kept."""
    from wsiseg.card import default_model_path

    tiles = _monuseg_tiles(data_dir)
    fast = MaskRCNNPredictor(*load_model(default_model_path()), select_device("cpu", "fp32"))
    full = MaskRCNNPredictor(*load_model(default_model_path()), select_device("cpu", "fp32"), prefilter=False)
    assert fast.model.roi_heads.score_thresh == fast.score_threshold > full.model.roi_heads.score_thresh
    for a, b in zip(fast.predict(tiles), full.predict(tiles)):
        assert len(a) > 5 and len(a) == len(b)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
        assert sum((ma != mb).sum() for ma, mb in zip(a.masks, b.masks)) <= 2


def test_consep_classes_get_distinct_colours_that_stand_out_on_he():
    from wsiseg.card import default_classes

    classes = default_classes(["epithelial", "inflammatory", "spindle", "other"])
    cols = np.array([c.color for c in classes], float)
    assert len({tuple(c) for c in cols}) == 4
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.linalg.norm(cols[a] - cols[b]) > 120  # distinct from one another
    haematoxylin, eosin, background = np.array([70, 50, 130]), np.array([230, 150, 190]), np.array([240, 240, 240])
    for c in cols:  # outlines visible on nuclei, on stroma and on glass
        assert min(np.linalg.norm(c - haematoxylin), np.linalg.norm(c - eosin), np.linalg.norm(c - background)) > 90


def test_mask_head_on_nchw_maps_keeps_the_same_detections(data_dir):
    """On the CPU the mask head runs on NCHW maps (its GroupNorm is faster there) and the rest channels-last:
    the same detections as with every layer channels-last."""
    from wsiseg.card import default_model_path

    tiles = _monuseg_tiles(data_dir)
    mixed = MaskRCNNPredictor(*load_model(default_model_path()), select_device("cpu", "fp32"))
    assert mixed.device.channels_last
    head = mixed.model.roi_heads.mask_head[0][0].weight
    assert head.is_contiguous() and not head.is_contiguous(memory_format=torch.channels_last)
    first_conv = next(m for m in mixed.model.backbone.body.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    nhwc = MaskRCNNPredictor(*load_model(default_model_path()), select_device("cpu", "fp32"))
    nhwc.model.roi_heads.mask_head.to(memory_format=torch.channels_last)
    for a, b in zip(mixed.predict(tiles), nhwc.predict(tiles)):
        assert len(a) > 5 and len(a) == len(b)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert sum((ma != mb).sum() for ma, mb in zip(a.masks, b.masks)) <= 2


def test_roi_sampling_ratio_comes_from_the_card():
    import dataclasses

    from wsiseg.card import ModelCard, default_classes

    m = build_model(dataclasses.replace(tiny_config(), roi_sampling_ratio=1))
    assert m.roi_heads.box_roi_pool.sampling_ratio == 1 and m.roi_heads.mask_roi_pool.sampling_ratio == 1
    assert ModelConfig().roi_sampling_ratio == 2  # cards written before the field keep torchvision's default
    card = ModelCard(name="x", classes=default_classes(["nucleus"]), mpp=0.25, tile_size=128, overlap=32,
                     config=ModelConfig(roi_sampling_ratio=-1))
    with pytest.raises(ValueError, match="roi_sampling_ratio"):
        card.validate()


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large", "efficientnet_lite0"])
def test_folding_batchnorm_keeps_the_network_the_same_function(backbone):
    """Inference folds each BatchNorm into the convolution before it (bf16 on the CPU: no fp32 round trip per
    layer); the folded network must compute what the trained one computes, BatchNorm statistics included."""
    import copy

    from wsiseg.model import fold_batchnorm

    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_config().__dict__, "backbone": backbone, "norm": "batchnorm"})
    model = build_model(cfg).eval()
    with torch.no_grad():  # statistics and affine parameters far from the identity, so folding matters
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 2)
                    m.bias.uniform_(-0.5, 0.5)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(copy.deepcopy(model).train())
    folded = fold_batchnorm(copy.deepcopy(model))
    assert not [n for n, m in folded.named_modules() if getattr(m, "running_var", None) is not None]
    x = torch.rand(2, 3, 128, 128)
    with torch.inference_mode():
        want, got = model.backbone(x), folded.backbone(x)
        for k in want:
            scale = want[k].abs().max().item()
            assert torch.allclose(got[k], want[k], atol=1e-4 * scale, rtol=1e-4), (backbone, k)
        a, b = model(list(x)), folded(list(x))
    for da, db in zip(a, b):
        n = min(len(da["scores"]), len(db["scores"]), 20)
        assert torch.allclose(da["scores"][:n], db["scores"][:n], atol=1e-3)


def test_the_predictor_folds_its_own_model_not_the_saved_weights(tmp_path):
    from wsiseg.card import ModelCard, default_classes
    from wsiseg.model import save_model

    cfg = ModelConfig(**{**tiny_config().__dict__, "backbone": "efficientnet_lite0"})
    card = ModelCard(name="tiny-lite0", classes=default_classes(["nucleus"]), mpp=0.5, tile_size=128, overlap=48,
                     config=cfg, score_threshold=0.0, description="random weights")
    path = save_model(build_model(cfg), card, tmp_path / "lite0.safetensors")
    net, _ = load_model(path)
    pred = MaskRCNNPredictor(net, card, select_device("cpu"))
    assert not [m for m in pred.model.modules() if getattr(m, "running_var", None) is not None]
    again, _ = load_model(path)  # the file is untouched: the same network loads from it
    assert any(getattr(m, "running_var", None) is not None for m in again.modules())
