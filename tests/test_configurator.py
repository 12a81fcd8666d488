"""
configurator.configure: defaults, then config files in order, then --key=value, the last one winning; values
type-checked against the defaults; unknown keys and malformed arguments refused with the closest valid keys.
Also: every config file shipped in config/ applies cleanly to the defaults of the script it is for.
"""

import ast
import os

import pytest

from configurator import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = dict(out_dir="out", batch_size=12, learning_rate=6e-4, compile=True, betas=(0.9, 0.95),
                layers=[1, 2], init_from="scratch", data_files=None, _private=1)


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_order_defaults_then_files_then_command_line(tmp_path, capsys):
    a = write(tmp_path / "a.py", "batch_size = 32\nlearning_rate = 1e-3\n")
    b = write(tmp_path / "b.py", "batch_size = 64\n# a later file sees the earlier values\nout_dir = f'out-{batch_size}'\n")
    config = configure(DEFAULTS, [a, b, "--learning_rate=3e-4", "--compile=False"])
    assert (config["batch_size"], config["learning_rate"], config["out_dir"], config["compile"]) == \
        (64, 3e-4, "out-64", False)
    assert "_private" not in config and config["init_from"] == "scratch"
    # each override is printed with where it came from
    out = capsys.readouterr().out
    assert f"config {a}: batch_size = 32" in out and f"config {b}: batch_size = 64" in out
    assert "override: learning_rate = 0.0003" in out and "override: compile = False" in out
    assert configure(DEFAULTS, ["--batch_size=8"], verbose=False)["batch_size"] == 8
    assert capsys.readouterr().out == ""


def test_values_parse_as_python_literals_else_strings():
    config = configure(DEFAULTS, ["--betas=(0.8, 0.9)", "--layers=[3]", "--init_from=gpt2", "--out_dir=123",
                                  "--data_files=['a.jsonl', 'b.jsonl']"], verbose=False)
    assert config["betas"] == (0.8, 0.9) and config["layers"] == [3] and config["init_from"] == "gpt2"
    assert config["out_dir"] == "123"  # a str default keeps the text: a folder named 123
    assert config["data_files"] == ["a.jsonl", "b.jsonl"]  # a None default takes any type
    # split on the first '=' only (nanoGPT PR #412)
    assert configure(DEFAULTS, ["--out_dir=a=b"], verbose=False)["out_dir"] == "a=b"
    assert configure(DEFAULTS, ["--out_dir="], verbose=False)["out_dir"] == ""
    # an int where a float is expected is fine (nanoGPT PR #156), and becomes a float
    lr = configure(DEFAULTS, ["--learning_rate=1"], verbose=False)["learning_rate"]
    assert lr == 1.0 and isinstance(lr, float)


@pytest.mark.parametrize("arg, match", [
    ("--batch_size=abc", r"command line: batch_size expects a int \(default 12\), got 'abc' \(str\); "
                         r"e\.g\. --batch_size=12"),
    ("--batch_size=1.5", r"batch_size expects a int .* got 1\.5 \(float\)"),
    ("--compile=1", r"compile expects a bool \(default True\), got 1 \(int\); e\.g\. --compile=True"),
    ("--learning_rate=True", r"learning_rate expects a float .* got True \(bool\)"),
    ("--betas=[0.9, 0.95]", r"betas expects a tuple"),
])
def test_wrong_type_names_key_value_and_expected_type(arg, match):
    with pytest.raises(TypeError, match=match):
        configure(DEFAULTS, [arg], verbose=False)


def test_unknown_keys_suggest_the_closest(tmp_path):
    with pytest.raises(ValueError, match=r"command line: unknown config key 'batchsize'; did you mean batch_size\?"):
        configure(DEFAULTS, ["--batchsize=4"], verbose=False)
    cfg = write(tmp_path / "c.py", "learning_rat = 1e-3\n")
    with pytest.raises(ValueError, match=rf"config file {cfg}: unknown config key 'learning_rat'; did you mean "
                                         r"learning_rate\?"):
        configure(DEFAULTS, [cfg], verbose=False)
    with pytest.raises(ValueError, match=r"unknown config key 'zzz'; valid keys: batch_size, betas, compile"):
        configure(DEFAULTS, ["--zzz=1"], verbose=False)


def test_config_file_type_errors_and_private_helpers(tmp_path):
    cfg = write(tmp_path / "c.py", "batch_size = '32'\n")
    with pytest.raises(TypeError, match=rf"config file {cfg}: batch_size expects a int .* got '32' \(str\)"):
        configure(DEFAULTS, [cfg], verbose=False)
    # helpers of a config file: imports, functions and _names are not config keys
    cfg = write(tmp_path / "d.py", "import math\n_tokens = 2 ** 19\ndef half(x):\n    return x // 2\n"
                                   "batch_size = half(_tokens) // 1024\n")
    assert configure(DEFAULTS, [cfg], verbose=False)["batch_size"] == 256


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file 'nope\.py' does not exist"):
        configure(DEFAULTS, ["nope.py"], verbose=False)
    with pytest.raises(ValueError, match=r"argument '--compile' must look like --key=value"):
        configure(DEFAULTS, ["--compile"], verbose=False)
    with pytest.raises(SyntaxError):
        configure(DEFAULTS, [write(tmp_path / "e.py", "batch_size = = 3\n")], verbose=False)


def script_defaults(script: str) -> dict:
    """The defaults block of a script: its module-level literal assignments before the configure(...) line."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "config":
                break
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass  # computed defaults (paths from __file__ ...) are not checked here
    return defaults


@pytest.mark.parametrize("config_file", ["train_shakespeare_char.py", "train_shakespeare.py",
                                         "finetune_shakespeare.py", "train_gpt2.py", "train_fineweb.py"])
def test_shipped_train_configs_apply_to_train_py(config_file, monkeypatch):
    monkeypatch.chdir(ROOT)
    defaults = script_defaults("train.py")
    assert len(defaults) > 40 and defaults["init_from"] == "scratch"
    config = configure(defaults, [os.path.join("config", config_file)], verbose=False)
    assert config["out_dir"] != "out" and config["out_dir"].startswith("out-")  # never the default folder
    tokens = config["batch_size"] * config["block_size"]
    assert config["total_batch_size"] % tokens == 0  # the batch divides on one rank (and on 8 for FineWeb)
    if config_file in ("train_gpt2.py", "train_fineweb.py"):
        assert config["total_batch_size"] == 2 ** 19 and config["total_batch_size"] // (tokens * 8) == 4
        assert config["max_iters"] * config["total_batch_size"] == pytest.approx(10e9, rel=0.001)
        assert config["warmup_iters"] * config["total_batch_size"] == pytest.approx(375e6, rel=0.001)
        assert config["min_lr"] == pytest.approx(config["learning_rate"] / 10)
    if config_file == "train_shakespeare_char.py":  # what `make demo` expects
        assert config["out_dir"] == "out-shakespeare-char" and config["dataset"] == "shakespeare_char"
