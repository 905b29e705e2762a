"""Registry and the one checkpoint loader: round trips and clear, all-or-nothing failures."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import moezoo
from moezoo.zoo import CheckpointError, PretrainedCfg, load_checkpoint, register_model, save_checkpoint
from moezoo.zoo.registry import _REGISTRY
from tests.conftest import digits_test_split, evaluate_digits_by_hand


def test_list_and_create():
    names = moezoo.list_models("vmoe*")
    assert {"vmoe_s16", "vmoe_b16", "vmoe_l16", "vmoe_ti_digits"} <= set(names)
    model = moezoo.create_model("vmoe_ti_digits", num_experts=4)
    assert model.moe_layers()[0].num_experts == 4
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(KeyError, match="unknown model"):
        moezoo.create_model("no_such_model")


def test_list_models_pretrained_filter(tmp_path):
    model = nn.Linear(3, 2)
    path = save_checkpoint(model, tmp_path / "w.safetensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    register_model("test_linear_pretrained", lambda: nn.Linear(3, 2), modality="test",
                   pretrained_cfg=PretrainedCfg(source=f"file:{path}", sha256=digest))
    try:
        assert moezoo.list_models("test_linear*", pretrained=True) == ["test_linear_pretrained"]
        loaded = moezoo.create_model("test_linear_pretrained", pretrained=True)
        assert torch.equal(loaded.weight, model.weight)
        assert "vmoe_s16" not in moezoo.list_models(pretrained=True)
    finally:
        _REGISTRY.pop("test_linear_pretrained")


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    path = save_checkpoint(model, tmp_path / "ckpt")
    assert path.name == "model.safetensors"
    assert not [p for p in tmp_path.rglob("*.tmp")]
    fresh = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    load_checkpoint(fresh, tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    import moezoo.zoo.checkpoint as ckpt

    old = nn.Linear(4, 3)
    path = save_checkpoint(old, tmp_path / "w.safetensors")
    before = path.read_bytes()

    def fail_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")  # the write starts, then the disk fills
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(nn.Linear(4, 3), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_url_sources_are_cached_per_url(tmp_path, monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    fetched = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        fetched.append(url)
        save_checkpoint(nn.Linear(2, 2), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    a = PretrainedCfg(source="url:https://example.org/a/model.safetensors").resolve()
    b = PretrainedCfg(source="url:https://example.org/b/model.safetensors").resolve()
    assert a != b and a.name == b.name == "model.safetensors" and a.exists() and b.exists()
    PretrainedCfg(source="url:https://example.org/a/model.safetensors").resolve()  # cached: no second fetch
    assert fetched == ["https://example.org/a/model.safetensors", "https://example.org/b/model.safetensors"]


def _unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_checkpoints_fail_before_any_change(tmp_path):
    model = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = save_checkpoint(nn.Linear(4, 3), tmp_path / "good.safetensors")

    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(model, good, sha256="0" * 64, entry="demo")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(model, truncated)
    wrong_keys = save_checkpoint({"weight": torch.zeros(3, 4), "extra": torch.zeros(1)}, tmp_path / "k.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['bias'\].*unexpected keys \['extra'\]"):
        load_checkpoint(model, wrong_keys, entry="demo")
    wrong_shape = save_checkpoint(nn.Linear(5, 3), tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatch for.*weight"):
        load_checkpoint(model, wrong_shape)
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(model, tmp_path / "missing.safetensors")
    assert _unchanged(model, before)


def test_lightning_ckpt_loads_into_bare_model(tmp_path):
    model = nn.Linear(4, 3)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "x.ckpt")
    fresh = nn.Linear(4, 3)
    load_checkpoint(fresh, tmp_path / "x.ckpt")
    assert torch.equal(fresh.weight, model.weight)


def test_pretrained_cfg_validates_source():
    with pytest.raises(ValueError, match="source must start with"):
        PretrainedCfg(source="s3://bucket/w.safetensors")
    assert PretrainedCfg(source="hf-hub:org/repo").kind == "hf-hub"


# -- shipped entries: weights, recorded results and cards agree --------------------------------

from moezoo.zoo import get_entry, list_models  # noqa: E402
from moezoo.zoo.cards import card_path, load_results, render_card  # noqa: E402

SHIPPED = [n for n in list_models(pretrained=True) if get_entry(n).pretrained_cfg.kind == "package"]


def test_some_entry_ships_weights():
    assert "vmoe_ti_digits" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_card_is_generated_from_the_recorded_results(name):
    """A drift check only: the card file is what rendering the recorded results gives today, so no
    one edited either by hand. It says nothing about whether the figures are right; see
    test_vision_cards_match_a_plain_evaluation_loop and the text entries in test_text.py."""
    entry = get_entry(name)
    results, studies = load_results(name)
    assert card_path(name).read_text() == render_card(entry, results, studies)
    assert results["weights"]["sha256"] == entry.pretrained_cfg.sha256


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_entries_name_their_config_and_card_files(name):
    """register_shipped derives the paths from the name; the files must be there under them."""
    from moezoo.zoo.cards import REPO_ROOT

    entry = get_entry(name)
    assert entry.card["config"] == f"configs/{entry.modality}/{name}.yaml"
    assert (REPO_ROOT / entry.card["config"]).is_file()
    assert (REPO_ROOT / entry.pretrained_cfg.card) == card_path(name) and card_path(name).is_file()
    assert callable(entry.evaluator())  # "module:function" resolves


@pytest.mark.parametrize("name", sorted(set(list_models()) - set(SHIPPED)))
def test_every_other_entry_has_a_card_that_says_it_is_not_measured(name):
    from moezoo.zoo.cards import results_path

    assert not results_path(name).exists()  # else the card would have to show its figures
    text = card_path(name).read_text()
    assert text == render_card(get_entry(name), None, [])
    assert "Not measured" in text and f"# {name}" in text


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_reproduce_the_card_figures(name):
    """A regression guard: the shipped weights, run through the entry's own evaluator, still give
    every recorded figure. The evaluator wrote those figures, so this cannot catch a wrong evaluator;
    the plain-loop tests beside it can."""
    entry = get_entry(name)
    model = moezoo.create_model(name, pretrained=True)
    metrics = entry.evaluator()(model)
    recorded = load_results(name)[0]["metrics"]
    for key, value in recorded.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def _card_table(name: str) -> dict[str, str]:
    """The Results table of the published card: metric -> value as printed."""
    text = card_path(name).read_text().split("## Results", 1)[1]
    return dict(re.findall(r"^\| (\w+) \| ([-0-9.]+) \|$", text, flags=re.M))


@pytest.mark.parametrize("name", ["vmoe_ti_digits", "vit_ti_digits"])
def test_vision_cards_match_a_plain_evaluation_loop(name):
    """The card's accuracy and loss, recomputed without moezoo's data module or evaluator: the test
    split built from scikit-learn here, a plain argmax loop over it (conftest)."""
    correct, loss, total = evaluate_digits_by_hand(moezoo.create_model(name, pretrained=True), *digits_test_split())
    card = _card_table(name)
    assert int(card["examples"]) == total == 270
    assert card["accuracy"] == f"{correct / total:.4f}" and card["loss"] == f"{loss:.4f}"
    recorded = load_results(name)[0]["metrics"]
    assert recorded["accuracy"] == correct / total  # a count of images: exact
    assert recorded["loss"] == pytest.approx(loss, rel=1e-5)  # float32 logits, summed in another order


def test_export_round_trip_and_cli(tmp_path, capsys):
    from moezoo.cli import main
    from moezoo.zoo import export_model

    model = moezoo.create_model("vmoe_ti_digits", num_experts=4)
    target = export_model(model, tmp_path / "export", card="# card\n")
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    again = moezoo.create_model(checkpoint_path=target)
    assert again.moe_layers()[0].num_experts == 4
    x = torch.randn(8, 1, 16, 16)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))
    with pytest.raises(FileExistsError):
        export_model(model, target)
    # An export that fails midway leaves no target and no debris, and a retry succeeds.
    import moezoo.zoo.registry as registry

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "CONFIG_NAME", "no/such/dir/config.json")
        with pytest.raises(OSError):
            export_model(model, tmp_path / "retry")
    assert not (tmp_path / "retry").exists() and not (tmp_path / ".retry.partial").exists()
    assert (export_model(model, tmp_path / "retry") / "model.safetensors").exists()
    with pytest.raises(ValueError, match="holds 'vmoe_ti_digits'"):
        moezoo.create_model("vit_ti_digits", checkpoint_path=target)

    assert main(["zoo", "export", "vmoe_ti_digits", str(tmp_path / "cli_export")]) == 0
    readme = (tmp_path / "cli_export" / "README.md").read_text()
    assert readme == card_path("vmoe_ti_digits").read_text()
    assert main(["zoo", "info", "vmoe_ti_digits"]) == 0
    assert "BatchPrioritizedRouter" in capsys.readouterr().out
