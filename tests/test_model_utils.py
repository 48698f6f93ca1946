"""Parameter counts, FLOPs, freezing, save/load with manifests (Hugging Face export and import: test_hf.py)."""

import json
import re

import pytest
import torch

from labutils.checkpoints import load_model, save_model, write_manifest
from labutils.model import GPT, ModelConfig
from labutils.model.attention import rope_tables
from labutils.model.utils import count_params, flops_per_token, freeze, param_table, unfreeze
from labutils.validation import CheckpointError

TINY = dict(vocab_size=50, block_size=16, d_model=32, n_layer=2, n_head=4)


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **overrides})).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))


def test_param_counts_by_hand():
    # Per block: qkv 32*96+96, out 32*32+32, two LayerNorms 2*64, MLP 32*128+128 + 128*32+32.
    per_block = 3168 + 1056 + 128 + 4224 + 4128
    non_embedding = 2 * per_block + 64  # + final LayerNorm
    model = build()
    assert count_params(model, non_embedding=True) == non_embedding == model.num_params(non_embedding=True)
    assert count_params(model) == non_embedding + 50 * 32 + 16 * 32  # tied head counted once
    untied = build(tie_weights=False)
    assert count_params(untied) == count_params(model) + 50 * 32
    assert count_params(untied, non_embedding=True) == non_embedding


def test_param_table_sums_to_the_total_and_tracks_freezing():
    model = build()
    table = param_table(model)
    assert table["params"].sum() == count_params(model)
    assert list(table["module"][:3]) == ["tok_emb", "pos_emb", "blocks.0.norm1"]
    assert table.set_index("module").loc["blocks.0.attn", "params"] == 3168 + 1056
    assert table["fraction"].sum() == pytest.approx(1.0)
    freeze(model, "blocks.0.*")
    frozen = param_table(model).set_index("module")
    assert frozen.loc["blocks.0.attn", "trainable"] == 0 and frozen.loc["blocks.1.attn", "trainable"] == 3168 + 1056


def test_flops_per_token_formula():
    model = build()
    n = count_params(model, non_embedding=True)
    assert flops_per_token(model) == 6 * (n + 32 * 50) + 12 * 2 * 32 * 16 == model.flops_per_token()
    assert flops_per_token(model, seq_len=8) == 6 * (n + 32 * 50) + 12 * 2 * 32 * 8


def test_flops_per_token_counts_only_active_experts():
    model = build(mlp="moe", n_experts=4, moe_top_k=1, d_ff=16)
    expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
    dense_n = count_params(model, non_embedding=True) - 2 * 3 * expert  # 3 of 4 experts idle per layer
    assert flops_per_token(model) == 6 * (dense_n + 32 * 50) + 12 * 2 * 32 * 16


def test_freeze_and_unfreeze_by_glob_and_regex():
    model = build().train()
    names = freeze(model, "tok_emb.*", re.compile(r"blocks\.0\.attn\."))
    assert "tok_emb.weight" in names and "blocks.0.attn.qkv.weight" in names and len(names) == 5
    _, loss = model(tokens(), tokens())
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is None
    assert model.blocks[1].attn.qkv.weight.grad is not None
    assert unfreeze(model, "blocks.0.*")[0] == "blocks.0.norm1.weight"
    assert model.blocks[0].attn.qkv.weight.requires_grad and not model.tok_emb.weight.requires_grad
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"pattern 'block.*' matches no parameter"):
        freeze(model, "block.*")


class FakeTokenizer:
    vocab_size = 50

    def save(self, path) -> None:
        with open(path, "w") as fh:
            json.dump({"kind": "fake"}, fh)


def test_save_and_load_round_trip(tmp_path):
    model = build(attention="mla", pos="rope", mlp="moe", n_experts=4, tie_weights=False)
    save_model(model, tmp_path / "m", tokenizer=FakeTokenizer())
    files = json.loads((tmp_path / "m" / "manifest.json").read_text())["files"]
    assert set(files) == {"model.pt", "config.json", "tokenizer.json"}
    assert ModelConfig.from_json(tmp_path / "m" / "config.json") == model.config
    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens())[0], model(tokens())[0], rtol=0, atol=0)


def test_tied_weights_stay_tied_after_loading(tmp_path):
    save_model(build(), tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_load_refuses_a_tampered_file(tmp_path):
    save_model(build(), tmp_path / "m")
    with open(tmp_path / "m" / "model.pt", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(CheckpointError, match="hash mismatch for .*model.pt"):
        load_model(tmp_path / "m")


def test_load_refuses_a_folder_without_manifest(tmp_path):
    save_model(build(), tmp_path / "m")
    (tmp_path / "m" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_model(tmp_path / "m")


def test_load_refuses_weights_that_do_not_fit_the_config(tmp_path):
    save_model(build(), tmp_path / "m")
    build(d_model=64).config.to_json(tmp_path / "m" / "config.json")
    write_manifest(tmp_path / "m")  # a consistent manifest: the mismatch itself must be caught
    with pytest.raises(
        CheckpointError,
        match=r"model.pt does not fit .*config.json: .*shape: \['tok_emb.weight \(50, 32\) vs \(50, 64\)",
    ):
        load_model(tmp_path / "m")
    build(mlp="swiglu").config.to_json(tmp_path / "m" / "config.json")
    write_manifest(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"missing: \['blocks.0.mlp.gate_proj.bias'"):
        load_model(tmp_path / "m")


def test_load_reports_an_invalid_config(tmp_path):
    save_model(build(), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**TINY, "n_head": 5}))
    write_manifest(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a valid model config: n_head"):
        load_model(tmp_path / "m")


def test_save_unwraps_a_compiled_model(tmp_path):
    model = build()
    save_model(torch.compile(model), tmp_path / "m")
    assert "tok_emb.weight" in torch.load(tmp_path / "m" / "model.pt", weights_only=True)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attention": "gqa", "n_kv_head": 2, "pos": "rope"},
        {"mlp": "swiglu"},
        {"mlp": "moe", "n_experts": 4, "moe_top_k": 2},
        {"norm": "rmsnorm", "tie_weights": False},
    ],
)
def test_the_shape_of_a_model_counts_what_the_model_has_without_its_weights(overrides):
    from labutils.model import model_shape

    config = ModelConfig(**{**TINY, **overrides})
    shape, real = model_shape(config), GPT(config)
    assert all(p.is_meta for p in shape.parameters())
    assert shape.num_params() == real.num_params() and shape.num_params(non_embedding=True) == real.num_params(
        non_embedding=True
    )
    assert flops_per_token(shape) == flops_per_token(real)


def test_the_shape_of_a_model_does_no_arithmetic_on_the_meta_device():
    """Every stage and training process counts a model's parameters and FLOPs on the meta device. Arithmetic there
    (RoPE's and the sinusoidal tables were computed on it) runs torch's Python meta kernels, whose first use imports
    sympy: 1.2 s of every such process. In a fresh process, the shapes of every position kind leave sympy unimported,
    and their position tables are those of a real model, on the meta device."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from labutils.model import ModelConfig, model_shape\n"
        "for pos in ('learned', 'sinusoidal', 'rope', 'alibi', 'none'):\n"
        "    shape = model_shape(ModelConfig(vocab_size=65, block_size=64, d_model=32, n_layer=1, n_head=2, pos=pos))\n"
        "    assert all(b.is_meta for b in shape.buffers()), pos\n"
        "print('sympy' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
    rope = GPT(ModelConfig(**{**TINY, "pos": "rope"}))
    cos, sin = rope_tables(TINY["block_size"], rope.config.attn_rope_dim)
    assert torch.equal(rope.pos_emb.cos, cos) and torch.equal(rope.pos_emb.sin, sin)
