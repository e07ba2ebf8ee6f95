"""The accelerator hot path, checked on the CPU: precision, channels-last and compile flags with
their fallbacks, float32 losses under autocast, the fp16 gradient scaler, device-side
augmentation against the host transforms and a float64 reference, the sync-free epoch metrics,
and ``python -m distnoisy.bench gpu`` as a smoke run."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError
from distnoisy.data.device_augment import DeviceAugment, crop_flip, decode_batch
from distnoisy.data.shards import Sample, write_shards
from distnoisy.data.stream import TrainStream, make_transform
from distnoisy.data.stream.decode import decode_jpegs, jpeg_decode_device
from distnoisy.engine.precision import CompiledOrEager, Precision, maybe_compile, resolve_precision
from distnoisy.engine.step import declare_run_fields, train_step
from distnoisy.methods import METHODS
from distnoisy.methods.base import StepInput
from distnoisy.store import SampleStore

CPU = torch.device("cpu")
MEAN, STD = (0.6959, 0.6537, 0.6371), (0.3113, 0.3192, 0.3214)


def photos(side: int, count: int) -> list[torch.Tensor]:
    """Real photographs (scikit-learn's two sample images), ``count`` square crops of them
    resized to ``side`` px, uint8 3 x side x side."""
    from sklearn.datasets import load_sample_images

    out = []
    for k in range(count):
        img = load_sample_images().images[k % 2]
        top, left = 20 * k % 200, 37 * k % 300
        crop = Image.fromarray(img[top : top + 220, left : left + 220])
        arr = np.asarray(crop.resize((side, side), Image.BILINEAR))
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
    return out


# -- config -------------------------------------------------------------------------------------
def test_config_accepts_the_keys_and_rejects_bad_values():
    cfg = load_config(
        [
            "train.precision=bf16",
            "train.channels_last=true",
            "train.compile=true",
            "data.decode=gpu",
            "data.augment_on=device",
        ]
    )
    assert (cfg.train.precision, cfg.train.channels_last, cfg.train.compile) == ("bf16", True, True)
    assert (cfg.data.decode, cfg.data.augment_on) == ("gpu", "device")
    defaults = load_config([])
    assert (defaults.train.precision, defaults.data.augment_on) == ("fp32", "host")
    with pytest.raises(
        ConfigError, match=r"train\.precision='fp8'; valid choices: fp32, bf16, fp16"
    ):
        load_config(["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"data\.decode=gpu needs data\.augment_on=device"):
        load_config(["data.decode=gpu"])
    with pytest.raises(ConfigError, match=r"data\.augment_on='gpu'"):
        load_config(["data.augment_on=gpu"])


# -- precision ----------------------------------------------------------------------------------
def test_precision_falls_back_with_a_notice(caplog):
    with caplog.at_level(logging.WARNING, logger="distnoisy.engine.precision"):
        fp16 = resolve_precision("fp16", CPU)
    assert fp16 == Precision("fp32", "cpu") and fp16.grad_scaler() is None
    assert "train.precision=fp16 is not supported on cpu: training in fp32" in caplog.text
    bf16 = resolve_precision("bf16", CPU)
    assert bf16.dtype is torch.bfloat16
    with bf16.autocast():
        assert torch.nn.Linear(4, 2)(torch.randn(3, 4)).dtype is torch.bfloat16


def _subject(name: str, n: int = 16):
    cls = METHODS.get(name)
    method = cls(cls.Params(name=name), num_samples=n, num_classes=3, epochs=2, seed=0)
    torch.manual_seed(0)
    nets = method.build_networks(
        lambda name=None, weights=None: torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)
        )
    )
    method.setup(nets, CPU)
    opts = method.build_optimizers(nets, lambda p: torch.optim.SGD(p, lr=0.1))
    store = SampleStore(n)
    declare_run_fields(store, 2, 3)
    method.attach(store)
    return method, nets, opts, store


@pytest.mark.parametrize("name", ["ce", "elr", "dal", "elr_plus", "limit"])
def test_losses_stay_float32_under_bf16_autocast(name):
    method, nets, opts, store = _subject(name)
    seen: list[torch.dtype] = []
    for net in nets.values():
        net.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    for phase in method.phases():
        batch = StepInput(x, y, torch.arange(8), epoch=0, step=0, steps_per_epoch=1, phase=phase)
        loss, correct = train_step(
            method, nets, opts, store, batch, Precision("bf16", "cpu").autocast()
        )
        # The networks ran in bf16; the loss the optimizer saw and the step reports is float32.
        assert set(seen) == {torch.bfloat16}
        assert loss.dtype is torch.float32 and torch.isfinite(loss)
        assert correct.dtype is torch.int64 and 0 <= int(correct) <= 8
    assert torch.isfinite(store["loss_hist"][:8, 0]).all()


def test_a_loss_runs_with_autocast_off_on_float32_logits():
    # A loss's own arithmetic (e.g. forward correction's p @ T) must not run in bf16.
    from distnoisy.methods.ce import CrossEntropy

    class Recording(CrossEntropy):
        def loss(self, logits, labels, index):
            self.seen = (torch.is_autocast_enabled("cpu"), logits.dtype)
            return super().loss(logits, labels, index)

    method, nets, opts, store = _subject("ce")
    recording = Recording(method.params, num_samples=16, num_classes=3, epochs=2)
    recording.attach(store)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 3
    batch = StepInput(x, y, torch.arange(8), epoch=0, step=0, steps_per_epoch=1)
    train_step(recording, nets, opts, store, batch, Precision("bf16", "cpu").autocast())
    assert recording.seen == (False, torch.float32)


def test_fp16_scaler_steps_equal_unscaled_steps_and_skip_overflow():
    # The scaler multiplies the loss by 2**10 and divides the gradients back before the step:
    # the SGD update must equal the unscaled one (powers of two: exact up to float rounding).
    runs = []
    for scaled in (False, True):
        method, nets, opts, store = _subject("ce")
        if scaled:
            method.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        x, y = (
            torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2)),
            torch.arange(8) % 3,
        )
        for step in range(3):
            batch = StepInput(x, y, torch.arange(8), epoch=0, step=step, steps_per_epoch=3)
            train_step(method, nets, opts, store, batch)
        runs.append(torch.cat([p.detach().flatten() for p in nets["model"].parameters()]))
    assert torch.allclose(runs[0], runs[1], rtol=1e-5, atol=1e-6)
    # An overflowing step is skipped (weights unchanged) and the scale halves.
    method, nets, opts, store = _subject("ce")
    method.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in nets["model"].parameters()]
    x = torch.full((8, 1, 8, 8), float("inf"))
    train_step(
        method, nets, opts, store, StepInput(x, torch.arange(8) % 3, torch.arange(8), 0, 0, 1)
    )
    assert all(torch.equal(a, b) for a, b in zip(before, nets["model"].parameters(), strict=True))
    assert method.grad_scaler.get_scale() == 2.0**9


# -- compile ------------------------------------------------------------------------------------
def test_compile_matches_eager_or_falls_back_with_a_notice(caplog):
    net = _subject("ce")[1]["model"]
    x = torch.randn(5, 1, 8, 8)
    # aot_eager: dynamo tracing and AOT autograd without C++ code generation (CI-cheap).
    compiled = CompiledOrEager(net, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert not compiled.failed and torch.allclose(out, net(x), atol=1e-6)
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in net.parameters()]

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    failing = CompiledOrEager(net, name="model", backend=broken)
    with caplog.at_level(logging.WARNING, logger="distnoisy.engine.precision"):
        out = failing(x)
    assert failing.failed and torch.equal(out, net(x))
    assert "train.compile: compiling network 'model' failed" in caplog.text
    assert maybe_compile(net, False) is net and isinstance(
        maybe_compile(net, True), CompiledOrEager
    )


# -- device augmentation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, side", [("imagenet_train", 73), ("cifar_train", 32), ("digits", 16)]
)
def test_device_augment_equals_the_host_transform(kind, side):
    host = make_transform(kind, MEAN, STD, seed=5, size=64)
    deferred = make_transform(kind, MEAN, STD, seed=5, size=64, defer=True)
    aug = DeviceAugment(kind, MEAN, STD, 64)
    images = photos(side, 6)
    for epoch in (0, 3):
        idx = [10, 11, 250, 7, 7, 9000]
        parts = [deferred.deferred(img, i, epoch) for img, i in zip(images, idx, strict=True)]
        batch = torch.stack([p[0] for p in parts])
        draws = torch.tensor([p[1] for p in parts])
        expected = torch.stack([host(img, i, epoch) for img, i in zip(images, idx, strict=True)])
        assert torch.equal(aug(batch, draws), expected)
    if kind != "digits":
        assert len({tuple(d) for d in draws.tolist()}) > 1  # the draws do differ per sample


def test_crop_flip_and_normalise_against_a_float64_reference():
    images = photos(40, 5)
    draws = torch.tensor([[0, 0, 0], [8, 3, 1], [2, 8, 1], [5, 5, 0], [8, 8, 1]])
    out = DeviceAugment("imagenet_train", MEAN, STD, 32)(torch.stack(images), draws)
    for img, (top, left, flip), got in zip(images, draws.tolist(), out, strict=True):
        ref = img.numpy().astype(np.float64)[:, top : top + 32, left : left + 32]
        if flip:
            ref = ref[:, :, ::-1]
        ref = (ref / 255 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
        assert np.abs(got.double().numpy() - ref).max() < 1e-5
    # crop_flip is a pure gather: any dtype, exact.
    x = torch.arange(2 * 1 * 4 * 5).reshape(2, 1, 4, 5)
    got = crop_flip(x, torch.tensor([[1, 2, 1], [0, 0, 0]]), 2, 3)
    assert got[0, 0].tolist() == [[9, 8, 7], [14, 13, 12]]
    assert got[1, 0].tolist() == [[20, 21, 22], [25, 26, 27]]


def test_deferred_non_square_images_are_cut_to_their_central_square():
    tf = make_transform("imagenet_train", MEAN, STD, seed=0, size=64, defer=True)
    wide = torch.zeros(3, 100, 150, dtype=torch.uint8)
    img, (top, left, flip) = tf.deferred(wide, 0, 0)
    assert tuple(img.shape) == (3, 73, 73) and 0 <= top <= 9 and 0 <= left <= 9 and flip in (0, 1)
    with pytest.raises(ConfigError, match="cannot run on the device"):
        make_transform("imagenet_eval", MEAN, STD, defer=True)


def test_stream_batches_on_the_device_equal_the_host_batches(tmp_path):
    # Real photos as PNG shards (lossless) through the whole batching path, loader processes
    # included: the uint8 batches and their draws, augmented by DeviceAugment, equal the host
    # path's float batches.
    imgs = photos(32, 24)

    def encode(t: torch.Tensor) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(t.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        return buf.getvalue()

    samples = (Sample(i, encode(t), i % 3, None, f"p{i}") for i, t in enumerate(imgs))
    m = write_shards(
        samples,
        tmp_path,
        split="train",
        classes=["a", "b", "c"],
        shard_size=8,
        image_ext="png",
        dataset="photos",
    )

    def batches(defer: bool, workers: int) -> list[dict[str, torch.Tensor]]:
        tf = make_transform("cifar_train", MEAN, STD, seed=3, defer=defer)
        s = TrainStream(
            m,
            rank=0,
            world_size=1,
            local_batch_size=6,
            seed=3,
            transform=tf,
            num_workers=workers,
            split="sample",
        )
        try:
            return list(s.epoch_batches(1))
        finally:
            s.close()

    host, device = batches(False, 0), batches(True, 1)
    aug = DeviceAugment("cifar_train", MEAN, STD, 32)
    assert len(host) == len(device) == 4
    for h, d in zip(host, device, strict=True):
        assert d["image"].dtype is torch.uint8 and tuple(d["augment"].shape) == (6, 3)
        assert torch.equal(h["index"], d["index"])
        assert torch.equal(aug(d["image"], d["augment"]), h["image"])


def test_jpeg_bytes_batches_decoded_on_the_device_equal_the_loader_decoded_ones(tmp_path):
    # data.decode=gpu: the loader batches JPEG bytes (a corrupt one is skipped and replaced
    # from the reserve as usual), decode_batch decodes them where the device is (here the CPU,
    # libjpeg both ways) and the augmentation sees the same pixels and draws.
    def jpeg(t: torch.Tensor) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(t.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    data = [jpeg(t) for t in photos(73, 20)]
    data[5] = b"PNG? no" + data[5]
    samples = (Sample(i, d, i % 3, None, f"j{i}") for i, d in enumerate(data))
    m = write_shards(
        samples, tmp_path, split="train", classes=["a", "b", "c"], shard_size=5,
        image_ext="jpg", dataset="photos",
    )  # fmt: skip

    def batches(encoded: bool) -> tuple[list[dict[str, torch.Tensor]], list]:
        tf = make_transform("imagenet_train", MEAN, STD, seed=1, size=64, defer=True,
                            encoded=encoded)  # fmt: skip
        s = TrainStream(m, rank=0, world_size=1, local_batch_size=4, seed=1, transform=tf,
                        split="sample")  # fmt: skip
        try:
            return list(s.epoch_batches(0)), s.bad_samples
        finally:
            s.close()

    (loader, bad_a), (encoded, bad_b) = batches(False), batches(True)
    assert [k for k, _ in bad_a] == [k for k, _ in bad_b] == ["000000005"]
    aug = DeviceAugment("imagenet_train", MEAN, STD, 64)
    for a, b in zip(loader, encoded, strict=True):
        assert b["jpeg"].dtype is torch.uint8 and len(b["jpeg_offsets"]) == 5
        images, undecodable = decode_batch(b["jpeg"], b["jpeg_offsets"], CPU, 73)
        assert undecodable == [] and torch.equal(images, a["image"])
        assert torch.equal(a["augment"], b["augment"]) and torch.equal(a["index"], b["index"])
        assert torch.equal(aug(images, b["augment"]), aug(a["image"], a["augment"]))
    # An image the decoder rejects after the signature check is replaced in its batch.
    b = encoded[0]
    broken = b["jpeg"].clone()
    broken[b["jpeg_offsets"][1] + 3 : b["jpeg_offsets"][2]] = 0
    images, undecodable = decode_batch(broken, b["jpeg_offsets"], CPU, 73)
    assert undecodable == [1] and torch.equal(images[1], images[0])


def test_jpeg_decode_falls_back_to_the_cpu_with_a_reason():
    where, reason = jpeg_decode_device(CPU)
    assert where == CPU and "not a CUDA GPU" in reason
    img = photos(48, 1)[0]
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    out = decode_jpegs([data, data], CPU)
    assert len(out) == 2 and tuple(out[0].shape) == (3, 48, 48)
    assert (out[0].float() - img.float()).abs().mean() < 4  # JPEG at quality 95


# -- the benchmark ------------------------------------------------------------------------------
SMOKE = [
    "gpu", "--device", "cpu", "--model", "resnet18", "--image-size", "32", "--batch", "4",
    "--steps", "1", "--warmup", "1", "--repeats", "1", "--loader-workers", "0",
]  # fmt: skip


@pytest.mark.slow
def test_bench_gpu_smoke_runs_without_the_rest_of_the_stack(tmp_path):
    # A separate interpreter: the accelerator machine has torch and torchvision only, so the
    # benchmark must not import Ray, MLflow, OmegaConf, WebDataset or pyarrow.
    out = tmp_path / "gpu.json"
    argv = [*SMOKE, "--methods", "ce,elr_plus", "--json", str(out)]
    code = (
        f"import sys, runpy\nsys.argv = ['distnoisy.bench', *{argv!r}]\n"
        "try:\n    runpy.run_module('distnoisy.bench', run_name='__main__')\n"
        "finally:\n    print('LOADED', sorted(k for k in ('omegaconf', 'ray', 'mlflow', "
        "'webdataset', 'pyarrow') if k in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LOADED []" in run.stdout
    assert "| elr_plus |" in run.stdout and "gpu decode falls back to the CPU" in run.stdout
    doc = json.loads(out.read_text())
    ips, medians = doc["ips"], doc["medians"]
    cols = ("model", "cpu_decode", "gpu_decode")
    for m, images in (("ce", 1_000_000), ("elr_plus", 192_000)):
        # One round: each median is its round; the printed row shows them, the rate relative to
        # CE, no peak memory (a CPU) and the epoch projected from the faster end-to-end rate
        # (ELR+: its protocol's 192k images; 8 GPUs at 90% of linear scaling).
        assert all(len(ips[m][c]) == 1 and medians[m][c] == ips[m][c][0] for c in cols)
        best = max(medians[m]["cpu_decode"], medians[m]["gpu_decode"])
        cells = [f"{medians[m][c]:,.0f} | {ips['ce'][c][0] / ips[m][c][0]:.3f}" for c in cols]
        row = f"| {m} | {' | '.join(cells)} | - | {images / best:,.0f} s "
        assert row + f"| {images / (8 * 0.9 * best):,.0f} s |" in run.stdout, run.stdout
    assert doc["peak_mem_gib"] == {"ce": None, "elr_plus": None}
    assert doc["environment"]["torch"] == torch.__version__


def test_bench_gpu_projection_and_cuda_check():
    from distnoisy.bench import gpu

    # 1M images at 2,000 img/s: 500 s on one GPU; 8 GPUs at 90% of linear: 500 / 7.2.
    assert gpu.projection(2000.0, 1_000_000, 1, 0.9) == pytest.approx(500.0)
    assert gpu.projection(2000.0, 1_000_000, 8, 0.9) == pytest.approx(500.0 / 7.2)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA device; run it on the accelerator"):
            gpu.resolve_device("cuda")
    with pytest.raises(SystemExit, match="--methods: unknown"):
        from distnoisy.bench.cli import main

        main([*SMOKE, "--methods", "ce,mixup"])


# -- end to end on digits -----------------------------------------------------------------------
@pytest.mark.slow
def test_digits_bf16_channels_last_on_the_device_path_matches_fp32(tmp_path, digits_root, caplog):
    from distnoisy.train import train

    common = [
        f"data.root={digits_root}",
        # ELR on digits is past its early-learning phase by epoch 6 (~95% clean test accuracy
        # from epoch 5 on, in three 60-epoch seeds).
        "train.epochs=6",
        "scaling.launcher=local",
        "scaling.num_workers=1",
        "tracking.enabled=false",
    ]
    fp32 = train(load_config([*common, f"output_dir={tmp_path / 'fp32'}"]))
    with caplog.at_level(logging.INFO, logger="distnoisy.engine.trainer"):
        fast = train(
            load_config(
                [
                    *common,
                    f"output_dir={tmp_path / 'bf16'}",
                    "train.precision=bf16",
                    "train.channels_last=true",
                    "data.augment_on=device",
                ]
            )
        )
    # The one worker runs in-process: its setup line says what the hot path did.
    assert "hot path: bf16 autocast on cpu, channels_last=True, compile=False" in caplog.text
    # bf16 did run: the first epoch's loss differs from fp32's beyond float32 rounding.
    assert fast["history"][0]["train_loss"] != pytest.approx(
        fp32["history"][0]["train_loss"], rel=1e-6
    )
    # Seed-to-seed spread of this 6-epoch run is ~1-2 points of test accuracy.
    assert fast["test_acc"] > 0.85 and abs(fast["test_acc"] - fp32["test_acc"]) < 0.04
    # The sync-free epoch metrics equal what the store recorded per sample.
    stats = pq.read_table(tmp_path / "bf16" / "sample_stats.parquet").to_pandas()
    pred_hist = np.stack(stats["pred_hist"].to_numpy())
    given = stats["given_label"].to_numpy()
    for e, h in enumerate(fast["history"]):
        seen = pred_hist[:, e] >= 0
        assert seen.sum() == 1437 // 64 * 64
        assert h["train_acc_given"] == pytest.approx((pred_hist[seen, e] == given[seen]).mean())
