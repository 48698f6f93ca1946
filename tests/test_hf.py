"""Hugging Face both ways: export and import with equal logits, the checkpoint's own tokenizer, fine-tuning from it."""

import json

import pytest
import torch
from conftest import TEXT, save_hf_tokenizer, train_with

from labutils.checkpoints import load_model, save_model
from labutils.data import prepare_data
from labutils.model import GPT, ModelConfig
from labutils.model.hf import (
    config_from_hf,
    export_hf,
    import_hf,
    load_pretrained,
    pretrained_config,
    pretrained_tokenizer,
)
from labutils.tokenizers import get_tokenizer, load_tokenizer
from labutils.validation import ConfigError, DataError

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=50, block_size=16, d_model=32, n_layer=2, n_head=4)


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # move norms off their all-ones init, so a mis-mapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model, vocab: int = 50) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens(vocab))
    return out.logits if hasattr(out, "logits") else out[0]


# ----------------------------------------------------------------------------- export

HF_CASES = {
    "llama-gqa-scaled-rope": dict(
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        attention="gqa",
        n_kv_head=2,
        bias=False,
        rope_theta=500.0,
        rope_scaling=2.0,
    ),
    "llama-mqa-untied": dict(pos="rope", norm="rmsnorm", mlp="swiglu", attention="mqa", bias=False, tie_weights=False),
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "gpt2-tanh-gelu": dict(pos="learned", norm="layernorm", mlp="gelu_tanh", bias=True),
    "gpt2-untied": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_weights=False, ffn_mult=2.0),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_export_then_import_gives_the_same_logits_and_the_same_tensors(case, tmp_path):
    model = build(**HF_CASES[case])
    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if case.startswith("llama") else "GPT2LMHeadModel")
    torch.testing.assert_close(logits(hf), logits(model), atol=1e-5, rtol=1e-5)
    back = import_hf(tmp_path / "hf")
    assert back.config.to_dict() == {
        **model.config.to_dict(),
        **{
            k: getattr(back.config, k)
            for k in ("dropout", "emb_dropout", "attn_dropout", "resid_dropout", "d_ff", "ffn_mult")
        },
    }
    assert back.config.ffn_hidden == model.config.ffn_hidden
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    export_hf(back, tmp_path / "again")  # export -> import -> export: the same tensors under the same names
    first, second = (
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("hf", "again")
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(attention="mla", pos="rope", norm="rmsnorm", mlp="swiglu", bias=False),
            r"LlamaForCausalLM needs attention='mla' \(needs one of \['mha', 'gqa', 'mqa'\]\)",
        ),
        (
            dict(pos="sinusoidal"),
            r"LlamaForCausalLM needs pos='sinusoidal' \(needs 'rope'\).*GPT2LMHeadModel needs pos='sinusoidal'",
        ),
        (
            dict(mlp="moe", pos="rope", norm="rmsnorm", bias=False),
            r"LlamaForCausalLM needs mlp='moe' \(needs 'swiglu'\)",
        ),
        (dict(qk_norm=True), r"GPT2LMHeadModel needs qk_norm=True \(needs False\)"),
    ],
)
def test_export_hf_names_the_fields_that_prevent_it(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        export_hf(build(**overrides), tmp_path / "hf")


# ----------------------------------------------------------------------------- import of transformers' own models


def _gpt2(**kw):
    return transformers.GPT2Config(
        **{
            **dict(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None),
            **kw,
        }
    )


def _llama(**kw):
    return transformers.LlamaConfig(
        **{
            **dict(
                vocab_size=50,
                hidden_size=32,
                intermediate_size=56,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=32,
            ),
            **kw,
        }
    )


IMPORT_CASES = {
    "gpt2 (gelu_new, tied)": lambda: transformers.GPT2LMHeadModel(_gpt2()),
    "gpt2 (n_inner, exact gelu, untied)": lambda: transformers.GPT2LMHeadModel(
        _gpt2(n_inner=48, activation_function="gelu", tie_word_embeddings=False)
    ),
    "llama (gqa, linear rope, theta)": lambda: transformers.LlamaForCausalLM(
        _llama(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    ),
    "llama (mqa, head_dim, tied, eps)": lambda: transformers.LlamaForCausalLM(
        _llama(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-5)
    ),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_a_transformers_checkpoint_imports_with_equal_logits(case, tmp_path):
    torch.manual_seed(0)
    hf = IMPORT_CASES[case]().eval()
    with torch.no_grad():  # norms off their ones, so a norm mapped to the wrong place shows
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    torch.testing.assert_close(logits(ours), logits(hf), atol=1e-5, rtol=0)
    with torch.no_grad():  # the comparison sees one changed weight
        ours.blocks[1].mlp.down_proj.weight[0, 0] += 0.05
    with pytest.raises(AssertionError):
        torch.testing.assert_close(logits(ours), logits(hf), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            lambda: transformers.GPTNeoXConfig(),
            r"model_type: 'gpt_neox' cannot be imported; labutils maps 'gpt2' and 'llama'",
        ),
        (
            lambda: _llama(
                rope_parameters={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "rope_theta": 5e5,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            ),
            r"rope_scaling: rope_type 'llama3' cannot be imported",
        ),
        (lambda: _llama(attention_bias=True), r"attention_bias: True cannot be imported"),
        (lambda: _llama(hidden_act="gelu"), r"hidden_act: 'gelu' cannot be imported"),
        (lambda: _gpt2(activation_function="gelu_fast"), r"activation_function: 'gelu_fast' cannot be imported"),
        (
            lambda: _gpt2(scale_attn_by_inverse_layer_idx=True),
            r"scale_attn_by_inverse_layer_idx: True cannot be imported",
        ),
    ],
)
def test_what_cannot_be_mapped_is_refused_with_its_field_named(config, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf(config())


def test_import_names_a_folder_that_is_not_a_checkpoint(tmp_path):
    from labutils.validation import CheckpointError

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no config.json"):
        import_hf(tmp_path / "empty")


# ----------------------------------------------------------------------------- the checkpoint's tokenizer


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_a_checkpoints_tokenizer_json_encodes_as_transformers_does(kind, tmp_path):
    folder = save_hf_tokenizer(tmp_path / "tok", kind)
    ours, theirs = get_tokenizer(f"hf:{folder}"), transformers.AutoTokenizer.from_pretrained(folder)
    text = "First Citizen: hear me speak!  Naïve café — ünïcödé 東京 🎭\n\nAll:\tSpeak."
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids) and ours.vocab_size == len(theirs)
    assert ours.eot_id == theirs.eos_token_id
    ours.save(tmp_path / "spec.json")  # the saved spec stands alone: the folder can go
    (folder / "tokenizer.json").unlink()
    again = load_tokenizer(tmp_path / "spec.json")
    assert again.encode(text) == ids and again.vocab_size == ours.vocab_size
    counted = int(ours.token_bytes()[ids].sum())  # bits per byte divide by these: every byte of the text, once
    assert counted == len(text.encode("utf-8")) + (1 if kind == "metaspace" else 0)  # Metaspace adds one leading space


def test_prepare_data_takes_a_checkpoints_tokenizer_and_names_its_folder_by_it(tmp_path, small_corpus):
    folder = save_hf_tokenizer(tmp_path / "my-llama", "byte-level")
    prepared = prepare_data(small_corpus, f"hf:{folder}", (0.8, 0.1, 0.1), tmp_path / "prep", progress=False)
    assert prepared.vocab_size == get_tokenizer(f"hf:{folder}").vocab_size
    from labutils import data

    assert data._resolve_out_dir(None, "small", f"hf:{folder}").name == "small-hf_my-llama"
    with pytest.raises(DataError, match="no tokenizer.json at"):
        get_tokenizer(f"hf:{tmp_path / 'nowhere'}")


def test_each_checkpoint_names_the_tokenizer_that_prepares_a_corpus_for_it(tmp_path, prepared):
    transformers.GPT2LMHeadModel(_gpt2(vocab_size=50257, n_layer=1)).save_pretrained(tmp_path / "gpt2")
    assert pretrained_tokenizer(tmp_path / "gpt2") == "gpt2"
    llama = save_hf_tokenizer(tmp_path / "llama", "metaspace")
    transformers.LlamaForCausalLM(_llama(vocab_size=300)).save_pretrained(llama)
    assert pretrained_tokenizer(llama) == f"hf:{llama}"
    saved = save_model(build(vocab_size=prepared.vocab_size), tmp_path / "ours", tokenizer=prepared.tokenizer)
    name = pretrained_tokenizer(saved)
    assert name == f"saved:{saved}" and get_tokenizer(name).encode(TEXT[:200]) == prepared.tokenizer.encode(TEXT[:200])


# ----------------------------------------------------------------------------- fine-tuning from pretrained weights


def test_fine_tuning_starts_at_the_pretrained_models_loss_and_keeps_frozen_weights(tmp_path, prepared, one_thread):
    """A model trained here, exported to transformers: a run from it scores at step 0 what it scored at its end, far
    below a fresh init's; frozen parameters end as they started; a labutils folder works the same."""
    shape = dict(
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        attention="gqa",
        n_kv_head=2,
        bias=False,
        tie_weights=False,
        block_size=16,
        d_model=32,
        n_layer=2,
        n_head=4,
    )
    train = dict(device="cpu", batch_size=8, max_steps=60, warmup_steps=5, eval_interval=30, eval_batches=2, lr=3e-3)
    first = train_with(shape, train, prepared, tmp_path / "first")
    model = load_model(tmp_path / "first" / "checkpoints" / "last")  # a checkpoint folder is a saved model too
    export_hf(model, tmp_path / "hf")
    save_model(model, tmp_path / "ours", tokenizer=prepared.tokenizer)
    fresh = train_with(
        shape, {**train, "max_steps": 1, "warmup_steps": 0, "eval_interval": 1}, prepared, tmp_path / "fresh"
    )
    for source in ("hf", "ours"):
        config = pretrained_config(tmp_path / source, dropout=0.0)
        tune = {
            **train,
            "max_steps": 3,
            "warmup_steps": 1,
            "eval_interval": 3,
            "lr": 1e-4,
            "init_from": str(tmp_path / source),
            "freeze": ["tok_emb.*"],
        }
        run = train_with(config, tune, prepared, tmp_path / f"tuned-{source}")
        start = run.evals.iloc[0]
        assert start["step"] == 0
        assert start["val_loss"] == pytest.approx(first.evals.iloc[-1]["val_loss"], abs=1e-4)
        assert start["val_loss"] < fresh.evals.iloc[0]["val_loss"] - 0.5
        tuned = torch.load(tmp_path / f"tuned-{source}" / "checkpoints" / "last" / "model.pt", weights_only=True)
        assert torch.equal(tuned["tok_emb.weight"], model.tok_emb.weight)
        assert not torch.equal(tuned["blocks.0.mlp.up_proj.weight"], model.blocks[0].mlp.up_proj.weight)


def test_a_config_other_than_the_checkpoints_is_refused_before_training(tmp_path):
    transformers.GPT2LMHeadModel(_gpt2()).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"d_model: a model started from .* keeps the checkpoint's d_model"):
        pretrained_config(tmp_path / "hf", d_model=64)
    with pytest.raises(ConfigError, match=r"block_size: 64 is longer than the 32 positions"):
        load_pretrained(tmp_path / "hf", pretrained_config(tmp_path / "hf", block_size=64))
    shorter = load_pretrained(tmp_path / "hf", pretrained_config(tmp_path / "hf", block_size=16))
    assert shorter.pos_emb.weight.shape[0] == 16
    assert json.loads(json.dumps(shorter.config.to_dict()))["block_size"] == 16
