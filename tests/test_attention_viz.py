"""
attention_viz.py: the weights shown are the model's own, the statistics mean what they say, and every output
file is written, readable and not blank. Tiny models (2 layers, 2 heads, 32 dims, block 32), CPU, fixed seeds.
"""

import json
import math
import os
import re
import runpy
import subprocess
import sys
from html.parser import HTMLParser

import attention_viz as av
import pytest
import torch
from torch.nn import functional as F

from lib.checkpoint import save_checkpoint
from lib.tokenizer import CharTokenizer, get_tokenizer
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;!?'\n$<>/&"
CHAR_PROMPT = "ROMEO:\nBut soft, light <b>&</b>?"  # 32 characters: the whole block
BPE_PROMPT = "The trophy would not fit in the suitcase </script> because it was too large. I needed a larger"


def tiny_model(vocab_size: int, seed: int = 0) -> GPT:
    """A random tiny GPT whose attention is far from uniform: larger query/key weights and non-trivial
    LayerNorms, so that a wrong scale, mask or head split would show."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=vocab_size, bias=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_attn" in name:
                p.normal_(0.0, 0.3)
            elif "ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def save_tiny(folder, tok, vocab_size: int):
    model = tiny_model(vocab_size)
    args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    save_checkpoint({"model": model.state_dict(), "model_args": args, "optimizer": None, "iter_num": 0,
                     "best_val_loss": 0.0, "config": {"out_dir": str(folder)}, "tokenizer": tok.meta()},
                    os.path.join(folder, "ckpt.pt"))
    return model


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("char")
    tok = CharTokenizer.from_text(CHARS)
    return folder, save_tiny(folder, tok, tok.n_vocab), tok


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    return folder, save_tiny(folder, get_tokenizer("gpt2"), 50257), get_tokenizer("gpt2")

# ----------------------------------------------------------------------------------------------
# the weights are the model's own


def recompute_attention(model: GPT, idx: torch.Tensor) -> list:
    """softmax(QK^T/sqrt(hs) + causal mask) per layer and head, from the parameters alone, in float64, with
    LayerNorm, GELU and the head split written out by hand (no model code)."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    C, nh, T = cfg.n_embd, cfg.n_head, idx.size(1)
    hs = C // nh

    def ln(x, p):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)  # -inf above the diagonal
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    out = []
    for l in range(cfg.n_layer):
        p = f"transformer.h.{l}."
        q, k, v = lin(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=-1)
        y, layer = torch.zeros_like(x), []
        for h in range(nh):
            s = slice(h * hs, (h + 1) * hs)
            a = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(hs) + mask, dim=-1)
            layer.append(a)
            y[..., s] = a @ v[..., s]
        out.append(torch.stack(layer, dim=1))  # (B, nh, T, T)
        x = x + lin(y, p + "attn.c_proj")
        u = lin(ln(x, p + "ln_2"), p + "mlp.c_fc")
        x = x + lin(0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3))), p + "mlp.c_proj")
    return out


def test_weights_equal_independent_recomputation():
    model = tiny_model(vocab_size=70, seed=1)
    idx = torch.randint(0, 70, (2, 29), generator=torch.Generator().manual_seed(0))
    att = av.attention_maps(model, idx)  # (n_layer, B, nh, T, T)
    assert att.shape == (2, 2, 2, 29, 29) and att.dtype == torch.float32
    ref = recompute_attention(model, idx)
    for l in range(2):
        err = (att[l].double() - ref[l]).abs().max().item()
        assert err <= 1e-6, f"layer {l}: extracted weights differ from the recomputation by {err:.2e}"
    assert (att.sum(-1) - 1).abs().max() <= 1e-6, "rows must sum to 1"
    assert (att.triu(1) == 0).all(), "a token must not attend to later tokens"
    assert att.max() > 0.5, "the test model's attention is nearly uniform: the comparison would be weak"

# (the statistics themselves, on hand-built patterns: tests/test_heads.py)

# ----------------------------------------------------------------------------------------------
# tokens, labels and bad input


def test_token_texts_and_labels():
    tok = get_tokenizer("gpt2")
    texts = av.token_texts(tok, tok.encode("a larger\nsuitcase"))
    assert "".join(texts) == "a larger\nsuitcase" and " larger" in texts
    assert av.display_label(" larger") == "␣larger" and av.display_label("\n") == "\\n"
    assert av.display_label("\t\x00") == "\\t\\x00"
    assert av.display_label("x" * 30) == "x" * 11 + "…"
    crest = av.token_texts(tok, tok.encode("🐍"))  # one character, several byte tokens
    assert all("\ufffd" not in t for t in crest), f"partial bytes must show as escapes: {crest}"
    char = CharTokenizer.from_text(CHARS)
    assert av.token_texts(char, char.encode("a b")) == ["a", " ", "b"]


def test_bad_input_is_refused_with_the_valid_range():
    char = CharTokenizer.from_text(CHARS)
    with pytest.raises(ValueError, match="prompt is empty"):
        av.encode_prompt(char, "", 32)
    with pytest.raises(ValueError, match=r"prompt is 40 tokens but .* block_size=32; shorten --text"):
        av.encode_prompt(char, "a" * 40, 32)
    with pytest.raises(ValueError, match=r"cannot encode --text .*'7'"):
        av.encode_prompt(char, "route 7", 32)
    assert av.encode_prompt(char, "a" * 32, 32) == [char.stoi["a"]] * 32
    with pytest.raises(ValueError, match=r"--layer=2 is out of range: this model has 2 layers, valid layers are "
                                         r"0\.\.1 or -2\.\.-1"):
        av.check_index("layer", 2, 2)
    with pytest.raises(ValueError, match=r"--head=-4 is out of range: .* valid heads are 0\.\.2 or -3\.\.-1"):
        av.check_index("head", -4, 3)
    with pytest.raises(TypeError, match="--head must be an integer, got 'x'"):
        av.check_index("head", "x", 3)
    assert av.check_index("layer", -2, 12) == 10

    texts = ["The", " gold", " trophy", "\n", " larger", ".", " larger"]
    assert av.find_query(" larger", texts) == 6 and av.find_query("larger", texts) == 6, "last occurrence"
    assert av.find_query("gold trophy", texts) == 2, "a span: the token that ends it"
    assert av.find_query(-1, texts) == 6 and av.find_query(0, texts) == 0
    with pytest.raises(ValueError, match=r"--query=7 is out of range for a prompt of 7 tokens: valid positions "
                                         r"are 0\.\.6 or -7\.\.-1"):
        av.find_query(7, texts)
    with pytest.raises(ValueError, match=r"--query='suitcase' is not in the prompt; .* 1:' gold'"):
        av.find_query("suitcase", texts)
    with pytest.raises(TypeError, match="--query must be a token position or a token's text"):
        av.find_query(1.5, texts)


def run_main(monkeypatch, *args):
    """Run the script's main block in this process (fast: no new interpreter)."""
    monkeypatch.setattr(sys, "argv", ["attention_viz.py", *args])
    runpy.run_path(os.path.join(REPO, "attention_viz.py"), run_name="__main__")


def test_script_refuses_bad_flags_before_writing(char_ckpt, tmp_path, monkeypatch, capsys):
    folder, _, _ = char_ckpt
    ckpt = str(folder / "ckpt.pt")
    for flags, err, match in [
        (["--layer=2"], ValueError, r"valid layers are 0\.\.1 or -2\.\.-1"),
        (["--head=-3"], ValueError, r"valid heads are 0\.\.1 or -2\.\.-1"),
        (["--head=True"], TypeError, "--head must be an integer"),
        (["--text=" + "a" * 33], ValueError, "prompt is 33 tokens but the model sees at most block_size=32"),
        (["--text="], ValueError, "prompt is empty"),
        (["--text=FILE:" + str(tmp_path / "missing.txt")], FileNotFoundError, "missing.txt"),
        (["--query=zebra"], ValueError, "--query='zebra' is not in the prompt"),
        (["--gamma=0"], ValueError, r"--gamma must be in \(0, 1\]"),
        (["--top_k=0"], ValueError, "--top_k must be >= 1, got 0"),
        (["--text=R", "--summary=True"], ValueError, "--summary needs a prompt of at least 2 tokens, got 1"),
    ]:
        with pytest.raises(err, match=match):
            run_main(monkeypatch, f"--init_from={ckpt}", f"--out_dir={tmp_path / 'out'}", "--text=ROMEO:", *flags)
    with pytest.raises(ValueError, match="init_from='resume' reads out_dir/ckpt.pt: pass the run's folder"):
        run_main(monkeypatch)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out"), "nothing written on bad input"

# ----------------------------------------------------------------------------------------------
# output files


def png_size(path) -> tuple:
    """(width, height) read back from the file, and a check that the picture is not blank."""
    from matplotlib.image import imread
    img = imread(path)  # (H, W, 4) floats
    colours = len(set(map(tuple, img.reshape(-1, img.shape[-1])[::7].tolist())))
    assert colours > 30, f"{path} looks blank: only {colours} distinct colours"
    return img.shape[1], img.shape[0]


class Spans(HTMLParser):
    """The texts of <span class="tok"> elements and the contents of every <script>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tokens, self.scripts, self.script_srcs, self._in = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "tok":
            self._in = "tok"
            self.tokens.append("")
        elif tag == "script":
            self._in = "script"
            self.scripts.append("")
            self.script_srcs.append(attrs.get("src"))

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "tok":
            self.tokens[-1] += data
        elif self._in == "script":
            self.scripts[-1] += data


def check_html(path, texts: list, att: torch.Tensor, layers=None):
    page = open(path, encoding="utf-8").read()
    parser = Spans()
    parser.feed(page)
    parser.close()
    assert parser.tokens == texts, "every token appears once, in order, as its own span"
    assert parser.script_srcs == [None, None] and "http" not in page and "<link" not in page, "self-contained"
    data = json.loads(parser.scripts[0])
    assert data["tokens"] == texts
    layers = list(range(att.size(0))) if layers is None else layers
    assert data["layers"] == layers
    tri = torch.tril_indices(len(texts), len(texts))
    expected = (att[layers][:, :, tri[0], tri[1]] * 1000).round().int().tolist()
    assert data["w1000"] == expected, "the page holds the model's weights (lower triangles, x1000)"


def test_html_keeps_one_layer_when_all_would_be_too_large(tmp_path, capsys):
    mask = torch.full((6, 6), float("-inf")).triu(1)
    att = torch.softmax(torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0)) + mask, dim=-1)
    texts = ["<a>", " b", "&", "\n", "é", "c"]
    path = tmp_path / "a.html"
    assert av.write_html(att, texts, str(path), "t", 1, 0.5, max_values=100) == os.path.getsize(path)
    out = capsys.readouterr().out
    assert "WARNING: all 3 layers x 2 heads at 6 tokens" in out
    assert "holds layer 1 only (choose another with --layer=N" in out
    check_html(path, texts, att, layers=[1])
    av.write_html(att, texts, str(path), "t", 1, 0.5)
    check_html(path, texts, att)


def written(stdout: str) -> dict:
    """{file name: (width, height)} from the script's 'wrote PATH (WxH px)' lines."""
    return {os.path.basename(p): (int(w), int(h)) for p, w, h in re.findall(r"wrote (\S+) \((\d+)x(\d+) px\)", stdout)}


def run_script(*args):
    r = subprocess.run([sys.executable, "attention_viz.py", *args, "--device=cpu"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_script_char_checkpoint_every_view(char_ckpt):
    folder, model, tok = char_ckpt
    out = run_script(f"--init_from={folder}", f"--text={CHAR_PROMPT}", "--query=light", "--summary=True",
                     "--html=True", "--induction_batch=2")
    pngs = written(out)
    q = av.find_query("light", av.token_texts(tok, tok.encode(CHAR_PROMPT)))
    assert set(pngs) == {"attention_layer1.png", f"attention_layer1_query{q}.png", "attention_summary.png"}, out
    for name, size in pngs.items():
        assert png_size(folder / name) == size and min(size) >= 200, name  # the checkpoint's folder by default
    assert f"query: token {q} 't', layer 1: top-5 attended tokens" in out
    assert re.search(r"head mean: (\d\.\d{3} \d+:'.*' \| ){4}\d\.\d{3} \d+:", out), out
    assert re.search(r"previous-token heads \(score >= 0\.4\): ", out) and "induction heads" in out
    record = json.load(open(folder / "attention_summary.json"))
    for key in ("entropy", "sink", "prev_token", "induction"):
        assert len(record[key]) == 2 and all(len(row) == 2 for row in record[key]), key
    assert all(0 <= x <= 1 for key in ("sink", "prev_token", "induction") for row in record[key] for x in row)
    assert record["induction_len"] == 16 and record["prompt_tokens"] == len(CHAR_PROMPT)
    ids = tok.encode(CHAR_PROMPT)
    check_html(folder / "attention.html", av.token_texts(tok, ids), av.attention_maps(model, torch.tensor([ids]))[:, 0])


def test_script_bpe_checkpoint_head_and_query(bpe_ckpt, monkeypatch, capsys):
    """In this process (the char-level test above runs the script as a subprocess): saves a torch import."""
    folder, model, tok = bpe_ckpt
    run_main(monkeypatch, "--init_from=resume", f"--out_dir={folder}", f"--text={BPE_PROMPT}", "--layer=-2",
             "--head=1", "--query=larger", "--html=True", "--device=cpu")
    out = capsys.readouterr().out
    ids = tok.encode(BPE_PROMPT)
    T = len(ids)
    pngs = written(out)
    assert set(pngs) == {"attention_layer0_head1.png", f"attention_layer0_query{T - 1}.png"}, out
    for name, size in pngs.items():
        assert png_size(folder / name) == size, name
    assert f"query: token {T - 1} ' larger', layer 0" in out and "head    1: " in out and "head    0" not in out
    texts = av.token_texts(tok, ids)
    check_html(folder / "attention.html", texts, av.attention_maps(model, torch.tensor([ids]))[:, 0])
    assert "</script>" in "".join(texts), "the prompt's own '</script>' must not end the data script early"
