"""model.py: exact parity with Hugging Face's GPT2LMHeadModel, KV-cache generation, helpers."""

import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lib.gpt2_weights import config_from_hf, export_hf, state_dict_from_hf
from lib.optim import make_optimizer
from lib.quant import WeightOnlyQuantizer
from model import GPT, GPTConfig

# (n_embd, n_head, n_positions, vocab): the four GPT-2 widths and head counts at 2 layers (the full vocabulary
# once; a smaller table elsewhere keeps the test fast and changes no code path), and an odd shape
SHAPES = [(768, 12, 64, 50257), (1024, 16, 64, 4096), (1280, 20, 64, 4096), (1600, 25, 64, 4096),
          (48, 3, 37, 101)]


def hf_and_ours(n_embd, n_head, n_positions, vocab, seed=0):
    torch.manual_seed(seed)
    hf_config = GPT2Config(n_embd=n_embd, n_head=n_head, n_layer=2, n_positions=n_positions, vocab_size=vocab)
    hf = GPT2LMHeadModel(hf_config).eval()
    config = config_from_hf(hf_config.to_dict())
    ours = GPT(config)
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), config))
    return hf, ours.eval()


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}" for s in SHAPES])
def test_logits_and_loss_match_huggingface(shape, tmp_path):
    n_embd, n_head, n_positions, vocab = shape
    hf, ours = hf_and_ours(*shape)
    idx = torch.randint(0, vocab, (2, n_positions), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits, _ = ours(idx)
        # HF shifts labels inside; ours takes next-token targets directly, -1 where there is none
        targets = torch.cat([idx[:, 1:], torch.full((2, 1), -1)], dim=1)
        _, loss = ours(idx, targets)
    err = (logits - ref.logits).abs().max().item()
    print(f"parity {n_embd}/{n_head}: max abs logit error {err:.2e}")
    assert err < 1e-5, f"max abs logit difference {err} for shape {shape}"
    assert abs(loss.item() - ref.loss.item()) < 1e-5

    # export -> transformers opens it -> same logits
    export_hf(ours, str(tmp_path / "hf"))
    back = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        err_back = (back(idx).logits - logits).abs().max().item()
    assert err_back < 1e-5, f"exported model differs by {err_back}"


def test_state_dict_from_hf_checks_shapes_and_names():
    hf, ours = hf_and_ours(48, 3, 37, 101)
    sd = hf.state_dict()
    wrong = GPTConfig(block_size=37, vocab_size=101, n_layer=2, n_head=3, n_embd=96)
    with pytest.raises(ValueError, match="shape mismatch"):
        state_dict_from_hf(sd, wrong)
    sd = dict(sd)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match="missing.*h.1.mlp.c_fc.bias"):
        state_dict_from_hf(sd, ours.config)


def peaky_model(vocab_size=50, block_size=16, seed=0) -> GPT:
    """A tiny random model with large weights: sharp next-token distributions, so greedy decoding has no near-ties
    that float rounding could flip."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.eval()


def test_greedy_with_cache_equals_without_past_block_size():
    model = peaky_model()
    prompt = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(2))
    a = model.generate(prompt, 64, temperature=0.0, use_cache=True)
    b = model.generate(prompt, 64, temperature=0.0, use_cache=False)
    assert a.shape == (1, 69)
    assert torch.equal(a, b)
    # the window policy really was exercised: 69 tokens > block_size 16; and the output is not a constant
    assert len(set(a[0].tolist())) > 3


def test_no_cache_path_is_the_documented_window_policy():
    """Each token is the argmax of a plain forward over the current window; when the window would exceed
    block_size it restarts from its last block_size // 2 tokens."""
    model = peaky_model()
    prompt = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(3))  # longer than block 16
    out = model.generate(prompt, 30, temperature=0.0)
    window = prompt[:, -16:].tolist()[0]
    for t in out[0, 20:].tolist():
        logits, _ = model(torch.tensor([window]))
        assert t == logits[0, -1].argmax().item()
        window.append(t)
        if len(window) > 16:
            window = window[-8:]


def test_sampling_options_and_reproducibility():
    model = peaky_model()
    prompt = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(4))
    greedy = model.generate(prompt, 20, temperature=0.0)
    assert torch.equal(model.generate(prompt, 20, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 20, top_p=1e-9, seed=5), greedy)
    s1 = model.generate(prompt, 20, temperature=1.0, top_k=10, top_p=0.9, seed=123)
    s2 = model.generate(prompt, 20, temperature=1.0, top_k=10, top_p=0.9, seed=123)
    s3 = model.generate(prompt, 20, temperature=1.0, top_k=10, top_p=0.9, seed=124)
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)
    # batch rows are independent: row-by-row greedy equals batched greedy
    for i in range(3):
        assert torch.equal(model.generate(prompt[i:i + 1], 20, temperature=0.0), greedy[i:i + 1])


def test_streaming_yields_the_same_tokens_and_stop_token_ends_rows():
    model = peaky_model()
    prompt = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(6))
    full = model.generate(prompt, 12, temperature=0.0)
    steps = list(model.generate_stream(prompt, 12, temperature=0.0))
    assert torch.equal(torch.stack(steps, dim=1), full[:, 4:])
    # stop at the token row 0 produces first: row 0 stops, the stream runs until row 1 stops too (or the limit)
    stop = full[0, 4].item()
    out = model.generate(prompt, 12, temperature=0.0, stop_token=stop)
    assert out[0, 4].item() == stop and (out[0, 4:] == stop).all()
    row1 = full[1, 4:].tolist()
    n1 = row1.index(stop) + 1 if stop in row1 else 12
    assert out.size(1) == 4 + n1
    assert out[1, 4:].tolist() == row1[:n1]


def test_padded_vocabulary_ids_are_never_sampled():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        # make the padding rows (ids 50257..50303) the most likely tokens by far
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[50257:] = 1.0
    prompt = torch.tensor([[1, 2, 3]])
    logits, _ = model(prompt)
    assert logits[0, -1].argmax().item() >= 50257  # the trap is armed
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, seed=0), dict(top_k=50, seed=1)):
        out = model.generate(prompt, 16, **kwargs)
        assert out.max().item() < 50257, kwargs


def test_prompt_longer_than_block_is_cropped_from_the_left():
    model = peaky_model()
    long = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(7))
    a = model.generate(long, 10, temperature=0.0)
    b = model.generate(long[:, -16:], 10, temperature=0.0)
    assert torch.equal(a[:, 40:], b[:, 16:])


@pytest.mark.parametrize("kwargs, name", [(dict(temperature=-0.1), "temperature"), (dict(top_k=0), "top_k"),
                                          (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_invalid_generation_arguments_are_named(kwargs, name):
    model = peaky_model()
    with pytest.raises(ValueError, match=name):
        model.generate(torch.tensor([[1, 2]]), 5, **kwargs)


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt"):
        peaky_model().generate(torch.zeros((1, 0), dtype=torch.long), 5)


def test_attention_probabilities_and_fast_path_agree():
    model = peaky_model()
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(8))
    fast, _ = model(idx)
    slow, _, attns = model(idx, return_attn=True)
    assert (fast - slow).abs().max().item() < 1e-5
    assert len(attns) == 2 and attns[0].shape == (2, 2, 12, 12)
    for a in attns:
        assert torch.allclose(a.sum(-1), torch.ones(2, 2, 12), atol=1e-6)
        assert (a.triu(diagonal=1) == 0).all()  # strictly causal


def test_bfloat16_autocast_on_cpu_attends_in_float32_and_trains_like_float32():
    """Under CPU bfloat16 autocast the fused path attends in float32 (torch's CPU flash attention is slow in bfloat16):
    its logits equal the explicit-math path's, which runs in bfloat16, to bfloat16 rounding; its output dtype is the
    autocast one; and a few AdamW steps follow the same losses as float32 (to bfloat16 precision)."""
    model = peaky_model()
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = model(idx)
        slow, _, _ = model(idx, return_attn=True)
        y = model.transformer.h[0].attn(model.transformer.wte(idx))[0]
    assert fast.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert (fast.float() - slow.float()).abs().max().item() < 0.1 * fast.float().abs().max().item()
    reference, _ = model(idx)
    assert (fast.float() - reference).abs().max().item() < 0.05 * reference.abs().max().item()
    whole, _ = copy.deepcopy(model).to(torch.bfloat16)(idx)  # weights in bfloat16, no autocast: the same path
    assert whole.dtype == torch.bfloat16 and (whole.float() - reference).abs().max() < 0.1 * reference.abs().max()
    torch.manual_seed(0)
    x, t = torch.randint(0, 30, (4, 16)), torch.randint(0, 30, (4, 16))
    curves = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        m = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=32))
        opt = make_optimizer(m, 0.0, 1e-2, (0.9, 0.95), "cpu")
        curves[dtype] = []
        for _ in range(20):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                _, loss = m(x, t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curves[dtype].append(loss.item())
    assert curves[torch.bfloat16][-1] < curves[torch.bfloat16][0] - 1.0, curves
    for a, b in zip(curves[torch.float32], curves[torch.bfloat16]):
        assert abs(a - b) < 0.05 * a, curves


def test_hidden_states_give_the_logits_through_the_head():
    model = peaky_model()
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(9))
    logits, _ = model(idx)
    hidden, loss = model(idx, return_hidden=True)
    assert hidden.shape == (2, 12, model.config.n_embd) and loss is None
    assert torch.allclose(model.lm_head(hidden[:, 5]), logits[:, 5], atol=1e-6)


def test_next_token_logits_from_the_transposed_head_copy_follow_the_weights():
    # generation's one-position logits on a CPU use a (C, vocab) copy of the tied weight: equal to lm_head within
    # 1e-5 at GPT-2's width and vocabulary, rebuilt after any change of the weight, never used under autograd
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=12, n_embd=768, vocab_size=50257, block_size=32)).eval()
    idx = torch.randint(0, 50257, (2, 7))
    with torch.no_grad():
        hidden = model(idx, return_hidden=True)[0][:, [-1]]
        fast = model(idx, last_only=True)[0]
        assert fast.shape == (2, 1, 50257)
        assert (fast - model.lm_head(hidden)).abs().max() <= 1e-5
        before = model(idx, last_only=True)[0]
        model.lm_head.weight.mul_(2)  # in place, like an optimizer step (tied: the embeddings change too)
        hidden = model(idx, return_hidden=True)[0][:, [-1]]
        after = model(idx, last_only=True)[0]
        assert (after - model.lm_head(hidden)).abs().max() <= 2e-5 and (after - before).abs().max() > 0.1
        model.load_state_dict(GPT(model.config).state_dict())  # new weights through the usual loader
        hidden = model(idx, return_hidden=True)[0][:, [-1]]
        assert (model(idx, last_only=True)[0] - model.lm_head(hidden)).abs().max() <= 1e-5
        model.double()  # new storage in another dtype
        assert model(idx, last_only=True)[0].dtype == torch.float64
    logits = model(idx, last_only=True)[0]  # autograd on: the Linear itself, so gradients reach the weight
    logits.sum().backward()
    assert model.lm_head.weight.grad is not None
    model.train()
    assert model._head_t is None


def test_decoding_layout_moves_block_weights_and_changes_no_token():
    # on a CPU, generate lays the blocks' Linear weights out in (in, out) memory order: the same logits (1e-5) and
    # tokens as nn.Linear's order, the same values in the state dict, quantizable; model.train() puts them back
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=300, block_size=64)).eval()
    idx = torch.randint(0, 300, (2, 9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref_logits = model(idx)[0]
        ref_tokens = idx
        for _ in range(20):  # greedy by plain forwards, in nn.Linear's order
            ref_tokens = torch.cat([ref_tokens, model(ref_tokens)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    weights = [b.mlp.c_fc.weight for b in model.transformer.h] + [b.attn.c_attn.weight for b in model.transformer.h]
    assert all(w.is_contiguous() for w in weights)
    assert torch.equal(model.generate(idx, 20, temperature=0.0), ref_tokens)
    assert not any(w.is_contiguous() for w in weights) and all(w.t().is_contiguous() for w in weights)
    with torch.no_grad():
        assert (model(idx)[0] - ref_logits).abs().max() <= 1e-5
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    fresh = GPT(model.config).eval()
    fresh.load_state_dict(before)
    for mode in ("int8", "int4"):  # the same integer storage as from nn.Linear's order, in plain contiguous tensors
        q, ref = WeightOnlyQuantizer(mode, 32).quantize(model), WeightOnlyQuantizer(mode, 32).quantize(fresh)
        assert all(torch.equal(q[k], v) and q[k].is_contiguous() for k, v in ref.items())
    model.train()
    assert all(w.is_contiguous() for w in weights)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], ref_logits)


def test_loss_ignores_minus_one_and_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 30, (4, 16))
    y = torch.randint(0, 30, (4, 16))
    y_masked = y.clone()
    y_masked[:, :8] = -1
    logits, loss = model(x, y_masked)
    ref = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 30), y[:, 8:].reshape(-1))
    assert abs(loss.item() - ref.item()) < 1e-6
    opt = make_optimizer(model, 0.0, 1e-2, (0.9, 0.95), "cpu")
    first = None
    for _ in range(100):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.1, (first, loss.item())


def test_gpt2_124m_parameter_count_and_flops():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257))
        padded = GPT(GPTConfig())
    assert model.num_params(non_embedding=False) == 124_439_808  # GPT-2 small as released
    assert padded.num_params(non_embedding=False) == 124_475_904  # 47 padding rows x 768
    n = model.num_params()
    assert n == 124_439_808 - 1024 * 768
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
    assert math.isclose(model.estimate_mfu(1000.0, 1e12, 1024), model.flops_per_token(1024) * 1000 / 1e12)


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=8, n_head=4, n_embd=256))
    std = lambda t: t.float().std().item()
    assert abs(std(model.transformer.wte.weight) - 0.02) < 0.002
    assert abs(std(model.transformer.wpe.weight) - 0.01) < 0.002
    assert abs(std(model.transformer.h[0].mlp.c_fc.weight) - 0.02) < 0.002
    assert abs(std(model.transformer.h[0].attn.c_proj.weight) - 0.02 / math.sqrt(16)) < 0.001
    assert model.lm_head.weight is model.transformer.wte.weight


def test_crop_block_size_and_optimizer_groups():
    model = peaky_model(block_size=16)
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    with pytest.raises(ValueError, match="block_size"):
        model.crop_block_size(9)
    with pytest.raises(ValueError, match="8"):
        model(torch.zeros((1, 9), dtype=torch.long))
    opt = make_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == model.num_params(non_embedding=False)


def test_bad_head_count_is_refused():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=50, n_head=3)


def test_a_change_to_the_block_reaches_every_consumer(monkeypatch):
    """The trunk lives in model.py only: change the block (here the MLP's activation, as an experiment would) and
    pre-training's loss, SFT's and classification's heads, DPO's log-probs, eval.py's scores, attention_viz's maps,
    KV-cached generation and compiled (static-cache) int8 decoding all change with it; undo it and they return."""
    import attention_viz as av
    import eval as ev
    from align import sequence_logps
    from lib.decode import decode_step
    from lib.finetuning import Finetuned
    from lib.quant import WeightOnlyQuantizer
    from lib.runtime import Runtime
    from model import MLP, KVCache

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=True)).eval()
    q = WeightOnlyQuantizer("int8")
    qmodel = q.convert(GPT(gpt.config).eval())
    qmodel.load_state_dict(q.quantize(gpt))
    rt = Runtime("cpu", "cpu", "float32")
    x = torch.randint(0, 64, (2, 12))
    y = torch.where(torch.arange(12) >= 8, torch.roll(x, -1, 1), torch.full_like(x, -1))  # the "response" only
    y_cls = torch.full_like(x, -1)
    y_cls[:, -1] = torch.tensor([0, 1])
    classifier = Finetuned(gpt, num_classes=2).eval()

    def outputs() -> dict:
        with torch.no_grad():
            cache = KVCache(gpt.config, 2)
            gpt(x[:, :6], cache=cache)
            k = torch.zeros(2, 1, 2, 16, 16)
            decode_step(qmodel, x[:1, :1], torch.zeros(1, dtype=torch.long), k, k.clone())
            return {"pretrain loss": gpt(x, torch.roll(x, -1, 1))[1],
                    "sft logits": Finetuned(gpt)(x, y)[0],
                    "classify logits": classifier(x, y_cls)[0],
                    "dpo log-probs": sequence_logps(gpt, x, y, rt),
                    "eval scores": ev.score_batch(gpt, [(x[0].tolist(), 4)], 64, rt)[0][0],
                    "attention maps": av.attention_maps(gpt, x),
                    "cached generation logits": gpt(x[:, 6:7], cache=cache, last_only=True)[0],
                    "int8 static decode logits": decode_step(qmodel, x[:1, 1:2], torch.ones(1, dtype=torch.long),
                                                             k, k.clone())}

    before = outputs()
    relu = lambda self, h: self.dropout(self.c_proj(torch.relu(self.c_fc(h))))  # the experiment: ReLU for GELU
    monkeypatch.setattr(MLP, "forward", relu)
    changed = outputs()
    unchanged = [name for name in before if torch.allclose(before[name].float(), changed[name].float())]
    assert not unchanged, f"these consumers did not see the change to model.py: {unchanged}"
    monkeypatch.undo()
    again = outputs()
    assert all(torch.equal(before[n], again[n]) for n in before)
