"""ALiBi through the position interface's attention bias: slopes, equivalences, KV cache, the fused no-bias path."""

import pytest
import torch

from labutils.generate import generate_tokens
from labutils.model import GPT, ModelConfig
from labutils.model import attention as attention_module
from labutils.model.attention import alibi_slopes
from labutils.model.hf import export_hf
from labutils.validation import ConfigError

TINY = dict(vocab_size=50, block_size=16, d_model=32, n_layer=2, n_head=4)
KINDS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_head=2),
    "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla", q_rank=16, kv_rank=12),
}


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **overrides})).eval()


def tokens(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def test_slopes_are_the_papers_geometric_sequences():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    # Not a power of two: the 4-head slopes, then every other one of the 8-head sequence.
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]))


def test_bias_falls_with_distance_and_continues_after_cached_tokens():
    positions = build(pos="alibi", n_head=8).pos_emb
    full = positions.attention_bias(6, past=0)
    assert full.shape == (8, 6, 6)
    assert full[0, 5, 2].item() == pytest.approx(-0.5 * 3) and full[7, 5, 2].item() == pytest.approx(-3 / 256)
    assert (full.diagonal(dim1=-2, dim2=-1) == 0).all()
    torch.testing.assert_close(positions.attention_bias(2, past=4), full[:, 4:])


@pytest.mark.parametrize("kind", list(KINDS))
def test_first_position_matches_no_positions_and_later_ones_differ(kind):
    alibi, nope = build(pos="alibi", **KINDS[kind]), build(seed=1, pos="none", **KINDS[kind])
    nope.load_state_dict(alibi.state_dict())  # same weights: ALiBi adds no parameters
    idx = tokens()
    with torch.no_grad():
        biased, plain = alibi(idx)[0], nope(idx)[0]
    torch.testing.assert_close(biased[:, 0], plain[:, 0])  # position 0 sees only itself, at distance 0
    assert (biased[:, 1:] - plain[:, 1:]).abs().amax() > 1e-4


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_greedy_decoding_with_cache_equals_recomputing_the_full_forward(kind):
    torch.manual_seed(0)
    # Untied, larger init: an untrained tiny model then varies its greedy output instead of repeating.
    model = GPT(ModelConfig(**{**TINY, **KINDS[kind]}, pos="alibi", tie_weights=False, init_std=0.2)).eval()
    prompt = tokens(batch=1, length=5)[0].tolist()
    cached = list(generate_tokens(model, prompt, 10, temperature=0, use_cache=True))
    uncached = list(generate_tokens(model, prompt, 10, temperature=0, use_cache=False))
    assert cached == uncached and len(set(cached)) > 2


@pytest.mark.parametrize("kind", ["mha", "gqa", "mla"])
def test_left_padding_gives_the_unpadded_logits(kind):
    # ALiBi sees only query-key distances, which masked left padding leaves unchanged.
    model = build(pos="alibi", **KINDS[kind])
    idx = tokens(batch=1, length=12)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), idx], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 12)], dim=1).bool()
    with torch.no_grad():
        masked = model(padded, padding_mask=mask)[0]
        torch.testing.assert_close(masked[:, 4:], model(idx)[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(masked).all()


@pytest.mark.parametrize("pos, masked", [("rope", False), ("learned", False), ("alibi", True)])
def test_only_a_biased_position_kind_leaves_the_fused_causal_call(monkeypatch, pos, masked):
    calls = []
    sdpa = attention_module.F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", recording)
    model = build(pos=pos, attention="gqa", n_kv_head=2)
    with torch.no_grad():
        model(tokens())
    assert len(calls) == TINY["n_layer"]
    for kwargs in calls:
        mask = kwargs.get("attn_mask")
        if masked:
            assert mask.dtype == torch.float32 and mask.shape == (4, 16, 16) and not kwargs.get("is_causal")
            assert torch.isinf(mask[0, 0, 1]) and mask[0, 1, 0].item() == pytest.approx(-0.25)
        else:
            assert mask is None and kwargs["is_causal"] is True


def test_export_to_hugging_face_refuses_alibi(tmp_path):
    model = build(pos="alibi", norm="rmsnorm", mlp="swiglu", bias=False)
    with pytest.raises(ConfigError, match=r"pos='alibi' \(needs 'rope'\)"):
        export_hf(model, tmp_path / "hf")
