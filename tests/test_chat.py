"""sample.py --chat=True through its standard input: each reply is the model's greedy continuation of the whole
conversation in the checkpoint's prompt template; the conversation is cut to the window, oldest turns first,
said once; Ctrl-C (SIGINT) stops a reply and not the program; end of input ends it."""

import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from lib.checkpoint import make_checkpoint, save_checkpoint
from lib.finetuning import chat_prompt, format_prompt
from lib.tokenizer import get_tokenizer
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg).eval()
    save_checkpoint(make_checkpoint("sft", model.state_dict(), vars(cfg), {"prompt_template": "alpaca"},
                                    {"tokenizer": "gpt2"}), str(d / "ckpt.pt"))
    return model, str(d / "ckpt.pt")


def chat(ckpt, *args):
    return [sys.executable, "sample.py", f"--init_from={ckpt}", "--chat=True", "--device=cpu", *args]


def test_chat_prompt_is_the_fine_tuning_template():
    assert chat_prompt([("Who speaks?", "")]) == format_prompt("Who speaks?")
    assert chat_prompt([("Who?", "")], "none") == "Who?"
    two = chat_prompt([("Hi", "Hello."), ("Who?", "")])
    assert two.count("Below is an instruction") == 1
    assert two.endswith("### Instruction:\nHi\n\n### Response:\nHello.\n\n### Instruction:\nWho?\n\n### Response:\n")


def test_replies_continue_the_conversation_and_old_turns_are_dropped_once(sft):
    model, ckpt = sft
    messages = ["Name a colour.", "And another one?", "Which is brighter?"]
    r = subprocess.run(chat(ckpt, "--temperature=0", "--max_new_tokens=8"), input="\n".join(messages) + "\n",
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    tok, turns, expected, drops = get_tokenizer("gpt2"), [], [], 0
    for m in messages:  # the same policy by hand: keep room for 8 tokens in the 64-token window
        turns.append((m, ""))
        while len(tok.encode_ordinary(chat_prompt(turns))) + 8 > 64 and len(turns) > 1:
            turns.pop(0)
            drops += 1
        ids = tok.encode_ordinary(chat_prompt(turns))
        new = model.generate(torch.tensor([ids]), 8, temperature=0.0)[0, len(ids):].tolist()
        expected.append(tok.decode(new))
        turns[-1] = (m, tok.decode(new).strip())
    assert drops >= 2  # the notice below is printed once however many turns go
    assert r.stdout.count("oldest turns are left out") == 1
    pos = 0
    for reply in expected:
        pos = r.stdout.index(reply, pos) + len(reply)
    assert r.stdout.count("> ") == len(messages) + 1  # a prompt per message, and one that met the end of input


def read_until(proc, seen, text, timeout=120.0):
    """Read proc's stdout into seen[0] (bytes) until text appears after position seen[1], within timeout seconds;
    move seen[1] past it."""
    deadline = time.time() + timeout
    while text.encode() not in seen[0][seen[1]:]:
        assert time.time() < deadline, f"no {text!r} within {timeout} s; read {seen[0][-2000:]!r}"
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"no {text!r} after {timeout} s; read {seen[0]!r}"
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, f"stdout closed before {text!r}; read {seen[0]!r}"
        seen[0] += chunk
    seen[1] = seen[0].index(text.encode(), seen[1]) + len(text)


def test_ctrl_c_stops_the_reply_not_the_program(sft):
    _, ckpt = sft
    proc = subprocess.Popen(chat(ckpt, "--max_new_tokens=100000", "--temperature=1.0"), cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = [b"", 0]
    try:
        read_until(proc, seen, "> ")
        proc.stdin.write(b"Tell me a long story.\n")
        proc.stdin.flush()
        read_until(proc, seen, " ")  # the reply has started
        proc.send_signal(signal.SIGINT)
        read_until(proc, seen, "[stopped]")
        read_until(proc, seen, "> ")  # and the next message is asked for
        proc.stdin.close()  # Ctrl-D
        proc.wait(timeout=120)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert "interrupted" not in err.decode()
