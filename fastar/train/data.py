"""Data sets: an ImageFolder tree (ImageNet layout), scikit-learn's bundled digits, synthetic tensors.

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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 998_244_353 + index * 2_654_435_761) % (2 ** 63 - 1)


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
                   synthetic_size: int = 1024, num_classes: int | None = None) -> Datasets:
    """data: "digits", "synthetic", or the path of a folder with train/ and val/ (ImageNet layout)."""
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
            f"--data {data!r} is neither 'digits', 'synthetic' nor a folder; give an ImageNet-layout "
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
