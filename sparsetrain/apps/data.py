"""LightningDataModules for classification: digits (bundled, the default), MNIST-1D (generated
locally), MNIST, Fashion-MNIST, CIFAR-10/100, any image folder, and synthetic tensors.

Every module exposes ``num_classes``, ``in_chans`` and ``img_size`` before ``setup`` so the
model can be built from them. The training order never depends on the global RNG: with
``shuffle=True`` each epoch is a permutation drawn from a generator seeded with
``seed + epoch`` (see :class:`EpochSeededSampler`), so a run resumed at an epoch boundary
sees the same batches as an uninterrupted one; with ``shuffle=False`` the order is fixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

log = logging.getLogger(__name__)


class EpochSeededSampler(RandomSampler):
    """A random permutation per epoch from ``torch.Generator().manual_seed(seed + epoch)``.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also after a resume), so
    the order is a pure function of ``(seed, epoch)``. It subclasses ``RandomSampler`` so that
    under DDP Lightning swaps it for a shuffling ``DistributedSampler`` (seeded, per epoch).
    """

    def __init__(self, data_source, seed: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def _split(n: int, sizes: list[int], seed: int) -> list[list[int]]:
    """Seeded split of ``range(n)`` into consecutive chunks of ``sizes`` (the rest goes first)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    rest = n - sum(sizes)
    if rest <= 0:
        raise ValueError(f"cannot split {n} samples into held-out sets of {sizes}: nothing left to train on")
    out, start = [perm[:rest]], rest
    for size in sizes:
        out.append(perm[start : start + size])
        start += size
    return out


class ClassificationData(pl.LightningDataModule):
    """Loaders shared by every dataset; subclasses set ``train_set``, ``val_set``, ``test_set`` in ``setup``."""

    num_classes: int
    in_chans: int
    img_size: int

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ):
        super().__init__()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.shuffle, self.seed = num_workers, shuffle, seed
        self.pin_memory, self.drop_last = pin_memory, drop_last
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochSeededSampler(dataset, self.seed) if train and self.shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=self.drop_last and train,
        )

    def train_dataloader(self):
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        return self._loader(self.val_set, train=False)

    def test_dataloader(self):
        return self._loader(self.test_set, train=False)


class DigitsDataModule(ClassificationData):
    """scikit-learn's bundled 8x8 digits (1797 grayscale images, 10 classes; no download).

    Pixels are scaled to [0, 1] and normalised with the training split's mean and std. The
    train/val/test split (default 1257/270/270) is drawn with ``split_seed``, independent of
    ``seed``, so runs with different seeds share the same test set.
    """

    num_classes, in_chans, img_size = 10, 1, 8

    def __init__(self, val_size: int = 270, test_size: int = 270, split_seed: int = 0, **loader_args):
        super().__init__(**loader_args)
        self.val_size, self.test_size, self.split_seed = val_size, test_size, split_seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = _split(len(labels), [self.val_size, self.test_size], self.split_seed)
        mean, std = images[train].mean(), images[train].std()
        images = (images - mean) / std
        self.train_set, self.val_set, self.test_set = (TensorDataset(images[i], labels[i]) for i in (train, val, test))


class MNIST1DDataModule(ClassificationData):
    """MNIST-1D (Greydanus & Kobak, ICML 2024; ``pip install mnist1d``): 1-D signals of length 40
    made from ten digit-like templates by random padding, scaling, translation, correlated and iid
    noise and shear. 4,000 training and 1,000 test signals, 10 classes; batches are ``(B, 1, 40)``.

    The package generates the data locally (no download) with its default arguments
    (``mnist1d.data.get_dataset_args()``, seed 42), which reproduce the paper's frozen dataset;
    ``dataset_args`` overrides some of them (e.g. ``{"shuffle_seq": True}``). The generated arrays are
    cached in ``<root>/mnist1d/`` as an ``.npz`` named by a hash of the arguments, next to a ``.json``
    with the arguments and the file's SHA-256: a later run loads the file after checking the
    checksum and regenerates it (with a warning) when the check fails. The generator reseeds
    Python's and NumPy's global RNGs; their states are restored afterwards, so a run is the same
    whether the cache existed or not.

    ``val_size`` training signals (drawn with ``split_seed``) are held out for validation; the test
    set is the package's, untouched. ``val_size=0`` trains on all 4,000 and validates on the test set.
    The package already centres the signals and scales them to unit standard deviation. Batches of
    100 by default, the paper's.
    """

    num_classes, in_chans, img_size = 10, 1, 40

    def __init__(
        self,
        root: str = "data",
        val_size: int = 500,
        split_seed: int = 0,
        dataset_args: dict | None = None,
        batch_size: int = 100,
        **loader_args,
    ):
        super().__init__(batch_size=batch_size, **loader_args)
        self.root, self.val_size, self.split_seed = Path(root), val_size, split_seed
        self.dataset_args = dict(dataset_args or {})
        self.img_size = int(self.dataset_args.get("final_seq_length", self.img_size))

    def _args(self) -> dict:
        from mnist1d.data import get_dataset_args

        args = get_dataset_args(as_dict=True)
        args.pop("url", None)  # where the package would download a frozen copy from: not a property of the data
        unknown = sorted(set(self.dataset_args) - set(args))
        if unknown:
            raise ValueError(
                f"data.dataset_args has unknown keys {unknown}; the mnist1d generator takes: {', '.join(sorted(args))}"
            )
        args.update(self.dataset_args)
        return args

    def cache_files(self) -> tuple[Path, Path]:
        """``(arrays .npz, checksum .json)`` of this module's dataset arguments."""
        key = hashlib.sha256(json.dumps(self._args(), sort_keys=True).encode()).hexdigest()[:12]
        folder = self.root / "mnist1d"
        return folder / f"mnist1d_{key}.npz", folder / f"mnist1d_{key}.json"

    def prepare_data(self) -> None:
        self._arrays()

    def _arrays(self) -> dict:
        """The four arrays ``x, y, x_test, y_test``: from the cache when its checksum holds, else generated."""
        import numpy as np

        arrays_file, meta_file = self.cache_files()
        if arrays_file.is_file() and meta_file.is_file():
            expected = json.loads(meta_file.read_text()).get("sha256")
            if _sha256(arrays_file) == expected:
                with np.load(arrays_file) as cached:
                    return {k: cached[k] for k in ("x", "y", "x_test", "y_test")}
            log.warning("%s does not match the checksum in %s; generating MNIST-1D again", arrays_file, meta_file)
        args = self._args()
        arrays = _generate_mnist1d(args)
        arrays_file.parent.mkdir(parents=True, exist_ok=True)
        partial = arrays_file.with_suffix(".partial.npz")
        np.savez(partial, **arrays)
        partial.replace(arrays_file)  # whole files only, also when two runs generate at once
        meta_file.write_text(json.dumps({"dataset_args": args, "sha256": _sha256(arrays_file)}, indent=2))
        return arrays

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        arrays = self._arrays()
        x, x_test = (torch.tensor(arrays[k], dtype=torch.float32).unsqueeze(1) for k in ("x", "x_test"))
        y, y_test = (torch.tensor(arrays[k], dtype=torch.long) for k in ("y", "y_test"))
        self.test_set = TensorDataset(x_test, y_test)
        if self.val_size:
            train, val = _split(len(y), [self.val_size], self.split_seed)
            self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])
        else:
            self.train_set, self.val_set = TensorDataset(x, y), self.test_set


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _generate_mnist1d(args: dict) -> dict:
    """``mnist1d.data.make_dataset`` with ``args``, as float32/int64 arrays; the global RNG states are kept."""
    try:
        from mnist1d.data import make_dataset
        from mnist1d.utils import ObjectView
    except ImportError as err:
        raise ImportError("data=mnist1d needs the mnist1d package: pip install mnist1d (or sparsetrain[apps])") from err
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {
        "x": data["x"].astype(np.float32),
        "y": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }


# name: (torchvision class name, classes, channels, size, mean, std, folder torchvision looks for)
TORCHVISION_DATASETS = {
    "mnist": ("MNIST", 10, 1, 28, (0.1307,), (0.3081,), "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", 10, 1, 28, (0.2860,), (0.3530,), "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar-100-python"),
}


class TorchvisionDataModule(ClassificationData):
    """MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through ``torchvision.datasets``.

    Training augmentation (``augment=True``): CIFAR random crop 32 with padding 4 and horizontal
    flip; MNIST-like sets none. Inputs are normalised with the usual per-channel statistics.
    Validation: with ``val_size=0`` (default) the test split is used for validation too, as
    the sparsity papers report it; ``val_size > 0`` holds out that many training images
    (without augmentation, drawn with ``split_seed``).
    Files are expected under ``root``; ``download=True`` fetches them once (needs network).
    """

    def __init__(
        self,
        name: str = "cifar10",
        root: str = "data",
        download: bool = False,
        augment: bool = True,
        val_size: int = 0,
        split_seed: int = 0,
        **loader_args,
    ):
        super().__init__(**loader_args)
        if name not in TORCHVISION_DATASETS:
            raise ValueError(f"data.name={name!r} is unknown; valid choices: {', '.join(TORCHVISION_DATASETS)}")
        self.name, self.root, self.download, self.augment = name, root, download, augment
        self.val_size, self.split_seed = val_size, split_seed
        _, self.num_classes, self.in_chans, self.img_size, self.mean, self.std, self.folder = TORCHVISION_DATASETS[name]

    def _dataset(self, train: bool, transform, download: bool = False):
        import torchvision

        cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[self.name][0])
        try:
            return cls(self.root, train=train, transform=transform, download=download)
        except RuntimeError as err:
            if download:
                raise
            raise FileNotFoundError(
                f"{self.name} was not found under data.root={self.root!r} "
                f"(looked for {Path(self.root).resolve() / self.folder}). Either download it once with "
                f"data.download=true on a machine with network access, or set data.root to a folder that "
                f"already holds {self.folder}/."
            ) from err

    def prepare_data(self) -> None:
        if self.download:
            self._dataset(train=True, transform=None, download=True)
            self._dataset(train=False, transform=None, download=True)

    def _transforms(self, train: bool):
        from torchvision import transforms as T

        steps = []
        if train and self.augment and self.in_chans == 3:
            steps += [T.RandomCrop(self.img_size, padding=4), T.RandomHorizontalFlip()]
        return T.Compose(steps + [T.ToTensor(), T.Normalize(self.mean, self.std)])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = self._dataset(True, self._transforms(train=True))
        self.test_set = self._dataset(False, self._transforms(train=False))
        if self.val_size:
            train_idx, val_idx = _split(len(train), [self.val_size], self.split_seed)
            self.train_set = Subset(train, train_idx)
            self.val_set = Subset(self._dataset(True, self._transforms(train=False)), val_idx)
        else:
            self.train_set, self.val_set = train, self.test_set


class ImageFolderDataModule(ClassificationData):
    """Any folder of images with one subfolder per class.

    Layout ``root/train/<class>/...`` with ``root/val`` (and optionally ``root/test``; else
    the val split is the test split too), or a single ``root/<class>/...`` split at random
    into train/val/test by ``val_fraction``/``test_fraction`` with ``split_seed``. Images are
    loaded as RGB and resized to ``img_size`` (train: random-resized crop and flip).
    """

    in_chans = 3

    def __init__(
        self,
        root: str,
        img_size: int = 224,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        augment: bool = True,
        split_seed: int = 0,
        **loader_args,
    ):
        super().__init__(**loader_args)
        from torchvision.datasets.folder import find_classes

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data.root={str(root)!r} is not a folder (resolved to {self.root.resolve()}); point data.root at a "
                "folder with one subfolder per class, or with train/ and val/ subfolders that hold class subfolders"
            )
        self.split_folders = (self.root / "train").is_dir() and (self.root / "val").is_dir()
        classes, _ = find_classes(self.root / "train" if self.split_folders else self.root)
        self.num_classes, self.img_size = len(classes), img_size
        self.val_fraction, self.test_fraction, self.augment, self.split_seed = (
            val_fraction,
            test_fraction,
            augment,
            split_seed,
        )

    def _transforms(self, train: bool):
        from torchvision import transforms as T

        norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
        if train and self.augment:
            return T.Compose([T.RandomResizedCrop(self.img_size), T.RandomHorizontalFlip(), *norm])
        return T.Compose([T.Resize(int(math.ceil(self.img_size / 0.875))), T.CenterCrop(self.img_size), *norm])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision.datasets import ImageFolder

        train_tf, eval_tf = self._transforms(True), self._transforms(False)
        if self.split_folders:
            self.train_set = ImageFolder(self.root / "train", train_tf)
            self.val_set = ImageFolder(self.root / "val", eval_tf)
            test_dir = self.root / "test"
            self.test_set = ImageFolder(test_dir, eval_tf) if test_dir.is_dir() else self.val_set
            return
        train, plain = ImageFolder(self.root, train_tf), ImageFolder(self.root, eval_tf)
        n = len(train)
        sizes = [int(round(self.val_fraction * n)), int(round(self.test_fraction * n))]
        train_idx, val_idx, test_idx = _split(n, sizes, self.split_seed)
        self.train_set = Subset(train, train_idx)
        self.val_set, self.test_set = Subset(plain, val_idx), Subset(plain, test_idx)


class SyntheticDataModule(ClassificationData):
    """Random images ``(in_chans, img_size, img_size)``: a fixed per-class pattern plus noise,
    so a model can learn something. For speed tests and smoke tests; nothing is read from disk."""

    def __init__(
        self,
        num_samples: int = 256,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        noise: float = 1.0,
        data_seed: int = 0,
        **loader_args,
    ):
        super().__init__(**loader_args)
        self.num_samples, self.num_classes, self.in_chans, self.img_size = num_samples, num_classes, in_chans, img_size
        self.noise, self.data_seed = noise, data_seed

    def _make(self, n: int, generator: torch.Generator, patterns: torch.Tensor) -> TensorDataset:
        labels = torch.randint(self.num_classes, (n,), generator=generator)
        noise = torch.randn(n, self.in_chans, self.img_size, self.img_size, generator=generator)
        return TensorDataset(patterns[labels] + self.noise * noise, labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.data_seed)
        patterns = torch.randn(self.num_classes, self.in_chans, self.img_size, self.img_size, generator=generator)
        held_out = max(1, self.num_samples // 4)
        self.train_set = self._make(self.num_samples, generator, patterns)
        self.val_set = self._make(held_out, generator, patterns)
        self.test_set = self._make(held_out, generator, patterns)
