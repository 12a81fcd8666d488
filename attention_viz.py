"""
See what a GPT attends to: every head of a layer as heatmaps, one head up close, where one token looks,
per-head statistics that find previous-token and induction heads, and an HTML page to explore by hovering.

    python attention_viz.py --out_dir=out-shakespeare-char --text="O Romeo, Romeo! wherefore art thou Romeo?" \
        --summary=True --html=True
    python attention_viz.py --init_from=gpt2-large --text="The gold trophy would not fit in the brown suitcase \
because it was too large. I needed a larger" --layer=-2 --query=larger
    python attention_viz.py --init_from=gpt2 --layer=5 --head=1 --html=True

Written to out_dir (default: the checkpoint's folder, or out-attention for gpt2*); every path is printed:
    attention_layer{L}.png           every head of layer L, one heatmap each (always, unless --head is given)
    attention_layer{L}_head{H}.png   --head=H: that head alone, with the weights in the cells for short prompts
    attention_layer{L}_query{i}.png  --query: where token i looks, one row per head; top-k printed as well
    attention_summary.png/.json      --summary: layer x head maps of entropy, first-token sink, previous-token
                                     and induction scores; the heads that look like either are printed
    attention.html                   --html: hover a token to see its attention, any layer/head, no network

The weights are the model's own: model.forward(return_attn=True) computes softmax(QK^T/sqrt(hs) + mask)
explicitly, in float32 by default. A prompt longer than block_size is refused rather than cropped, so every
picture shows exactly the text that was asked for.
"""

import json
import math
import os
import sys

import torch

from configurator import configure
from lib.checkpoint import GPT2_NAMES
from lib.errors import install
from lib.heads import (attention_maps, data_token_ids, flag_heads, head_stats,
                       induction_score, repeated_random_tokens)
from lib.models import load_model
from lib.runtime import print0, setup_runtime

# ----------------------------------------------------------------------------------------------
# defaults; override with a config file and/or --key=value
# model
init_from = "resume"  # 'resume' (out_dir/ckpt_name), a checkpoint file or folder, or 'gpt2'|'gpt2-medium'|...
out_dir = ""  # checkpoint folder for 'resume'; pictures go here. '' = the checkpoint's folder; out-attention for gpt2*
ckpt_name = "ckpt.pt"  # file inside out_dir for init_from='resume'
device = "cpu"  # 'cpu' | 'cuda' | 'cuda:N' | 'mps' | 'auto'
dtype = "float32"  # 'float32' shows the exact weights; 'bfloat16' | 'float16' save memory on a GPU
seed = 1337  # the random token sequences of --summary
# what to show
text = "The gold trophy would not fit in the brown suitcase because it was too large. I needed a larger"  # or FILE:path
layer = -1  # layer index; negative counts from the end (-1 = last layer)
head = None  # None = every head of the layer in a grid; an int = that head alone, large
query = None  # None, a token position (int, negative from the end) or a token's text ('larger': last occurrence)
top_k = 5  # attended tokens printed per head for --query
summary = False  # layer x head statistics, and the heads that look like previous-token / induction heads
html = False  # write attention.html (all layers and heads of the prompt)
# statistics (--summary)
induction_len = 64  # length L of the random sequence that is repeated (capped by block_size and the vocabulary)
induction_batch = 8  # random sequences averaged
induction_data = ""  # token files whose ids the random sequences are drawn from; '' = the model's training data
flag_threshold = 0.4  # listed as a previous-token / induction head from this score (uniform attention: 1/(t+1))
# looks
gamma = 0.5  # colour ~ weight**gamma: 1 = linear, 0.5 keeps small weights visible next to an attention sink
annotate_max = 24  # write the weights in the cells of the --head picture up to this many tokens
dpi = 100  # resolution: 100 gives the sizes printed, 200 doubles them

# ----------------------------------------------------------------------------------------------
# tokens, checks, the attention itself


def token_texts(tok, ids: list) -> list:
    """Each token decoded on its own, from its bytes: a character split across GPT-2 tokens shows as \\xNN escapes
    rather than as replacement characters."""
    return [tok.token_bytes([i]).decode("utf-8", errors="backslashreplace") for i in ids]


def display_label(s: str, max_chars: int = 12) -> str:
    """A token as an axis label: whitespace made visible (space -> '␣', newline -> '\\n'), truncated with '…'."""
    s = s.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    s = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)
    return s if len(s) <= max_chars else s[:max_chars - 1] + "…"


def check_index(name: str, value, n: int) -> int:
    """A layer or head index in [-n, n) -> [0, n), or an error naming the valid range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"--{name} must be an integer, got {value!r} ({type(value).__name__}); e.g. --{name}=0")
    if not -n <= value < n:
        raise ValueError(f"--{name}={value} is out of range: this model has {n} {name}s, valid {name}s are "
                         f"0..{n - 1} or -{n}..-1 (e.g. --{name}={n - 1})")
    return value % n


def encode_prompt(tok, prompt: str, block_size: int) -> list:
    """Token ids of the prompt; empty or longer than block_size is an error (we refuse rather than crop)."""
    if not prompt:
        raise ValueError("the prompt is empty: pass some text with --text=\"...\" (or --text=FILE:path)")
    try:
        ids = tok.encode(prompt)
    except ValueError as e:
        raise ValueError(f"cannot encode --text with this model's tokenizer (edit the text): {e}") from e
    if len(ids) > block_size:
        raise ValueError(f"the prompt is {len(ids)} tokens but the model sees at most block_size={block_size}; "
                         f"shorten --text (its last {block_size} tokens start at "
                         f"{tok.decode(ids[-block_size:])[:40]!r})")
    return ids


def find_query(q, texts: list) -> int:
    """The position asked for by --query: an int (negative from the end), or text: a token equal to it (or
    equal once surrounding whitespace is dropped), else the token that ends it in the prompt ('light' in a
    character-level prompt). The last occurrence wins: it has the most context to attend to."""
    T = len(texts)
    if isinstance(q, bool) or not isinstance(q, (int, str)):
        raise TypeError(f"--query must be a token position or a token's text, got {q!r}; e.g. --query=-1")
    if isinstance(q, int):
        if not -T <= q < T:
            raise ValueError(f"--query={q} is out of range for a prompt of {T} tokens: valid positions are "
                             f"0..{T - 1} or -{T}..-1")
        return q % T
    hits = [i for i, t in enumerate(texts) if t == q] or [i for i, t in enumerate(texts) if t.strip() == q.strip()]
    if hits:
        return hits[-1]
    joined, q = "".join(texts), q.strip() or q
    at = joined.rfind(q) if q else -1
    if at < 0:
        shown = ", ".join(f"{i}:{t!r}" for i, t in enumerate(texts[:60]))
        raise ValueError(f"--query={q!r} is not in the prompt; pass a token position or a token's text, one of: "
                         f"{shown}")
    ends = torch.tensor([len(t) for t in texts]).cumsum(0)  # (T,) end offset of each token in joined
    return int((ends > at + len(q) - 1).nonzero()[0])


# ----------------------------------------------------------------------------------------------
# pictures (matplotlib, imported here only)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    matplotlib.rcParams["text.parse_math"] = False  # a token such as '$' is text, not TeX
    import matplotlib.pyplot as plt
    return plt


def _canvas(plt, dpi: int, nrows: int, ncols: int, cell_w: int, cell_h: int, left: int, bottom: int, top: int,
            right: int, gap_x: int = 0, gap_y: int = 0):
    """A figure laid out in pixels at 100 dpi (--dpi only scales it): nrows x ncols axes of cell_w x cell_h
    between fixed margins, so label room is explicit and the PNG size is known. -> (fig, axes[r][c])."""
    W = left + ncols * cell_w + (ncols - 1) * gap_x + right
    H = top + nrows * cell_h + (nrows - 1) * gap_y + bottom
    fig = plt.figure(figsize=(W / 100, H / 100), dpi=dpi)
    axes = [[fig.add_axes(((left + c * (cell_w + gap_x)) / W, (bottom + (nrows - 1 - r) * (cell_h + gap_y)) / H,
                           cell_w / W, cell_h / H)) for c in range(ncols)] for r in range(nrows)]
    return fig, axes


def _colorbar(fig, im, right_px: int, label: str):
    """A colour bar in the right margin (right_px wide), over the middle half of the figure's height."""
    W, H = fig.get_size_inches() * 100
    cax = fig.add_axes((1 - (right_px - 20) / W, 0.25, 14 / W, 0.5))
    fig.colorbar(im, cax=cax, label=label)


def _save(plt, fig, path: str, dpi: int, title: str) -> tuple:
    """Title the figure, write it, say where and how large; returns (width, height) in pixels."""
    fig.suptitle(title, fontsize=10, y=1 - 8 / (fig.get_size_inches()[1] * 100), va="top")
    tmp = path + ".tmp.png"  # write then rename: a failed run never leaves a half-written picture
    fig.savefig(tmp, dpi=dpi)
    width, height = fig.canvas.get_width_height()
    plt.close(fig)
    os.replace(tmp, path)
    print0(f"wrote {path} ({width}x{height} px)")
    return width, height


def _ticks(ax, texts: list, axis: str, max_labels: int, fontsize: float, show: bool = True):
    """Token labels on one axis, every k-th one when there are more than max_labels."""
    step = max(1, math.ceil(len(texts) / max_labels))
    pos = list(range(0, len(texts), step))
    labels = [display_label(texts[i]) if show else "" for i in pos]
    if axis == "x":
        ax.set_xticks(pos, labels, rotation=90, fontsize=fontsize)
    else:
        ax.set_yticks(pos, labels, fontsize=fontsize)


def _label_px(texts: list, fontsize: float) -> int:
    """Pixels needed by the longest token label at fontsize (about 0.65 em per character)."""
    return int(max(len(display_label(t)) for t in texts) * 0.65 * fontsize * 100 / 72) + 14


def _masked(w: torch.Tensor):
    """(T, T) weights -> numpy with NaN above the diagonal, drawn blank (the causal mask)."""
    T = w.size(-1)
    return w.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("nan")).numpy()


def _cells(ax, w: torch.Tensor, norm, fontsize: float):
    """Write each weight in its cell ('.62'; blank above the diagonal), dark text on light colours."""
    for r in range(w.size(0)):
        for c in range(w.size(1)):
            x = float(w[r, c])
            if not math.isnan(x):
                ax.text(c, r, "1" if x >= 0.995 else f"{x:.2f}"[1:], ha="center", va="center", fontsize=fontsize,
                        color="black" if norm(x) > 0.6 else "white")


def _heatmap(ax, w, gamma: float):
    """Weights on a shared 0..1 scale, colour ~ weight**gamma; NaN (the causal mask) left white."""
    import matplotlib
    from matplotlib.colors import PowerNorm
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    norm = PowerNorm(gamma, vmin=0.0, vmax=1.0)
    return ax.imshow(w, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto"), norm


def plot_layer(att: torch.Tensor, texts: list, path: str, title: str, gamma: float, dpi: int) -> tuple:
    """att (nh, T, T): one heatmap per head in a grid, shared colour scale, token labels on the outer axes."""
    plt = _pyplot()
    nh, T = att.size(0), att.size(-1)
    ncols = math.ceil(math.sqrt(nh))
    nrows = math.ceil(nh / ncols)
    panel = min(max(14 * T, 240), 480)  # pixels per heatmap
    fs = 7 if T <= 32 else 6
    margin = _label_px(texts, fs)
    fig, axes = _canvas(plt, dpi, nrows, ncols, panel, panel, left=margin + 10, bottom=margin + 6, top=80,
                        right=130, gap_x=14, gap_y=28)
    for i, ax in enumerate(a for row in axes for a in row):
        if i >= nh:
            ax.axis("off")
            continue
        im, _ = _heatmap(ax, _masked(att[i]), gamma)
        ax.set_title(f"head {i}", fontsize=9)
        _ticks(ax, texts, "x", panel // 11, fs, show=i >= nh - ncols)  # labels on the outer axes only
        _ticks(ax, texts, "y", panel // 11, fs, show=i % ncols == 0)
    _colorbar(fig, im, 130, f"attention weight (colour ~ weight^{gamma:g}); rows: queries")
    return _save(plt, fig, path, dpi, title)


def plot_head(att: torch.Tensor, texts: list, path: str, title: str, gamma: float, dpi: int,
              annotate_max: int) -> tuple:
    """att (T, T) of one head: one large heatmap, the weights written in the cells for short prompts."""
    plt = _pyplot()
    T = att.size(-1)
    annotate = T <= annotate_max
    side = min(max((32 if annotate else 10) * T, 480), 1200)
    margin = _label_px(texts, 8)
    fig, axes = _canvas(plt, dpi, 1, 1, side, side, left=margin + 30, bottom=margin + 30, top=70, right=140)
    ax = axes[0][0]
    w = _masked(att)
    im, norm = _heatmap(ax, w, gamma)
    _ticks(ax, texts, "x", side // 12, 8)
    _ticks(ax, texts, "y", side // 12, 8)
    if annotate:
        _cells(ax, torch.from_numpy(w), norm, 7 if side / T >= 30 else 6)
    ax.set_xlabel("key (attended token)")
    ax.set_ylabel("query (attending token)")
    _colorbar(fig, im, 140, f"attention weight (colour ~ weight^{gamma:g})")
    return _save(plt, fig, path, dpi, title)


def plot_query(att: torch.Tensor, texts: list, q: int, path: str, title: str, gamma: float, dpi: int) -> tuple:
    """att (nh, T, T): row q of every head plus their mean, as shaded text: one row per head over tokens 0..q."""
    plt = _pyplot()
    rows = torch.cat([att[:, q, :q + 1], att[:, q, :q + 1].mean(0, keepdim=True)])  # (nh + 1, q + 1)
    nh, n = att.size(0), q + 1
    cell = 34 if n <= 40 else max(1400 // n, 1)  # pixels per token: at most ~1400 wide
    margin = _label_px(texts[:n], 8)
    fig, axes = _canvas(plt, dpi, 1, 1, max(n * cell, 300), (nh + 1) * 24, left=80, bottom=margin + 30, top=70,
                        right=130)
    ax = axes[0][0]
    im, norm = _heatmap(ax, rows.numpy(), gamma)
    _ticks(ax, texts[:n], "x", max(n * cell // 14, 1), 8)
    ax.set_yticks(range(nh + 1), [f"head {h}" for h in range(nh)] + ["mean"], fontsize=8)
    if n <= 40:
        _cells(ax, rows, norm, 6)
    ax.set_xlabel(f"earlier tokens (0..{q})")
    _colorbar(fig, im, 130, f"attention weight (colour ~ weight^{gamma:g})")
    return _save(plt, fig, path, dpi, title)


def plot_summary(stats: dict, path: str, title: str, dpi: int) -> tuple:
    """stats {name: (n_layer, nh)}: one layer x head map per statistic, values written when they fit."""
    plt = _pyplot()
    n_layer, nh = next(iter(stats.values())).shape
    cell = min(max(480 // max(n_layer, nh), 10), 40)
    fig, axes = _canvas(plt, dpi, 1, len(stats), max(nh * cell, 120), n_layer * cell, left=60, bottom=50, top=80,
                        right=70, gap_x=100)
    for ax, (name, v) in zip(axes[0], stats.items()):
        vmax = max(float(v.max()), 1e-9) if name.startswith("entropy") else 1.0
        im = ax.imshow(v.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="auto")
        if cell >= 28:
            for l in range(n_layer):
                for h in range(nh):
                    ax.text(h, l, f"{float(v[l, h]):.2f}", ha="center", va="center", fontsize=6,
                            color="black" if float(v[l, h]) > 0.6 * vmax else "white")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(0, nh, math.ceil(nh / 12)))
        ax.set_yticks(range(0, n_layer, math.ceil(n_layer / 24)))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.08, pad=0.04)
    return _save(plt, fig, path, dpi, title)

# ----------------------------------------------------------------------------------------------
# the HTML page: tokens as spans, the weights as JSON in our own <script>, nothing fetched


HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>attention: %(title)s</title>
<style>
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
#text { font-family: monospace; font-size: 15px; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ccc;
        padding: 1em; }
.tok { border-radius: 3px; cursor: pointer; }
.tok.q { outline: 2px solid #d33; }
#info { font-family: monospace; min-height: 3em; margin-top: 1em; white-space: pre; }
</style></head><body>
<h3>%(title)s</h3>
<p>Hover a token to shade every earlier token by how much it attends to it (click to pin, click again to free).</p>
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<div id="text">%(spans)s</div>
<div id="info"></div>
<script id="attention-data" type="application/json">%(data)s</script>
<script>
const D = JSON.parse(document.getElementById("attention-data").textContent);
const toks = document.querySelectorAll(".tok"), L = document.getElementById("layer"),
      H = document.getElementById("head"), info = document.getElementById("info");
let pinned = null, current = null;
D.layers.forEach((n, i) => L.add(new Option("layer " + n, i)));
for (let h = 0; h < D.n_head; h++) H.add(new Option("head " + h, h));
H.add(new Option("mean of heads", -1));
L.value = D.layer; H.value = D.n_head > 1 ? -1 : 0;
function row(q) {  // weights of query q over keys 0..q: w1000 holds each head's lower triangle, x1000
  const l = +L.value, h = +H.value, off = q * (q + 1) / 2, out = new Array(q + 1).fill(0);
  const heads = h < 0 ? [...Array(D.n_head).keys()] : [h];
  for (const k of heads) for (let j = 0; j <= q; j++) out[j] += D.w1000[l][k][off + j] / 1000 / heads.length;
  return out;
}
function show(q) {
  current = q;
  const w = q === null ? [] : row(q);
  toks.forEach((t, j) => {
    const a = j < w.length ? Math.pow(w[j], D.gamma) : 0;
    t.style.background = a > 0 ? "rgba(30, 90, 220, " + a.toFixed(3) + ")" : "";
    t.classList.toggle("q", j === q);
    t.title = j < w.length ? "weight " + w[j].toFixed(3) : "";
  });
  if (q === null) { info.textContent = ""; return; }
  const top = w.map((v, j) => [v, j]).sort((a, b) => b[0] - a[0]).slice(0, 5);
  info.textContent = "token " + q + " " + JSON.stringify(D.tokens[q]) + " attends to:\\n" +
    top.map(([v, j]) => "  " + v.toFixed(3) + "  " + j + " " + JSON.stringify(D.tokens[j])).join("\\n");
}
toks.forEach((t, i) => {
  t.addEventListener("mouseenter", () => { if (pinned === null) show(i); });
  t.addEventListener("click", () => { pinned = pinned === i ? null : i; show(i); });
});
[L, H].forEach(s => s.addEventListener("change", () => show(pinned !== null ? pinned : current)));
</script></body></html>
"""


def write_html(att: torch.Tensor, texts: list, path: str, title: str, layer: int, gamma: float,
               max_values: int = 5_000_000) -> int:
    """att (n_layer, nh, T, T) -> a self-contained page; returns its size in bytes. Only the lower triangles
    are stored, as integers in thousandths. When every layer would hold more than max_values weights (about
    3 bytes each), only `layer` is kept, with a warning."""
    import html as htmlmod
    n_layer, nh, T, _ = att.shape
    layers = list(range(n_layer))
    if n_layer * nh * T * (T + 1) // 2 > max_values:
        print0(f"WARNING: all {n_layer} layers x {nh} heads at {T} tokens would make a page of about "
               f"{3 * n_layer * nh * T * (T + 1) // 2 / 1e6:.0f} MB; attention.html holds layer {layer} only "
               f"(choose another with --layer=N, or shorten --text)")
        layers = [layer]
    tri = torch.tril_indices(T, T)  # row-major (q, k) with k <= q: row q starts at q(q+1)/2
    w1000 = (att[layers][:, :, tri[0], tri[1]] * 1000).round().int().tolist()  # (layers, nh, T(T+1)/2)
    data = {"tokens": texts, "n_head": nh, "layers": layers, "layer": layers.index(layer), "gamma": gamma,
            "w1000": w1000}
    spans = "".join(f'<span class="tok" data-i="{i}">{htmlmod.escape(t)}</span>' for i, t in enumerate(texts))
    # "</" inside a <script> would end it early: escape it as "<\\/", which JSON reads back as "</"
    page = HTML % {"title": htmlmod.escape(title), "spans": spans,
                   "data": json.dumps(data, separators=(",", ":")).replace("</", "<\\/")}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    size = os.path.getsize(path)
    print0(f"wrote {path} ({size / 1e6:.2f} MB, {len(layers)} of {n_layer} layers x {nh} heads x {T} tokens)")
    return size

# ----------------------------------------------------------------------------------------------
# main


if __name__ == "__main__":
    install()  # a user's error is one line 'error: ...', Ctrl-C is 'interrupted' (lib/errors.py)
    config = configure(globals(), sys.argv[1:]); globals().update(config)
    # check what needs no model first
    if text.startswith("FILE:"):
        if not os.path.isfile(text[5:]):
            raise FileNotFoundError(f"--text={text!r}: no file {text[5:]!r}; pass an existing text file or the "
                                    f"prompt itself (--text=\"...\")")
        with open(text[5:], encoding="utf-8") as f:
            text = f.read()
    if head is not None and (isinstance(head, bool) or not isinstance(head, int)):
        raise TypeError(f"--head must be an integer (or left unset for the grid of every head), got {head!r}")
    if query is not None and (isinstance(query, bool) or not isinstance(query, (int, str))):
        raise TypeError(f"--query must be a token position or a token's text, got {query!r}; e.g. --query=-1")
    if not 0 < gamma <= 1:
        raise ValueError(f"--gamma must be in (0, 1], got {gamma!r} (1 = linear colours)")
    if not out_dir:
        if init_from == "resume":
            raise ValueError("init_from='resume' reads out_dir/ckpt.pt: pass the run's folder, e.g. "
                             "--out_dir=out-shakespeare-char")
        out_dir = "out-attention" if init_from in GPT2_NAMES else \
            (init_from if os.path.isdir(init_from) else os.path.dirname(init_from) or ".")
    for key, value, low in (("top_k", top_k, 1), ("induction_len", induction_len, 2), ("dpi", dpi, 20),
                            ("induction_batch", induction_batch, 1), ("annotate_max", annotate_max, 0)):
        if value < low:
            raise ValueError(f"--{key} must be >= {low}, got {value!r}")
    rt = setup_runtime(device, dtype)

    model, ckpt, tok = load_model(init_from, out_dir, rt.device, ckpt_name=ckpt_name)
    model.eval()
    cfg = model.config
    ids = encode_prompt(tok, text, cfg.block_size)
    L = check_index("layer", layer, cfg.n_layer)
    H = None if head is None else check_index("head", head, cfg.n_head)
    texts = token_texts(tok, ids)
    qpos = None if query is None else find_query(query, texts)
    if summary and len(ids) < 2:
        raise ValueError(f"--summary needs a prompt of at least 2 tokens, got {len(ids)}: lengthen --text")
    if init_from in GPT2_NAMES:
        name = init_from
    else:
        name = "/".join(os.path.normpath(os.path.abspath(ckpt["path"])).split(os.sep)[-2:])
    name += f" ({cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} dims)"
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # the prompt for titles: '\n' visible
    shown = shown if len(shown) <= 90 else shown[:89] + "…"
    print0(f"model: {name}; prompt: {len(ids)} tokens")
    os.makedirs(out_dir, exist_ok=True)

    with rt.autocast():
        att = attention_maps(model, torch.tensor([ids]))[:, 0]  # (n_layer, nh, T, T)
    # the weights shown must be probabilities over the earlier tokens only (bf16/fp16 autocast: looser sums)
    sums = att.sum(-1)
    assert torch.allclose(sums, torch.ones(()), atol=1e-4 if rt.dtype == "float32" else 3e-2), sums.aminmax()
    assert float(att.triu(1).abs().max()) == 0.0, "attention to later tokens: the causal mask is broken"

    # ---- the layer, or one head of it
    if H is None:
        plot_layer(att[L], texts, os.path.join(out_dir, f"attention_layer{L}.png"),
                   f"{name}: layer {L}, every head\n{shown}", gamma, dpi)
    else:
        plot_head(att[L, H], texts, os.path.join(out_dir, f"attention_layer{L}_head{H}.png"),
                  f"{name}: layer {L}, head {H}\n{shown}", gamma, dpi, annotate_max)

    # ---- one query token
    if qpos is not None:
        print0(f"query: token {qpos} {texts[qpos]!r}, layer {L}: top-{top_k} attended tokens")
        heads = range(cfg.n_head) if H is None else [H]
        for h, w in [(h, att[L, h, qpos, :qpos + 1]) for h in heads] + [("mean", att[L, :, qpos, :qpos + 1].mean(0))]:
            top = torch.topk(w, min(top_k, qpos + 1))
            print0(f"  head {h:>4}: " + " | ".join(f"{float(v):.3f} {int(j)}:{texts[j]!r}"
                                                 for v, j in zip(top.values, top.indices)))
        plot_query(att[L], texts, qpos, os.path.join(out_dir, f"attention_layer{L}_query{qpos}.png"),
                   f"{name}: layer {L}, where token {qpos} {display_label(texts[qpos])!r} looks\n{shown}",
                   gamma, dpi)

    # ---- per-head statistics: entropy, sink and previous-token on the prompt, induction on random repeats
    if summary:
        s = head_stats(att)  # each (n_layer, nh)
        # draw ids the model met in training: an unseen token's embedding is untrained and no head can match it
        run_cfg = (ckpt or {}).get("config") or {}
        source = induction_data or run_cfg.get("data_dir") or (os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "data", run_cfg["dataset"]) if run_cfg.get("dataset") else "")
        try:
            pool = data_token_ids(source) if source else None
        except FileNotFoundError as e:
            if induction_data:
                raise
            print0(f"WARNING: the training data of this model is not here ({e}); the induction probe draws from the "
                   f"whole vocabulary instead (--induction_data=DIR names token files to draw from)")
            pool = None
        rand, start, n_rep = repeated_random_tokens(tok.n_vocab, tok.eot_token, cfg.block_size, induction_len,
                                                    induction_batch, seed, pool)
        print0(f"induction: {induction_batch} random sequences of {n_rep} tokens, each repeated once, drawn from "
               + (f"the {len(pool):,} ids that occur in {source}" if pool else f"all {tok.n_vocab:,} ids"))
        with rt.autocast():
            ratt = attention_maps(model, rand)  # (n_layer, B, nh, 2L(+1), 2L(+1))
        ind = induction_score(ratt, start, n_rep).mean(1)  # (n_layer, nh), averaged over the sequences
        stats = {"entropy (nats)": s["entropy"], "first-token sink": s["sink"], "previous-token": s["prev"],
                 "induction": ind}
        if cfg.n_layer * cfg.n_head <= 64:
            print0("layer head  entropy   sink   prev  induction")
            for l in range(cfg.n_layer):
                for h in range(cfg.n_head):
                    print0(f"{l:5d} {h:4d} {float(s['entropy'][l, h]):8.3f} {float(s['sink'][l, h]):6.3f} "
                           f"{float(s['prev'][l, h]):6.3f} {float(ind[l, h]):10.3f}")
        flagged = {}
        for key, v in (("previous-token", s["prev"]), ("induction", ind)):
            hits = flag_heads(v, flag_threshold)
            flagged[key] = [f"L{l}H{h}" for l, h, _ in hits]
            best = max(((float(v[l, h]), l, h) for l in range(cfg.n_layer) for h in range(cfg.n_head)))
            listing = ", ".join(f"L{l}H{h} {x:.2f}" for l, h, x in hits) or \
                f"none (highest: L{best[1]}H{best[2]} {best[0]:.2f})"
            print0(f"{key} heads (score >= {flag_threshold:g}): {listing}")
        plot_summary(stats, os.path.join(out_dir, "attention_summary.png"),
                     f"{name}: per-head statistics\nentropy/sink/previous-token on the prompt ({len(ids)} tokens); "
                     f"induction on {induction_batch} random {n_rep}-token sequences repeated", dpi)
        record = {"model": name, "prompt_tokens": len(ids), "induction_len": n_rep, "induction_batch": induction_batch,
                  "seed": seed, "flag_threshold": flag_threshold, "flagged": flagged,
                  **{k: [[round(float(x), 5) for x in row] for row in v] for k, v in
                     zip(("entropy", "sink", "prev_token", "induction"), stats.values())}}
        path = os.path.join(out_dir, "attention_summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
        print0(f"wrote {path}")

    # ---- the page to explore every layer and head
    if html:
        write_html(att, texts, os.path.join(out_dir, "attention.html"), f"{name}: {shown}", L, gamma)
