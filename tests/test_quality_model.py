"""The merge-quality benchmark on base models of several families: LoRA targets by model type, padding, pooling,
and task adapters trained and read back on tiny GPT-2 and Llama models built from configs (nothing downloaded)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from bench_quality import check_base_model
from quality_data import Tokens
from quality_model import (
    BASE_MODEL_ID,
    AdapterReader,
    TrainConfig,
    architecture,
    embed,
    is_saved_adapter,
    lora_config,
    prepare_tokenizer,
    start_token_id,
    train_adapter,
)

MINILM_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def tiny_model(model_type: str):
    """A 2-layer model of the family with random weights, in eval mode."""
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    if model_type == "gpt2":
        sizes = {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 40, "n_positions": 32}
        return GPT2Model(GPT2Config(**sizes, bos_token_id=1, eos_token_id=1)).eval()
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
        max_position_embeddings=32,
    )
    return LlamaModel(config).eval()


def test_minilm_keeps_its_targets_and_lora_config():
    assert list(architecture("bert").target_modules) == MINILM_TARGETS
    lora = lora_config("bert", TrainConfig(), BASE_MODEL_ID)
    assert sorted(lora.target_modules) == sorted(MINILM_TARGETS)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.fan_in_fan_out) == (8, 16, 0.05, False)
    assert lora.base_model_name_or_path == BASE_MODEL_ID


def test_decoder_families_have_their_own_targets():
    gpt2 = lora_config("gpt2", TrainConfig(), "openai-community/gpt2")
    assert sorted(gpt2.target_modules) == ["c_attn", "c_fc", "c_proj"] and gpt2.fan_in_fan_out
    assert gpt2.base_model_name_or_path == "openai-community/gpt2"
    for family in ("llama", "qwen2", "mistral"):
        assert set(architecture(family).target_modules) == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        }
        assert architecture(family).decoder and not architecture(family).fan_in_fan_out
    assert architecture("gpt2").decoder and not architecture("bert").decoder


def test_unknown_family_and_unnamed_decoder_stop_the_run():
    with pytest.raises(ValueError, match=r"'t5'.*known: bert"):
        architecture("t5")
    with pytest.raises(SystemExit, match="--model: no LoRA targets known for model type 't5'"):
        check_base_model("t5", "google/t5-small")
    with pytest.raises(SystemExit, match="'llama' model: give its name with --base-model-id"):
        check_base_model("llama", BASE_MODEL_ID)
    check_base_model("llama", "HuggingFaceTB/SmolLM2-135M-Instruct")
    check_base_model("bert", BASE_MODEL_ID)


def test_tokenizer_pads_right_with_end_of_text_when_it_has_no_pad_token():
    gpt2_like = prepare_tokenizer(SimpleNamespace(pad_token=None, eos_token="<|endoftext|>", padding_side="left"))
    assert (gpt2_like.pad_token, gpt2_like.padding_side) == ("<|endoftext|>", "right")
    bert_like = prepare_tokenizer(SimpleNamespace(pad_token="[PAD]", eos_token=None, padding_side="right"))
    assert bert_like.pad_token == "[PAD]"


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_decoder_embedding_reads_a_start_token_pools_after_it_and_ignores_right_padding(model_type):
    model = tiny_model(model_type)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    with torch.no_grad():
        batch = embed(model, ids, torch.tensor([4, 2]))
        alone = embed(model, ids[1:, :2], torch.tensor([2]))
        start = model.config.bos_token_id
        hidden = model(input_ids=torch.tensor([[start, 9, 10]])).last_hidden_state[0]
    torch.testing.assert_close(batch[1:], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[0], torch.nn.functional.normalize(hidden[1:].mean(dim=0), dim=0))
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(2))


def test_start_token_is_bos_else_eos_and_none_for_an_encoder():
    assert start_token_id(SimpleNamespace(model_type="bert", bos_token_id=1, eos_token_id=2)) is None
    assert start_token_id(SimpleNamespace(model_type="llama", bos_token_id=1, eos_token_id=2)) == 1
    assert start_token_id(SimpleNamespace(model_type="gpt2", bos_token_id=None, eos_token_id=7)) == 7
    with pytest.raises(ValueError, match="names no bos_token_id or eos_token_id"):
        start_token_id(SimpleNamespace(model_type="qwen2", bos_token_id=None, eos_token_id=None))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside PEFT
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_adapters_train_and_read_back_on_decoders(tmp_path, model_type):
    from transformers import AutoModel

    name = str(tmp_path / "base")  # a local folder as the base model's name: PEFT then looks nowhere else
    tiny_model(model_type).save_pretrained(name)
    base = AutoModel.from_pretrained(name).eval()
    generator = torch.Generator().manual_seed(1)
    tokens = Tokens(torch.randint(1, 40, (12, 6), generator=generator, dtype=torch.int32), torch.full((12,), 6))
    labels = torch.arange(12) % 2
    head = torch.randn(2, 16, generator=generator)
    (tmp_path / "a.partial").mkdir()  # left by a run cut off while saving: replaced, never reused
    assert not is_saved_adapter(tmp_path / "a")
    folder = train_adapter(base, tokens, labels, head, TrainConfig(epochs=1, batch_size=4), 0, tmp_path / "a", name)
    assert is_saved_adapter(folder) and sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == name
    assert set(config["target_modules"]) == set(architecture(model_type).target_modules)
    assert config["fan_in_fan_out"] is architecture(model_type).fan_in_fan_out
    delta = AdapterReader(base, folder, torch.device("cpu")).delta(folder)
    params = dict(base.named_parameters())
    assert len(delta) == 2 * {"gpt2": 4, "llama": 7}[model_type]  # gpt2: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    for weight, change in delta.items():
        assert change.shape == params[weight].shape, weight  # GPT-2's Conv1D: in × out, as the base stores it
        assert change.abs().max() > 0, weight


def test_base_model_folder_saved_in_float16_loads_back_in_float32(tmp_path):
    from quality_base_model import main
    from quality_model import load_base_model
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"])}
    source = tmp_path / "source"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    original = BertModel(config).eval()
    original.save_pretrained(source)
    BertTokenizerFast(vocab=vocab).save_pretrained(source)
    main([str(source), str(tmp_path / "out"), "--dtype", "float16"])
    model, tokenizer = load_base_model(tmp_path / "out", torch.device("cpu"))
    assert tokenizer("good bad")["input_ids"] == [2, 5, 6, 3]
    for name, weight in original.state_dict().items():
        assert model.state_dict()[name].dtype == torch.float32
        torch.testing.assert_close(model.state_dict()[name], weight.half().float(), rtol=0, atol=0)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), str(tmp_path / "out2")])
