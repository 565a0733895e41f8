"""Data sets: an ImageFolder tree (ImageNet layout), Fashion-MNIST (Debian's dataset-fashion-mnist),
scikit-learn's bundled digits, synthetic tensors.

Every training sample's augmentation is drawn from a generator seeded by (seed, epoch, index), so
the images of a run are a function of the seed alone: the same with 0 or 8 loader workers, and the
same after --resume. Keys are (epoch, index) pairs (see sampler.MicroBatchSampler); a plain index
means no augmentation epoch (validation).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian/Ubuntu package dataset-fashion-mnist
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# per-pixel statistics of the 60,000 training images (in [0, 1])
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 998_244_353 + index * 2_654_435_761) % (2 ** 63 - 1)


def splitmix64(x: int) -> int:
    """A 64-bit hash (Steele et al.'s SplitMix64 finaliser): cheap per-sample random bits, a pure
    function of its argument (a torch.Generator per sample costs ~10x more)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _split_key(key):
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return None, int(key)


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    image_size: int
    in_memory: bool  # True: no loader worker processes needed
    test: torch.utils.data.Dataset | None = None  # with a holdout: val is the held-out split, test the test set


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's load_digits (1797 8x8 gray images, 10 classes, bundled: no download), upsampled
    to image_size x image_size, 3 channels; a fixed stratified 80/20 split (random_state=0).
    Training augmentation: a random translation of up to image_size/8 pixels."""

    def __init__(self, split: str, image_size: int = 32, augment: bool = True, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.int64)
        idx_train, idx_val = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2,
                                              random_state=0, stratify=d.target)
        idx = idx_train if split == "train" else idx_val
        x = x[idx].unsqueeze(1)
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        mean, std = 0.3, 0.4  # close to the train set's statistics after upsampling
        self.x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()
        self.y = y[idx]
        self.augment = augment and split == "train"
        self.split = split
        self.seed, self.image_size = seed, image_size
        self.shift = max(1, image_size // 8)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, key):
        epoch, i = _split_key(key)
        x = self.x[i]
        if self.augment and epoch is not None:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i))
            s = self.shift
            dx, dy = torch.randint(-s, s + 1, (2,), generator=g).tolist()
            pad = F.pad(x, (s, s, s, s), value=float(x.min()))
            x = pad[:, s + dy:s + dy + self.image_size, s + dx:s + dx + self.image_size]
        return x, self.y[i]


class FashionMNISTMissing(FileNotFoundError):
    pass


def _idx_path(root: str, name: str) -> str | None:
    for cand in (name, name + ".gz"):
        path = os.path.join(root, cand)
        if os.path.isfile(path):
            return path
    return None


def _readable_idx(path: str) -> str:
    """A path torchvision's IDX reader can open: the file itself, or for NAME.gz a decompressed copy
    in ~/.cache/fastar (written once, atomically; keyed by the .gz's path, size and mtime)."""
    if not path.endswith(".gz"):
        return path
    import gzip
    import hashlib
    import shutil

    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastar",
                         "fashion-mnist", key)
    out = os.path.join(cache, os.path.basename(path)[:-3])
    if not os.path.isfile(out):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{out}.tmp.{os.getpid()}"
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, out)
    return out


_FASHION_CACHE: dict = {}


def load_fashion_mnist(root: str = FASHION_MNIST_DIR, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 28 x 28, labels int64 N) of split 'train' (60,000) or 'test' (10,000), read
    from the original IDX files (gzipped or not) in `root` with torchvision's IDX reader (the one
    torchvision.datasets.FashionMNIST uses). Raises FashionMNISTMissing naming the package and path."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    names = FASHION_MNIST_FILES[split]
    paths = [_idx_path(root, n) for n in names]
    if None in paths:
        missing = [os.path.join(root, n + "[.gz]") for n, p in zip(names, paths) if p is None]
        raise FashionMNISTMissing(
            f"Fashion-MNIST not found: {', '.join(missing)} missing. Install the Debian/Ubuntu package "
            f"{FASHION_MNIST_PACKAGE} (apt-get install {FASHION_MNIST_PACKAGE}; `make setup` does when run "
            f"as root), which puts the IDX files in {FASHION_MNIST_DIR}, or give their folder as "
            "--data fashion-mnist=PATH")
    key = (tuple(os.path.abspath(p) for p in paths), tuple(os.stat(p).st_mtime_ns for p in paths))
    if key not in _FASHION_CACHE:
        x = read_image_file(_readable_idx(paths[0]))
        y = read_label_file(_readable_idx(paths[1])).long()
        if x.shape[0] != y.shape[0] or tuple(x.shape[1:]) != (28, 28):
            raise ValueError(f"{root}: {split} images {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
        _FASHION_CACHE[key] = (x, y)
    return _FASHION_CACHE[key]


HOLDOUT_SEED = 20170608  # the held-out split's draw (the paper's arXiv date): not the subsets' seed 0


def fashion_subset(n_total: int, n: int | None, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """The indices of --train-subset n: a fixed draw (`seed`, 0 by default, whatever the run's seed,
    so that every run of a study trains on the same images), stratified by class when labels are given."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_total, generator=g)
    if labels is None:
        return perm[:n].sort().values
    classes = labels.unique().tolist()
    per, out = n // len(classes), []
    for c in classes:
        out.append(perm[labels[perm] == c][:per])
    idx = torch.cat(out)
    if len(idx) < n:  # the remainder, in the permutation's order
        rest = perm[~torch.isin(perm, idx)][:n - len(idx)]
        idx = torch.cat([idx, rest])
    return idx.sort().values


class FashionMNISTDataset(torch.utils.data.Dataset):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training / 10,000 test 28x28 gray images of 10
    classes of clothing, held in memory (uint8), normalised with the training set's mean and std,
    resized once to image_size if it is not 28, as 3 channels (the models' stem).

    Training augmentation, the recipe's crop + flip at this scale: a random crop of image_size from
    the image padded by image_size/7 (4 pixels at 28) on each side, and a horizontal flip with
    probability 1/2, all three from splitmix64(sample_seed(seed, epoch, index))."""

    def __init__(self, split: str, root: str = FASHION_MNIST_DIR, image_size: int = 28,
                 augment: bool = True, seed: int = 0, subset: int | None = None, holdout: int | None = None):
        """split: train | test | holdout. holdout: that many training images (a fixed stratified draw)
        are the "holdout" split and are left out of "train", before any subset is drawn from it."""
        x, y = load_fashion_mnist(root, "test" if split == "test" else "train")
        if split != "test":
            idx = torch.arange(len(y))
            if holdout is not None:
                if holdout >= len(y):
                    raise ValueError(f"--holdout {holdout} leaves no training images (of {len(y)})")
                held = fashion_subset(len(y), holdout, y, seed=HOLDOUT_SEED)
                if split == "holdout":
                    idx = held
                else:
                    keep = torch.ones(len(y), dtype=torch.bool)
                    keep[held] = False
                    idx = idx[keep]
            if split == "train" and subset is not None:
                idx = idx[fashion_subset(len(idx), subset, y[idx])]
            x, y = x[idx], y[idx]
        x = (x.float().div_(255.0).unsqueeze(1) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        if image_size != 28:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                              antialias=image_size < 28)
        self.y = y
        self.augment = augment and split == "train"
        self.split = split
        self.seed, self.image_size = seed, image_size
        self.pad = max(1, round(image_size / 7)) if self.augment else 0
        fill = float(-FASHION_MNIST_MEAN / FASHION_MNIST_STD)  # a black pixel
        p = self.pad
        # padded once, so that a crop is a view: N x 1 x (S+2p) x (S+2p); 3 channels by expand
        self.x = F.pad(x, (p, p, p, p), value=fill).contiguous()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, key):
        epoch, i = _split_key(key)
        x, p, s = self.x[i], self.pad, self.image_size
        if self.augment and epoch is not None:
            r, span = splitmix64(sample_seed(self.seed, epoch, i)), 2 * p + 1
            dx, dy, flip = r % span, (r >> 16) % span, (r >> 32) & 1
            x = x[:, dy:dy + s, dx:dx + s]
            if flip % 2:
                x = x.flip(-1)
        elif p:
            x = x[:, p:p + s, p:p + s]
        return x.expand(3, -1, -1), self.y[i]

    def __getitems__(self, keys):
        """A whole micro-batch in a few tensor ops (the DataLoader calls this instead of __getitem__
        per sample; use batch_collate as its collate_fn): the same images as __getitem__."""
        eps, idx = zip(*(_split_key(k) for k in keys))
        it = torch.tensor(idx, dtype=torch.int64)
        p, s, span = self.pad, self.image_size, 2 * self.pad + 1
        offs = []
        for e, i in zip(eps, idx):
            if self.augment and e is not None:
                r = splitmix64(sample_seed(self.seed, e, i))
                offs.append((r % span, (r >> 16) % span, (r >> 32) & 1))
            else:  # no augmentation (validation, or a plain index): the centre
                offs.append((p, p, 0))
        dx, dy, flip = torch.tensor(offs, dtype=torch.int64).unbind(1)
        flip = flip.bool()
        ar = torch.arange(s)
        rows = dy[:, None] + ar  # B x s
        cols = torch.where(flip[:, None], dx[:, None] + (s - 1 - ar), dx[:, None] + ar)
        x = self.x[:, 0][it[:, None, None], rows[:, :, None], cols[:, None, :]]  # B x s x s
        return x.unsqueeze(1).expand(-1, 3, -1, -1), self.y[it]


def batch_collate(batch):
    """collate_fn for data sets with __getitems__ (already a batch)."""
    return batch


def parse_fashion_spec(data: str) -> str | None:
    """'fashion-mnist' -> the Debian folder; 'fashion-mnist=PATH' -> PATH; anything else -> None."""
    if data == "fashion-mnist":
        return FASHION_MNIST_DIR
    if data.startswith("fashion-mnist="):
        return data.split("=", 1)[1] or FASHION_MNIST_DIR
    return None


class SyntheticDataset(torch.utils.data.Dataset):
    """Random images with random labels, each a function of (seed, index): for throughput runs and
    tests. There is nothing to learn: its error stays at chance."""

    def __init__(self, size: int, image_size: int, num_classes: int, seed: int = 0):
        self.size, self.image_size, self.num_classes, self.seed = size, image_size, num_classes, seed

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        _, i = _split_key(key)
        g = torch.Generator().manual_seed(sample_seed(self.seed, 0, i))
        x = torch.randn(3, self.image_size, self.image_size, generator=g)
        y = torch.randint(0, self.num_classes, (), generator=g)
        return x, y


class SeededImageFolder(torch.utils.data.Dataset):
    """torchvision ImageFolder whose random transforms draw from a per-sample seeded torch RNG."""

    def __init__(self, root: str, transform, seed: int = 0):
        import torchvision

        self.folder = torchvision.datasets.ImageFolder(root)
        self.transform, self.seed = transform, seed

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        epoch, i = _split_key(key)
        path, y = self.folder.samples[i]
        img = self.folder.loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch if epoch is not None else -1, i))
            x = self.transform(img)
        return x, y


def build_datasets(data: str, image_size: int | None = None, seed: int = 0,
                   synthetic_size: int = 1024, num_classes: int | None = None,
                   train_subset: int | None = None, holdout: int | None = None) -> Datasets:
    """data: "fashion-mnist[=PATH]", "digits", "synthetic", or the path of a folder with train/ and
    val/ (ImageNet layout). train_subset: train on a fixed subset of that many images (all data sets).
    holdout (fashion-mnist only): val is that many held-out training images, test the test set."""
    if holdout is not None:
        root = parse_fashion_spec(data)
        if root is None:
            raise ValueError("--holdout is implemented for --data fashion-mnist only")
        size = image_size or 28
        return Datasets(FashionMNISTDataset("train", root, size, seed=seed, subset=train_subset, holdout=holdout),
                        FashionMNISTDataset("holdout", root, size, seed=seed, holdout=holdout), 10, size, True,
                        test=FashionMNISTDataset("test", root, size, seed=seed))
    ds = _build_datasets(data, image_size, seed, synthetic_size, num_classes, train_subset)
    if train_subset is not None and not isinstance(ds.train, FashionMNISTDataset) and train_subset < len(ds.train):
        keep = fashion_subset(len(ds.train), train_subset).tolist()
        ds.train = _KeyedSubset(ds.train, keep)
    return ds


class _KeyedSubset(torch.utils.data.Dataset):
    """A subset that passes (epoch, index) keys through, mapping the index."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, key):
        epoch, i = _split_key(key)
        j = self.indices[i]
        return self.ds[(epoch, j) if epoch is not None else j]


def _build_datasets(data, image_size, seed, synthetic_size, num_classes, train_subset) -> Datasets:
    root = parse_fashion_spec(data)
    if root is not None:
        size = image_size or 28
        return Datasets(FashionMNISTDataset("train", root, size, seed=seed, subset=train_subset),
                        FashionMNISTDataset("test", root, size, seed=seed), 10, size, True)
    if data == "digits":
        size = image_size or 32
        return Datasets(DigitsDataset("train", size, seed=seed), DigitsDataset("val", size, seed=seed),
                        10, size, True)
    if data == "synthetic":
        size, nc = image_size or 224, num_classes or 1000
        return Datasets(SyntheticDataset(synthetic_size, size, nc, seed),
                        SyntheticDataset(max(synthetic_size // 4, 1), size, nc, seed + 1), nc, size, True)
    if not os.path.isdir(data):
        raise FileNotFoundError(
            f"--data {data!r} is neither 'fashion-mnist[=PATH]', 'digits', 'synthetic' nor a folder; give an ImageNet-layout "
            "folder with train/<class>/*.JPEG and val/<class>/*.JPEG")
    import torchvision.transforms as T

    size = image_size or 224
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor(), normalize])
    train_dir = os.path.join(data, "train")
    val_dir = os.path.join(data, "val")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d} is missing: --data must hold train/ and val/ class folders")
    train = SeededImageFolder(train_dir, train_tf, seed)
    val = SeededImageFolder(val_dir, val_tf, seed)
    return Datasets(train, val, len(train.folder.classes), size, False)
