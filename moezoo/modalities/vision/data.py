"""``ImageDataModule``: a built-in offline image set (scikit-learn's digits) and folders of images."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from moezoo.data import SplitDataModule

__all__ = ["ImageDataModule", "load_digits_splits"]

_BUILTIN = ("digits",)
_SPLITS = ("train", "val", "test")


def load_digits_splits(image_size: int = 16, seed: int = 0, val_fraction: float = 0.15,
                       test_fraction: float = 0.15) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's 1,797 real handwritten 8x8 digits (UCI optdigits), no download needed.

    Pixels 0..16 are scaled to [-1, 1] and resized (bilinear) to ``image_size``; the split is
    stratified with ``seed`` (70/15/15 by default: 1,257 / 270 / 270 images).

    Returns:
        split name -> (images (N, 1, image_size, image_size) float32, labels (N,) int64).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    index = torch.arange(len(labels)).numpy()
    held_out = val_fraction + test_fraction
    train_idx, rest_idx = train_test_split(index, test_size=held_out, stratify=labels.numpy(), random_state=seed)
    val_idx, test_idx = train_test_split(
        rest_idx, test_size=test_fraction / held_out, stratify=labels.numpy()[rest_idx], random_state=seed
    )
    return {name: (images[idx], labels[idx]) for name, idx in zip(_SPLITS, (train_idx, val_idx, test_idx))}


class ImageDataModule(SplitDataModule):
    """Images and labels for :class:`~moezoo.modalities.vision.ImageClassification`.

    Args:
        dataset: ``"digits"`` (built in, offline); ``"folder"``: ``root`` holds ``train/``,
            ``val/`` and optionally ``test/`` in torchvision ``ImageFolder`` layout (ImageNet);
            ``"torchvision:<Name>"``: a torchvision dataset class already downloaded under ``root``
            (e.g. ``torchvision:CIFAR10``; its test split serves as validation and test).
        root: dataset folder for ``"folder"`` and torchvision datasets.
        image_size: side length fed to the model.
        batch_size: training batch size (also used for evaluation unless ``eval_batch_size``).
        eval_batch_size: evaluation batch size.
        num_workers: DataLoader workers.
        seed: split seed (digits).
        augment: random-resized-crop and flip style training augmentation (timm's
            ``create_transform``) for folders; small random shifts for digits.
        auto_augment: timm auto-augment policy for folders, e.g. ``"rand-m10-n2"`` (RandAugment).
        mean, std: normalisation for folders (V-MoE scales pixels to [-1, 1]: 0.5 / 0.5).
        crop_pct, crop_mode, interpolation: evaluation resizing for folders, as timm's
            ``create_transform`` takes them (defaults: timm's, resize to image_size / 0.875 and
            centre-crop, bilinear). vmoe's ``resize_small(256)|central_crop(224)`` is
            ``crop_pct=224/256``; its ``resize(384)`` is ``crop_pct=1.0, crop_mode="squash"``.
        rotate90: quarter turns applied to the built-in digits (a shifted task for fine-tuning demos).
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        image_size: int = 16,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = False,
        auto_augment: str | None = None,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        crop_pct: float | None = None,
        crop_mode: str | None = None,
        interpolation: str = "bilinear",
        rotate90: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in _BUILTIN + ("folder",) and not dataset.startswith("torchvision:"):
            raise ValueError(
                f"dataset must be one of {_BUILTIN + ('folder',)} or 'torchvision:<Name>', got {dataset!r}"
            )
        if dataset != "digits" and not root:
            raise ValueError(f"dataset={dataset!r} needs root=<folder on disk>")
        if image_size < 1 or batch_size < 1:
            raise ValueError(f"image_size and batch_size must be >= 1, got {image_size}, {batch_size}")
        self.dataset, self.root = dataset, root
        self.image_size, self.batch_size = image_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed, self.augment = num_workers, seed, augment
        self.auto_augment, self.mean, self.std = auto_augment, tuple(mean), tuple(std)
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1] or None, got {crop_pct}")
        if crop_mode not in (None, "center", "squash", "border"):
            raise ValueError(f"crop_mode must be None, 'center', 'squash' or 'border', got {crop_mode!r}")
        self.crop_pct, self.crop_mode, self.interpolation = crop_pct, crop_mode, interpolation
        if rotate90 and dataset != "digits":
            raise ValueError(f"rotate90 applies to the built-in digits only, got dataset={dataset!r}")
        self.rotate90 = rotate90 % 4
        self.splits: dict[str, Dataset] = {}
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        if self.dataset == "digits":
            return 10
        self.setup()
        return len(self.splits["train"].classes)

    def _transform(self, train: bool):
        from timm.data import create_transform

        training = self.augment and train
        crop = {} if training else {"crop_pct": self.crop_pct, "crop_mode": self.crop_mode}
        return create_transform(
            self.image_size,
            is_training=training,
            auto_augment=self.auto_augment if train else None,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            **crop,
        )

    def _folder(self, split: str):
        from torchvision.datasets import ImageFolder

        path = Path(self.root) / split
        if not path.is_dir():
            raise FileNotFoundError(f"ImageDataModule: {path} is not a folder of class sub-folders")
        return ImageFolder(str(path), transform=self._transform(split == "train"))

    def _torchvision(self, train: bool):
        import torchvision.datasets as tv

        name = self.dataset.split(":", 1)[1]
        cls = getattr(tv, name, None)
        if cls is None:
            raise ValueError(f"torchvision.datasets has no {name!r}")
        try:
            return cls(self.root, train=train, download=False, transform=self._transform(train))
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            raise FileNotFoundError(f"{name} is not under {self.root} (moezoo never downloads): {err}") from err

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.dataset == "digits":
            data = load_digits_splits(self.image_size, self.seed)
            self.splits = {
                name: TensorDataset(torch.rot90(images, self.rotate90, dims=(2, 3)).contiguous(), labels)
                for name, (images, labels) in data.items()
            }
        elif self.dataset.startswith("torchvision:"):
            test = self._torchvision(False)
            self.splits = {"train": self._torchvision(True), "val": test, "test": test}
        else:
            root = Path(self.root)
            self.splits = {s: self._folder(s) for s in _SPLITS if (root / s).is_dir()}
            self.splits.setdefault("test", self.splits["val"])

    def _shift(self, batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        images = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])
        # Random translation by up to an eighth of the image, filled with the background value.
        pad = max(self.image_size // 8, 1)
        padded = F.pad(images, (pad, pad, pad, pad), value=-1.0)
        out = torch.empty_like(images)
        offsets = torch.randint(0, 2 * pad + 1, (len(batch), 2))
        for i, (dy, dx) in enumerate(offsets.tolist()):
            out[i] = padded[i, :, dy : dy + self.image_size, dx : dx + self.image_size]
        return out, labels

    def dataset_for(self, split: str) -> Dataset:
        self.setup()
        return self.splits[split]

    def collate_for(self, train: bool):
        return self._shift if (train and self.augment and self.dataset == "digits") else None
