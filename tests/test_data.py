"""Datasets, multiview transforms, unreadable images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pretrain_in_process, run_main
from infomax.config.pretrain import ConfigError, ViewConfig, load_config
from infomax.data import DataError, MultiViewDataset, build_dataset, build_view_transform, collate_skipped
from infomax.data.datasets import FMNIST_DEFAULT_ROOT, ImageFolder, Synthetic, stratified_subset


def make_imagefolder(root: Path, good_per_class: int = 12, corrupt: int = 3) -> list[Path]:
    rng = np.random.default_rng(0)
    bad = []
    for c in ("cat", "dog"):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(good_per_class):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    for i in range(corrupt):
        path = root / "train" / "dog" / f"broken{i}.jpg"
        path.write_bytes(b"\xff\xd8 not really a jpeg" * (i + 1))
        bad.append(path)
    return bad


def test_multiview_gives_v_views_of_the_recipe_shapes() -> None:
    base = Synthetic(size=8, classes=4, image_size=20, seed=0)
    views = [ViewConfig(size=16), ViewConfig(size=12, blur_p=1.0)]
    ds = MultiViewDataset(base, [build_view_transform(v, 3, base.mean, base.std) for v in views], seed=0)
    item = ds[3]
    assert [tuple(v.shape) for v in item["views"]] == [(3, 16, 16), (3, 12, 12)]
    assert item["label"] == 3 and item["skipped"] == ""
    assert not torch.equal(item["views"][0][:, :12, :12], item["views"][1])


def test_augmentations_depend_only_on_seed_epoch_and_index() -> None:
    base = Synthetic(size=8, classes=4, image_size=20, seed=0)
    t = [build_view_transform(ViewConfig(size=16), 3, base.mean, base.std)] * 2
    a, b = MultiViewDataset(base, t, seed=0), MultiViewDataset(base, t, seed=0)
    torch.manual_seed(123)
    first = a[5]["views"][0]
    torch.manual_seed(999)  # the global RNG does not matter...
    assert torch.equal(b[5]["views"][0], first)
    b.set_epoch(1)  # ...the epoch does
    assert not torch.equal(b[5]["views"][0], first)


def test_persistent_loader_workers_draw_each_epochs_augmentations() -> None:
    """Workers that outlive an epoch (the probe's ``persistent_workers``) see ``set_epoch``: the second
    epoch draws what a fresh dataset at epoch 1 draws, not the first epoch again."""
    base = Synthetic(size=8, classes=4, image_size=20, seed=0)
    ds = MultiViewDataset(base, [build_view_transform(ViewConfig(size=16), 3, base.mean, base.std)], seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=1, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append(next(iter(loader))["views"][0])
    fresh = MultiViewDataset(base, ds.transforms, seed=0)
    fresh.set_epoch(1)
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(epochs[1], torch.stack([fresh[i]["views"][0] for i in range(8)]))


def test_grayscale_data_keeps_one_channel() -> None:
    t = build_view_transform(ViewConfig(size=16, jitter_p=1.0, grayscale_p=1.0), 1, (0.5,), (0.5,))
    assert t(torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8)).shape == (1, 16, 16)


def test_synthetic_is_deterministic_and_class_structured() -> None:
    a, b = Synthetic(16, 4, 16, seed=0), Synthetic(16, 4, 16, seed=0)
    assert torch.equal(a[5][0], b[5][0]) and a[5][1] == 1
    # images of one class are closer to each other than to other classes
    x = torch.stack([a[i][0].float().flatten() for i in range(16)])
    x = torch.nn.functional.normalize(x - x.mean(0), dim=1)
    sim = x @ x.T
    same = torch.tensor([[i % 4 == j % 4 and i != j for j in range(16)] for i in range(16)])
    other = torch.tensor([[i % 4 != j % 4 for j in range(16)] for i in range(16)])
    assert sim[same].mean() > sim[other].mean() + 0.2


@pytest.mark.skipif(not Path(FMNIST_DEFAULT_ROOT).is_dir(), reason="make setup installs dataset-fashion-mnist")
def test_fashion_mnist_reads_the_real_idx_files() -> None:
    cfg = load_config(None, ["data.dataset=fashion_mnist"])
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) == 60000 and len(test) == 10000
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and label == 9  # ankle boot
    assert sorted(set(train.labels.tolist())) == list(range(10))


@pytest.mark.skipif(not Path(FMNIST_DEFAULT_ROOT).is_dir(), reason="make setup installs dataset-fashion-mnist")
@pytest.mark.parametrize("size, crop_ratio", [(28, 1.0), (32, 0.875)])
def test_in_memory_batches_are_transformed_exactly_as_single_images(size: int, crop_ratio: float) -> None:
    """The eval transform on a whole Fashion-MNIST batch (``load_many``) gives each image's per-item
    result bit for bit, through a Subset (the kNN monitor's) too, and the DataLoader takes that path."""
    from infomax.features.extract import ImageListDataset, _WithPosition

    test = build_dataset(load_config(None, ["data.dataset=fashion_mnist"]), "test")
    for base in (test, stratified_subset(test, 135)):
        ds, picks = ImageListDataset(base, size, crop_ratio), [3, 0, 17, 101, 64]
        batched = ds.__getitems__(picks)
        assert all(torch.equal(a, ds[i][0]) and b == ds[i][1] for (a, b), i in zip(batched, picks))
        assert batched[0][0].shape == (1, size, size)
        x, y, pos = next(iter(torch.utils.data.DataLoader(_WithPosition(ds), batch_size=8)))
        assert torch.equal(x, torch.stack([ds[i][0] for i in range(8)])) and pos.tolist() == list(range(8))
    calls = []
    test.load_many = lambda idx: calls.append(idx) or type(test).load_many(test, idx)  # the loader batches through it
    next(iter(torch.utils.data.DataLoader(_WithPosition(ImageListDataset(test, 28)), batch_size=4)))
    assert calls == [[0, 1, 2, 3]]


def test_corrupt_images_are_replaced_and_reported(tmp_path: Path) -> None:
    bad = make_imagefolder(tmp_path)
    base = ImageFolder(str(tmp_path), "train")
    ds = MultiViewDataset(base, [build_view_transform(ViewConfig(size=16), 3, base.mean, base.std)] * 2, seed=0)
    index = base.samples.index((str(bad[0]), 1))
    item = ds[index]
    assert item["views"][0].shape == (3, 16, 16)
    assert collate_skipped([item["skipped"]]) == [str(b) for b in bad]  # adjacent bad files, all skipped


def test_dataset_without_readable_images_fails_at_start(tmp_path: Path) -> None:
    d = tmp_path / "train" / "x"
    d.mkdir(parents=True)
    (d / "a.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 1 images"):
        build_dataset(load_config(None, ["data.dataset=imagefolder", f"data.root={tmp_path}"]))


def test_a_subset_of_a_folder_is_sent_to_a_worker_with_its_own_paths_alone(tmp_path: Path) -> None:
    """Pickled for a fork server's worker, a subset of a folder carries its own paths, not the folder's (1.28M on
    ImageNet), and loads the same images; a subset of a subset too."""
    import pickle

    from infomax.data.datasets import Subset

    make_imagefolder(tmp_path, corrupt=0)
    folder = ImageFolder(str(tmp_path), "train")
    for subset in (Subset(folder, [20, 3]), Subset(Subset(folder, list(range(4, 24))), [16, 0])):
        sent = pickle.loads(pickle.dumps(subset))
        assert len(sent.base.samples) == 2 and [sent.label(i) for i in range(2)] == [subset.label(i) for i in range(2)]
        assert all(torch.equal(sent.load(i)[0], subset.load(i)[0]) for i in range(2))


@pytest.mark.slow
def test_training_on_imagefolder_skips_and_reports_corrupt_files(tmp_path: Path) -> None:
    bad = make_imagefolder(tmp_path / "data", good_per_class=20, corrupt=3)
    proc = run_main(f"run.dir={tmp_path / 'run'}", "data.dataset=imagefolder", f"data.root={tmp_path / 'data'}",
                    "optim.batch_size_per_process=8", "optim.epochs=2", "monitor.knn_bank=16", "monitor.knn_queries=8")
    count = int(re.search(r"unreadable images (\d+)", proc.stdout).group(1))
    assert 1 <= count <= 3  # distinct files, however often each was retried
    assert "unreadable images were skipped" in proc.stdout and str(bad[0].parent) in proc.stdout
    examples = proc.stdout.split("unreadable images were skipped, e.g. ")[1].splitlines()[0].split(", ")
    assert len(examples) == len(set(examples))


def test_unreadable_images_are_counted_once_each() -> None:
    from infomax.runtime.checkpoint import Progress

    progress = Progress()
    progress.note_unreadable(["a.jpg", "b.jpg", "a.jpg"])  # b.jpg retried past a bad neighbour
    progress.note_unreadable(["b.jpg", "c.jpg"])  # the next epoch
    assert progress.unreadable == ["a.jpg", "b.jpg", "c.jpg"] and progress.unreadable_count == 3


def test_val_split_without_a_readable_image_is_one_line_at_start(tmp_path: Path, capsys) -> None:
    make_imagefolder(tmp_path / "data", good_per_class=4, corrupt=0)
    (tmp_path / "data" / "val" / "cat").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "data" / "val" / "cat" / f"{i}.jpg").write_bytes(b"not an image")
    proc = pretrain_in_process(capsys, f"run.dir={tmp_path / 'run'}", "data.dataset=imagefolder",
                               f"data.root={tmp_path / 'data'}", "optim.batch_size_per_process=4", "run.max_steps=1",
                               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: none of the 3 images under")
    assert "val" in proc.stderr and not (tmp_path / "run").exists()


def test_data_limit_keeps_every_class_of_a_class_sorted_folder(tmp_path: Path) -> None:
    """An image folder lists its classes one after another: data.limit took its first N images, here all cats."""
    from infomax.data.train_loader import training_and_validation

    make_imagefolder(tmp_path, good_per_class=12, corrupt=0)
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={tmp_path}", "data.limit=6"])
    train, _ = training_and_validation(cfg)
    assert sorted(train.label(i) for i in range(len(train))) == [0, 0, 0, 1, 1, 1]


def test_knn_monitor_queries_are_never_bank_images(tmp_path: Path) -> None:
    from infomax.data.datasets import disjoint_subsets
    from infomax.data.train_loader import build_knn_sets

    base = Synthetic(1300, 4, 8, seed=0)
    for n_bank, n_queries in ((500, 200), (5000, 1000), (1300, 1300), (10, 5)):
        bank, queries = disjoint_subsets(base, n_bank, n_queries)
        assert not set(bank.indices) & set(queries.indices)
        assert len(queries) == min(n_queries, 650) and len(bank) == min(n_bank, 1300 - len(queries))
    make_imagefolder(tmp_path, good_per_class=12, corrupt=0)  # no val/: the queries come from train
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={tmp_path}", "monitor.knn_bank=500",
                             "monitor.knn_queries=200"])
    bank, queries = build_knn_sets(cfg, build_dataset(cfg))
    assert not set(bank.indices) & set(queries.indices) and len(queries) == 12 and len(bank) == 12


def test_batch_views_depend_only_on_seed_epoch_batch_and_rank() -> None:
    from infomax.data.batch_views import BatchViews

    images = Synthetic(16, 4, 12, seed=0)
    x = torch.stack([images.load(i)[0] for i in range(16)])
    recipe = [ViewConfig(size=10, crop_scale_min=0.3, flip_p=0.5), ViewConfig(size=8, flip_p=0.0, jitter_p=0.0)]
    views = BatchViews(recipe, images.mean, images.std, seed=3)
    first = views(x, epoch=1, batch=2, rank=0)
    assert [v.shape for v in first] == [(16, 3, 10, 10), (16, 3, 8, 8)]
    assert all(torch.equal(a, b) for a, b in zip(first, views(x, epoch=1, batch=2, rank=0)))
    for other in (dict(epoch=2, batch=2, rank=0), dict(epoch=1, batch=3, rank=0), dict(epoch=1, batch=2, rank=1)):
        assert not torch.equal(first[0], views(x, **other)[0])
    # flip_p=1 mirrors exactly the crop that flip_p=0 draws (the same generator draws the same crops)
    plain = BatchViews([ViewConfig(size=12, crop_scale_min=0.5, flip_p=0.0, jitter_p=0.0)], (0.0,) * 3, (1.0,) * 3, 0)
    mirror = BatchViews([ViewConfig(size=12, crop_scale_min=0.5, flip_p=1.0, jitter_p=0.0)], (0.0,) * 3, (1.0,) * 3, 0)
    out, flipped = plain(x, 0, 0)[0], mirror(x, 0, 0)[0]
    assert torch.allclose(flipped, out.flip(-1), atol=1e-6) and not torch.allclose(flipped, out, atol=1e-3)
    assert out.min() >= 0 and out.max() <= 1


def power_of(out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of B, the mean of log(out) / log(x) over its pixels in (0.1, 0.8), and the largest
    relative deviation from that mean: a deviation near 0 means out = x ** g for one g."""
    means, spread = [], []
    for o, i in zip(out.flatten(1), x.flatten(1)):
        m = (i > 0.1) & (i < 0.8)
        ratio = o[m].log() / i[m].log()
        means.append(ratio.mean())
        spread.append(((ratio - ratio.mean()).abs() / ratio.mean()).max())
    return torch.stack(means), torch.stack(spread)


def grey_ramps_jittered(path: str, **jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """8 identical 8 x 8 grey ramps in [0, 1] and the same ramps after a view whose only jitter is ``jitter``
    (crop of the whole image, no flip, brightness and contrast 0), on the batch or the loader path."""
    from infomax.data.batch_views import BatchViews

    view = ViewConfig(size=8, crop_scale_min=1.0, flip_p=0.0, brightness=0.0, contrast=0.0, **{"jitter_p": 1.0, **jitter})
    x = (torch.linspace(0, 1, 64).view(1, 1, 8, 8).repeat(8, 1, 1, 1) * 255).round().to(torch.uint8)
    if path == "batch":  # the same generator draws the same crops first; the jitter is the only difference
        no_jitter = ViewConfig(size=8, crop_scale_min=1.0, flip_p=0.0, jitter_p=0.0)
        return BatchViews([no_jitter], (0.0,), (1.0,), 0)(x, 0, 0)[0], BatchViews([view], (0.0,), (1.0,), 0)(x, 0, 0)[0]
    jitter_step = build_view_transform(view, 1, (0.0,), (1.0,)).transforms[2]  # RandomApply([ColorJitter, ...])
    with torch.random.fork_rng(devices=[]):  # its own draws, whatever ran before in this worker
        torch.manual_seed(0)
        return x.float() / 255, torch.stack([jitter_step(img) for img in x]).float() / 255


@pytest.mark.parametrize("path", ["batch", "loader"])
def test_gamma_raises_each_image_to_one_power_within_its_strength(path: str) -> None:
    s = 0.5
    base, out = grey_ramps_jittered(path, gamma=s)
    per_image, spread = power_of(out, base)
    assert (spread < 0.03).all()  # one power per image
    assert (per_image > 1 / (1 + s) - 0.02).all() and (per_image < 1 + s + 0.02).all()
    assert per_image.std() > 0.05  # drawn per image, not once per batch


def test_tone_curve_is_monotone_onto_and_bends_by_its_slopes() -> None:
    from infomax.data.transforms import random_tone_slopes, tone_curve

    x = torch.linspace(0, 1, 101).repeat(6, 1)
    slopes = random_tone_slopes(6, 1.0, torch.Generator().manual_seed(0))
    y = tone_curve(x, slopes)
    assert torch.allclose(y[:, 0], torch.zeros(6)) and torch.allclose(y[:, -1], torch.ones(6))
    assert (y.diff(dim=1) > 0).all()  # strictly increasing: order of grey levels kept
    # on each quarter the slope is the drawn one, renormalised: (y(b) - y(a)) / (b - a) = 4 s_k / sum s
    quarter = y[:, [25, 50, 75, 100]] - y[:, [0, 25, 50, 75]]
    assert torch.allclose(quarter, slopes / slopes.sum(1, keepdim=True), atol=1e-6)
    assert ((slopes >= 0.5 - 1e-6) & (slopes <= 2 + 1e-6)).all()  # each within [1/(1 + s), 1 + s]
    assert torch.equal(tone_curve(x, torch.ones(6, 4)), x)  # equal slopes: the identity


@pytest.mark.parametrize("path", ["batch", "loader"])
def test_tone_curve_maps_each_image_monotonically_and_differently(path: str) -> None:
    base, out = grey_ramps_jittered(path, tone=1.0)
    order = base[0].flatten().argsort()
    assert (out.flatten(1)[:, order].diff(dim=1) >= 0).all()  # a monotone map of each image's grey levels
    assert (out - base).abs().amax(dim=(1, 2, 3)).min() > 0.02  # every image bent
    assert (out[1:] - out[:1]).abs().amax(dim=(1, 2, 3)).min() > 0.02  # by its own curve
    base, out = grey_ramps_jittered("batch", tone=1.0, jitter_p=0.5)  # the curve comes with the jitter, or not at all
    bent = (out - base).abs().amax(dim=(1, 2, 3)) > 0.02
    assert 0 < bent.sum() < 8 and torch.equal(out[~bent], base[~bent])


def test_batch_blur_is_torchvisions_gaussian_blur_per_image() -> None:
    """Each blurred image equals torchvision's GaussianBlur at the sigma drawn for it (kernel and reflect
    padding included); with blur_p=0.5 the others are left exactly as they were."""
    from torchvision.transforms import v2

    from infomax.data.batch_views import blur
    from infomax.data.transforms import blur_kernel_size

    x = torch.rand(16, 3, 64, 64)  # 3 channels: each image's kernel must reach each of its channels
    view = ViewConfig(size=64, blur_p=0.5, blur_sigma_max=3.0)
    out = blur(x, view, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, in blur's order
    on, sigma = torch.rand(16, generator=g) < 0.5, torch.empty(16).uniform_(0.1, 3.0, generator=g)
    assert 0 < on.sum() < 16
    k = blur_kernel_size(64)
    assert k == 7
    for img, res, o, s in zip(x, out, on, sigma):
        expected = v2.functional.gaussian_blur(img, [k, k], [float(s)] * 2) if o else img
        assert torch.allclose(res, expected, atol=1e-5)
    assert not torch.allclose(out[on], x[on], atol=1e-3)
    assert blur(x, ViewConfig(size=28, blur_p=0.0), torch.Generator()) is x
    every = blur(x[:4], ViewConfig(size=64, blur_p=1.0, blur_sigma_max=3.0), torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)  # blur_p=1: every image, the whole batch at once
    torch.rand(4, generator=g)
    for img, res, s in zip(x[:4], every, torch.empty(4).uniform_(0.1, 3.0, generator=g)):
        assert torch.allclose(res, v2.functional.gaussian_blur(img, [k, k], [float(s)] * 2), atol=1e-5)


def test_batch_solarize_is_torchvisions_per_image_and_keeps_the_stream_when_off() -> None:
    """With solarize_p=0.5 each image is either torchvision's RandomSolarize of its uint8 self (pixels
    >= 128 become 255 - x) or untouched, as its draw says; with solarize_p=0 nothing is drawn."""
    from torchvision.transforms import v2

    from infomax.data.batch_views import solarize
    from infomax.data.transforms import random_colour_steps

    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    view = ViewConfig(size=8, jitter_p=0.0, solarize_p=0.5)
    out = solarize(x.float() / 255, view, torch.Generator().manual_seed(3))
    on = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5
    assert 0 < on.sum() < 16
    always = v2.Compose(random_colour_steps(ViewConfig(size=8, jitter_p=0.0, grayscale_p=0.0, solarize_p=1.0), 3))
    for img, res, o in zip(x, out, on):
        expected = always(img) if o else img
        assert torch.allclose(res, expected.float() / 255, atol=1e-6)
    assert not torch.equal(out[on], x[on].float() / 255)
    g = torch.Generator().manual_seed(3)
    solarize(x.float(), ViewConfig(size=8), g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())


def test_batch_views_draw_as_before_for_recipes_without_blur_or_tone() -> None:
    """Blur, tone and solarize draw from the view generator only when asked, so older recipes keep their
    views (and resumed runs of them their exact stream): a recipe with all three off equals one built by hand."""
    from infomax.data.batch_views import BatchViews, batch_seed, jitter, random_resized_crop_flip

    x = (torch.rand(8, 1, 12, 12) * 255).to(torch.uint8)
    views = [ViewConfig(size=10, crop_scale_min=0.3, flip_p=0.5, gamma=1.0), ViewConfig(size=8, contrast=0.8)]
    g = torch.Generator().manual_seed(batch_seed(0, 1, 2, 0))
    by_hand = [jitter(random_resized_crop_flip(x.float() / 255, v, g), v, g) for v in views]  # view 1 after view 0's draws
    assert all(torch.equal(a, b) for a, b in zip(BatchViews(views, (0.0,), (1.0,), 0)(x, 1, 2), by_hand))
    blurred = BatchViews([ViewConfig(size=10, crop_scale_min=0.3, flip_p=0.5, gamma=1.0, blur_p=1.0), views[1]],
                         (0.0,), (1.0,), 0)(x, 1, 2)
    assert not torch.equal(blurred[1], by_hand[1])  # with blur on, view 0 draws more and view 1 changes


def test_batch_jitter_on_rgb_is_torchvisions_colour_jitter_per_image() -> None:
    """Brightness, contrast, saturation and hue, drawn per image with jitter_p=0.5 and applied in a random
    order per image (torchvision's ColorJitter shuffles its steps per call), each equal to torchvision's
    functional op at the factor drawn for that image (contrast and saturation blend with the luma grey);
    undrawn images are left as they were."""
    from torchvision.transforms.v2 import functional as TF

    from infomax.data.batch_views import jitter

    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    view = ViewConfig(size=12, jitter_p=0.5, brightness=0.4, contrast=0.4, saturation=0.6, hue=0.3)
    out = jitter(x, view, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)  # the same draws, in jitter's order
    on = (torch.rand(16, generator=g) < 0.5).float()
    factors = [1 + on * torch.empty(16).uniform_(-s, s, generator=g) for s in (0.4, 0.4, 0.6)]
    hue = on * torch.empty(16).uniform_(-0.3, 0.3, generator=g)
    order = torch.rand(16, 4, generator=g).argsort(dim=1)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    assert 0 < on.sum() < 16 and len({tuple(o) for o in order[on == 1].tolist()}) > 1
    for i, img in enumerate(x):
        ref = img
        for j in order[i].tolist():
            ref = ops[j](ref, float([*factors, hue][j][i]))
        assert torch.allclose(out[i], ref, atol=1e-5), i
    assert torch.equal(out[on == 0], x[on == 0])


def test_batch_jitter_on_grey_images_orders_brightness_and_contrast_per_image() -> None:
    """One channel: brightness and contrast only, in a random order per image, each as torchvision's op.
    The two orders differ where the brightness clamps, so both are checked to occur."""
    from torchvision.transforms.v2 import functional as TF

    from infomax.data.batch_views import jitter

    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = jitter(x, ViewConfig(size=8, jitter_p=1.0, brightness=0.8, contrast=0.8), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.rand(32, generator=g)
    bright, contrast = (1 + torch.empty(32).uniform_(-0.8, 0.8, generator=g) for _ in range(2))
    contrast_first = torch.rand(32, 2, generator=g).argsort(dim=1)[:, 0] == 1
    assert 0 < contrast_first.sum() < 32
    for i, img in enumerate(x):
        b, c = float(bright[i]), float(contrast[i])
        ref = TF.adjust_brightness(TF.adjust_contrast(img, c), b) if contrast_first[i] else \
            TF.adjust_contrast(TF.adjust_brightness(img, b), c)
        assert torch.allclose(out[i], ref, atol=1e-5), i


def test_batch_grayscale_is_torchvisions_per_image_and_grey_images_draw_nothing() -> None:
    from torchvision.transforms.v2 import functional as TF

    from infomax.data.batch_views import grayscale

    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = grayscale(x, ViewConfig(size=8, grayscale_p=0.5), torch.Generator().manual_seed(2))
    on = torch.rand(16, generator=torch.Generator().manual_seed(2)) < 0.5
    assert 0 < on.sum() < 16
    for img, res, o in zip(x, out, on):
        assert torch.allclose(res, TF.rgb_to_grayscale(img, 3) if o else img, atol=1e-6)
    g = torch.Generator().manual_seed(2)  # 1 channel: no grayscale step, no saturation or hue, no draws
    grayscale(x[:, :1], ViewConfig(size=8, grayscale_p=0.5), g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(2).get_state())


def test_ffcv_crops_get_the_batch_paths_colour_steps_in_one_pass() -> None:
    """FFCV hands over uint8 crops; BatchViews.colour draws each view's colour steps for the whole batch
    (the batch path's own steps, from the same per-batch generator) and normalises, and leaves views
    FFCV normalised alone. Without colour steps it is exactly the recipe's ToDtype + Normalize."""
    from torchvision.transforms import v2

    from infomax.data.batch_views import BatchViews, batch_seed, colour_steps

    plain = ViewConfig(size=8, jitter_p=0.0, grayscale_p=0.0)
    jittered = ViewConfig(size=8, jitter_p=1.0, brightness=0.4, contrast=0.2, saturation=0.4, hue=0.1, blur_p=0.5)
    crops = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    normalised = torch.randn(16, 3, 8, 8)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.2, 0.2)
    out = BatchViews([plain, jittered, plain], mean, std, seed=7).colour([crops, crops, normalised], epoch=1, batch=2)
    normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    assert out[0].dtype == torch.float32 and torch.allclose(out[0], normalise(crops), atol=1e-6)
    g = torch.Generator().manual_seed(batch_seed(7, 1, 2, 0))
    colour_steps(crops.float() / 255, plain, g)  # view 0 draws first
    assert torch.allclose(out[1], normalise(colour_steps(crops.float() / 255, jittered, g)), atol=1e-6)
    brightness = (out[1] * 0.2 + 0.4).mean((1, 2, 3)) / (out[0] * 0.2 + 0.4).mean((1, 2, 3))
    assert brightness.std() > 0.05  # per image, not once per batch
    assert out[2] is normalised


def test_subsets_hold_every_class_in_proportion_where_evenly_spaced_ones_took_whole_classes() -> None:
    """The synthetic label is ``i % classes``: evenly spaced picks held out all of classes 0 and 4 (data.holdout=64
    of 256 images, 8 classes) and gave the kNN bank only the even classes. Every subset is stratified now."""
    from collections import Counter

    from infomax.data.datasets import disjoint_subsets, holdout_split, labels_of, stratified_indices

    synthetic = Synthetic(256, 8, 16, seed=0)
    rest, held = holdout_split(synthetic, 64)
    assert Counter(labels_of(held)) == {c: 8 for c in range(8)} and Counter(labels_of(rest)) == {c: 24 for c in range(8)}
    assert Counter(labels_of(stratified_subset(rest, 128))) == {c: 16 for c in range(8)}  # synthetic_tiny's bank
    bank, queries = disjoint_subsets(synthetic, 128, 64)
    assert set(labels_of(bank)) == set(labels_of(queries)) == set(range(8)) and not set(bank.indices) & set(queries.indices)
    # uneven classes: proportional by largest remainder, every class at least once when n allows, spread within
    labels = [0] * 90 + [1] * 9 + [2] * 1
    picked = stratified_indices(labels, 10)
    assert Counter(labels[i] for i in picked) == {0: 8, 1: 1, 2: 1} and picked[:8] == [j * 90 // 8 for j in range(8)]
    assert stratified_indices(labels, 1000) == list(range(100)) and stratified_indices(labels, 10) == picked


def test_a_knn_bank_or_a_probes_images_without_a_class_to_score_is_refused(run_dir: Path, capsys) -> None:
    """A subset smaller than the class count must lack a class the scored images hold: said in one line, before
    any work, for the kNN monitor's bank (pretraining) and the eval's limit_train."""
    from conftest import main_in_process
    from infomax.config.eval import EvalConfig
    from infomax.config.pretrain import ConfigError
    from infomax.eval.main import open_splits

    code, _, err = main_in_process(capsys, f"run.dir={run_dir}", "monitor.knn_bank=5")
    assert code == 2 and "'monitor.knn_bank': its 5 images hold none of class(es) 5, 6, 7 that the kNN queries" in err
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="'limit_train': its 4 images hold none of class[(]es[)] 4, 5, 6, 7 that the"):
        open_splits(EvalConfig(dataset="synthetic", synthetic_size=64, limit_train=4))
    assert [len(split) for split in open_splits(EvalConfig(dataset="synthetic", synthetic_size=64, limit_train=8))] == [8, 16]


def test_val_labels_follow_train_class_folders_when_val_lacks_a_class_or_holds_a_hidden_folder(tmp_path: Path) -> None:
    """Each split numbered its own class folders: a val/ without 'ant' (or with a stray .ipynb_checkpoints, which
    sorts first) shifted every label after it, and each score silently counted the wrong class."""
    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)

    for cls in ("ant", "bee", "cat"):
        image(tmp_path / "train" / cls / "0.png")
    image(tmp_path / "val" / "cat" / "0.png")
    image(tmp_path / "val" / ".ipynb_checkpoints" / "0.png")
    image(tmp_path / "val" / "cat" / ".ipynb_checkpoints" / "0.png")  # a copy inside a class: not another image
    image(tmp_path / "val" / "cat" / "._0.png")  # macOS's AppleDouble file beside an image
    val = ImageFolder(str(tmp_path), "val")
    assert val.num_classes == 3 and [val.label(i) for i in range(len(val))] == [2]  # cat is train's class 2
    image(tmp_path / "val" / "dog" / "0.png")
    with pytest.raises(DataError, match=r"holds class folder\(s\) that '\S+/train' lacks \(dog\)"):
        ImageFolder(str(tmp_path), "val")


def test_a_16_bit_grey_image_is_scaled_to_8_bits_not_clipped_white(tmp_path: Path) -> None:
    """Pillow's own conversion to RGB clips 16-bit values above 255: a 16-bit PNG scan read almost all white."""
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    (tmp_path / "train" / "x").mkdir(parents=True)
    Image.fromarray(levels).save(tmp_path / "train" / "x" / "scan.png")
    assert Image.open(tmp_path / "train" / "x" / "scan.png").mode.startswith("I")  # read back as 16 bits
    pixels, _ = ImageFolder(str(tmp_path), "train").load(0)
    expected = torch.from_numpy(np.round(levels / 257).astype(np.uint8))
    assert pixels.shape == (3, 64, 64) and all(torch.equal(pixels[c], expected) for c in range(3))
    from infomax.data.datasets import eight_bit  # a 32-bit image (mode I) of 8-bit values stays as it is

    ramp = np.arange(256).reshape(16, 16)
    assert np.array_equal(np.asarray(eight_bit(Image.fromarray(ramp.astype(np.int32), "I"))), ramp.astype(np.uint8))


def test_a_folder_of_one_class_is_refused_by_the_monitor_and_the_eval_not_scored_100_percent(tmp_path: Path,
                                                                                              capsys) -> None:
    """train/train/<class>/ (one level too deep) read as one class 'train': the kNN monitor and every eval row read
    100 % and the online probe was silently off. Pretraining without the monitor still runs: labels are not used."""
    from infomax.config.eval import EvalConfig
    from infomax.eval.main import open_splits

    make_imagefolder(tmp_path / "data" / "train", good_per_class=4, corrupt=0)  # data/train/train/{cat,dog}
    common = [f"data.root={tmp_path / 'data'}", "data.dataset=imagefolder", "optim.batch_size_per_process=4",
              "run.max_steps=1", "data.views.0.size=16", "data.views.1.size=16"]
    proc = pretrain_in_process(capsys, f"run.dir={tmp_path / 'run'}", *common, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "hold 1 class: the kNN monitor scores classes and needs 2 or more; set monitor.knn_every=0" in proc.stderr
    assert "one level deeper" in proc.stderr and not (tmp_path / "run").exists()
    assert pretrain_in_process(capsys, f"run.dir={tmp_path / 'ok'}", *common, "monitor.knn_every=0").returncode == 0
    with pytest.raises(ConfigError, match="holds 1 class: the eval scores classes and needs 2 or more"):
        open_splits(EvalConfig(dataset="imagefolder", root=str(tmp_path / "data"), weights=["x"]))


def test_a_train_class_folder_without_images_is_named_at_start(tmp_path: Path) -> None:
    """Its images in a format not read (.heic) left a class with no images: never learnt, and the kNN bank's refusal
    then told the user to raise monitor.knn_bank."""
    make_imagefolder(tmp_path, good_per_class=2, corrupt=0)
    (tmp_path / "train" / "eel").mkdir()
    (tmp_path / "train" / "eel" / "0.heic").write_bytes(b"")
    with pytest.raises(DataError, match=r"1 class folder\(s\) of '\S+/train' hold no images \(.+\): eel; add their"):
        ImageFolder(str(tmp_path), "train")


def test_an_image_folder_without_val_says_at_start_to_hold_images_out_for_the_eval(tmp_path: Path, capsys) -> None:
    """Without val/ the monitor's queries came from train/ in silence; the eval then asked for val/, or refused
    holdout=N for a run pretrained on every image: the way out was to pretrain again."""
    make_imagefolder(tmp_path / "data", good_per_class=8, corrupt=0)
    args = [f"data.root={tmp_path / 'data'}", "data.dataset=imagefolder", "optim.batch_size_per_process=4",
            "run.max_steps=1", "data.views.0.size=16", "data.views.1.size=16", "monitor.knn_bank=8",
            "monitor.knn_queries=4"]
    proc = pretrain_in_process(capsys, f"run.dir={tmp_path / 'run'}", *args)
    assert proc.stdout.count("set data.holdout=N now, and evaluate with holdout=N") == 1, proc.stdout[-2000:]
    proc = pretrain_in_process(capsys, f"run.dir={tmp_path / 'held'}", *args, "data.holdout=4")
    assert "set data.holdout=N" not in proc.stdout
