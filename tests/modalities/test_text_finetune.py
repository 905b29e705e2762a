"""Fine-tuning transformers MoE causal LMs from the CLI: the shipped config, a model from a local folder,
JSON-lines data (text and chat template) through the model's own tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moezoo.cli import main
from moezoo.modalities.text import CausalLMFineTuning, TextDataModule, load_tokenizer
from moezoo.zoo.hf import TransformersMoE
from tests.zoo.tiny_transformers import tiny_model, tokens

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/text/hf_moe_finetune.yaml"


def test_the_shipped_config_fits_two_steps_through_the_cli(tmp_path):
    main(["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
          "--trainer.enable_checkpointing", "false", "--trainer.logger", "false", "--trainer.enable_progress_bar",
          "false"])


@pytest.mark.slow
def test_the_shipped_config_runs_as_shipped(tmp_path):
    """The whole shipped run (150 steps, about a minute on 2 CPU cores with OMP_NUM_THREADS=1); the
    validation loss falls far below the byte-level chance level ln 256 = 5.55 nats."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "moezoo.cli", "fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path),
         "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*"))))
    events.Reload()
    val = [e.value for e in events.Scalars("val/loss")]
    assert len(val) == 2 and val[-1] < 3.0
    assert sorted(p.name for p in tmp_path.rglob("routing/*.png"))


def test_a_model_from_a_local_folder_is_converted(tmp_path):
    reference = tiny_model("qwen3_moe")
    reference.save_pretrained(tmp_path)
    task = CausalLMFineTuning(pretrained=str(tmp_path))
    assert sum(isinstance(m, TransformersMoE) for m in task.model.modules()) == 2
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(task.eval().logits(x), reference(x).logits, atol=1e-5, rtol=0)


def test_the_task_validates_its_arguments():
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        CausalLMFineTuning()
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        CausalLMFineTuning(pretrained="x", config={"model_type": "olmoe"})
    with pytest.raises(ValueError, match="dtype must name a torch dtype"):
        CausalLMFineTuning(config={"model_type": "olmoe"}, dtype="bfloat17")
    with pytest.raises(ValueError, match="needs model_type"):
        CausalLMFineTuning(config={"hidden_size": 8})


def _chat_tokenizer(folder: Path) -> str:
    """A word-level transformers tokenizer with a chat template, written to ``folder`` (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<|user|>", "<|assistant|>", "hello", "there", "how", "are", "you", "fine", "thanks", "!"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_json_lines_with_text_and_with_the_models_chat_template(tmp_path):
    name = _chat_tokenizer(tmp_path / "tokenizer")
    encode, _ = load_tokenizer(name)
    chats = tmp_path / "chats.jsonl"
    records = [{"messages": [{"role": "user", "content": "hello there how are you"},
                             {"role": "assistant", "content": "fine thanks !"}]}] * 6
    chats.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    dm = TextDataModule("files", name, context_length=4, batch_size=2, train_files=[str(chats)],
                        val_files=[str(chats)], chat_template=True)
    dm.setup()
    one = "<|user|> hello there how are you <|assistant|> fine thanks ! "
    assert dm.ids["val"].tolist() == encode("\n\n".join([one] * 6))
    assert dm.ids["val"][:10].tolist() == [1, 3, 4, 5, 6, 7, 2, 8, 9, 10]
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "hello there"}\n\n{"text": "how are you"}\n')
    plain = TextDataModule("files", "bytes", context_length=4, train_files=[str(texts)], val_files=[str(texts)])
    plain.setup()
    assert bytes(plain.ids["val"].tolist()).decode() == "hello there\n\nhow are you"
    texts.write_text('{"body": "hello"}\n')
    with pytest.raises(ValueError, match=r"texts.jsonl:1 has no string field 'text'"):
        TextDataModule("files", "bytes", context_length=2, train_files=[str(texts)], val_files=[str(texts)]).setup()
    with pytest.raises(ValueError, match="chat_template=True needs a transformers tokenizer"):
        TextDataModule("files", "bytes", train_files=[str(texts)], chat_template=True)
