"""Parameter groups, Muon, schedules and EMA (labutils.optim): fast, CPU, tiny models."""

import math

import pytest
import torch

from labutils.config import TrainConfig
from labutils.model import GPT, ModelConfig
from labutils.optim import EMA, Muon, layer_index, lr_factor, orthogonalize, param_groups, set_lr
from labutils.training import build_optimizers


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(
        ModelConfig(**{"vocab_size": 65, "block_size": 32, "d_model": 32, "n_layer": 2, "n_head": 2, **overrides})
    )


# --------------------------------------------------------------------------- schedules


def test_warmup_is_linear_and_reaches_peak():
    kw = dict(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, **kw) == pytest.approx(0.1)
    assert lr_factor(4, 100, **kw) == pytest.approx(0.5)
    assert lr_factor(9, 100, **kw) == pytest.approx(1.0)
    assert lr_factor(10, 100, **kw) == pytest.approx(1.0)  # decay starts at the peak


def test_cosine_half_way_and_floor():
    kw = dict(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(55, 100, **kw) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_factor(100, 100, **kw) == pytest.approx(0.1)
    assert lr_factor(500, 100, **kw) == pytest.approx(0.1)  # past the end: stays on the floor


def test_linear_constant_and_wsd():
    assert lr_factor(50, 100, schedule="linear", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, schedule="linear", min_lr_ratio=0.2) == pytest.approx(0.2)
    assert lr_factor(99, 100, schedule="constant", warmup_steps=5) == 1.0
    wsd = dict(schedule="wsd", min_lr_ratio=0.0, decay_frac=0.2, warmup_steps=10)
    assert lr_factor(50, 100, **wsd) == 1.0
    assert lr_factor(9, 100, **wsd) == pytest.approx(1.0) and lr_factor(8, 100, **wsd) == pytest.approx(
        0.9
    )  # warm-up ends
    assert lr_factor(80, 100, **wsd) == 1.0  # stable until the last 20%
    assert lr_factor(81, 100, **wsd) == pytest.approx(0.95)  # then linear to the floor over 20 steps
    assert lr_factor(90, 100, **wsd) == pytest.approx(0.5)
    assert lr_factor(100, 100, **wsd) == pytest.approx(0.0)


def test_time_budget_progress_drives_decay():
    assert lr_factor(1000, schedule="cosine", progress=0.5, min_lr_ratio=0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="total_steps or progress"):
        lr_factor(3, schedule="cosine")


# --------------------------------------------------------------------------- parameter groups


def test_no_decay_on_norms_biases_embeddings_and_every_param_once():
    model = tiny_gpt(tie_weights=False)
    adamw, muon = param_groups(model, lr=1e-3, weight_decay=0.1)
    assert muon == []
    seen = [p for g in adamw for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    for g in adamw:
        for p in g["params"]:
            name = names[id(p)]
            no_decay = p.ndim < 2 or name.startswith(("tok_emb", "pos_emb"))
            assert g["weight_decay"] == (0.0 if no_decay else 0.1), name


def test_layer_lr_decay_scales_by_depth():
    model = tiny_gpt(tie_weights=False)
    assert layer_index(model, "tok_emb.weight", 2) == 0
    assert layer_index(model, "blocks.0.attn.qkv.weight", 2) == 1
    assert layer_index(model, "blocks.1.mlp.up_proj.weight", 2) == 2
    assert layer_index(model, "norm_f.weight", 2) == 3
    adamw, _ = param_groups(model, lr=1.0, weight_decay=0.0, layer_lr_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in adamw for p in g["params"]}
    params = dict(model.named_parameters())
    assert scale[id(params["norm_f.weight"])] == 1.0
    assert scale[id(params["blocks.1.mlp.up_proj.weight"])] == 0.5
    assert scale[id(params["blocks.0.mlp.up_proj.weight"])] == 0.25
    assert scale[id(params["tok_emb.weight"])] == 0.125
    assert scale[id(params["lm_head.weight"])] == 1.0
    opt = torch.optim.AdamW(adamw)
    set_lr([opt], 0.1)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([0.0125, 0.025, 0.05, 0.1])
    for g in opt.param_groups:  # every parameter of block i runs at 0.1 * 0.5 ** (3 - (i + 1))
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            assert g["lr"] == pytest.approx(0.1 * 0.5 ** (3 - layer_index(model, name, 2))), name


def test_layer_lr_decay_gives_a_tied_head_the_head_rate_and_no_weight_decay():
    model = tiny_gpt(tie_weights=True)
    assert model.lm_head.weight is model.tok_emb.weight
    adamw, _ = param_groups(model, lr=1.0, weight_decay=0.1, layer_lr_decay=0.5)
    group = next(g for g in adamw if any(p is model.tok_emb.weight for p in g["params"]))
    assert group["lr_scale"] == 1.0 and group["weight_decay"] == 0.0
    assert sum(p is model.tok_emb.weight for g in adamw for p in g["params"]) == 1


def test_muon_takes_block_matrices_only():
    model = tiny_gpt()
    adamw_opt, muon_opt = build_optimizers(
        model, TrainConfig(optimizer="muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02)
    )
    assert isinstance(muon_opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = [names[id(p)] for g in muon_opt.param_groups for p in g["params"]]
    assert muon_names and all(n.startswith("blocks.") and model.get_parameter(n).ndim == 2 for n in muon_names)
    adamw_names = [names[id(p)] for g in adamw_opt.param_groups for p in g["params"]]
    assert "tok_emb.weight" in adamw_names and not set(adamw_names) & set(muon_names)


# --------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("shape", [(16, 16), (8, 32), (32, 8), (3, 8, 16)])
def test_orthogonalize_pushes_singular_values_towards_one(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    out = orthogonalize(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.5 and sv.max() < 1.3


def test_muon_step_lowers_a_quadratic():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    target = torch.randn(8, 8)
    opt = Muon([w], lr=0.1)
    losses = []
    for _ in range(60):
        loss = (w - target).pow(2).sum()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.1 * losses[0]


# --------------------------------------------------------------------------- EMA


def test_ema_update_rule_with_its_warm_up():
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, tau=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # update 0: decay min(0.9, 1 / 10) = 0.1, so the average is mostly the trained weights already
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[name], 0.1 * before[name] + 0.9 * p.detach())
    assert [EMA(model, tau=0.9).decay()] == [0.1]
    ema.updates = 100  # past the warm-up: (101 / 110) > 0.9, so tau holds
    assert ema.decay() == 0.9
    ema.updates = 5
    assert ema.decay() == pytest.approx(6 / 15)
    restored = EMA(model, tau=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 5
    legacy = {"tau": 0.9, "shadow": dict(ema.shadow)}  # a checkpoint written before the warm-up existed
    restored.load_state_dict(legacy)
    assert restored.decay() == 0.9


def test_muon_decays_a_matrix_at_adamws_pace_for_one_weight_decay():
    from labutils.model import GPT, ModelConfig

    model = GPT(ModelConfig(vocab_size=16, d_model=16, n_layer=1, n_head=2, block_size=8))
    adamw, muon = param_groups(model, lr=1e-3, weight_decay=0.1, muon_lr=0.02)
    decayed = [g for g in muon if g["weight_decay"]]
    assert decayed and all(g["weight_decay"] * g["base_lr"] == pytest.approx(0.1 * 1e-3) for g in decayed)
    assert all(g["weight_decay"] == pytest.approx(0.1) for g in adamw if g["weight_decay"])


def test_ema_applied_swaps_and_restores():
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, tau=0.5)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in ema.shadow:
        ema.shadow[name].fill_(7.0)
    with ema.applied(model):
        assert all(torch.all(p == 7.0) for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, live[name])
    assert torch.all(ema.model_state_dict(model)["weight"] == 7.0)


def test_ema_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        EMA(torch.nn.Linear(2, 2), tau=1.0)


def test_lr_factor_is_a_pure_function_of_the_step_with_the_closed_form():
    def cosine(step, total=50, warmup=5, floor=0.1):  # written out independently of labutils.optim
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    steps = list(range(60))
    backwards = {s: lr_factor(s, 50, schedule="cosine", warmup_steps=5, min_lr_ratio=0.1) for s in reversed(steps)}
    assert [backwards[s] for s in steps] == pytest.approx([cosine(s) for s in steps])


def test_muon_update_is_orthogonalised_whatever_the_gradient():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 16))
    u, _, v = torch.linalg.svd(torch.randn(16, 16))
    w.grad = u @ torch.diag(torch.logspace(0, -3, 16)) @ v  # singular values spread over 1000x
    before = w.detach().clone()
    Muon([w], lr=0.1, momentum=0.0).step()
    update_sv = torch.linalg.svdvals((before - w.detach()) / 0.1)
    assert update_sv.max() / update_sv.min() < 4  # the gradient's 1000x spread is flattened (5 Newton-Schulz steps)
    assert 0.5 < update_sv.median() < 1.3
