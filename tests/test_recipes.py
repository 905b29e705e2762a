"""Each fine-tuning recipe, run briefly from a shipped entry on the rotated-digits task: frozen
parameters stay bit-identical, trainable ones change, the optimiser holds state only for what
trains, and the task metric improves over the starting checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from moezoo.layers import routed_layers
from moezoo.lightning_cli import MoezooCLI
from moezoo.modalities.vision.evaluate import evaluate_classifier
from moezoo.zoo import get_entry, list_models
from moezoo.zoo.recipes import ExpertSpecialisedFineTuning

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = set(list_models(pretrained=True))


def run_recipe(name: str, tmp_path: Path, steps: int = 40):
    args = ["--config", str(ROOT / f"configs/recipes/{name}.yaml"), "--trainer.max_steps", str(steps),
            "--trainer.max_epochs", "100", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(tmp_path)]
    cli = MoezooCLI(args=args, run=False)
    # What the recipe starts from: the model after the recipe's setup, before any step.
    start = {}

    class Record(Callback):
        def on_fit_start(self, trainer, pl_module):
            start.update({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})
            start["__accuracy__"] = evaluate_classifier(pl_module.model, trainer.datamodule)["accuracy"]
            pl_module.train()

    cli.trainer.callbacks.append(Record())
    cli.trainer.fit(cli.model, cli.datamodule)
    after = evaluate_classifier(cli.model.model, cli.datamodule)["accuracy"]
    return cli, start, after


def check_freezing(cli, start):
    model = cli.model.model
    params = dict(model.named_parameters())
    frozen = [n for n, p in params.items() if not p.requires_grad]
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert frozen and trainable
    for n in frozen:
        assert torch.equal(params[n].detach(), start[n]), n
    assert any(not torch.equal(params[n].detach(), start[n]) for n in trainable)
    optimizer = cli.trainer.optimizers[0]
    with_state = {id(p) for p in optimizer.state}
    assert with_state == {id(p) for n, p in params.items() if p.requires_grad}
    return frozen, trainable


def test_the_recipes_starting_entries_ship_weights():
    assert {"vmoe_ti_digits", "vit_ti_digits"} <= SHIPPED


def test_freeze_moe(tmp_path):
    cli, start, after = run_recipe("freeze_moe", tmp_path)
    frozen, trainable = check_freezing(cli, start)
    routed = {f"{name}.{p}" for name, layer in routed_layers(cli.model.model) for p, _ in layer.named_parameters()}
    assert set(frozen) == routed
    assert after > start["__accuracy__"] + 0.05


def test_freeze_dense(tmp_path):
    cli, start, after = run_recipe("freeze_dense", tmp_path)
    frozen, trainable = check_freezing(cli, start)
    routed = {f"{name}.{p}" for name, layer in routed_layers(cli.model.model) for p, _ in layer.named_parameters()}
    assert set(trainable) == routed
    assert after > start["__accuracy__"] + 0.05


def test_expert_dropout(tmp_path):
    cli, start, after = run_recipe("expert_dropout", tmp_path)
    experts = [layer.experts for _, layer in routed_layers(cli.model.model)]
    assert experts and all(e.dropout == 0.4 for e in experts)
    assert cli.model.model.blocks[0].mlp.drop1.p == 0.0  # dense MLPs keep their rate
    assert after > start["__accuracy__"] + 0.05


def test_esft_trains_only_the_most_used_experts(tmp_path):
    cli, start, after = run_recipe("esft", tmp_path)
    esft = next(c for c in cli.trainer.callbacks if isinstance(c, ExpertSpecialisedFineTuning))
    model = cli.model.model
    changed_any = False
    for name, layer in routed_layers(model):
        chosen = esft.selected[name]
        assert 1 <= len(chosen) < layer.num_experts
        for pname, p in layer.experts.named_parameters():
            before = start[f"{name}.experts.{pname}"]
            for e in range(layer.num_experts):
                same = torch.equal(p.detach()[e], before[e])
                if e not in chosen:
                    assert same, (name, pname, e)
                changed_any |= not same
        assert all(torch.equal(p.detach(), start[f"{name}.router.{n}"]) for n, p in layer.router.named_parameters())
    assert changed_any
    others = [n for n, p in model.named_parameters() if ".experts." not in n]
    assert all(not dict(model.named_parameters())[n].requires_grad for n in others)
    state = {id(p) for p in cli.trainer.optimizers[0].state}
    assert state == {id(p) for _, layer in routed_layers(model) for p in layer.experts.parameters()}
    assert after > start["__accuracy__"] + 0.05


def test_esft_setup_twice_keeps_one_gradient_mask_per_parameter():
    from types import SimpleNamespace

    import moezoo

    model = moezoo.create_model("vmoe_ti_digits")
    batches = [(torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_dataloader=lambda: batches))
    esft = ExpertSpecialisedFineTuning(threshold=0.5, num_batches=2)
    esft.setup(trainer, SimpleNamespace(model=model), "fit")
    esft.setup(trainer, SimpleNamespace(model=model), "fit")
    experts = [p for _, layer in routed_layers(model) for p in layer.experts.parameters()]
    assert len(esft._frozen) == len(experts)
    assert all(len(p._backward_hooks) == 1 for p in experts)


def test_sparse_upcycling_recipe(tmp_path):
    dense_start = get_entry("vit_ti_digits")
    cli, start, after = run_recipe("upcycle_vit", tmp_path)
    model = cli.model.model
    assert len(routed_layers(model)) == 3
    assert after > start["__accuracy__"] + 0.05
    assert dense_start.pretrained_cfg is not None
