"""
Any of our models as an lm-evaluation-harness model, so that its tasks (hellaswag, lambada_openai, arc_easy,
wikitext, a local YAML of your own ...) run on a checkpoint of this project. eval.py --task=harness is the
command line; lm-eval is optional: pip install lm-eval.

lm-eval asks a model three things, in batches of requests: the log-likelihood of a continuation after a context
(multiple choice, LAMBADA), the log-likelihood of a whole text in windows (perplexity tasks), and a greedy
generation until a stop string (generative tasks). The first two are batched forwards over right-padded rows,
scored by lib/perplexity.py's score_batch as eval.py scores its own tasks; generation runs GPT.generate_stream on
the KV cache and stops at the first stop string.
"""

from typing import Optional

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    raise ImportError("lm-evaluation-harness is not installed: pip install lm-eval") from None

from lib.perplexity import score_batch


class HarnessLM(TemplateLM):
    """lm-eval's model interface over our GPT and its tokenizer (GPT-2's BPE or characters)."""

    def __init__(self, model, tokenizer, rt, batch_size: int = 16, max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tok, self.rt = model.eval(), tokenizer, rt  # rt: lib/runtime.py's device and autocast
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.max_length = model.config.block_size

    @property
    def eot_token_id(self) -> Optional[int]:
        return self.tok.eot_token  # <|endoftext|>: the context of an empty context; None for characters

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list:
        return self.tok.encode_ordinary(string)

    def tok_decode(self, ids, **kwargs) -> str:
        return self.tok.decode(ids)

    def score(self, rows: list) -> list:
        """rows: [(ids, n)], the last n ids scored given those before (cut from the left to the window, as
        lm-eval's HFLM does) -> [(sum of log-probs, every scored token was the argmax)]: eval.py's score_batch,
        batch_size rows at a time, longest first (little padding)."""
        rows = [(ids[-(self.max_length + 1):], min(n, self.max_length)) for ids, n in rows]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out = [None] * len(rows)
        for k in range(0, len(order), self.batch_size):
            batch = order[k:k + self.batch_size]
            for i, (logp, greedy) in zip(batch, score_batch(self.model, [rows[i] for i in batch], self.tok.n_vocab,
                                                            self.rt)):
                out[i] = (float(logp.sum()), bool(greedy.all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        return self.score([(ctx + cont, len(cont)) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Each text scored whole, in disjoint windows of the model's context (lm-eval's recipe for
        wikitext-style perplexity): -> its summed log-likelihood."""
        if self.eot_token_id is None:
            raise ValueError("rolling log-likelihoods start from <|endoftext|>: a character-level model has none")
        rows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(self.tok_encode(text), self.eot_token_id, self.max_length, 1)
            for ctx, cont in map(make_disjoint_window, windows):
                rows.append((ctx + cont, len(cont)))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self.score(rows)):
            totals[r] += ll
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Greedy (or sampled, when asked) text after each context, cut before the first stop string."""
        out = []
        for context, kw in (req.args for req in requests):
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok_encode(context)[-self.max_length:] or [self.eot_token_id]
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            stop = self.eot_token_id  # <|endoftext|> ends a text; characters have no such id (None)
            new, text = [], ""
            stream = self.model.generate_stream(torch.tensor([ids], device=self.rt.device),
                                                int(kw.get("max_gen_toks", self.max_gen_toks)),
                                                temperature=temperature, stop_token=stop)
            for t in stream:
                if stop is not None and int(t[0]) == stop:
                    break
                new.append(int(t[0]))
                text = self.tok.decode(new)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def run_harness(model, tokenizer, rt, tasks: list, limit: int = 0, batch_size: int = 16, include_path: str = "",
                num_fewshot: Optional[int] = None) -> dict:
    """Run lm-eval's tasks on our model -> {task: {metric: value}} (lm-eval's 'acc,none' as 'acc')."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    lm = HarnessLM(model, tokenizer, rt, batch_size=batch_size)
    manager = TaskManager(include_path=include_path or None)
    res = simple_evaluate(model=lm, tasks=tasks, limit=limit or None, num_fewshot=num_fewshot,
                          task_manager=manager, bootstrap_iters=0, log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
            for task, metrics in res["results"].items()}
