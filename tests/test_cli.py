"""The moezoo CLI: a short fit of the shipped config, plain LightningCLI compatibility, zoo list."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moezoo.cli import main
from tests.cli_fit import assert_two_warmup_steps, train_losses, two_step_fit
from tests.conftest import digits_test_split, evaluate_digits_by_hand

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
FAST = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_checkpointing", "false", "--trainer.logger", "false"]


def test_two_step_fit_through_the_cli(tmp_path):
    checkpoint, rows = two_step_fit("vision/vmoe_ti_digits", tmp_path)
    assert_two_warmup_steps(checkpoint, lr=0.001, warmup_steps=50)  # the config's lr and warmup_steps
    first, _ = train_losses(rows)
    # An untrained classifier (timm's init: head weights N(0, 0.02), bias 0) gives nearly uniform
    # probabilities over the 10 digits, so the first loss is close to ln 10 (label smoothing does not
    # change the cross-entropy of a uniform prediction).
    assert abs(first - math.log(10)) < 0.2


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses_under_moezoo_and_a_plain_lightning_cli(config, capsys):
    from lightning.pytorch.cli import LightningCLI

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(subclass_mode_model=True, subclass_mode_data=True,
                     args=["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


def _printed(config: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


#: Configs that build and fit offline as shipped (the others need a GPU, a download or a dataset
#: folder); the default suite fits the two whose printed config used not to read back.
OFFLINE_CONFIGS = [ROOT / "configs" / c for c in (
    "vision/vit_ti_digits.yaml", "recipes/upcycle_vit.yaml", "vision/vmoe_ti_digits.yaml",
    "vision/soft_moe_ti_digits.yaml", "language_image/limoe_ti_glyphs.yaml", "text/lm_moa_pydoc.yaml",
    "text/lm_switchhead_pydoc.yaml", "text/lm_sigma_moe_pydoc.yaml", "text/moa_translation_dates.yaml",
    "speech/speechmoe_tiny_espeak.yaml", "timeseries/time_moe_tiny.yaml")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_printed_config_reads_back_as_itself(config, capsys, tmp_path):
    # jsonargparse once printed timm's class-valued defaults (embed_layer=PatchEmbed) as a
    # class_path that read back as an instance; a printed config must print the same again.
    printed = _printed(config, capsys)
    (tmp_path / "printed.yaml").write_text(printed)
    assert _printed(tmp_path / "printed.yaml", capsys) == printed


@pytest.mark.parametrize("config", [c if c.name in ("vit_ti_digits.yaml", "upcycle_vit.yaml")
                                    else pytest.param(c, marks=pytest.mark.slow) for c in OFFLINE_CONFIGS],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_printed_config_fits_with_fast_dev_run(config, capsys, tmp_path, monkeypatch):
    (tmp_path / "printed.yaml").write_text(_printed(config, capsys))
    monkeypatch.chdir(tmp_path)  # the configs' run folders are relative
    assert main(["fit", "--config", str(tmp_path / "printed.yaml"), "--trainer.fast_dev_run", "1",
                 "--trainer.default_root_dir", str(tmp_path)]) == 0


def test_configs_run_under_a_plain_lightning_cli(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "from lightning.pytorch.cli import LightningCLI\n"
        "LightningCLI(subclass_mode_model=True, subclass_mode_data=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script), "fit", "--config", str(ROOT / "configs/vision/vmoe_ti_digits.yaml"),
         "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false", *FAST],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_steps=2" in result.stderr + result.stdout


def test_zoo_list_prints_a_table(capsys, monkeypatch):
    import moezoo

    monkeypatch.setenv("COLUMNS", "220")  # rich folds cells to the terminal width
    assert main(["zoo", "list", "vmoe*"]) == 0
    out = capsys.readouterr().out
    assert "vmoe_ti_digits" in out and "vmoe_b16" in out and "modality" in out and "experts" in out
    # The headline metric shown is the accuracy the shipped weights really have, measured here by a
    # plain argmax loop over the test split (not read back from the card).
    correct, _, total = evaluate_digits_by_hand(moezoo.create_model("vmoe_ti_digits", pretrained=True),
                                                *digits_test_split())
    assert f"accuracy {correct / total:.4g}" in out


def test_console_script_is_installed():
    result = subprocess.run(["moezoo", "zoo", "list"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "220"})
    assert result.returncode == 0, result.stderr
    assert "vmoe_s16" in result.stdout
