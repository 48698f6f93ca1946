"""GPT and its parts: causality, attention equivalences, RoPE, KV cache, MoE, checkpointing, presets."""

import itertools

import pytest
import torch

from labutils.model import GPT, PRESETS, ModelConfig, get_preset
from labutils.model.attention import apply_rope, rope_tables
from labutils.model.mlp import MoE

TINY = dict(vocab_size=50, block_size=16, d_model=32, n_layer=2, n_head=4)
ATTENTION = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_head=2),
    "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla", q_rank=16, kv_rank=12),
}
POSITIONS = ["learned", "sinusoidal", "rope", "none", "alibi"]


def build(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **overrides})).eval()


def tokens(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention, pos", list(itertools.product(ATTENTION, POSITIONS)))
def test_changing_a_future_token_never_changes_earlier_logits(attention, pos):
    model = build(**ATTENTION[attention], pos=pos, qk_norm=attention in ("gqa", "mla"))
    idx = tokens()
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=1e-6)
    assert (after[:, 9:] - before[:, 9:]).abs().amax() > 1e-4  # the change is seen from position 9 on


@pytest.mark.parametrize(
    "overrides", [dict(mlp="moe", n_experts=4), dict(norm_position="post", norm="rmsnorm")], ids=["moe", "post-norm"]
)
def test_causality_of_other_block_kinds(overrides):
    model = build(**overrides)
    idx = tokens()
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[0][:, :5], model(idx)[0][:, :5], rtol=0, atol=1e-6)


def test_loss_is_cross_entropy_ignoring_minus_100():
    model = build()
    idx = tokens()
    targets = idx.roll(-1, dims=1)
    targets[:, -3:] = -100
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, :-3].reshape(-1, 50), targets[:, :-3].reshape(-1))
    torch.testing.assert_close(loss, expected)
    _, smoothed = model(idx, targets, label_smoothing=0.1)
    assert smoothed > loss
    assert model(idx)[1] is None
    assert logits.shape == (2, 16, 50) and float(model.aux_loss) == 0.0


def repeat_heads(w: torch.Tensor, heads: int, times: int) -> torch.Tensor:
    """Rows of `heads` stacked heads, each head repeated `times` times in place."""
    return w.unflatten(0, (heads, -1)).repeat_interleave(times, dim=0).flatten(0, 1)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gqa_shares_each_kv_head_across_its_group_of_query_heads(kv_heads):
    # An MHA model whose k/v weights repeat the grouped ones must give the same logits.
    kind = dict(attention="gqa", n_kv_head=kv_heads) if kv_heads > 1 else dict(attention="mqa")
    grouped, full = build(**kind, pos="rope"), build(attention="mha", pos="rope")
    state = grouped.state_dict()
    sizes = [4 * 8, kv_heads * 8, kv_heads * 8]  # q, k, v rows of the fused projection (head_dim 8)
    for i in range(TINY["n_layer"]):
        for key in (f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.qkv.bias"):
            q, k, v = state[key].split(sizes)
            state[key] = torch.cat(
                [q, repeat_heads(k, kv_heads, 4 // kv_heads), repeat_heads(v, kv_heads, 4 // kv_heads)]
            )
    full.load_state_dict(state)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(full(idx)[0], grouped(idx)[0])


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(64, 8, theta=10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> float:
        return (apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])).item()

    assert score(3, 1) == pytest.approx(score(40, 38), abs=1e-5)
    assert score(10, 2) == pytest.approx(score(60, 52), abs=1e-5)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3  # but it does depend on the distance
    # Linear scaling: position p with factor 2 is position p / 2 without it.
    cos2, sin2 = rope_tables(64, 8, scaling=2.0)
    torch.testing.assert_close(cos2[20], cos[10])
    torch.testing.assert_close(sin2[20], sin[10])


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_left_padding_with_rope_gives_the_unpadded_logits(attention):
    # Masked padding shifts absolute positions only; RoPE sees relative ones, so logits match.
    model = build(**ATTENTION[attention], pos="rope")
    idx = tokens(batch=1, length=12)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), idx], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 12)], dim=1).bool()
    with torch.no_grad():
        plain = model(idx)[0]
        masked = model(padded, padding_mask=mask)[0]
        torch.testing.assert_close(masked[:, 4:], plain, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(masked).all()  # padded queries see only themselves: no NaN rows
        unmasked = model(padded)[0][:, 4:]
    assert (unmasked - plain).abs().amax() > 1e-4  # without the mask the padding is attended to
    with torch.no_grad():
        full_mask = torch.ones(2, 16, dtype=torch.bool)
        torch.testing.assert_close(model(tokens(), padding_mask=full_mask)[0], model(tokens())[0])


CACHE_CASES = {
    **ATTENTION,
    "mla-no-q-rank": dict(attention="mla", q_rank=0),
    "mha-qk-norm": dict(qk_norm=True),
    "mla-qk-norm": dict(attention="mla", qk_norm=True),
}


@pytest.mark.parametrize("case, pos", list(itertools.product(CACHE_CASES, POSITIONS)))
def test_kv_cache_gives_the_logits_of_a_full_forward(case, pos):
    model = build(**CACHE_CASES[case], pos=pos)
    idx = tokens(batch=2, length=14)
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_cache()
        pieces = [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:8], cache=cache)[0]]  # prefill, then a chunk
        pieces += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(8, 14)]  # then one token at a time
    assert cache.seq_len == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_forward_beyond_block_size_is_refused():
    model = build()
    cache = model.new_cache()
    model(tokens(batch=1, length=16), cache=cache)
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model(tokens(batch=1, length=1), cache=cache)


def _moe(top_k: int, n_experts: int = 4, shared: bool = False) -> MoE:
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, mlp="moe", n_experts=n_experts, moe_top_k=top_k, moe_shared_expert=shared, d_ff=16)
    return MoE(cfg)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_routes_each_token_to_its_top_k_experts(top_k):
    moe = _moe(top_k)
    x = torch.randn(3, 5, 32)
    seen = {}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda mod, inp, out, e=e: seen.__setitem__(e, inp[0].shape[0]))
    out, _ = moe(x)
    assert sum(seen.values()) == 15 * top_k  # every token visits exactly top_k experts
    flat = x.reshape(-1, 32)
    probs = moe.router(flat).softmax(-1)
    weights, chosen = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.stack(
        [
            sum(w * moe.experts[int(e)](t) for w, e in zip(ws, es, strict=True))
            for t, ws, es in zip(flat, weights, chosen, strict=True)
        ]
    )
    torch.testing.assert_close(out.reshape(-1, 32), expected, atol=1e-5, rtol=1e-5)


def test_moe_aux_loss_is_one_when_balanced_and_n_experts_when_collapsed():
    moe = _moe(top_k=1)
    x = torch.rand(64, 32) + 0.5  # positive features, so a positive router row wins for every token
    with torch.no_grad():
        moe.router.weight.zero_()
    assert moe(x)[1].item() == pytest.approx(1.0)  # uniform router probabilities: balanced
    with torch.no_grad():
        moe.router.weight[2] = 5.0
    assert moe(x)[1].item() == pytest.approx(4.0, abs=1e-3)  # every token on expert 2


def test_moe_aux_loss_gradient_rebalances_the_router():
    moe = _moe(top_k=1)
    x = torch.randn(256, 32)
    x[:, 0] += 1.0
    with torch.no_grad():
        moe.router.weight[2, 0] = 1.0  # most tokens prefer expert 2
    optimizer = torch.optim.SGD(moe.router.parameters(), lr=0.3)
    history = []
    for _ in range(8):
        _, aux = moe(x)
        optimizer.zero_grad()
        aux.backward()
        optimizer.step()
        history.append(aux.item())
    assert history[0] > 1.2 and history[-1] < 1.05  # training on the aux loss alone balances the load


def test_moe_shared_expert_always_contributes():
    moe = _moe(top_k=2, shared=True)
    with torch.no_grad():
        for expert in moe.experts:
            expert.down_proj.weight.zero_()
            expert.down_proj.bias.zero_()
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(moe(x)[0], moe.shared_expert(x))


def test_model_loss_adds_weighted_aux_loss():
    model = build(mlp="moe", n_experts=4, moe_aux_loss_weight=0.5)
    idx = tokens()
    logits, loss = model(idx, idx)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), idx.reshape(-1))
    assert model.aux_loss.item() >= 1.0 - 1e-6
    torch.testing.assert_close(loss, ce + 0.5 * model.aux_loss)


@pytest.mark.parametrize("overrides", [dict(), dict(mlp="moe", n_experts=4, attention="mla")], ids=["dense", "moe-mla"])
def test_gradient_checkpointing_gives_the_same_gradients(overrides):
    plain, ckpt = build(**overrides).train(), build(grad_checkpoint=True, **overrides).train()
    ckpt.load_state_dict(plain.state_dict())
    idx = tokens()
    losses = []
    for model in (plain, ckpt):
        _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1])
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)


def test_init_scales_residual_projections_by_depth():
    model = GPT(ModelConfig(vocab_size=50, block_size=16, d_model=256, n_layer=8, n_head=4))
    assert model.blocks[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.out_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.blocks[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.lm_head.weight is model.tok_emb.weight
    assert GPT(ModelConfig(**{**TINY, "tie_weights": False})).lm_head.weight is not None


def test_dropout_and_drop_path_act_only_in_training():
    model = build(dropout=0.2, drop_path=0.5)
    assert [b.drop_path for b in model.blocks] == [0.0, 0.5]  # grows linearly to drop_path
    idx = tokens()
    with torch.no_grad():
        eval_a, eval_b = model(idx)[0], model(idx)[0]
        model.train()
        train_a, train_b = model(idx)[0], model(idx)[0]
    torch.testing.assert_close(eval_a, eval_b)
    assert (train_a - train_b).abs().amax() > 1e-4


SMALL = dict(d_model=48, n_layer=2, vocab_size=64, block_size=16, ffn_mult=None, d_ff=64, q_rank=16, kv_rank=16)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_trains_a_step_at_small_size(name):
    torch.manual_seed(0)
    model = GPT(get_preset(name, **SMALL)).train()
    idx = tokens(length=16) % 64
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_amt_86m_has_86m_non_embedding_parameters():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT(get_preset("amt-86m"))
    assert 84e6 < model.num_params(non_embedding=True) < 87e6


def test_compiles_without_graph_breaks():
    model = build(attention="gqa", n_kv_head=2, pos="rope", qk_norm=True, norm="rmsnorm", mlp="swiglu")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx, idx)[0], model(idx, idx)[0])


def test_sinusoidal_positions_start_at_the_embedding_scale():
    """Unscaled, the sin/cos table (RMS 0.71) would swamp token embeddings initialised at std 0.02."""
    cfg = ModelConfig(vocab_size=50, block_size=64, d_model=32, n_layer=1, n_head=2, pos="sinusoidal")
    model = GPT(cfg)
    table_rms = model.pos_emb.table.pow(2).mean().sqrt().item()
    assert table_rms == pytest.approx(cfg.init_std, rel=0.05)


def test_a_new_kind_of_any_component_is_one_registry_entry(monkeypatch):
    """The extension points the README names: attention, MLP, norm and position kinds are `Kind` entries of one
    shape (build, check, what is derived from it), and an entry is all a new kind needs."""
    from torch import nn

    from labutils.model import attention, kinds, mlp
    from labutils.validation import ConfigError

    class Halved(nn.Module):  # a toy MLP kind: half the hidden width, ReLU
        def __init__(self, config):
            super().__init__()
            self.up_proj = nn.Linear(config.d_model, config.ffn_hidden // 2)
            self.down_proj = nn.Linear(config.ffn_hidden // 2, config.d_model)

        def forward(self, x):
            return self.down_proj(torch.relu(self.up_proj(x)))

    class Scaled(nn.Module):  # a toy position kind: no parameters, adds 0.5 * position
        rope = None

        def add_to(self, x, past):
            return x + 0.5 * torch.arange(past, past + x.shape[1], device=x.device)[None, :, None]

    def halved_needs_even_ffn(c):
        if c.ffn_hidden % 4:
            raise ConfigError(f"ffn_mult: halved needs a hidden width divisible by 4, got {c.ffn_hidden}")

    with pytest.raises(ConfigError, match="ModelConfig.attention: unknown option 'pairs'"):
        ModelConfig(vocab_size=20, block_size=8, d_model=16, n_layer=1, n_head=4, attention="pairs")
    with pytest.raises(ConfigError, match="ModelConfig.norm: unknown option 'scalenorm'"):
        ModelConfig(vocab_size=20, block_size=8, d_model=16, n_layer=1, n_head=4, norm="scalenorm")
    monkeypatch.setitem(
        attention.ATTENTION,
        "pairs",
        attention.AttentionKind(build=attention.CausalSelfAttention, kv_heads=lambda c: c.n_head // 2),
    )
    monkeypatch.setitem(mlp.MLP_KINDS, "halved", mlp.MLPKind(build=Halved, check=halved_needs_even_ffn))
    monkeypatch.setitem(
        kinds.NORMS, "unit", kinds.Kind(build=lambda c, dim: nn.LayerNorm(dim, elementwise_affine=False))
    )
    monkeypatch.setitem(attention.POSITIONS, "scaled", attention.PositionKind(build=lambda c: Scaled()))
    config = ModelConfig(
        vocab_size=20,
        block_size=8,
        d_model=16,
        n_layer=1,
        n_head=4,
        attention="pairs",
        mlp="halved",
        norm="unit",
        pos="scaled",
    )
    model = GPT(config)
    assert config.attn_kv_heads == 2 and model.blocks[0].attn.n_kv_head == 2 and isinstance(model.blocks[0].mlp, Halved)
    assert (
        not list(model.blocks[0].norm1.parameters()) and isinstance(model.pos_emb, Scaled) and config.attn_rope_dim == 0
    )
    logits, loss = model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    assert logits.shape == (2, 8, 20) and torch.isfinite(loss)
    with pytest.raises(ConfigError, match="halved needs a hidden width divisible by 4, got 6"):
        config.replace(d_ff=6, ffn_mult=None)


def test_flops_count_the_routed_share_the_moe_entry_names():
    """FLOP counting asks the MLP kind's entry which parameters sit behind a router and what share a token uses."""
    from labutils.model.mlp import MLP_KINDS

    moe = GPT(
        ModelConfig(vocab_size=20, block_size=8, d_model=16, n_layer=2, n_head=2, mlp="moe", n_experts=4, moe_top_k=1)
    )
    experts = sum(p.numel() for b in moe.blocks for p in b.mlp.experts.parameters())
    assert sum(MLP_KINDS["moe"].routed_params(b.mlp) for b in moe.blocks) == experts
    dense = moe.num_params(non_embedding=True) + 16 * 20
    attention = 6 * 2 * 8 * 2 * (8 + 8)
    assert moe.flops_per_token() == 6 * (dense - experts * 3 / 4) + attention
    assert (
        GPT(moe.config.replace(moe_top_k=4)).flops_per_token() == 6 * dense + attention
    )  # every expert: the dense count


def test_relu2_mlp_is_relu_squared_between_the_same_two_matrices():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=17, block_size=8, d_model=16, n_layer=1, n_head=2, mlp="relu2")
    mlp = GPT(cfg).blocks[0].mlp
    x = torch.randn(2, 8, 16)
    expected = mlp.down_proj(torch.relu(mlp.up_proj(x)) ** 2)
    torch.testing.assert_close(mlp(x), expected)
    assert sum(p.numel() for p in mlp.parameters()) == sum(
        p.numel() for p in GPT(cfg.replace(mlp="gelu")).blocks[0].mlp.parameters()
    )


def test_a_low_precision_residual_stays_in_bf16_under_autocast_and_changes_nothing_without():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=17, block_size=8, d_model=32, n_layer=2, n_head=2)
    base, low = GPT(cfg), GPT(cfg.replace(low_precision_residual=True))
    low.load_state_dict(base.state_dict())
    idx, targets = torch.randint(0, 17, (2, 8)), torch.randint(0, 17, (2, 8))
    assert torch.equal(base(idx)[0], low(idx)[0])  # eval and generation run without autocast: the same model
    seen = []
    low.blocks[1].register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out[0].dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss_low = low(idx, targets)
        _, loss_base = base(idx, targets)
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the stream between blocks, in and out
    assert loss_low.dtype == torch.float32 and loss_low.item() == pytest.approx(loss_base.item(), abs=0.02)
    loss_low.backward()
    assert all(
        p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in low.parameters() if p.grad is not None
    )
