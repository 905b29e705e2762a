"""Branch-Train-MiX on the two built-in digit domains, end to end on the CPU, one seed.

Branch: two dense ViTs of the vit_ti_digits architecture train from one initialisation, one on the
upright digits and one on the digits turned a quarter (``ImageDataModule(rotate90=1)``). Mix:
:func:`moezoo.zoo.btx.branch_train_mix` makes one MoE of them (every MLP a 2-expert top-2 MoE layer,
expert i = parent i's MLP, the rest averaged) and fine-tunes it briefly on the union of the two
training sets. Every model is scored on the union of the two test splits (270 + 270 images). As a
control, each dense parent is also fine-tuned on the union for the same steps as the MoE.

    python benchmarks/branch_train_mix.py          # writes benchmarks/results/branch_train_mix.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from moezoo.layers import aux_loss, parameter_counts
from moezoo.modalities.vision import ImageDataModule
from moezoo.zoo.btx import branch_train_mix

ARCH = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3,
            mlp_ratio=6.0)  # configs/vision/vit_ti_digits.yaml
DOMAINS = {"digits": 0, "rot90": 1}  # quarter turns


def split(domain: str, name: str):
    data = ImageDataModule("digits", image_size=16, rotate90=DOMAINS[domain])
    return data.dataset_for(name)


def train(model: nn.Module, dataset, epochs: int, lr: float, seed: int) -> int:
    """AdamW with a linear decay to 0, batch 64, the model's aux losses added; returns the steps."""
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    steps = epochs * len(loader)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels) + aux_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return steps


@torch.no_grad()
def accuracy(model: nn.Module, domain: str) -> float:
    model.eval()
    images, labels = split(domain, "test").tensors
    return (model(images).argmax(-1) == labels).float().mean().item()


def scores(model: nn.Module) -> dict[str, float]:
    out = {d: accuracy(model, d) for d in DOMAINS}
    out["union"] = sum(out.values()) / len(DOMAINS)  # the test splits are the same size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "branch_train_mix.json")
    args = parser.parse_args()
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    init = VisionTransformer(**ARCH)  # BTX branches from one seed model
    parents = {}
    for i, domain in enumerate(DOMAINS):
        parents[domain] = copy.deepcopy(init)
        train(parents[domain], split(domain, "train"), args.parent_epochs, 1e-3, args.seed + i)
    union = ConcatDataset([split(d, "train") for d in DOMAINS])

    merged = branch_train_mix(list(parents.values()))
    results = {"parents": {d: scores(m) for d, m in parents.items()}, "merged_before_finetune": scores(merged)}
    steps = train(merged, union, args.finetune_epochs, 5e-4, args.seed + 10)
    results["btx_moe"] = scores(merged)
    results["parent_finetuned_on_union"] = {}
    for d, parent in parents.items():
        tuned = copy.deepcopy(parent)
        train(tuned, union, args.finetune_epochs, 5e-4, args.seed + 10)
        results["parent_finetuned_on_union"][d] = scores(tuned)
    record = {
        "benchmark": "branch_train_mix",
        "command": "python benchmarks/branch_train_mix.py",
        "seed": args.seed,
        "parent_epochs": args.parent_epochs,
        "finetune_epochs": args.finetune_epochs,
        "finetune_steps": steps,
        "parameters": {"parent": parameter_counts(init), "btx_moe": parameter_counts(merged)},
        "accuracy": results,
        "btx_beats_each_parent_on_union": all(
            results["btx_moe"]["union"] > r["union"] for r in results["parents"].values()),
        "cpu_seconds_wall": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
