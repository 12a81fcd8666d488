"""
Supervised fine-tuning. (Work in progress: the prompt template and masking below are the shared pieces that
align.py reuses.)
"""

# Alpaca's prompt layout (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction (and optional input); the response follows it directly."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def encode_pair(tok, prompt: str, response: str, block_size: int, truncate: str = "right"):
    """Token ids and training labels for prompt + response (+ <|endoftext|> when the tokenizer has one).

    Returns (x, y, truncated): x = ids[:-1], y = ids[1:] with -1 wherever the target is a prompt token, so
    the loss (ignore_index=-1) counts response tokens only. len(x) <= block_size. When prompt + response is
    too long: truncate='right' cuts the end; truncate='prompt' drops prompt tokens from the left first (the
    response matters more), then cuts the end if the response alone is still too long.
    """
    if truncate not in ("right", "prompt"):
        raise ValueError(f"truncate must be 'right' or 'prompt', got {truncate!r}")
    p = tok.encode_ordinary(prompt)
    r = tok.encode_ordinary(response) + ([tok.eot_token] if tok.eot_token is not None else [])
    n = block_size + 1  # x and y of length block_size come from block_size + 1 ids
    truncated = len(p) + len(r) > n
    if truncated and truncate == "prompt":
        p = p[max(len(p) - max(n - len(r), 1), 0):]  # keep at least one prompt token to condition on
    ids = (p + r)[:n]
    x = ids[:-1]
    y = [t if i + 1 >= len(p) else -1 for i, t in enumerate(ids[1:])]
    return x, y, truncated
