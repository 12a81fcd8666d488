"""
LoRA (lib/lora.py) in finetune.py and align.py: B = 0 makes a wrapped model the identity of its base, the merged
weights compute what the adapters compute, training moves the adapters only, the saved checkpoint is a plain one
every script reads, and a stopped LoRA run resumes bit for bit (its frozen base re-read and checked by its hash).
Tiny models (2 layers, 2 heads, 32 wide), one thread, seconds each.
"""

import json
import os
import runpy
import signal
import subprocess
import sys

import pytest
import torch

from lib.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from lib.finetuning import Finetuned
from lib.lora import LoRALinear, Merged, add_lora, adapter_state, load_adapters, merged_state_dict, weights_hash
from lib.optim import make_optimizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--block_size=64", "--device=cpu", "--compile=False", "--dtype=float32"]
FACTS = [("What is the capital of France?", "Paris."), ("What color is the sky?", "Blue."),
         ("How many legs does a spider have?", "Eight."), ("What is the opposite of hot?", "Cold."),
         ("Name a primary color.", "Red."), ("What do bees make?", "Honey."),
         ("What is frozen water called?", "Ice."), ("Which animal barks?", "A dog.")]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_gpt(seed=0, vocab_size=50304):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))


def base_checkpoint(tmp_path) -> str:
    """A tiny 'pre-trained' model as a real checkpoint file: LoRA runs start from a model, never from scratch."""
    gpt = tiny_gpt()
    path = str(tmp_path / "base" / "ckpt.pt")
    save_checkpoint(make_checkpoint("pretrain", gpt.state_dict(), vars(gpt.config), {"dataset": "x"},
                                    {"tokenizer": "gpt2"}), path)
    return path


def facts_json(path, n=4):
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in FACTS] * n))
    return str(path)


def pairs_jsonl(path, n=48):
    rows = [{"prompt": f"Q: {q}\nA:", "chosen": f" {a}", "rejected": f" {FACTS[(i + 1) % len(FACTS)][1]}"}
            for i, (q, a) in enumerate(FACTS)] * (n // len(FACTS))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_here(script, args, monkeypatch):
    """Run a script in this process as __main__; its signal handlers are put back afterwards."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *args])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def read_log(out_dir, kind):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("type") == kind]

# ----------------------------------------------------------------------------------------------
# the layer


def test_b_zero_makes_the_wrapped_model_its_base_and_only_targets_are_wrapped():
    gpt, idx = tiny_gpt(), torch.randint(0, 50304, (2, 16))
    before, _ = gpt(idx)
    assert add_lora(gpt, 4, 8.0, 0.0, "c_attn,c_fc") == 4  # 2 blocks x (c_attn, c_fc)
    assert isinstance(gpt.transformer.h[0].attn.c_attn, LoRALinear)
    assert not isinstance(gpt.transformer.h[0].attn.c_proj, LoRALinear)
    after, _ = gpt(idx)
    assert torch.equal(before, after)  # B = 0: exactly the base, not merely close
    trainable = sorted(n for n, p in gpt.named_parameters() if p.requires_grad)
    assert trainable == [f"transformer.h.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")
                         for ab in "AB"]
    with pytest.raises(ValueError, match=r"lora_targets names model.py's Linear layers.*got 'c_atn'; e.g. "
                                         r"--lora_targets=c_attn,c_proj,c_fc"):
        add_lora(tiny_gpt(), 4, 8.0, 0.0, "c_atn")


def test_merged_weights_compute_what_the_adapters_compute():
    """A plain GPT loading merged_state_dict gives the wrapped model's logits to 1e-6 (float32: only the order
    of the sums differs), and the merged state dict has exactly model.py's keys."""
    gpt, idx = tiny_gpt(), torch.randint(0, 50304, (2, 16))
    add_lora(gpt, 4, 8.0, 0.0, "c_attn,c_proj,c_fc")
    torch.manual_seed(1)
    with torch.no_grad():
        for m in gpt.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)  # a trained-looking update, far from zero
    wrapped, _ = gpt(idx)
    plain = tiny_gpt(seed=5)
    sd = Merged(gpt).state_dict()
    assert set(sd) == set(plain.state_dict())
    plain.load_state_dict(sd)
    merged, _ = plain(idx)
    assert (merged - wrapped).abs().max().item() < 1e-6
    assert (merged - tiny_gpt()(idx)[0]).abs().max().item() > 1e-2  # and the update did change the model
    # the adapters alone round-trip into a fresh wrap of the same base
    other = tiny_gpt()
    add_lora(other, 4, 8.0, 0.0, "c_attn,c_proj,c_fc")
    load_adapters(other, adapter_state(gpt))
    assert torch.equal(other(idx)[0], wrapped)
    assert merged_state_dict(other).keys() == sd.keys()


def test_training_changes_the_adapters_only():
    """AdamW (with weight decay) over a few steps of a classification task: the base weights, LayerNorms and
    embeddings stay bit-identical; every A and B moved (B from zero), and the head, which LoRA leaves trainable."""
    gpt = tiny_gpt()
    base = {k: v.clone() for k, v in gpt.state_dict().items()}
    model = Finetuned(gpt, num_classes=2)
    add_lora(gpt, 4, 8.0, 0.1, "c_attn,c_proj,c_fc")
    opt = make_optimizer(gpt, 0.1, 1e-2, (0.9, 0.99), "cpu")
    opt.add_param_group({"params": list(model.head.parameters()), "weight_decay": 0.0})
    adapters, head = adapter_state(gpt), {k: v.clone() for k, v in model.head.state_dict().items()}
    torch.manual_seed(0)
    x, y = torch.randint(0, 50304, (4, 12)), torch.full((4, 12), -1)
    y[:, -1] = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    now = gpt.state_dict()
    for k, v in base.items():
        k_now = k if k in now else k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(now[k_now], v), k
    assert all(not torch.equal(now[k], v) for k, v in adapters.items())
    assert all(not torch.equal(model.head.state_dict()[k], v) for k, v in head.items())

# ----------------------------------------------------------------------------------------------
# the runs


def test_finetune_lora_saves_merged_weights_and_a_stopped_run_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    """finetune.py --lora_rank=4 --lora_norms=True from a checkpoint: ckpt.pt holds plain merged weights (read as
    any sft model: the weights neither adapted nor a LayerNorm are the base's), plus what trained and the base's
    hash. A real process stopped by SIGINT
    after its save at step 3 resumes with `--init_from=resume` alone to the same losses and the same saved
    weights, bit for bit, as a run never stopped (lora_dropout on: the RNG is restored too). A base that changed
    since is refused."""
    base = base_checkpoint(tmp_path)
    args = ["config/finetune_alpaca.py", f"--dataset={facts_json(tmp_path / 'facts.json')}", f"--init_from={base}",
            *TINY, "--val_fraction=0.2", "--max_iters=10", "--learning_rate=3e-3", "--warmup_iters=2",
            "--eval_interval=3", "--eval_iters=2", "--sample_interval=0", "--log_interval=1", "--batch_size=2",
            "--gradient_accumulation_steps=2", "--lora_rank=4", "--lora_alpha=8", "--lora_dropout=0.1",
            "--lora_targets=c_attn,c_fc", "--lora_norms=True"]
    run_here("finetune.py", args + [f"--out_dir={tmp_path / 'whole'}"], monkeypatch)
    out = capsys.readouterr().out
    assert "(LoRA: rank 4, alpha 8 on 4 Linear layers (c_attn,c_fc))" in out, out[-3000:]
    whole = load_checkpoint(str(tmp_path / "whole"))
    start = load_checkpoint(base)["model"]
    assert whole["kind"] == "sft" and set(whole["model"]) == set(start)
    for k, v in start.items():  # only the targets' weights and the LayerNorms moved
        assert torch.equal(whole["model"][k], v) == all(s not in k for s in ("c_attn.weight", "c_fc.weight", "ln_")), k
    assert whole["lora"]["rank"] == 4 and whole["lora"]["base"] == base
    gpt = tiny_gpt()
    assert whole["lora"]["base_sha256"] == weights_hash(gpt)
    # the merged weights are the base plus the saved adapters' update (and the trained LayerNorms)
    add_lora(gpt, 4, 8.0, 0.0, "c_attn,c_fc", norms=True)
    load_adapters(gpt, whole["lora"]["adapters"])
    assert all(torch.equal(v, whole["model"][k]) for k, v in merged_state_dict(gpt).items())

    out_dir = tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    p = subprocess.Popen([sys.executable, "finetune.py", *args, f"--out_dir={out_dir}"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("saved ") and "(iteration 3)" in line:
            p.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + p.communicate(timeout=120)[0]
    assert p.returncode == 128 + signal.SIGINT, output
    at = load_checkpoint(str(out_dir))["resume"]["iter_num"]
    assert at in (4, 5), output
    capsys.readouterr()
    run_here("finetune.py", ["--init_from=resume", f"--out_dir={out_dir}"], monkeypatch)
    assert f"(sft, iteration {at:,}) with its saved config" in capsys.readouterr().out
    assert [r["loss"] for r in read_log(out_dir, "train")] == [r["loss"] for r in read_log(tmp_path / "whole",
                                                                                          "train")]
    resumed = load_checkpoint(str(out_dir))
    assert all(torch.equal(resumed["model"][k], v) for k, v in whole["model"].items())
    assert all(torch.equal(resumed["lora"]["adapters"][k], v) for k, v in whole["lora"]["adapters"].items())
    # the base was overwritten since: the run cannot continue exactly, and says so
    save_checkpoint(make_checkpoint("pretrain", tiny_gpt(seed=3).state_dict(), vars(gpt.config), {},
                                    {"tokenizer": "gpt2"}), base)
    with pytest.raises(ValueError, match=r"the base model of this LoRA run, .* has changed since the run started"):
        run_here("finetune.py", ["--init_from=resume", f"--out_dir={out_dir}", "--max_iters=12"], monkeypatch)


def test_finetune_lora_refuses_scratch_and_bad_keys(tmp_path, monkeypatch):
    data = facts_json(tmp_path / "facts.json")
    with pytest.raises(ValueError, match=r"LoRA \(lora_rank=4\) adapts a pre-trained model.*init_from='scratch'"):
        run_here("finetune.py", [f"--dataset={data}", "--init_from=scratch", *TINY, "--lora_rank=4",
                                 f"--out_dir={tmp_path / 'out'}"], monkeypatch)
    with pytest.raises(ValueError, match=r"lora_alpha must be > 0.*got -1.0"):
        run_here("finetune.py", [f"--dataset={data}", "--init_from=gpt2", *TINY, "--lora_rank=4",
                                 "--lora_alpha=-1", f"--out_dir={tmp_path / 'out'}"], monkeypatch)


def test_align_lora_trains_the_adapters_and_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    """align.py --lora_rank=4: the saved DPO model differs from its start in the targets only, and a run stopped
    at a checkpoint (a 4-step run, then --max_iters=8 on resume) ends where an 8-step run ends, bit for bit."""
    base, pairs = base_checkpoint(tmp_path), pairs_jsonl(tmp_path / "pairs.jsonl")
    args = [f"--init_from={base}", f"--dataset={pairs}", "--val_split=", "--val_pairs=8", *TINY, "--batch_size=4",
            "--total_batch_pairs=8", "--learning_rate=1e-2", "--warmup_iters=1", "--eval_interval=4",
            "--log_interval=1", "--lora_rank=4", "--lora_alpha=8", "--lora_targets=c_attn,c_proj,c_fc"]
    run_here("align.py", args + ["--max_iters=8", f"--out_dir={tmp_path / 'whole'}"], monkeypatch)
    run_here("align.py", args + ["--max_iters=4", f"--out_dir={tmp_path / 'legs'}"], monkeypatch)
    run_here("align.py", ["--init_from=resume", f"--out_dir={tmp_path / 'legs'}", "--max_iters=8"], monkeypatch)
    capsys.readouterr()
    whole, legs, start = (load_checkpoint(str(tmp_path / d)) for d in ("whole", "legs", "base"))
    assert whole["kind"] == "dpo" and whole["lora"]["base"] == base
    for k, v in start["model"].items():
        assert torch.equal(whole["model"][k], v) == (".attn.c_" not in k and ".mlp.c_" not in k or "bias" in k), k
    assert all(torch.equal(legs["model"][k], v) for k, v in whole["model"].items())
    assert [r["dpo_loss"] for r in read_log(tmp_path / "legs", "train")] == \
        [r["dpo_loss"] for r in read_log(tmp_path / "whole", "train")]


def test_finetune_lora_under_ddp_equals_one_process(tmp_path, monkeypatch):
    """2 ranks x batch 4 (torchrun) see at each step the 8 records one process sees as one batch: with LoRA (frozen
    base weights, which DDP leaves out of its gradient reduction) the logged losses and the saved adapters agree."""
    base = base_checkpoint(tmp_path)
    args = [f"--dataset={facts_json(tmp_path / 'facts.json')}", f"--init_from={base}", *TINY, "--batching=random",
            "--max_iters=2", "--val_fraction=0.2", "--eval_interval=2", "--eval_iters=2", "--log_interval=1",
            "--sample_interval=0", "--learning_rate=1e-3", "--warmup_iters=0", "--lora_rank=4", "--lora_alpha=8"]
    run_here("finetune.py", args + [f"--out_dir={tmp_path / 'one'}", "--batch_size=8"], monkeypatch)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "finetune.py", *args, f"--out_dir={tmp_path / 'ddp'}", "--batch_size=4"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    a, b = read_log(tmp_path / "one", "train"), read_log(tmp_path / "ddp", "train")
    assert len(a) == len(b) == 2 and max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-6, (a, b)
    one, ddp = (load_checkpoint(str(tmp_path / d))["lora"]["adapters"] for d in ("one", "ddp"))
    assert max((one[k] - ddp[k]).abs().max().item() for k in one) < 1e-6
