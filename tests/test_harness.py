"""lm-evaluation-harness adapter (lib/harness.py, eval.py --task=harness): offline, with a local task file. Its
multiple-choice scores equal eval.py's on the same HellaSwag rows (acc, and lm-eval's acc_norm = eval.py's
acc_norm_chars: both divide by the ending's characters), item by item; rolling log-likelihoods equal eval.py's
chunked perplexity; generate_until is our greedy decoding cut at the stop string. Skipped without lm-eval."""

import json
import os

import pytest
import torch
from conftest import run_script

from lib.checkpoint import make_checkpoint, resume_state, save_checkpoint
from lib.perplexity import sliding_windows
from lib.runtime import Runtime
from lib.tokenizer import get_tokenizer
from model import GPT, GPTConfig

pytest.importorskip("lm_eval")
import eval as ev  # noqa: E402

from lib.harness import HarnessLM  # noqa: E402

WINDOW = 32
CPU = Runtime("cpu", "cpu", "float32")
# HellaSwag rows in the official layout (made-up text), with WikiHow's markers for the preprocessing
ROWS = [
    {"activity_label": "Removing ice from car", "ctx_a": "A man stands next to a car covered in snow.",
     "ctx_b": "he", "label": 2, "endings": ["eats a sandwich in the kitchen.", "starts to dance on the roof.",
                                           "scrapes the ice off the windshield.", "is shown talking to the camera."]},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to clean a window [title] Mix water and soap.",
     "ctx_b": "", "label": 0, "endings": ["[title] Wipe the glass from top to bottom.", "[title] Paint it red.",
                                         "Sing a song.", "[title] Throw the bucket out of the window."]},
    {"activity_label": "Playing guitar", "ctx_a": "A young woman sits on a chair holding a guitar.", "ctx_b": "she",
     "label": 1, "endings": ["plays.", "strums the first chords of a slow song.", "jumps.", "throws it away."]},
    {"activity_label": "Making a sandwich", "ctx_a": "Bread is laid out on a board.", "ctx_b": "a knife",
     "label": 3, "endings": ["flies.", "is put in the sink", "sings about cheese.", "spreads butter on the bread."]},
    {"activity_label": "Running", "ctx_a": "A woman ties her shoes at the start of a track.", "ctx_b": "she",
     "label": 0, "endings": ["runs four laps.", "eats the shoes.", "falls asleep.", "paints the track blue."]},
]
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was "
        "the season of Darkness, it was the spring of hope, it was the winter of despair.")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-layer GPT-2-token model in a padded 50304-row table, as a checkpoint; the rows; a local lm-eval task."""
    d = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=WINDOW, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg).eval()
    save_checkpoint(make_checkpoint("pretrain", model.state_dict(), vars(cfg), {}, {"tokenizer": "gpt2"},
                                    resume=resume_state(1, "val_loss", 0.0)), str(d / "ckpt.pt"))
    with open(d / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    # the same rows as lm-eval's hellaswag task sees them after its preprocessing (eval.py's 'harness' prompt)
    with open(d / "docs.jsonl", "w") as f:
        for r in ROWS:
            query, choices, gold = ev.hellaswag_item("x", r, "harness")
            f.write(json.dumps({"query": query, "choices": choices, "gold": gold}) + "\n")
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "local_hellaswag.yaml").write_text(
        "task: local_hellaswag\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {d / 'docs.jsonl'}\n"
        "validation_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: '{{query}}'\ndoc_to_target: '{{gold}}'\ndoc_to_choice: '{{choices}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return {"dir": d, "model": model, "tok": get_tokenizer("gpt2"), "tasks": str(tasks)}


def test_multiple_choice_equals_eval_py_item_by_item(setup, tmp_path):
    model, tok = setup["model"], setup["tok"]
    lm = HarnessLM(model, tok, CPU, batch_size=3)
    items = []
    for r in ROWS:
        context, endings, _ = ev.hellaswag_item("x", r, "harness")
        items.append((tok.encode_ordinary(context), [tok.encode_ordinary(" " + e) for e in endings]))
    ours = dict(ev.score_items(model, items, WINDOW, 16, tok.n_vocab, CPU))
    for i, (ctx, conts) in enumerate(items):
        theirs = lm._loglikelihood_tokens([(None, ctx, c) for c in conts])
        for (lp, greedy), (ll, is_greedy) in zip(ours[i], theirs):
            assert ll == pytest.approx(float(lp.sum()), abs=1e-4)
            assert is_greedy == bool(greedy.all())


def test_scores_equal_eval_py_through_both_command_lines(setup, tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    ckpt = str(setup["dir"] / "ckpt.pt")
    common = ["eval.py", f"--init_from={ckpt}", "--device=cpu", "--batch_size=5"]
    for args in (["--task=hellaswag", f"--data_file={setup['dir'] / 'rows.jsonl'}", "--hellaswag_prompt=harness",
                  f"--out_dir={tmp_path / 'ours'}"],
                 ["--task=harness", "--harness_tasks=local_hellaswag", f"--harness_include={setup['tasks']}",
                  f"--out_dir={tmp_path / 'lm_eval'}"]):
        r = run_script(common + args, env=env)  # a process of its own, forked from conftest.py's runner
        assert r.returncode == 0, r.stdout + r.stderr
    ours = json.loads(open(tmp_path / "ours" / "eval.jsonl").readline())
    theirs = json.loads(open(tmp_path / "lm_eval" / "eval.jsonl").readline())
    assert ours["items"] == 5 and theirs["tasks"] == 1
    assert theirs["local_hellaswag/acc"] == pytest.approx(ours["acc"])
    assert theirs["local_hellaswag/acc_norm"] == pytest.approx(ours["acc_norm_chars"])


def test_rolling_loglikelihood_is_chunked_perplexity(setup):
    model, tok = setup["model"], setup["tok"]
    from lm_eval.api.instance import Instance
    lm = HarnessLM(model, tok, CPU, batch_size=4)
    text = tok.decode(tok.encode_ordinary(TEXT)[:2 * WINDOW])  # whole windows: lm-eval gives a shorter last one
    [ll] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])  # the whole context
    ids = [tok.eot_token] + tok.encode_ordinary(text)  # eval.py's perplexity with stride = window: disjoint chunks
    nll = 0.0
    for b, e, n in sliding_windows(len(ids), WINDOW, WINDOW):
        x = torch.tensor([ids[b:e]])
        with torch.no_grad():
            logits, _ = model(x[:, :-1])
        logp = torch.log_softmax(logits[0, -n:, :tok.n_vocab].double(), -1)
        nll -= float(logp[torch.arange(n), x[0, -n:]].sum())
    assert len(ids) == 2 * WINDOW + 1 and ll == pytest.approx(-nll, rel=1e-5)


def test_generate_until_is_greedy_decoding_cut_at_the_stop(setup):
    model, tok = setup["model"], setup["tok"]
    from lm_eval.api.instance import Instance
    lm = HarnessLM(model, tok, CPU)
    prompt = "The capital of France is"
    ids = tok.encode_ordinary(prompt)
    full = tok.decode(model.generate(torch.tensor([ids]), 12, temperature=0.0)[0, len(ids):].tolist())
    stop = full[len(full) // 2:][:3]  # a stop string the greedy text reaches
    [a, b] = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0),
                                Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 1)])
    assert a == full
    assert b == full.split(stop)[0] and len(b) < len(full)


def test_missing_lm_eval_says_how_to_install(tmp_path):
    code = "import sys; sys.modules['lm_eval'] = None; import lib.harness"
    r = run_script(["-c", code], timeout=120)
    assert r.returncode != 0 and "pip install lm-eval" in r.stderr
    r = run_script(["-c", "import sys, runpy; sys.modules['lm_eval'] = None; sys.argv = ['eval.py', '--task=harness', "
                    "'--harness_tasks=hellaswag']; runpy.run_path('eval.py', run_name='__main__')"], timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: lm-evaluation-harness")
