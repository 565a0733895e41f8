"""Fashion-MNIST (--data fashion-mnist), the LARS/LAMB optimizers, bf16 autocast and the study's
analysis. Tests that need the real data set skip, with the reason, when Debian's
dataset-fashion-mnist is not installed; the rest write small IDX files of their own."""
import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastar.train import recipe
from fastar.train.data import (FASHION_MNIST_DIR, FASHION_MNIST_PACKAGE, FashionMNISTMissing, batch_collate,
                               build_datasets)
from fastar.train.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DATA = all(os.path.exists(os.path.join(FASHION_MNIST_DIR, f"{n}-idx{d}-ubyte.gz"))
                for n, d in (("train-images", 3), ("train-labels", 1), ("t10k-images", 3), ("t10k-labels", 1)))
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}: install the Debian package "
                          f"{FASHION_MNIST_PACKAGE} (`make setup` does, when run as root with apt-get)")


def _write_idx(root, prefix, images, labels, gz=True):
    """The original IDX format: big-endian magic (0x0803 images, 0x0801 labels) and dimensions."""
    n = images.shape[0]
    img = struct.pack(">IIII", 0x803, n, 28, 28) + images.to(torch.uint8).numpy().tobytes()
    lab = struct.pack(">II", 0x801, n) + labels.to(torch.uint8).numpy().tobytes()
    for name, blob in ((f"{prefix}-images-idx3-ubyte", img), (f"{prefix}-labels-idx1-ubyte", lab)):
        if gz:
            with gzip.open(os.path.join(root, name + ".gz"), "wb") as f:
                f.write(blob)
        else:
            with open(os.path.join(root, name), "wb") as f:
                f.write(blob)


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the .gz files' decompressed copies
    g = torch.Generator().manual_seed(1)
    root = tmp_path / "fm"
    root.mkdir()
    train_x = torch.randint(0, 256, (200, 28, 28), generator=g)
    train_y = torch.arange(200) % 10
    test_x = torch.randint(0, 256, (50, 28, 28), generator=g)
    test_y = (torch.arange(50) * 3) % 10
    _write_idx(str(root), "train", train_x, train_y, gz=True)
    _write_idx(str(root), "t10k", test_x, test_y, gz=False)  # gzipped or not, both are read
    return str(root), train_x, train_y, test_x, test_y


def test_missing_data_names_package_and_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(FashionMNISTMissing) as e:
        build_datasets(f"fashion-mnist={missing}")
    msg = str(e.value)
    assert FASHION_MNIST_PACKAGE in msg and str(missing) in msg and FASHION_MNIST_DIR in msg
    # and through the command line (fastar-train's entry point): one line and exit status 2, no traceback
    from fastar.train.__main__ import main

    assert main(["--data", f"fashion-mnist={missing}", "--model", "resnet8", "--epochs", "1",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastar-train: error: Fashion-MNIST not found") and FASHION_MNIST_PACKAGE in err
    assert str(missing) in err and "Traceback" not in err


def test_idx_files_read_normalised_and_augmented_per_seed_epoch_index(fake_fashion):
    root, train_x, train_y, test_x, test_y = fake_fashion
    ds = build_datasets(f"fashion-mnist={root}", seed=5)
    assert (len(ds.train), len(ds.val), ds.num_classes, ds.image_size) == (200, 50, 10, 28)
    assert torch.equal(ds.train.y, train_y) and torch.equal(ds.val.y, test_y)
    # validation: the image itself, normalised, 3 channels
    x, y = ds.val[7]
    assert x.shape == (3, 28, 28) and int(y) == int(test_y[7])
    want = (test_x[7].float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[0], want)
    torch.testing.assert_close(x[2], want)
    # training: a crop of the 4-pixel-padded image (maybe flipped): a function of (seed, epoch, index)
    a, b = ds.train[(3, 11)][0], ds.train[(3, 11)][0]
    assert torch.equal(a, b)
    crops = {tuple(ds.train[(e, 11)][0][0].flatten()[:50].tolist()) for e in range(12)}
    assert len(crops) > 3  # different epochs, different crops
    other = build_datasets(f"fashion-mnist={root}", seed=6).train
    assert any(not torch.equal(other[(e, 11)][0], ds.train[(e, 11)][0]) for e in range(4))
    pad = nn.functional.pad((train_x[11].float() / 255 - 0.2860) / 0.3530, (4, 4, 4, 4), value=-0.2860 / 0.3530)
    windows = [pad[dy:dy + 28, dx:dx + 28] for dy in range(9) for dx in range(9)]
    for e in range(6):
        img = ds.train[(e, 11)][0][0]
        assert any(torch.allclose(img, w) or torch.allclose(img, w.flip(-1)) for w in windows)
    # the DataLoader's batched fetch gives exactly the per-sample images
    keys = [(2, i) for i in range(0, 200, 7)]
    xb, yb = ds.train.__getitems__(keys)
    assert torch.equal(xb, torch.stack([ds.train[k][0] for k in keys]))
    assert torch.equal(yb, torch.stack([ds.train[k][1] for k in keys]))
    assert batch_collate((xb, yb)) == (xb, yb)


def test_train_subset_is_fixed_and_stratified(fake_fashion):
    root = fake_fashion[0]
    a = build_datasets(f"fashion-mnist={root}", seed=0, train_subset=50).train
    b = build_datasets(f"fashion-mnist={root}", seed=9, train_subset=50).train
    assert len(a) == 50 and torch.equal(a.y, b.y) and torch.equal(a.x, b.x)  # the same images for every seed
    assert torch.bincount(a.y, minlength=10).tolist() == [5] * 10
    assert len(build_datasets(f"fashion-mnist={root}", image_size=16).val[0][0][0]) == 16


def _lars_lamb_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5))


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_lars_lamb_leave_bn_and_bias_out_of_the_trust_ratio(name):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _lars_lamb_model().double()  # float64: the steps are compared to 1e-4 of their size
    opt = recipe.make_optimizer(model, lr=0.5, momentum=0.9, weight_decay=1e-4, optimizer=name)
    assert type(opt).__name__ == name.capitalize()
    adapt, no_adapt = opt.param_groups
    conv, bn, fc = model[0], model[1], model[4]
    assert {id(p) for p in adapt["params"]} == {id(conv.weight), id(fc.weight)}
    assert {id(p) for p in no_adapt["params"]} == {id(conv.bias), id(bn.weight), id(bn.bias), id(fc.bias)}
    assert adapt["always_adapt"] and adapt["weight_decay"] == 1e-4
    assert not no_adapt["always_adapt"] and no_adapt["weight_decay"] == 0.0
    # one step with known gradients: the adapted weights move by the trust-ratio-scaled step, the
    # others by the plain momentum-SGD (LARS) or Adam (LAMB) step
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    for n, p in model.named_parameters():
        grads[n] = torch.randn_like(p) * 0.01
        p.grad = grads[n].clone()
    opt.step()
    for n, p in model.named_parameters():
        w, g, step = before[n], grads[n], before[n] - p.detach()
        if name == "lars":
            m = 0.9  # nesterov, first step: buf = d, update = d + m*buf = (1+m) d
            if n in ("0.weight", "4.weight"):
                d = g + 1e-4 * w
                trust = 1e-3 * w.norm() / (g.norm() + 1e-4 * w.norm() + 1e-8)
                torch.testing.assert_close(step, 0.5 * (1 + m) * trust * d, rtol=1e-4, atol=1e-9)
            else:
                torch.testing.assert_close(step, 0.5 * (1 + m) * g, rtol=1e-4, atol=1e-9)
        else:  # LAMB's first step: Adam's update is ~sign(g) (bias-corrected); trust = |w| / |update|
            if n in ("0.weight", "4.weight"):
                assert step.norm().item() == pytest.approx(0.5 * w.norm().item(), rel=1e-3)
            else:  # Adam's step of the (globally clipped to norm 1) gradient, no trust ratio
                total = torch.sqrt(sum((v ** 2).sum() for v in grads.values()))
                gc = g / max(1.0, total.item())
                torch.testing.assert_close(step, 0.5 * gc / (gc.abs() + 1e-6), rtol=1e-6, atol=1e-9)


def test_optimizer_options_and_defaults(tmp_path):
    pytest.importorskip("timm")
    from fastar.train import run
    from fastar.train.cli import parse_args

    assert parse_args(["--optimizer", "lars"]).optimizer == "lars"
    with pytest.raises(SystemExit):
        parse_args(["--optimizer", "adamw"])
    with pytest.raises(SystemExit):
        parse_args(["--train-subset", "0"])
    tiny = ["--data", "synthetic", "--synthetic-size", "64", "--num-classes", "4", "--image-size", "8",
            "--model", "resnet8", "--width", "4", "--batch", "16", "--epochs", "1", "--threads", "1",
            "--no-progress", "--no-plots", "--quiet"]
    state_keys = {"sgd": "momentum_buffer", "lars": "momentum_buffer", "lamb": "exp_avg_sq"}
    for name, wd in (("sgd", 1e-4), ("lars", 1e-4), ("lamb", 1e-2)):
        out = str(tmp_path / name)
        s = run(tiny + ["--optimizer", name, "--out", out])
        assert s["config"]["optimizer"] == name and s["config"]["weight_decay"] == wd
        ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
        st = next(iter(ck["optimizer"]["state"].values()))
        assert state_keys[name] in st
        assert len(s["history"]) == 1 and 0 <= s["history"][0]["train_top1_err"] <= 100
        if name == "lars":  # neither --base-lr nor --ref-batch: LARS's global lr, not scaled with kn
            assert s["target_lr"] == recipe.LARS_DEFAULT_LR and s["config"]["ref_batch"] == 16, s["config"]
    # a resume must not switch optimizers: the recipe differs
    with pytest.raises(ValueError, match="optimizer"):
        run(tiny + ["--optimizer", "sgd", "--out", str(tmp_path / "lamb"), "--resume"])


def test_amp_bf16_autocast(tmp_path):
    from fastar.train import run
    from fastar.train.cli import parse_args
    from fastar.train.loop import autocast

    model = build_model("resnet8", 10, width=4)
    x = torch.randn(2, 3, 8, 8)
    with autocast(parse_args(["--amp", "bf16"]), torch.device("cpu")):
        assert model(x).dtype == torch.bfloat16
    with autocast(parse_args([]), torch.device("cpu")):
        assert model(x).dtype == torch.float32
    s = run(["--data", "synthetic", "--synthetic-size", "64", "--num-classes", "4", "--image-size", "8",
             "--model", "resnet8", "--width", "4", "--batch", "16", "--epochs", "1", "--threads", "1",
             "--amp", "bf16", "--no-progress", "--no-plots", "--quiet", "--out", str(tmp_path / "bf16")])
    assert s["config"]["amp"] == "bf16" and s["history"][0]["train_loss"] > 0
    ck = torch.load(os.path.join(tmp_path / "bf16", "checkpoint.pt"), weights_only=False)
    assert all(v.dtype != torch.bfloat16 for v in ck["model"].values())  # weights stay fp32


def _large_batch_module():
    spec = importlib.util.spec_from_file_location("large_batch", os.path.join(REPO, "bench", "large_batch.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_analysis_reads_the_findings_from_the_numbers():
    lb = _large_batch_module()
    args = lb.fashion_parser().parse_args(["--dataset", "fashion-mnist", "--factors", "4,8,16", "--none-factors",
                                           "4,8", "--table-factor", "8", "--lars-factor", "16",
                                           "--lars-factors", "8"])
    cells = lb.fashion_cells(args)
    st = lambda m, s=0.1, d=0: {"n": 3, "diverged": d, "errs": [], "mean": m, "std": s, "train_err_mean": 0}  # noqa
    stats = {"baseline": st(10.0), "gradual_x4": st(10.2), "gradual_x8": st(10.9, 0.5), "gradual_x16": st(14.0),
             "none_x4": st(11.0), "none_x8": st(11.0), "constant_x8": st(12.0), "noscale_x8": st(20.0),
             "lars_x16": st(10.8), "lamb_x16": st(12.0), "lars_x8": st(10.3), "lamb_x8": st(10.9)}
    lamb = {c["key"]: c for c in cells}["lamb_x8"]
    assert lamb["argv"][lamb["argv"].index("--base-lr") + 1] == str(0.04 * (8 / 16) ** 0.5)  # sqrt scaling
    a = lb.fashion_analysis(cells, stats, 16)
    assert a["finding1_flat_up_to_kn"] == 128 and a["finding1_appeared"]  # x8: +0.9 < 2 x 0.5
    assert a["finding3_tipping_kn"] == 256 and a["finding3_appeared"]
    assert a["finding2_appeared"] and [f["worse"] for f in a["finding2"]] == [True, False]
    assert a["sgd_largest_kn_within_1pt"] == 128
    assert a["lars_largest_kn_within_1pt"] == 256 and not a["lars_claim_holds"]  # 16x is not 2 x the tipping 16x
    assert a["lamb_largest_kn_within_1pt"] == 128 and a["lamb"]["256"]["minus_baseline"] == pytest.approx(2.0)
    stats["gradual_x4"] = st(10.5)  # now x4 is worse (0.5 > 2 x 0.1): no flat range, tipping at x4
    a = lb.fashion_analysis(cells, stats, 16)
    assert not a["finding1_appeared"] and a["finding3_tipping_kn"] == 64 and a["lars_claim_holds"]
    assert not a["finding2_appeared"]  # gradual was not within noise where no-warmup was measured


@needs_data
def test_debian_fashion_mnist_loads():
    ds = build_datasets("fashion-mnist")
    assert (len(ds.train), len(ds.val), ds.num_classes) == (60000, 10000, 10)
    assert torch.bincount(ds.train.y).tolist() == [6000] * 10
    assert torch.bincount(ds.val.y).tolist() == [1000] * 10
    x = ds.train.x[:, :, 4:-4, 4:-4]  # the padded store, unpadded: normalised to mean 0, std 1
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


@needs_data
def test_smoke_run_two_workers_trains_through_fastar_logs_and_plots(tmp_path):
    """A short two-worker run of fastar-train on Fashion-MNIST whose gradients fastar.wrap averages
    (no DDP stand-in), held to an accuracy that only training gives: 3 epochs of 8,192 images at
    16x16, resnet8 width 8, kn = 64, SGD at 0.2 without warmup, /10 at epoch 2.5 (measured: 23.7 %
    validation error on the 10,000 test images, 10 s in all; chance is 90 %; --optimizer lars, whose
    global lr is checked in test_optimizer_options_and_defaults, reached only 72 % in such a run)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    env.pop("FASTAR_TRAIN_WRAP", None)  # through fastar: no DDP stand-in, whether or not the extension is built
    out = str(tmp_path / "smoke")
    cmd = [sys.executable, "-m", "fastar.train", "--nproc", "2", "--data", "fashion-mnist", "--model", "resnet8",
           "--width", "8", "--image-size", "16", "--train-subset", "8192", "--epochs", "3", "--batch", "32",
           "--base-lr", "0.2", "--ref-batch", "64", "--warmup", "none", "--milestones", "2.5", "--out", out,
           "--no-progress"]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "sgd lr 0.2" in p.stdout and "val top-1 error" in p.stdout
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["world_size"] == 2 and s["config"]["optimizer"] == "sgd" and s["config"]["train_subset"] == 8192
    assert s["impl"] == "fastar" and "grads averaged by fastar" in p.stdout  # fastar.wrap averaged the gradients
    assert s["iters_per_epoch"] == 8192 // 64 and s["target_lr"] == pytest.approx(0.2)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 3
    # it trained: the loss fell from ln 10 = 2.303 and the error on the 10,000 test images is far
    # below chance (90 %); measured 23.7 % (epochs: 42.5, 30.7, 23.7 %), held below 35 %
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] < 2.2, rows
    assert rows[-1]["val_top1_err"] < 35, rows
    assert all(r["images_per_s"] > 0 for r in rows)
    torch.manual_seed(0)
    init = build_model("resnet8", 10, width=8).state_dict()
    trained = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]
    for k, v in init.items():
        if k.endswith("weight") and v.dim() == 4:
            assert not torch.allclose(trained[k], v), k
    for png in ("lr.png", "curves.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000


def test_training_error_logged_and_kept_across_a_mid_epoch_resume(fake_fashion, tmp_path):
    """metrics' train_top1_err (the paper's Figures 2 and 4) is the same whether or not the run was
    stopped mid-epoch and resumed."""
    from fastar.train import run

    args = ["--data", f"fashion-mnist={fake_fashion[0]}", "--image-size", "12", "--model", "resnet8", "--width", "4",
            "--batch", "16", "--epochs", "2", "--threads", "1", "--no-progress", "--no-plots", "--quiet",
            "--ckpt-every-iters", "5"]
    full = run(args + ["--out", str(tmp_path / "full")])
    ipe = full["iters_per_epoch"]
    assert ipe == 200 // 16
    assert run(args + ["--out", str(tmp_path / "cut"), "--stop-at-iter", str(ipe + 7)]) is None
    cut = run(args + ["--out", str(tmp_path / "cut"), "--resume"])
    for a, b in zip(full["history"], cut["history"]):
        assert 0 <= a["train_top1_err"] <= 100
        assert b["train_top1_err"] == pytest.approx(a["train_top1_err"], abs=1e-9)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)


def test_study_report_rereads_the_error_and_keeps_the_measure_it_ran_with(tmp_path):
    """--report-only --err-last K re-reads each run's error from its per-epoch validation history;
    the errors and decisions of the measure the study ran with stay in the JSON (as_run_measure)."""
    lb = _large_batch_module()
    args = lb.fashion_parser().parse_args(["--dataset", "fashion-mnist", "--factors", "4", "--none-factors", "",
                                           "--epochs", "4", "--err-last", "3"])
    cells = [c for c in lb.fashion_cells(args) if c["key"] in ("baseline", "gradual_x4")]
    runs = []
    for key, vals in (("baseline", [(20, 17, 12, 11), (21, 18, 13, 10)]), ("gradual_x4", [(22, 19, 14, 12), (23, 20, 15, 13)])):
        for seed, v in enumerate(vals):
            hist = [{"epoch": e, "train_loss": 1.0, "train_top1_err": 10.0, "val_top1_err": float(x)} for e, x in enumerate(v)]
            runs.append({"key": key, "seed": seed, "argv": [key, str(seed)], "diverged": False, "err_last": 3,
                         "err": float(sorted(v[-3:])[1]), "final_err": float(v[-1]), "final_train_err": 10.0,
                         "history": hist, "target_lr": 0.1, "iters_per_epoch": 10, "cpu_s": 1.0, "wall_s": 2.0})
    partial = tmp_path / "s.partial.json"
    partial.write_text(json.dumps({"args": vars(args), "common_argv": [], "cells": cells, "wall_s": 1.0,
                                   "complete": True, "runs": runs}))
    assert lb.fashion_parser().parse_args(["--dataset", "fashion-mnist"]).train_subset == 0  # the full set
    lb.fashion_report(str(partial), str(tmp_path / "s.json"), docs=False, name="s", err_last=1)
    out = json.loads((tmp_path / "s.json").read_text())
    assert out["err_last"] == 1 and out["stats"]["baseline"]["errs"] == [11.0, 10.0]
    assert out["as_run_measure"]["err_last"] == 3
    assert out["as_run_measure"]["stats"]["baseline"]["errs"] == [12.0, 13.0]
    assert out["stats"]["gradual_x4"]["mean"] == 12.5 and "analysis" in out["as_run_measure"]
    assert "all 60,000 training images" in out["table_md"] and "CPU time of the runs" in out["table_md"]


def test_holdout_split_is_fixed_stratified_disjoint_and_the_test_set_read_once(fake_fashion, tmp_path):
    """--holdout N: N training images (a fixed stratified draw) are the validation split of every
    epoch and left out of training (and of any --train-subset); the test set is read once, after the
    last epoch, and never with --no-test."""
    root, train_x, train_y = fake_fashion[:3]
    a = build_datasets(f"fashion-mnist={root}", seed=0, holdout=50)
    b = build_datasets(f"fashion-mnist={root}", seed=7, holdout=50, train_subset=100)
    assert (len(a.train), len(a.val), len(a.test)) == (150, 50, 50)
    assert torch.bincount(a.val.y, minlength=10).tolist() == [5] * 10
    assert torch.equal(a.val.x, b.val.x)  # the same held-out images for every seed and subset

    def rows(ds):  # the images themselves (unpadded, unaugmented store), as bytes
        p = ds.pad
        x = ds.x[:, :, p:p + 28, p:p + 28] if p else ds.x
        return {x[i].numpy().tobytes() for i in range(len(ds.y))}

    held, train, sub = rows(a.val), rows(a.train), rows(b.train)
    assert len(held) == 50 and not (held & train) and not (held & sub) and sub <= train
    assert len(train | held) == 200 and len(b.train) == 100
    with pytest.raises(ValueError, match="fashion-mnist"):
        build_datasets("digits", holdout=10)
    from fastar.train import run
    from fastar.train.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--no-test"])  # without --holdout the test set is the validation set
    args = ["--data", f"fashion-mnist={root}", "--holdout", "50", "--image-size", "12", "--model", "resnet8",
            "--width", "4", "--batch", "16", "--epochs", "2", "--threads", "1", "--no-progress", "--no-plots",
            "--quiet"]
    s = run(args + ["--out", str(tmp_path / "final")])
    assert [("test_top1_err" in h, "val_top1_err" in h) for h in s["history"]] == [(False, True), (True, True)]
    assert s["test_top1_err"] == s["history"][-1]["test_top1_err"] and s["holdout"] == 50
    # the two errors are of different images: 50 held-out vs 50 test, counted per image
    assert (s["history"][-1]["val_top1_err"] * 50 / 100) % 1 == pytest.approx(0, abs=1e-6)
    g = run(args + ["--no-test", "--out", str(tmp_path / "grid")])
    assert g["test_top1_err"] is None and all("test_top1_err" not in h for h in g["history"])
    assert g["history"][-1]["val_top1_err"] == s["history"][-1]["val_top1_err"]  # the same run otherwise


def test_tuned_study_analysis_divergence_welch_and_fastar_match():
    lb = _large_batch_module()
    a = lb.tuned_parser().parse_args(["--dataset", "fashion-mnist", "--study", "tuned", "--factors", "4,8",
                                      "--decisive-factors", "8", "--none-factors", "8", "--table-factor", "8",
                                      "--grid-factor", "8", "--fastar-factors", "8"])
    cells = lb.tuned_cells(a)
    assert cells["baseline"]["seeds"] == 5 and cells["gradual_x8"]["seeds"] == 5 and cells["gradual_x4"]["seeds"] == 3
    assert cells["fastar_x8"]["argv"][cells["fastar_x8"]["argv"].index("--accum") + 1] == "4"
    assert "--nproc" in cells["fastar_x8"]["argv"] and cells["fastar_x8"]["twin"] == "gradual_x8"
    lars = lb.grid_cell(a, "lars", 4.0, 0.002)
    assert lars["split"] == "holdout" and "--decay" in lars["argv"] and lars["argv"][lars["argv"].index("--trust-coeff") + 1] == "0.002"
    assert lars["argv"][lars["argv"].index("--ref-batch") + 1] == str(16 * 8)  # the global lr as given: no scaling
    runs = []

    def add(key, errs, **kw):
        for s, e in enumerate(errs):
            runs.append(dict(key=key, seed=s, err=e, diverged=e is None or e >= lb.CHANCE_ERR, val_err=e,
                             final_train_err=1.0, **kw))

    add("baseline", [10.0, 10.2, 9.9, 10.1, 10.0])
    add("gradual_x4", [10.1, 10.3, 10.0])
    add("gradual_x8", [10.4, 10.2, 10.6, 10.3, 10.5])  # +0.36 > 2 x 0.16, Welch p 0.004: worse
    add("none_x8", [12.0, 90.0, 11.8, 12.2, 12.1])  # one run at chance: diverged
    add("fastar_x8", [10.41, 10.19, 10.62], impl="fastar")
    for lr, e in ((1.0, 30.0), (2.0, 20.0), (4.0, 25.0), (8.0, 90.0)):
        runs.append(dict(key=f"grid_lars_lr{lr:g}_eta0.001", seed=0, err=e, diverged=e >= 89, lr=lr, eta=0.001,
                         final_train_err=1.0))
    by = {}
    for r in runs:
        by.setdefault(r["key"], []).append(r)
    st = {k: lb.tuned_stats(v) for k, v in by.items()}
    assert st["none_x8"]["diverged"] == 1 and st["none_x8"]["mean"] == pytest.approx(12.025)
    allc = dict(cells, **{r["key"]: lb.grid_cell(a, "lars", r["lr"], r["eta"]) for r in runs if "lr" in r})
    an = lb.tuned_analysis(vars(a), allc, st, runs)
    f1 = an["finding1"]
    assert f1["flat_up_to_kn"] == 64 and an["finding3"]["tipping_kn"] == 128
    step8 = f1["steps"][-1]
    assert step8["worse"] and step8["p"] < 0.05 and step8["diff"] == pytest.approx(0.36)
    # finding 2: no warmup has more diverged runs: worse whatever its mean; but gradual is not within
    # noise of the baseline at 8x, so the finding is not shown
    f2 = an["finding2"]["cells"][0]
    assert f2["worse"] and f2["by"] == "diverged runs" and not f2["gradual_within_noise"]
    assert not an["finding2"]["appeared"]
    g = an["lars"]["grid"]
    assert g["best"] == {"lr": 2.0, "eta": 0.001, "holdout_err": 20.0} and not g["best_at_edge"]
    assert [p["diverged"] for p in g["points"]] == [False, False, False, True]
    fa = an["fastar"][0]
    assert fa["match"] and fa["paired_diffs"] == {0: pytest.approx(0.01), 1: pytest.approx(-0.01), 2: pytest.approx(0.02)}
    # Welch: equal means -> p 1-ish; far apart -> tiny; too few values -> None
    assert lb.welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert lb.welch([1.0, 1.1, 0.9], [5.0, 5.1, 4.9]) < 1e-3 and lb.welch([1.0], [2.0, 3.0]) is None
    # a large difference that Welch does not back (two seeds, wide spread) is not "worse"
    c = lb.compare({"n": 2, "diverged": 0, "errs": [10.0, 10.1], "mean": 10.05, "std": 0.07},
                   {"n": 2, "diverged": 0, "errs": [10.0, 14.0], "mean": 12.0, "std": 2.83})
    assert c["diff"] == pytest.approx(1.95) and not c["worse"]
    # one run a side: no Welch test, so no decision (and the finding-1 walk stops there)
    one = lb.compare({"n": 1, "diverged": 0, "errs": [10.0], "mean": 10.0, "std": 0.0},
                     {"n": 1, "diverged": 0, "errs": [30.0], "mean": 30.0, "std": 0.0})
    assert one["worse"] is None and one["diff"] == 20.0
    st1 = {k: lb.tuned_stats(v[:1]) for k, v in by.items()}
    an1 = lb.tuned_analysis(vars(a), allc, st1, [r for r in runs if r["seed"] == 0])
    assert an1["finding1"]["undecided_at_kn"] == 64 and not an1["finding1"]["appeared"]
    assert not an1["finding3"]["appeared"]


def test_docs_generated_blocks_match_the_committed_json():
    """Every generated block of the docs is exactly what its committed JSON generates: a block left
    stale (a report run with --no-docs, a hand edit) fails here. `python bench/large_batch.py
    --docs-only` rewrites them all."""
    lb = _large_batch_module()
    blocks = lb.generated_blocks()
    assert {"large_batch", "fashion_mnist_study", "fashion_mnist_bf16"} <= set(blocks)
    stale = [name for name, (path, md) in blocks.items() if lb.read_block(path, name) != md.strip("\n")]
    assert not stale, f"generated blocks differ from their JSON: {stale}; run python bench/large_batch.py --docs-only"


def test_docs_check_catches_a_stale_block(tmp_path):
    """The check above can fail: a docs file whose block differs by one digit is reported, and
    update_all_docs' rewrite fixes it."""
    lb = _large_batch_module()
    name, (path, md) = next(iter(lb.generated_blocks().items()))
    doc = tmp_path / "doc.md"
    doc.write_text(f"text\n<!-- {name}:begin -->\n{md.replace('1', '7', 1)}\n<!-- {name}:end -->\nmore\n")
    assert lb.read_block(str(doc), name) != md
    lb.update_docs_between(md, str(doc), f"<!-- {name}:begin -->", f"<!-- {name}:end -->")
    assert lb.read_block(str(doc), name) == md and doc.read_text().startswith("text\n")
