"""
lib.optim.make_optimizer: optimizer='adamw' is torch's AdamW as before; optimizer='muon' puts the 2-D weights
inside the blocks under torch.optim.Muon and everything else under AdamW, behind one object that the training loops,
torch.amp.GradScaler and clip_grad_norm_ use like a torch optimizer. Tiny real models (2 layers, 2 heads, 32 dims)
read the characters of a sonnet; every comparison of two runs is bit for bit.
"""

import pytest
import torch

from lib.optim import MuonAdamW, make_optimizer, muon_step, newton_schulz, pick_ns_dtype
from lib.tokenizer import CharTokenizer
from model import GPT, GPTConfig

TEXT = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\nRough winds do shake "
        "the darling buds of May,\nAnd summer's lease hath all too short a date;\n")  # sonnet 18, public domain
TOK = CharTokenizer.from_text(TEXT)
IDS = torch.tensor(TOK.encode(TEXT))
HIDDEN = {f"transformer.h.{i}.{name}.weight" for i in range(2)
          for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=TOK.n_vocab, n_layer=2, n_head=2, n_embd=32, **kw))


def batch(step: int):
    """(x, y) of 4 windows of 16 characters, different for every step."""
    starts = [(step * 37 + 11 * i) % (len(IDS) - 17) for i in range(4)]
    x = torch.stack([IDS[s:s + 16] for s in starts])  # (4, 16)
    y = torch.stack([IDS[s + 1:s + 17] for s in starts])  # (4, 16)
    return x, y


def muon_adamw(model: GPT, **kw):
    return make_optimizer(model, 0.1, 1e-2, (0.9, 0.99), "cpu", optimizer="muon", **kw)


def train_steps(model, optimizer, steps, scaler=None, lr: float = 1e-2) -> list:
    """What train.py does per iteration: learning rate per group, scaled backward, unscale, clip, step, update."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        _, loss = model(*batch(step))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before: dict) -> set:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

# ----------------------------------------------------------------------------------------------
# which parameters go where


def test_adamw_is_torchs_fused_adamw_as_before():
    model = tiny()
    opt = make_optimizer(model, 0.1, 1e-2, (0.9, 0.99), "cpu")
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("lr_scale" not in g for g in opt.param_groups)


def test_muon_takes_the_hidden_matrices_adamw_the_embeddings_layernorms_and_biases():
    model = tiny(bias=True)
    opt = muon_adamw(model, muon_lr=0.03, muon_momentum=0.9, muon_ns_steps=4)
    assert isinstance(opt, MuonAdamW) and type(opt.muon) is torch.optim.Muon and opt.adamw.defaults["fused"]
    names = {id(p): n for n, p in model.named_parameters()}
    (muon_group,) = opt.muon.param_groups
    decay, no_decay = opt.adamw.param_groups
    assert {names[id(p)] for p in muon_group["params"]} == HIDDEN
    # the embedding table is also the LM head (tied), so AdamW updates both
    assert {names[id(p)] for p in decay["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert len(opt.param_groups) == 3 and sum(len(g["params"]) for g in opt.param_groups) == len(names)
    # one schedule for both: Muon's learning rate is learning_rate * lr_scale; weight decay per group
    assert muon_group["lr"] == 0.03 and muon_group["lr_scale"] == pytest.approx(3.0)
    assert (muon_group["momentum"], muon_group["nesterov"], muon_group["ns_steps"]) == (0.9, True, 4)
    assert (muon_group["weight_decay"], decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.1, 0.0)
    for group in opt.param_groups:
        group["lr"] = 5e-3 * group.get("lr_scale", 1.0)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(1.5e-2) and opt.adamw.param_groups[0]["lr"] == 5e-3


def test_a_step_changes_only_its_own_groups_and_never_frozen_weights():
    model = tiny(bias=True)
    model.transformer.wpe.weight.requires_grad_(False)  # frozen: in no group, never changed
    opt = muon_adamw(model)
    assert all(p is not model.transformer.wpe.weight for g in opt.param_groups for p in g["params"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for part, expected in ((opt.muon, HIDDEN), (opt.adamw, trainable - HIDDEN), (opt, trainable)):
        before = snapshot(model)
        model(*batch(0))[1].backward()
        part.step()
        opt.zero_grad(set_to_none=True)
        assert changed(model, before) == expected


def test_classification_head_added_as_a_param_group_is_trained_by_adamw():
    model = tiny()
    head = torch.nn.Linear(32, 2)
    opt = muon_adamw(model)
    opt.add_param_group({"params": [head.weight, head.bias], "weight_decay": 0.0})
    assert opt.param_groups[-1]["params"] == [head.weight, head.bias] and len(opt.adamw.param_groups) == 3
    before = head.weight.detach().clone()
    head(model(batch(0)[0], return_hidden=True)[0][:, -1]).sum().backward()
    opt.step()
    assert not torch.equal(head.weight, before)

# ----------------------------------------------------------------------------------------------
# exactness: checkpoints, loss scaling


def test_state_dict_round_trip_through_a_file_continues_bit_identically(tmp_path):
    a = tiny()
    opt_a = muon_adamw(a)
    train_steps(a, opt_a, range(3))
    torch.save({"model": a.state_dict(), "optimizer": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(saved["optimizer"]) == {"muon", "adamw"}
    assert all("momentum_buffer" in s for s in saved["optimizer"]["muon"]["state"].values())
    assert all("exp_avg_sq" in s for s in saved["optimizer"]["adamw"]["state"].values())
    b = tiny(seed=1)  # other weights and fresh optimizer state: everything must come from the file
    b.load_state_dict(saved["model"])
    opt_b = muon_adamw(b, muon_lr=0.5)
    opt_b.load_state_dict(saved["optimizer"])
    assert opt_b.muon.param_groups[0]["lr_scale"] == pytest.approx(2.0)  # the saved run's settings
    assert train_steps(b, opt_b, range(3, 6)) == train_steps(a, opt_a, range(3, 6))
    assert changed(b, snapshot(a)) == set()
    # the learning rate reaches the groups that load_state_dict put in place: lr 0 changes nothing
    before = snapshot(b)
    train_steps(b, opt_b, range(6, 7), lr=0.0)
    assert changed(b, before) == set()


def test_grad_scaler_enabled_gives_the_steps_of_no_scaling_and_skips_non_finite_ones():
    """Scaling the loss by 2**16 and the gradients back is exact in floating point (powers of two), so a run
    with an enabled GradScaler must match the unscaled one bit for bit."""
    plain, scaled = tiny(), tiny()
    opt_plain, opt_scaled = muon_adamw(plain), muon_adamw(scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=1000)
    assert train_steps(scaled, opt_scaled, range(4), scaler) == train_steps(plain, opt_plain, range(4))
    assert changed(scaled, snapshot(plain)) == set()
    # an inf in one gradient: both optimizers skip the step and the scale halves
    before = snapshot(scaled)
    scaler.scale(scaled(*batch(4))[1]).backward()
    scaled.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt_scaled)
    scaler.update()
    assert changed(scaled, before) == set() and scaler.get_scale() == 2.0 ** 15

# ----------------------------------------------------------------------------------------------
# Newton-Schulz precision


def test_muon_step_in_bfloat16_is_torchs_muon_step_bit_for_bit():
    """muon_step re-implements torch.optim.Muon's step to orthogonalize same-shape matrices together and in a
    chosen dtype: in bfloat16 it must give exactly torch's weights and momentum buffers (here with stacks of 2
    matrices per shape), so batching changes nothing and the float32 path differs in precision only."""
    ours, theirs = tiny(), tiny()
    opt_ours, opt_theirs = muon_adamw(ours), muon_adamw(theirs)
    for step in range(3):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            model(*batch(step))[1].backward()
            muon_step(opt.muon, torch.bfloat16) if model is ours else opt.muon.step()
            opt.zero_grad(set_to_none=True)
    assert changed(ours, snapshot(theirs)) == set()
    for p_ours, p_theirs in zip(opt_ours.muon.param_groups[0]["params"], opt_theirs.muon.param_groups[0]["params"]):
        assert torch.equal(opt_ours.muon.state[p_ours]["momentum_buffer"],
                           opt_theirs.muon.state[p_theirs]["momentum_buffer"])


def test_float32_newton_schulz_orthogonalizes_like_bfloat16():
    """Both precisions map a random matrix to nearly the same near-orthogonal one: singular values in [0.6, 1.25]
    (measured 0.68-1.13 on these shapes) and the results 1.6-1.8% apart (relative Frobenius norm): bfloat16's
    rounding, 2^-8 per operation, over 5 iterations of 3 matmuls. A tall matrix goes through its transpose; a stack
    is orthogonalized matrix by matrix."""
    torch.manual_seed(0)
    coefficients = torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))]).defaults["ns_coefficients"]
    for shape in ((96, 32), (32, 32), (32, 128)):
        G = torch.randn(shape)
        out = {dt: newton_schulz(G[None], coefficients, 5, 1e-7, dt)[0].float()
               for dt in (torch.bfloat16, torch.float32)}
        for dt, X in out.items():
            assert X.shape == shape
            s = torch.linalg.svdvals(X)
            assert 0.6 < s.min() and s.max() < 1.25, (shape, dt, s.min(), s.max())
        rel = (out[torch.bfloat16] - out[torch.float32]).norm() / out[torch.float32].norm()
        assert rel < 0.03, (shape, rel)
        stack = torch.stack([G, 2 * G.flip(0)])  # each matrix normalized on its own
        both = newton_schulz(stack, coefficients, 5, 1e-7, torch.float32)
        assert torch.allclose(both[0], out[torch.float32], atol=1e-6)
        assert torch.allclose(both[1], newton_schulz(stack[1:], coefficients, 5, 1e-7, torch.float32)[0], atol=1e-6)


def test_float32_path_trains_like_torchs_bfloat16_muon():
    models = {dt: tiny() for dt in ("bfloat16", "float32")}
    losses = {dt: train_steps(m, muon_adamw(m, muon_ns_dtype=dt), range(10)) for dt, m in models.items()}
    assert type(muon_adamw(tiny(), muon_ns_dtype="float32").ns_dtype) is torch.dtype
    assert losses["float32"][0] == losses["bfloat16"][0]  # the first loss is before any step
    assert abs(losses["float32"][-1] - losses["bfloat16"][-1]) < 1e-3, losses  # measured 1e-4


def test_newton_schulz_precision_auto_follows_the_hardware():
    assert pick_ns_dtype("auto", "cuda") == (torch.bfloat16, "tensor cores")
    assert pick_ns_dtype("float32", "cuda") == (torch.float32, "requested")
    dtype, why = pick_ns_dtype("auto", "cpu")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert dtype == (torch.bfloat16 if native else torch.float32) and ("AVX512-BF16" in why), why
    with pytest.raises(ValueError, match=r"muon_ns_dtype must be 'auto', 'bfloat16' or 'float32', got 'fp8'"):
        pick_ns_dtype("fp8", "cpu")

# ----------------------------------------------------------------------------------------------
# learning


def test_muon_overfits_one_batch():
    """40 steps on one batch: from about ln(vocab) = 3.6 nats to under 0.05 (measured: 0.007; AdamW at the
    same learning rate: 0.010)."""
    model = tiny()
    losses = train_steps(model, muon_adamw(model), [0] * 40)
    assert losses[0] > 3.0 and losses[-1] < 0.05, losses

# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_optimizer_settings_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match=r"optimizer must be 'adamw' or 'muon', got 'sgd'; e.g. --optimizer=muon"):
        make_optimizer(model, 0.1, 1e-2, (0.9, 0.99), "cpu", optimizer="sgd")
    with pytest.raises(ValueError, match=r"needs learning_rate > 0 and muon_lr > 0 .* muon_lr=0.0"):
        muon_adamw(model, muon_lr=0.0)
    adamw_state = make_optimizer(model, 0.1, 1e-2, (0.9, 0.99), "cpu").state_dict()
    with pytest.raises(ValueError, match=r"keys \['param_groups', 'state'\], not Muon \+ AdamW's .* with that "
                                         r"one \(e.g. --optimizer=adamw\)"):
        muon_adamw(model).load_state_dict(adamw_state)
