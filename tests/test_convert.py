"""Converting a stock checkpoint to another scheme: the report, growing a learned table, and fine-tuning after."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, ENCODERS, VOCAB, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, Trainer, TrainingArguments

from hf_posenc.convert import grown_table


def auto_class(arch):
    return AutoModelForMaskedLM if arch in ENCODERS else AutoModelForCausalLM


@pytest.fixture(scope="module")
def stock_checkpoints(tmp_path_factory):
    """One saved stock model (random weights) per architecture: {arch: (folder, model)}."""
    saved = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = auto_class(arch).from_config(tiny_config(arch)).eval()
        folder = tmp_path_factory.mktemp(f"stock-{arch}")
        model.save_pretrained(folder)
        saved[arch] = (folder, model)
    return saved


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("posenc", ["alibi", "t5_bias", "learned", "rope", "sinusoidal"])
def test_report_accounts_for_every_tensor(stock_checkpoints, arch, posenc):
    """kept + added are the model's tensors, dropped + kept the checkpoint's; kept ones are equal weight by weight."""
    folder, stock = stock_checkpoints[arch]
    model = auto_class(arch).from_pretrained(folder, posenc=posenc)
    report = model.posenc_conversion
    assert report.posenc == model.config.posenc
    assert set(report.kept) | set(report.added) == set(model.state_dict())
    assert set(report.kept) | set(report.dropped) == set(stock.state_dict())
    stock_weights, weights = stock.state_dict(), model.state_dict()
    assert all(torch.equal(weights[name], stock_weights[name]) for name in report.kept)
    positional = [n for n in report.added + report.dropped if "position" in n or "wpe" in n]
    assert positional == report.added + report.dropped  # only positional tensors ever come or go


def test_report_names_what_changed(stock_checkpoints):
    """GPT-2 -> t5_bias drops wpe and adds the shared table; Llama -> learned adds embed_positions."""
    gpt2 = AutoModelForCausalLM.from_pretrained(stock_checkpoints["gpt2"][0], posenc="t5_bias").posenc_conversion
    assert gpt2.dropped == ["transformer.wpe.weight"]
    assert gpt2.added == ["transformer.position_bias.relative_attention_bias.weight"]
    llama = AutoModelForCausalLM.from_pretrained(stock_checkpoints["llama"][0], posenc="learned").posenc_conversion
    assert llama.added == ["model.embed_positions.weight"] and llama.dropped == []
    assert "dropped nothing" in str(llama) and "embed_positions" in str(llama)


def test_output_loading_info_still_works(stock_checkpoints):
    """output_loading_info=True returns (model, info) as without posenc, the report attached to the model."""
    model, info = AutoModelForCausalLM.from_pretrained(
        stock_checkpoints["gpt2"][0], posenc="alibi", output_loading_info=True
    )
    assert info["unexpected_keys"] == {"transformer.wpe.weight"} and model.posenc_conversion.dropped


@pytest.mark.parametrize("method", ["tile", "interpolate"])
def test_grow_learned_table(stock_checkpoints, method, tmp_path):
    """GPT-2's 64-row table grown to 160 rows by the stated method; the model then runs past 64 and round-trips."""
    folder, stock = stock_checkpoints["gpt2"]
    model = AutoModelForCausalLM.from_pretrained(
        folder, posenc={"type": "learned", "num_positions": 160, "grow": method}
    ).eval()
    old, new = stock.transformer.wpe.weight, model.transformer.wpe.weight
    assert new.shape == (160, old.shape[1])
    assert model.posenc_conversion.grown == [f"transformer.wpe.weight: 64 -> 160 rows ({method})"]
    if method == "tile":
        assert torch.equal(new[:64], old) and torch.equal(new[64:128], old) and torch.equal(new[128:], old[:32])
    else:
        assert torch.equal(new[0], old[0]) and torch.allclose(new[-1], old[-1], atol=1e-6)
    x = torch.randint(0, VOCAB, (1, 150))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(x).logits, model(x).logits)


def test_grown_table_interpolates_linearly():
    """interpolate places old row i at new position i*(N-1)/(n-1) and is linear in between."""
    old = torch.arange(8.0)[:, None] * torch.tensor([[1.0, -2.0]])
    new = grown_table(old, 15, "interpolate")
    torch.testing.assert_close(new, torch.arange(15.0)[:, None] / 2 * torch.tensor([[1.0, -2.0]]))


@pytest.mark.parametrize(
    ("posenc", "message"),
    [
        ({"type": "learned", "num_positions": 128}, r"has 64 positions.*asks for 128.*'grow': one of"),
        ({"type": "learned", "num_positions": 32, "grow": "tile"}, r"shrinking would drop trained rows"),
        (
            {"type": "learned", "num_positions": 128, "grow": "stretch"},
            r"grow must be one of \('tile', 'interpolate'\)",
        ),
    ],
)
def test_never_a_silent_resize(stock_checkpoints, posenc, message):
    """A different table length without a stated method, a shorter table, or an unknown method are refused."""
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(stock_checkpoints["gpt2"][0], posenc=posenc)


@pytest.mark.parametrize(
    ("arch", "posenc"), [("gpt2", "alibi"), ("llama", "t5_bias"), ("gpt_neox", "alibi"), ("bert", "rope")]
)
def test_fine_tune_converted_checkpoint_with_trainer(stock_checkpoints, arch, posenc, tmp_path):
    """A converted checkpoint fine-tunes with transformers' Trainer: the loss goes down and the result reloads."""
    model = auto_class(arch).from_pretrained(stock_checkpoints[arch][0], posenc=posenc)
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(3, VOCAB, (64, 1), generator=generator)
    sequences = 3 + (starts + torch.arange(24)) % (VOCAB - 3)  # counting, no pad ids: learnable in a few steps
    dataset = [{"input_ids": s, "labels": s} for s in sequences]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=40,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        logging_steps=5,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0], losses
    trainer.save_model(str(tmp_path / "final"))
    reloaded = auto_class(arch).from_pretrained(tmp_path / "final")
    assert reloaded.config.posenc == model.config.posenc


def test_unsupported_checkpoint_names_the_supported(tmp_path):
    """Converting a checkpoint of an unsupported architecture fails before loading, saying why."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("opt", num_hidden_layers=1, hidden_size=32, num_attention_heads=2, ffn_dim=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not support architecture 'opt': no rotary module.*hf-posenc archs"):
        AutoModelForCausalLM.from_pretrained(tmp_path, posenc="alibi")


def test_rope_to_scaled_rope_keeps_every_weight(stock_checkpoints):
    """Llama default RoPE -> YaRN x4: every tensor kept, nothing added or dropped, only rope_parameters change."""
    folder, stock = stock_checkpoints["llama"]
    model = AutoModelForCausalLM.from_pretrained(folder, posenc={"type": "rope", "rope_type": "yarn", "factor": 4.0})
    report = model.posenc_conversion
    assert report.added == report.dropped == report.grown == []
    assert sorted(report.kept) == sorted(stock.state_dict())
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.rope_parameters["factor"] == 4.0
    assert stock.config.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("method", ["tile", "interpolate"])
def test_grow_encoder_table(stock_checkpoints, encoder, method, tmp_path):
    """BERT's and RoBERTa's tables grow too and the models run past the old length; RoBERTa's reserved rows (0 and its
    padding row) stay where they are and only the position rows after them grow."""
    folder, stock = stock_checkpoints[encoder]
    model = AutoModelForMaskedLM.from_pretrained(
        folder, posenc={"type": "learned", "num_positions": 160, "grow": method}
    ).eval()
    old = stock.base_model.embeddings.position_embeddings.weight  # 64 rows
    new = model.base_model.embeddings.position_embeddings.weight
    reserved = 2 if encoder == "roberta" else 0
    assert new.shape[0] == 160 and torch.equal(new[:reserved], old[:reserved])
    if method == "tile":
        period = 64 - reserved
        assert torch.equal(new[reserved : reserved + period], old[reserved:])
        assert torch.equal(new[reserved + period : reserved + 2 * period], old[reserved:])
    else:
        assert torch.equal(new[reserved], old[reserved]) and torch.allclose(new[-1], old[-1], atol=1e-6)
    x = torch.randint(3, VOCAB, (1, 150))
    with torch.no_grad():
        assert model(x).logits.shape == (1, 150, VOCAB)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForMaskedLM.from_pretrained(tmp_path)(x).logits, model(x).logits)


def test_new_roberta_table_keeps_its_padding_row():
    """A RoBERTa learned table built at another length keeps the stock padding_idx (its zero, untrained row)."""
    model = AutoModelForMaskedLM.from_config(tiny_config("roberta"), posenc={"type": "learned", "num_positions": 100})
    table = model.base_model.embeddings.position_embeddings
    assert table.num_embeddings == 100 and table.padding_idx == model.config.pad_token_id
