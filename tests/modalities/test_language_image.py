"""LIMoE: entropy losses per modality, the contrastive loss, per-modality capacity, the tokenizer,
retrieval metrics and a 2-step CLI fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moezoo.cli import main
from moezoo.layers import MultimodalMoE, aux_loss
from moezoo.modalities.language_image import (
    ContrastiveImageText,
    ImageTextDataModule,
    LIMoE,
    build_tokenizer,
    contrastive_loss,
    retrieval_recall,
)
from moezoo.routers import BatchPrioritizedRouter

ROOT = Path(__file__).resolve().parents[2]


def test_contrastive_loss_hand_worked_and_symmetric():
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale * image @ text.t()  # [[sqrt2, 0], [sqrt2, 2]]
    i2t = -(torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 1]) / 2
    t2i = -(torch.log_softmax(logits.t(), 1)[0, 0] + torch.log_softmax(logits.t(), 1)[1, 1]) / 2
    assert contrastive_loss(image, text, scale).item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-6)
    assert contrastive_loss(text, image, scale).item() == pytest.approx(contrastive_loss(image, text, scale).item())
    perfect = torch.eye(4)
    assert contrastive_loss(perfect, perfect, torch.tensor(100.0)).item() < 1e-6


def test_entropy_losses_are_per_modality():
    torch.manual_seed(0)
    layer = MultimodalMoE(4, 8, 4, BatchPrioritizedRouter(4, 4, k=1, noise_std=0.0, capacity_factor=4.0),
                          entropy_thresholds={"text": math.log(3.0)})
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(4))
    image = torch.randn(10, 4)
    text = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    layer({"image": image, "text": text})
    losses = layer.last_losses
    p_img, p_txt = torch.softmax(image, -1), torch.softmax(text, -1)
    entropy = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    assert losses["image/local_entropy"].item() == pytest.approx(entropy(p_img).mean().item(), rel=1e-5)
    assert losses["text/local_entropy"].item() == pytest.approx(entropy(p_txt).mean().item(), rel=1e-5)
    assert losses["image/global_entropy"].item() == pytest.approx(-entropy(p_img.mean(0)).item(), rel=1e-5)
    expected_text = max(0.0, math.log(3.0) - entropy(p_txt.mean(0)).item())
    assert losses["text/global_entropy"].item() == pytest.approx(expected_text, rel=1e-5)
    assert layer.last_stats["text/tokens_per_expert"].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_balance_losses_cover_all_tokens_and_capacity_is_per_modality():
    from moezoo.routers import losses as L

    layer = MultimodalMoE(4, 8, 4, BatchPrioritizedRouter(4, 4, k=1, noise_std=0.0)).eval()
    image, text = torch.randn(12, 4), torch.randn(3, 4)
    layer({"image": image, "text": text})
    probs = torch.softmax(layer.router.gate(torch.cat([image, text])), -1)
    assert layer.last_losses["importance"].item() == pytest.approx(L.importance_loss(probs).item(), rel=1e-5)


def test_capacity_is_applied_per_modality():
    # 12 image tokens and 2 text tokens all prefer expert 0; capacity 1.0 x tokens / E per modality.
    layer = MultimodalMoE(2, 4, 2, BatchPrioritizedRouter(2, 2, k=1, noise_std=0.0, capacity_factor=1.0,
                                                          capacity_multiple_of=None))
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(2))
    prefers_zero = torch.tensor([[3.0, 0.0]])
    layer.eval()({"image": prefers_zero.repeat(12, 1), "text": prefers_zero.repeat(2, 1)})
    # image capacity ceil(12/2)=6, text ceil(2/2)=1: a shared buffer of 7 would let images take all 7
    assert layer.last_stats["image/tokens_per_expert"].tolist() == [6.0, 0.0]
    assert layer.last_stats["text/tokens_per_expert"].tolist() == [1.0, 0.0]


def test_padding_tokens_are_not_routed_and_masks_keep_text_independent():
    torch.manual_seed(1)
    model = LIMoE(img_size=16, patch_size=4, vocab_size=20, max_text_len=6, embed_dim=16, depth=2, num_heads=2,
                  proj_dim=8, num_experts=2, capacity_factor=8.0).eval()
    ids = torch.randint(2, 20, (3, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    a = model.encode(text=ids, text_mask=mask)["text"]
    ids2 = ids.clone()
    ids2[:, 3:] = 7  # change only padding
    b = model.encode(text=ids2, text_mask=mask)["text"]
    assert torch.allclose(a, b, atol=1e-6)
    model.encode(text=ids, text_mask=mask)
    assert model.blocks[1].mlp.last_stats["text/tokens_per_expert"].sum() == 9


def test_limoe_shapes_and_losses():
    model = LIMoE(vocab_size=40, embed_dim=32, depth=2, num_heads=2, proj_dim=16, num_experts=4)
    image, text, scale = model(torch.randn(4, 1, 32, 32), torch.randint(2, 40, (4, 16)))
    assert image.shape == text.shape == (4, 16)
    assert torch.allclose(image.norm(dim=-1), torch.ones(4)) and scale.item() == pytest.approx(10.0)
    names = set(model.blocks[1].mlp.last_losses)
    assert names == {"importance", "load"} | {f"{m}/{n}" for m in ("image", "text")
                                              for n in ("local_entropy", "global_entropy")}
    assert aux_loss(model).requires_grad


def test_retrieval_recall_hand_worked():
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])
    r = retrieval_recall(image, text, ks=(1, 2))
    assert r["i2t_recall@1"] == pytest.approx(1 / 3) and r["t2i_recall@1"] == pytest.approx(1 / 3)
    # images 1 and 2 each see one wrong text scoring higher than their partner: rank 1, inside top 2
    assert r["i2t_recall@2"] == pytest.approx(1.0)


def test_retrieval_under_ddp_ranks_over_the_gathered_pool(monkeypatch):
    from types import SimpleNamespace

    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(8, 6), dim=-1), F.normalize(torch.randn(8, 6), dim=-1)
    labels = torch.full((8,), -1)
    task = ContrastiveImageText(torch.nn.Linear(1, 1))
    task._trainer = SimpleNamespace(world_size=2, datamodule=None)
    # This rank holds pairs 0..3; the other rank's 4..7 arrive through all_gather.
    task._outputs = [(image[:4], text[:4], labels[:4])]
    shards = ((image[:4], image[4:]), (text[:4], text[4:]), (labels[:4], labels[4:]))

    def all_gather(local):  # (world, ...) as Lightning's all_gather returns it
        return torch.stack([local, next(o for mine, o in shards if mine.shape == local.shape and torch.equal(mine, local))])

    monkeypatch.setattr(task, "all_gather", all_gather)
    logged = {}
    monkeypatch.setattr(task, "log", lambda key, value, **kw: logged.__setitem__(key, value))
    task._eval_epoch_end("val")
    expected = retrieval_recall(image, text)
    assert logged == {f"val/{k}": v for k, v in expected.items()}
    assert expected != retrieval_recall(image[:4], text[:4])  # the shard alone would differ


def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer(["the capital letter G in stix bold", "the lowercase letter g in stix bold"])
    ids = tok("the capital letter G")["input_ids"]
    assert tok.decode(ids) == "the capital letter G"
    assert tok("letter g")["input_ids"] != tok("letter G")["input_ids"]
    assert tok("letter z")["input_ids"][1] == tok.unk_token_id
    dm = ImageTextDataModule()
    dm.save_tokenizer(tmp_path / "tok")
    reloaded = ImageTextDataModule(tokenizer=str(tmp_path / "tok"))
    reloaded.setup()
    text = "the digit 7 in dejavu sans regular"
    assert reloaded.tokenize([text])[0].tolist() == dm.tokenize([text])[0].tolist()


def test_csv_and_jsonl_image_caption_pairs(tmp_path):
    import json

    from PIL import Image

    (tmp_path / "img").mkdir()
    for i, shade in enumerate((0, 255)):
        Image.new("RGB", (10, 10), (shade,) * 3).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "train.csv").write_text("image,caption\nimg/0.png,a black square\nimg/1.png,a white square\n")
    for split in ("val", "test"):
        (tmp_path / f"{split}.jsonl").write_text(
            "\n".join(json.dumps({"image": f"img/{i}.png", "caption": c}) for i, c in ((1, "a white square"),)) + "\n")
    dm = ImageTextDataModule(dataset="pairs", root=str(tmp_path), image_size=8, channels=3, batch_size=2)
    dm.setup()
    train = dm.splits["train"]
    assert train.captions == ["a black square", "a white square"] and len(dm.splits["val"]) == 1
    # pixels scaled to [-1, 1]: black -1, white 1
    assert train.images.shape == (2, 3, 8, 8) and train.images[0].max() == -1 and train.images[1].min() == 1
    assert dm.tokenize(["a white square"])[0][:3].tolist() != dm.tokenize(["a black square"])[0][:3].tolist()
    with pytest.raises(FileNotFoundError, match="no train.csv or train.jsonl"):
        ImageTextDataModule(dataset="pairs", root=str(tmp_path / "img")).setup()


def test_glyph_splits_hold_out_fonts():
    dm = ImageTextDataModule()
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 930, "val": 186, "test": 186}
    fonts = {k: {c.split(" in ")[1] for c in v.captions} for k, v in dm.splits.items()}
    assert fonts["train"].isdisjoint(fonts["test"]) and fonts["train"].isdisjoint(fonts["val"])
    assert len(fonts["train"]) == 15 and len(fonts["test"]) == 3
    images, ids, mask, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (64, 1, 32, 32) and ids.shape == mask.shape == (64, 16)


def test_two_step_fit_through_the_cli(tmp_path):
    main(["fit", "--config", str(ROOT / "configs/language_image/limoe_ti_glyphs.yaml"), "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.check_val_every_n_epoch",
          "1", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    # The run keeps its tokenizer beside its outputs, and it encodes as the built-in one does.
    saved = ImageTextDataModule(tokenizer=str(tmp_path / "tokenizer"))
    saved.setup()
    fresh = ImageTextDataModule()
    fresh.setup()
    text = "the lowercase letter q in dejavu serif bold"
    assert saved.tokenize([text])[0].tolist() == fresh.tokenize([text])[0].tolist()
