from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsiseg.augment import random_crop
from wsiseg.datasets import Sample
from wsiseg.training import (
    PartialLabelRoIHeads,
    TrainConfig,
    apply_partial_mode,
    enable_partial_labels,
    extra_training_data,
    hide_labels,
    lr_at,
    partial_fastrcnn_loss,
    partial_maskrcnn_loss,
    split_names,
    train,
)


def _cls_inputs(seed=0, n=6, k=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k + 1, generator=g, requires_grad=True)
    box = torch.randn(n, 4 * (k + 1), generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    targets = torch.randn(n, 4, generator=g)
    return logits, box, labels, targets


def test_unknown_class_adds_nothing_to_class_loss():
    logits, box, labels, targets = _cls_inputs()
    known = torch.tensor([1.0, 1, 0, 1, 1, 1])  # proposal 2 matched a nucleus of unknown class
    cls, _ = partial_fastrcnn_loss(logits, box, [labels], [targets], [known])
    (g,) = torch.autograd.grad(cls, logits)
    p = torch.softmax(logits.detach(), -1)
    # the unknown one trains "nucleus, not background" only: its foreground logits all move in proportion to
    # their probabilities, so the ratios between the classes (which class it is) do not change
    ratio = g[2, 1:] / p[2, 1:]
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
    assert g[2, 0] > 0 and ratio[0] < 0  # background pushed down, foreground as a whole up
    # exactly -log P(foreground), averaged over the proposals
    ref = logits.detach().clone().requires_grad_(True)
    fg = torch.logsumexp(ref[2, 1:], 0) - torch.logsumexp(ref[2], 0)
    (g_ref,) = torch.autograd.grad(-fg / len(labels), ref)
    torch.testing.assert_close(g[2], g_ref[2])
    # the others get the usual cross-entropy gradient
    keep = known.bool()
    ref = logits.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(ref, labels, reduction="sum") / len(labels), ref)
    torch.testing.assert_close(g[keep], g_ref[keep])


def test_one_class_model_scores_as_torchvision_does():
    """With one class, nucleus_detections is torchvision's post-processing."""
    from helpers_model import tiny_config
    from torchvision.models.detection.roi_heads import RoIHeads

    from wsiseg.model import build_model

    model = build_model(tiny_config(tile_size=128, num_classes=1)).eval()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 2, generator=g) * 3
    reg = torch.randn(50, 8, generator=g)
    props = [torch.rand(50, 2, generator=g) * 100]
    props = [torch.cat([props[0], props[0] + 5 + torch.rand(50, 2, generator=g) * 20], 1)]
    ours = model.roi_heads.postprocess_detections(logits, reg, props, [(128, 128)])
    theirs = RoIHeads.postprocess_detections(model.roi_heads, logits, reg, props, [(128, 128)])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a[0], b[0])


def test_unknown_class_still_trains_boxes_of_every_class():
    logits, box, labels, targets = _cls_inputs()
    known = torch.tensor([1.0, 1, 0, 1, 1, 1])
    _, reg = partial_fastrcnn_loss(logits, box, [labels], [targets], [known])
    (g,) = torch.autograd.grad(reg, box)
    row = g[2].reshape(4, 4)
    assert (row[0] == 0).all() and (row[1:].abs().sum(dim=1) > 0).all()  # background slot untouched
    # a known proposal trains only its own class's regressor
    own = g[1].reshape(4, 4)
    assert own[1].abs().sum() > 0 and own[[0, 2, 3]].abs().sum() == 0


def _mask_inputs(seed=0, n=4, k=2, m=14):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k + 1, m, m, generator=g, requires_grad=True)
    gt_masks = (torch.rand(n, 32, 32, generator=g) > 0.5).to(torch.uint8)
    props = torch.tensor([[2.0, 2, 20, 20], [4, 4, 28, 30], [0, 0, 16, 16], [10, 8, 30, 31]])
    return logits, gt_masks, props


def test_box_only_nucleus_adds_nothing_to_mask_loss():
    logits, gt_masks, props = _mask_inputs()
    labels = torch.tensor([1, 2, 1, 2])
    matched = torch.arange(4)
    class_known = torch.ones(4, dtype=torch.bool)
    mask_known = torch.tensor([True, False, True, True])  # nucleus 1 has only a box
    loss = partial_maskrcnn_loss(logits, [props], [gt_masks], [labels], [matched], [class_known], [mask_known])
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.equal(g[1], torch.zeros_like(g[1]))
    # the rest: the standard per-class mask loss over the three nuclei with masks
    from torchvision.models.detection.roi_heads import maskrcnn_loss

    keep = mask_known
    ref = logits.detach().clone().requires_grad_(True)
    ref_loss = maskrcnn_loss(ref[keep], [props[keep]], [gt_masks[keep]], [labels[keep]],
                             [torch.arange(int(keep.sum()))])
    (g_ref,) = torch.autograd.grad(ref_loss, ref)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(g[keep], g_ref[keep])


def test_unknown_class_nucleus_trains_every_class_mask():
    logits, gt_masks, props = _mask_inputs()
    labels = torch.tensor([1, 1, 2, 2])
    loss = partial_maskrcnn_loss(logits, [props], [gt_masks], [labels], [torch.arange(4)],
                                 [torch.tensor([True, False, True, True])], [torch.ones(4, dtype=torch.bool)])
    (g,) = torch.autograd.grad(loss, logits)
    assert g[1, 0].abs().sum() == 0 and g[1, 1].abs().sum() > 0 and g[1, 2].abs().sum() > 0
    assert g[0, 2].abs().sum() == 0  # a known nucleus trains only its class's mask


def test_roi_heads_train_with_partial_targets():
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers_model import tiny_config

    from wsiseg.model import build_model

    torch.manual_seed(0)
    model = enable_partial_labels(build_model(tiny_config(tile_size=128, num_classes=2)))
    assert isinstance(model.roi_heads, PartialLabelRoIHeads)
    model.train()
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 10:30, 10:30] = 1
    masks[1, 60:90, 50:70] = 1
    tgt = {"boxes": torch.tensor([[10.0, 10, 30, 30], [50, 60, 70, 90]]), "labels": torch.tensor([1, 2]),
           "masks": masks, "class_known": torch.tensor([True, False]), "mask_known": torch.tensor([False, True])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 128, 128, dtype=torch.uint8), "class_known": torch.zeros(0, dtype=torch.bool),
             "mask_known": torch.zeros(0, dtype=torch.bool)}
    losses = model([torch.rand(3, 128, 128), torch.rand(3, 128, 128)], [tgt, empty])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128)])
    assert "masks" in out[0]


def _sample(seed=0):
    rng = np.random.default_rng(seed)
    lab = np.zeros((200, 200), np.int32)
    for i in range(1, 21):
        y, x = rng.integers(10, 190, 2)
        lab[y - 5 : y + 5, x - 5 : x + 5] = i
    img = np.full((200, 200, 3), 230, np.uint8)
    img[lab > 0] = (60, 30, 110)
    present = [int(i) for i in np.unique(lab)[1:]]
    return Sample("img_000", img, lab, {i: i % 2 for i in present}, set(), 0.25)


def test_hide_labels_and_baselines():
    s = [_sample(i) for i in range(5)]
    hide_labels(s, 0.2, 0.2, seed=1)
    n = sum(len(np.unique(x.instances)) - 1 for x in s)
    no_cls = sum(len(np.unique(x.instances)) - 1 - len(x.classes) for x in s)
    no_mask = sum(len(x.no_mask) for x in s)
    assert 0.05 * n < no_cls < 0.4 * n and 0.05 * n < no_mask < 0.4 * n
    bg = apply_partial_mode(s, "background")
    for a, b in zip(s, bg):
        hidden = [i for i in np.unique(a.instances)[1:] if int(i) not in a.classes or int(i) in a.no_mask]
        assert all(not (b.instances == i).any() for i in hidden)
    assert apply_partial_mode(s, "drop") == []  # every image has some hidden label
    assert apply_partial_mode(s, "partial") is s


def test_random_crop_targets():
    s = _sample()
    s.no_mask.add(3)
    s.classes.pop(4, None)
    rng = np.random.default_rng(0)
    img, t = random_crop(s, 128, 0.25, rng, scale_jitter=0.0, hed=True)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    n = len(t["labels"])
    assert t["masks"].shape == (n, 128, 128) and t["boxes"].shape == (n, 4)
    for b, m in zip(t["boxes"], t["masks"]):
        ys, xs = np.nonzero(m)
        assert (b == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).all()
    assert set(t["labels"]) <= {1, 2}


def test_glass_crops_reach_past_the_image_with_blank_glass_and_no_nuclei_there():
    s = _sample()
    rng = np.random.default_rng(1)
    s.image[:] = rng.integers(0, 180, s.image.shape, dtype=np.uint8)  # tissue: never uniform, never white
    beyond = 0
    for _ in range(20):
        img, t = random_crop(s, 128, s.mpp, rng, scale_jitter=0.0, hed=False, glass=1.0)
        assert img.shape == (128, 128, 3)
        # rows or columns of uniform near-white glass on at least one side, and no nucleus mask on them
        flat = [img[:8], img[-8:], img[:, :8], img[:, -8:]]
        edges = [t["masks"][:, :8], t["masks"][:, -8:], t["masks"][:, :, :8], t["masks"][:, :, -8:]]
        glass = [k for k, e in enumerate(flat) if e.min() >= 200 and np.ptp(e.reshape(-1, 3), 0).max() == 0]
        assert glass, "some edge of the crop is blank glass"
        assert all(not edges[k].any() for k in glass)
        beyond += len(glass)
    assert beyond >= 20
    img, _ = random_crop(s, 128, s.mpp, np.random.default_rng(1), scale_jitter=0.0, hed=False, glass=0.0)
    assert img.max() < 180  # without glass, a crop of a larger image is all image


def test_split_keeps_source_images_together():
    names = [f"train_{i}_{j:03d}" for i in range(10) for j in range(4)]
    tr, va = split_names(names, TrainConfig(val_fraction=0.2, seed=3))
    assert {n.rsplit("_", 1)[0] for n in tr}.isdisjoint({n.rsplit("_", 1)[0] for n in va})
    assert len(va) == 8


def test_train_resume_and_export(tmp_path, data_dir):
    cfg = TrainConfig(name="t", data=str(data_dir / "consep-train"), val_names=["train_1_000"],
                      model=dict(backbone="resnet18", width=8, fpn_channels=32, box_head_dim=64,
                                 mask_head_channels=16, detections_per_tile=50),
                      tile_size=128, crop_size=96, overlap=32, steps=3, batch_size=1, val_every=3, warmup_steps=2,
                      hide_class_fraction=0.2, hide_mask_fraction=0.2, out=str(tmp_path / "run"), threads=1)
    import wsiseg.training as tr

    crops = []
    real_crop = tr.random_crop
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tr, "random_crop", lambda *a, **k: (crops.append(a[1]), real_crop(*a, **k))[1])
        best = train(cfg, log=lambda *_: None)
    assert crops == [96, 96, 96]  # training crops of crop_size; the card says the tiles it will run on
    run = tmp_path / "run"
    assert (run / "best.safetensors").exists() and (run / "last.pt").exists()
    assert "pq" in best and len((run / "loss.csv").read_text().splitlines()) == 4
    split = json.loads((run / "split.json").read_text())
    assert split["val"] == ["train_1_000"] and "train_1_000" not in split["train"]
    from wsiseg.model import load_model

    model, card = load_model(run / "best.safetensors")
    assert card.class_names == ["other", "inflammatory", "epithelial", "spindle"] and card.mpp == 0.25
    assert card.tile_size == 128
    # a crash after the checkpoint leaves log rows past it; resume continues from the checkpoint without repeats
    with open(run / "loss.csv", "a") as f:
        f.write("4,0.001,9.9,0,0,0,0,0,1.0\n5,0.001,9.9,0,0,0,0,0,1.0\n")
    cfg.steps = 4
    cfg.val_every = 100
    train(cfg, log=lambda *_: None)
    rows = (run / "loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1].split(",")[2]) != 9.9


def test_a_single_validated_setting_is_the_one_the_model_ships_with(tmp_path, data_dir):
    """A config naming one score threshold and one smallest nucleus validates at them, and the exported card
    runs at them (not at the card's defaults)."""
    from wsiseg.card import ModelCard, load_card

    cfg = TrainConfig(name="t", data=str(data_dir / "consep-train"), val_names=["train_1_000"],
                      model=dict(backbone="resnet18", width=8, fpn_channels=32, box_head_dim=64,
                                 mask_head_channels=16, detections_per_tile=50),
                      tile_size=128, overlap=32, steps=1, batch_size=1, val_every=1, warmup_steps=1,
                      score_thresholds=[0.3], min_areas_um2=[7.5], out=str(tmp_path / "run"), threads=1)
    defaults = ModelCard(name="x", classes=[], mpp=0.25, tile_size=128, overlap=32)
    assert (defaults.score_threshold, defaults.min_area_um2) != (0.3, 7.5)
    train(cfg, log=lambda *_: None)
    val = json.loads((tmp_path / "run" / "val.jsonl").read_text().splitlines()[-1])
    card = load_card(tmp_path / "run" / "best.safetensors")
    assert (val["score_threshold"], val["min_area_um2"]) == (card.score_threshold, card.min_area_um2) == (0.3, 7.5)


def test_a_run_carried_to_another_machine_goes_on_at_its_step(tmp_path, data_dir):
    """``carry_run`` keeps what a later machine needs without optimizer state; training with the carried folder
    as its run folder continues at the carried step from those weights."""
    import torch
    from safetensors.torch import load_file

    from wsiseg.training import CARRIED_WEIGHTS, carry_run

    cfg = TrainConfig(name="t", data=str(data_dir / "consep-train"), val_names=["train_1_000"],
                      model=dict(backbone="resnet18", width=8, fpn_channels=32, box_head_dim=64,
                                 mask_head_channels=16, detections_per_tile=50),
                      tile_size=128, overlap=32, steps=2, batch_size=1, val_every=2, warmup_steps=1,
                      out=str(tmp_path / "run"), threads=1)
    train(cfg, log=lambda *_: None)
    with pytest.raises(FileNotFoundError, match="no last.pt"):
        carry_run(tmp_path / "nothing", tmp_path / "x")
    carried = carry_run(tmp_path / "run", tmp_path / "carried")
    assert carried.name == CARRIED_WEIGHTS
    assert {p.name for p in (tmp_path / "carried").iterdir()} >= {CARRIED_WEIGHTS, "best.safetensors", "loss.csv"}
    assert not (tmp_path / "carried" / "last.pt").exists()
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    weights = load_file(carried)
    assert set(weights) == set(last["model"])  # the network's tensors and nothing else: no optimizer state
    k = next(k for k, v in last["model"].items() if v.is_floating_point() and v.numel() > 100)
    assert torch.equal(weights[k], last["model"][k].half())
    logs = []
    cfg.out, cfg.steps = str(tmp_path / "carried"), 3
    train(cfg, log=logs.append)
    assert any("went on from" in m and "at step 2" in m for m in logs)
    rows = (tmp_path / "carried" / "loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3]
    assert torch.load(tmp_path / "carried" / "last.pt", weights_only=True)["step"] == 3
    (tmp_path / "carried" / "last.pt").unlink()
    (tmp_path / "carried" / CARRIED_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not weights carried"):
        train(cfg, log=lambda *_: None)


def test_train_takes_its_device_from_select_device(tmp_path, data_dir, monkeypatch):
    """Training and its validation run where select_device says (CUDA when present); asking for an absent
    accelerator is the same clear error as for inference, before any work is done."""
    import torch

    import wsiseg.inference as inf
    from wsiseg.errors import DeviceUnavailableError

    cfg = TrainConfig(name="t", data=str(data_dir / "consep-train"), val_names=["train_1_000"],
                      model=dict(backbone="resnet18", width=8, fpn_channels=32, box_head_dim=64,
                                 mask_head_channels=16, detections_per_tile=50),
                      tile_size=128, overlap=32, steps=1, batch_size=1, val_every=1, warmup_steps=1,
                      out=str(tmp_path / "run"), threads=1)
    if not torch.cuda.is_available():
        cfg.device = "cuda"
        with pytest.raises(DeviceUnavailableError, match="cuda"):
            train(cfg, log=lambda *_: None)
        assert not (tmp_path / "run").exists()
    asked = []
    real = inf.select_device
    monkeypatch.setattr(inf, "select_device", lambda name="auto", precision="auto": asked.append((name, precision))
                        or real("cpu", precision))
    cfg.device, cfg.bf16 = "auto", False
    train(cfg, log=lambda *_: None)
    assert asked[0] == ("auto", "fp32") and ("auto", "auto") in asked[1:]  # training, then validation


def test_evaluate_cli(tmp_path, data_dir):
    import subprocess
    import sys

    cfg = TrainConfig(name="t", data=str(data_dir / "consep-train"), val_names=["train_2_000", "train_2_001"],
                      model=dict(backbone="resnet18", width=8, fpn_channels=32, box_head_dim=64,
                                 mask_head_channels=16, detections_per_tile=50),
                      tile_size=128, overlap=32, steps=1, batch_size=1, val_every=100, warmup_steps=1,
                      out=str(tmp_path / "run"), threads=1)
    train(cfg, log=lambda *_: None)
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "evaluate", "--model", str(tmp_path / "run" / "best.safetensors"),
                           "--data", str(data_dir / "consep-train"), "--split", str(tmp_path / "run" / "split.json"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(out.read_text())
    assert m["images"] == len(json.loads((tmp_path / "run" / "split.json").read_text())["val"])
    assert {"pq", "dq", "sq", "aji", "f1", "dice", "AP", "AP50", "AP75", "classification_accuracy"} <= set(m)
    # a threshold above any score keeps nothing: every nucleus is missed
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "evaluate", "--model", str(tmp_path / "run" / "best.safetensors"),
                           "--data", str(data_dir / "consep-train"), "--split", str(tmp_path / "run" / "split.json"),
                           "--score-threshold", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    none = json.loads(out.read_text())
    assert none["tp"] == 0 and none["fp"] == 0 and none["fn"] == m["tp"] + m["fn"]


def test_evaluate_cli_threshold_baseline(tmp_path, data_dir):
    import subprocess
    import sys

    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "wsiseg.cli", "evaluate", "--model", "threshold",
                           "--data", str(data_dir / "monuseg-train"), "--names", "TCGA-18-5592-01Z-00-DX1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(out.read_text())
    assert m["images"] == 1 and m["tp"] + m["fn"] > 300  # every annotated nucleus of the image is counted
    assert 0.0 < m["pq"] < 0.5


def test_lr_schedule_warmup_cosine_and_restart():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110, restarts=[60])
    lrs = [lr_at(s, cfg) for s in range(111)]
    assert lrs[0] == pytest.approx(0.05) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:60], lrs[11:60]))  # decays within the first cycle
    assert lrs[35] == pytest.approx(0.5) and lrs[59] < 0.01
    assert lrs[60] == pytest.approx(1.0) and lrs[85] == pytest.approx(0.5) and lrs[110] == pytest.approx(0.0)
    assert lr_at(35, TrainConfig(lr=1.0, warmup_steps=10, steps=60)) == pytest.approx(0.5)


def test_lr_schedule_restart_peaks():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=160, restarts=[60, 110], restart_peaks=[1.0, 0.5])
    assert lr_at(60, cfg) == pytest.approx(1.0) and lr_at(85, cfg) == pytest.approx(0.5)
    assert lr_at(110, cfg) == pytest.approx(0.5) and lr_at(135, cfg) == pytest.approx(0.25)
    assert lr_at(160, cfg) == pytest.approx(0.0)
    assert lr_at(110, TrainConfig(lr=1.0, warmup_steps=10, steps=160, restarts=[60, 110])) == pytest.approx(1.0)


def test_lr_schedule_holds_swa_lr_from_swa_start():
    plain = TrainConfig(lr=1.0, warmup_steps=10, steps=60)
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=60, swa_start=35)
    assert [lr_at(s, cfg) for s in (0, 20, 34)] == pytest.approx([lr_at(s, plain) for s in (0, 20, 34)])
    assert [lr_at(s, cfg) for s in (35, 50, 60)] == pytest.approx([0.5] * 3)  # the schedule's rate at swa_start
    cfg.swa_lr = 0.2
    assert [lr_at(s, cfg) for s in (34, 35, 59)] == pytest.approx([lr_at(34, plain), 0.2, 0.2])
    with pytest.raises(ValueError, match="swa_start"):
        TrainConfig(steps=10, swa_start=10).validate()


def test_swa_validates_and_exports_the_average_of_its_snapshots_across_resumes_and_carries(tmp_path, data_dir):
    """With swa_start the exported model is the mean of the weights at every swa_every-th step after it, and the
    average survives a resume from last.pt and a carry to another machine."""
    import torch
    from safetensors.torch import load_file

    from wsiseg.training import carry_run

    snaps = []
    real = torch.optim.swa_utils.AveragedModel.update_parameters

    def record(self, model):
        snaps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(self, model)

    cfg = TrainConfig(name="t", data=str(data_dir / "consep-train"), val_names=["train_1_000"],
                      model=dict(backbone="resnet18", width=8, fpn_channels=32, box_head_dim=64,
                                 mask_head_channels=16, detections_per_tile=50),
                      tile_size=128, overlap=32, steps=5, batch_size=1, val_every=5, warmup_steps=1,
                      swa_start=1, swa_every=2, out=str(tmp_path / "run"), threads=1)
    key = "roi_heads.box_head.fc6.weight"

    def mean(ss):
        return torch.stack([s[key].float() for s in ss]).mean(0)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.swa_utils.AveragedModel, "update_parameters", record)
        train(cfg, log=lambda *_: None)
        assert len(snaps) == 2  # steps 3 and 5
        assert not torch.equal(snaps[0][key], snaps[1][key])
        best = load_file(tmp_path / "run" / "best.safetensors")
        torch.testing.assert_close(best[key].float(), mean(snaps), atol=1e-3, rtol=1e-3)  # fp16 export
        assert not torch.allclose(best[key].float(), snaps[1][key].float(), atol=1e-3, rtol=1e-3)
        cfg.steps = cfg.val_every = 7  # resume from last.pt: the average goes on
        train(cfg, log=lambda *_: None)
        swa = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["swa"]
        assert int(swa["n_averaged"]) == 3
        torch.testing.assert_close(swa["module." + key], mean(snaps))
        carry_run(tmp_path / "run", tmp_path / "carried")  # on another machine
        cfg.out, cfg.steps, cfg.val_every = str(tmp_path / "carried"), 9, 9
        train(cfg, log=lambda *_: None)
        swa = torch.load(tmp_path / "carried" / "last.pt", weights_only=True)["swa"]
        assert int(swa["n_averaged"]) == 4
        torch.testing.assert_close(swa["module." + key], mean(snaps), atol=1e-3, rtol=1e-3)


def test_init_weights_copies_a_saved_model_and_renews_heads_for_new_classes(tmp_path):
    from dataclasses import replace

    from helpers_model import tiny_config, tiny_model

    from wsiseg.model import build_model
    from wsiseg.training import CLASS_HEADS, init_weights

    path, source, _ = tiny_model(tmp_path, classes=("nucleus",), tile_size=128)
    src = source.state_dict()

    torch.manual_seed(1)
    same = build_model(tiny_config(128, 1))
    info = init_weights(same, ["nucleus"], path)
    assert info["fresh_tensors"] == []
    assert all(torch.equal(v, src[k].to(v.dtype)) for k, v in same.state_dict().items())

    torch.manual_seed(1)
    other = build_model(tiny_config(128, 4))
    info = init_weights(other, ["a", "b", "c", "d"], path)
    assert info["fresh_tensors"] and all(k.startswith(CLASS_HEADS) for k in info["fresh_tensors"])
    for k, v in other.state_dict().items():
        if k.startswith(CLASS_HEADS):
            assert v.shape != src[k].shape or not torch.equal(v, src[k])
        else:
            assert torch.equal(v, src[k].to(v.dtype)), k

    wider = build_model(replace(tiny_config(128, 1), width=16))
    with pytest.raises(ValueError, match="tiny.safetensors"):
        init_weights(wider, ["nucleus"], path)


def test_init_weights_widens_the_rpn_to_more_anchor_scales(tmp_path):
    """A model with one anchor per ratio initialises one with three scales per ratio: every new anchor of a
    ratio starts with the source anchor's objectness and box deltas, so the source's proposals survive."""
    from dataclasses import replace

    from helpers_model import tiny_config, tiny_model

    from wsiseg.model import build_model
    from wsiseg.training import init_weights

    path, source, _ = tiny_model(tmp_path, classes=("nucleus",), tile_size=128)
    cfg = replace(tiny_config(128, 1), anchor_scales=(1.0, 1.41, 2.0))
    wide = build_model(cfg)
    info = init_weights(wide, ["nucleus"], path)
    assert sorted(info["expanded_tensors"]) == sorted(f"rpn.head.{n}.{p}" for n in ("cls_logits", "bbox_pred")
                                                      for p in ("weight", "bias"))
    assert wide.rpn.anchor_generator.num_anchors_per_location()[0] == 3 * len(cfg.aspect_ratios)
    x = torch.rand(1, cfg.fpn_channels, 8, 8)
    with torch.no_grad():
        old_obj, old_box = source.rpn.head([x])
        new_obj, new_box = wide.rpn.head([x])
    n_ratios = len(cfg.aspect_ratios)
    for r in range(n_ratios):
        for s in range(3):
            a = r * 3 + s  # torchvision orders a level's anchors ratio-major, scale-minor
            # the same weights; outputs of convolutions of different widths may differ in the last bit
            assert torch.equal(wide.rpn.head.cls_logits.weight[a], source.rpn.head.cls_logits.weight[r])
            assert torch.allclose(new_obj[0][:, a], old_obj[0][:, r], rtol=1e-5, atol=1e-6)
            assert torch.allclose(new_box[0][:, 4 * a:4 * a + 4], old_box[0][:, 4 * r:4 * r + 4], rtol=1e-5, atol=1e-6)
    gen = wide.rpn.anchor_generator
    widths = gen.cell_anchors[0][:, 2] - gen.cell_anchors[0][:, 0]
    ratio = widths.reshape(n_ratios, 3)[:, 1:] / widths.reshape(n_ratios, 3)[:, :1]  # (torchvision rounds anchors)
    assert ratio.allclose(torch.tensor([1.41, 2.0]).expand(n_ratios, 2), rtol=0.1)


def test_train_fine_tunes_from_a_saved_model(tmp_path, data_dir):
    from helpers_model import tiny_model

    path, _, _ = tiny_model(tmp_path, classes=("nucleus",), tile_size=128)
    model = dict(backbone="resnet18", width=8, fpn_channels=32, box_head_dim=64, mask_head_channels=16,
                 detections_per_tile=60, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150)
    cfg = TrainConfig(name="ft", data=str(data_dir / "consep-train"), val_names=["train_1_000"], model=model,
                      tile_size=128, overlap=32, steps=1, batch_size=1, val_every=1, warmup_steps=1, init=str(path),
                      out=str(tmp_path / "run"), threads=1)
    logs = []
    train(cfg, log=logs.append)
    assert any("initialised from" in m for m in logs)
    from wsiseg.card import load_card

    card = load_card(tmp_path / "run" / "best.safetensors")
    assert card.training["init_weights"]["source_model"] == "tiny-random"
    assert card.class_names == ["other", "inflammatory", "epithelial", "spindle"]
    cfg.model = {**model, "width": 16}
    cfg.out = str(tmp_path / "run2")
    with pytest.raises(ValueError, match="the 'model' settings must match"):
        train(cfg, log=lambda *_: None)


def test_every_shipped_config_is_valid_and_fine_tunes_fit_the_default_model():
    import dataclasses
    from pathlib import Path

    from wsiseg.card import ModelConfig, default_model_path, load_card

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    shipped = load_card(default_model_path()).config
    for path in configs:
        cfg = TrainConfig.from_yaml(path)
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.items()}
        mcfg = ModelConfig(**{**fields, "num_classes": shipped.num_classes, "tile_size": cfg.tile_size})
        if cfg.init == "default":  # (how many proposals and anchors are sampled is a training setting, not weights;
            # the class temperature is fitted after training, by wsiseg calibrate)
            mcfg = dataclasses.replace(mcfg, box_positive_fraction=shipped.box_positive_fraction,
                                       rpn_batch_size_per_image=shipped.rpn_batch_size_per_image,
                                       class_temperature=shipped.class_temperature)
            assert mcfg == shipped, f"{path.name}: model settings differ from the bundled model's"


def _instance_folder(root, names, classes=None, seed=0):
    """An instance-label folder of synthetic 160x160 images; ``classes`` cycles over the nuclei in classes.csv."""
    from conftest import synthetic_he
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = ["image,instance,class"]
    for k, n in enumerate(names):
        img, lab = synthetic_he(160, 160, seed=seed + k, n_nuclei=12)
        Image.fromarray(img).save(root / "images" / f"{n}.png")
        Image.fromarray(lab.astype(np.uint16)).save(root / "labels" / f"{n}.png")
        rows += [f"{n},{i},{classes[(i - 1) % len(classes)]}" for i in range(1, int(lab.max()) + 1)] if classes else []
    meta = {"mpp": 0.25, **({"classes": sorted(set(classes))} if classes else {})}
    (root / "meta.json").write_text(json.dumps(meta))
    if classes:
        (root / "classes.csv").write_text("\n".join(rows) + "\n")
    return root


def test_extra_training_data_takes_the_main_classes(tmp_path):
    extra = _instance_folder(tmp_path / "extra", ["e_0", "e_1"], classes=["tumour", "lymphocyte", "stroma"])
    one = extra_training_data(TrainConfig(extra_data=[str(extra)]), ["nucleus"])
    assert [s.name for s in one] == ["e_0", "e_1"]
    for s in one:  # a one-class model: every nucleus is that class
        assert s.classes == {int(i): 0 for i in np.unique(s.instances)[1:]} and s.classes
    two = extra_training_data(TrainConfig(extra_data=[str(extra)]), ["lymphocyte", "tumour"])
    for s in two:  # classes by name; a class the model lacks is unknown (left to the partial-label loss)
        ids = np.unique(s.instances)[1:]
        assert {c for c in s.classes.values()} == {0, 1}
        assert sorted(s.classes) == [int(i) for i in ids if (i - 1) % 3 != 2]
        assert all(s.classes[int(i)] == (1 if (i - 1) % 3 == 0 else 0) for i in ids if (i - 1) % 3 != 2)
    with pytest.raises(ValueError, match="extra_share"):
        extra_training_data(TrainConfig(extra_data=[str(extra)], extra_share=1.0), ["nucleus"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        extra_training_data(TrainConfig(extra_data=[str(tmp_path / "nowhere")]), ["nucleus"])


def test_train_draws_crops_from_extra_data(tmp_path, monkeypatch):
    import wsiseg.training as tr

    main = _instance_folder(tmp_path / "main", ["m_0", "m_1"])
    extra = _instance_folder(tmp_path / "extra", ["e_0", "e_1", "e_2"], classes=["a", "b"], seed=10)
    drawn = []
    crop = tr.random_crop
    monkeypatch.setattr(tr, "random_crop", lambda s, *a, **k: (drawn.append(s.name), crop(s, *a, **k))[1])
    cfg = TrainConfig(name="x", data=str(main), val_names=["m_1"], extra_data=[str(extra)], extra_share=0.75,
                      model=dict(backbone="resnet18", width=8, fpn_channels=32, box_head_dim=64,
                                 mask_head_channels=16, detections_per_tile=50),
                      tile_size=128, overlap=32, steps=4, batch_size=4, val_every=100, warmup_steps=1,
                      out=str(tmp_path / "run"), threads=1)
    train(cfg, log=lambda *_: None)
    assert set(drawn) <= {"m_0", "e_0", "e_1", "e_2"}  # never the validation image
    assert 6 <= sum(n.startswith("e_") for n in drawn) <= 16  # 75% of 16 crops, roughly
    from wsiseg.card import load_card

    card = load_card(tmp_path / "run" / "best.safetensors")
    assert card.training["extra_images"] == 3 and card.class_names == ["nucleus"]


def test_train_on_several_datasets_with_their_splits(tmp_path, monkeypatch):
    """Datasets with and without classes: their shares, their own validation images, unknown classes."""
    import wsiseg.training as tr

    typed = _instance_folder(tmp_path / "typed", ["t_0", "t_1", "t_2"], classes=["epi", "immune"])
    plain = _instance_folder(tmp_path / "plain", ["pa", "pb"])
    split = tmp_path / "split-typed.json"
    split.write_text(json.dumps({"train": ["t_0", "t_1"], "val": ["t_2"]}))
    drawn = []
    crop = tr.random_crop
    monkeypatch.setattr(tr, "random_crop", lambda s, *a, **k: (drawn.append((s.name, dict(s.classes))),
                                                                 crop(s, *a, **k))[1])
    cfg = TrainConfig(name="x", class_names=["immune", "epi"],
                      datasets=[{"path": str(typed), "share": 1, "split": str(split)},
                                {"path": str(plain), "share": 3, "val_fraction": 0.5}],
                      model=dict(backbone="resnet18", width=8, fpn_channels=32, box_head_dim=64,
                                 mask_head_channels=16, detections_per_tile=50),
                      tile_size=128, overlap=32, steps=4, batch_size=4, val_every=4, warmup_steps=1,
                      out=str(tmp_path / "run"), threads=1, score_thresholds=[0.2, 0.5],
                      min_areas_um2=[1.0, 4.0])
    train(cfg, log=lambda *_: None)
    names = [n for n, _ in drawn]
    assert "t_2" not in names and 6 <= sum(n.startswith("p") for n in names) <= 16  # 3/4 of the crops
    assert all(not c for n, c in drawn if n.startswith("p"))  # no classes: unknown, not the first class
    assert all(set(c.values()) == {0, 1} for n, c in drawn if n.startswith("t_"))
    val = [json.loads(ln) for ln in (tmp_path / "run" / "val.jsonl").read_text().splitlines()]
    assert set(val[-1]["datasets"]) == {"typed", "plain"}
    assert val[-1]["pq"] == pytest.approx(np.mean([m["pq"] for m in val[-1]["datasets"].values()]))
    from wsiseg.card import load_card

    card = load_card(tmp_path / "run" / "best.safetensors")
    assert card.class_names == ["immune", "epi"] and card.training["steps_done"] == 4
    # validation tried both score thresholds; the model ships with the one it scored best at
    by_t = val[-1]["pq_by_score_threshold"]
    assert set(by_t) == {"0.2", "0.5"} and val[-1]["pq"] == max(by_t.values())
    assert card.score_threshold == val[-1]["score_threshold"] and by_t[str(card.score_threshold)] == val[-1]["pq"]
    # ... and with each smallest nucleus kept: the pair it scored best at
    by_a = val[-1]["pq_by_min_area_um2"]
    assert set(by_a) == {"1", "4"} and val[-1]["pq"] == max(by_a.values())
    assert card.min_area_um2 == val[-1]["min_area_um2"] and by_a[f"{card.min_area_um2:g}"] == val[-1]["pq"]
    assert card.training["datasets"]["plain"]["share"] == 0.75
    # each class says which data taught it: only the dataset with class labels, with its training nuclei
    n_epi = sum(c == 1 for smp in tr.training_pools(cfg)[0][0].train for c in smp.classes.values())
    assert [c.description for c in card.classes][1] == f"learnt from typed: {n_epi:,} training nuclei"
    assert "plain" not in card.classes[0].description and card.classes[0].description.startswith("learnt from typed")
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert saved["typed"]["val"] == ["t_2"] and len(saved["plain"]["val"]) == 1
    with pytest.raises(ValueError, match="'path'"):
        tr.training_pools(TrainConfig(datasets=[{"where": str(plain)}]))


def test_a_dataset_entry_of_qupath_nuclei_over_a_slide_trains_without_validation(tmp_path, data_dir):
    """The skin labels shipped in examples/skin (QuPath GeoJSON over the bundled 20x slide) are a ``datasets:``
    entry with its ``slide``; ``val_fraction: 0`` keeps all of it for training."""
    from pathlib import Path

    from wsiseg.training import training_pools

    repo = Path(__file__).resolve().parents[1]
    cfg = TrainConfig(name="t", class_names=["epithelial", "inflammatory", "spindle", "other"], datasets=[
        {"name": "consep", "path": str(data_dir / "consep-train"), "share": 0.5,
         "split": str(repo / "configs" / "split-consep.json")},
        {"name": "skin", "path": str(repo / "examples" / "skin" / "CMU-1-Small-Region.labels.geojson.gz"),
         "slide": str(repo / "examples" / "CMU-1-Small-Region.svs"), "share": 0.5, "val_fraction": 0}],
        out=str(tmp_path / "run"))
    pools, names = training_pools(cfg)
    skin = pools[1]
    assert skin.val == [] and skin.split["val"] == [] and len(skin.train) == 1
    (s,) = skin.train
    assert s.mpp == pytest.approx(0.499, abs=1e-3)  # the slide's, so crops are resampled to the model's mpp
    classes = list(s.classes.values())
    n = int(len(np.unique(s.instances)) - 1)
    assert n > 400 and classes.count(names.index("epithelial")) > 200
    assert len(classes) < n  # nuclei outside the labelled areas have no class (trained as nuclei only)
    img, t = random_crop(s, 128, 0.25, np.random.default_rng(0))
    assert img.shape == (128, 128, 3) and len(t["labels"]) > 0


def test_skin_labels_follow_the_region_rules():
    """examples/skin/skin_labels.py: epidermis -> epithelial; dermis -> the model's class only where sure;
    elsewhere in the label region no class; outside it, left out."""
    import sys
    from pathlib import Path

    from shapely.geometry import box

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "skin"))
    from skin_labels import label_nuclei

    def nucleus(x, y, name=None, p=0.0):
        ring = [[x - 2, y - 2], [x + 2, y - 2], [x + 2, y + 2], [x - 2, y + 2], [x - 2, y - 2]]
        props = {"measurements": {"Class probability": p, f"Class probability: {name}": p,
                                  "Class probability: other": (1 - p) / 2}}
        if p >= 0.5:  # as wsiseg writes it: an uncertain class is no classification
            props["classification"] = {"name": name, "color": [1, 2, 3]}
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}

    areas = {"label region": box(0, 0, 100, 100), "epidermis (train)": box(0, 0, 50, 100),
             "dermis (train)": box(50, 0, 80, 100)}
    nuclei = [nucleus(10, 10, "spindle", 0.99), nucleus(60, 10, "spindle", 0.9), nucleus(60, 30, "inflammatory", 0.6),
              nucleus(90, 10, "spindle", 0.99), nucleus(150, 10, "spindle", 0.99)]
    out = label_nuclei(nuclei, areas, sure=0.8)
    names = [(f["properties"].get("classification") or {}).get("name") for f in out]
    assert names == ["epithelial", "spindle", None, None]
    nuclei[2] = nucleus(60, 30, "inflammatory", 0.45)  # uncertain: no classification in the file
    out = label_nuclei(nuclei, areas, sure=0.0)  # the model's most likely class, however likely
    assert [(f["properties"].get("classification") or {}).get("name") for f in out] == [
        "epithelial", "spindle", "inflammatory", None]
