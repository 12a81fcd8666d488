"""lib.records.load_records: every local format on small files written here (CRLF, BOM, compression, no
extension, folders, globs), every kind of bad record named FILE:LINE, and Hub datasets (offline)."""

import bz2
import gzip
import json
import lzma

import pytest

from lib.records import load_records, report_bad

TEXT_LABEL = {"text": "--text_field", "label": "--label_field"}


def write(path, data: bytes):
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "wb") as f:
        f.write(data)
    return str(path)


def rows(recs):
    return [(where.rsplit("/", 1)[-1], rec) for where, rec in recs.rows]

# ----------------------------------------------------------------------------------------------
# formats


def test_jsonl_with_bom_crlf_and_blank_lines(tmp_path):
    p = write(tmp_path / "a.jsonl", b'\xef\xbb\xbf{"text": "caf\xc3\xa9", "label": 1}\r\n\r\n{"text": "b\\r\\nc", "label": 0}\r\n')
    assert rows(load_records(p, require=TEXT_LABEL)) == [("a.jsonl:1", {"text": "café", "label": 1}),
                                                         ("a.jsonl:3", {"text": "b\r\nc", "label": 0})]


def test_utf16_with_bom_is_read(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": "x"}\n{"text": "y"}\n'.encode("utf-16"))
    assert [r["text"] for _, r in load_records(p).rows] == ["x", "y"]


def test_json_list_and_split_object_keep_lines(tmp_path):
    p = write(tmp_path / "l.json", b'[\n  {"text": "a"},\n  {"text": "b",\n   "label": 2}\n]\n')
    assert rows(load_records(p)) == [("l.json:2", {"text": "a"}), ("l.json:3", {"text": "b", "label": 2})]
    p = write(tmp_path / "s.json", b'{"train": [{"text": "a"},\n {"text": "b"}],\n "test": [\n{"text": "c"}]}')
    assert rows(load_records(p)) == [("s.json:1", {"text": "a"}), ("s.json:2", {"text": "b"})]
    assert rows(load_records(p, split="test")) == [("s.json:4", {"text": "c"})]
    with pytest.raises(ValueError, match=r"s.json: a JSON object of splits \['test', 'train'\] and no split 'val'"):
        load_records(p, split="val")
    p = write(tmp_path / "lines.json", b'{"text": "a"}\n{"text": "b"}\n')  # JSON lines named .json
    assert rows(load_records(p)) == [("lines.json:1", {"text": "a"}), ("lines.json:2", {"text": "b"})]


def test_csv_crlf_bom_quotes_and_multiline_values(tmp_path):
    # the SMS Spam Collection's Kaggle CSV: a BOM-less header with empty names, CRLF, quoted commas
    data = ('v1,v2,,,\r\nham,"Go, until ""jurong""",,,\r\nspam,"two\r\nlines",,,\r\nham,Ok lar,,,\r\n' * 1).encode()
    p = write(tmp_path / "spam.csv", b"\xef\xbb\xbf" + data)
    recs = load_records(p, require={"v2": "--text_field", "v1": "--label_field"})
    assert [(w, r["v1"], r["v2"]) for w, r in rows(recs)] == [
        ("spam.csv:2", "ham", 'Go, until "jurong"'), ("spam.csv:3", "spam", "two\nlines"), ("spam.csv:5", "ham", "Ok lar")]
    # columns by index, the same values
    recs = load_records(p, require={"1": "--text_field", "0": "--label_field"})
    assert [(r["0"], r["1"]) for _, r in recs.rows][0] == ("ham", 'Go, until "jurong"')


def test_tsv_with_header_by_name_and_index(tmp_path):
    p = write(tmp_path / "train.tsv", b"sentence\tlabel\nhide new secretions\t0\nit 's \"good\"\t1\n")
    recs = load_records(p, require={"sentence": "--text_field", "label": "--label_field"})
    assert rows(recs) == [("train.tsv:2", {"sentence": "hide new secretions", "label": "0"}),
                          ("train.tsv:3", {"sentence": "it 's \"good\"", "label": "1"})]  # TSV: quotes are text
    recs = load_records(p, require={"0": "--text_field", "1": "--label_field"})
    assert recs.rows[0][1]["0"] == "hide new secretions"


def test_headerless_tsv_without_extension_is_sniffed(tmp_path, capsys):
    # the raw SMS Spam Collection: label<TAB>text, no header, no extension, CRLF
    lines = [("ham", "Go until jurong point"), ("spam", "Free entry in 2 a wkly comp"), ("ham", "Ok lar..."),
             ("ham", "U dun say so early hor"), ("spam", "WINNER!! claim, call now")]
    p = write(tmp_path / "SMSSpamCollection", "".join(f"{a}\t{b}\r\n" for a, b in lines).encode())
    recs = load_records(p, require={"1": "--text_field", "0": "--label_field"})
    assert [(r["0"], r["1"]) for _, r in recs.rows] == lines
    out = capsys.readouterr().out
    assert "no extension, read as TSV" in out and "no header row, columns 0..1" in out
    with pytest.raises(ValueError, match=r"no column 'text': this TSV file has no header row \(its first row is "
                                         r"\['ham', 'Go until jurong point'\]\), so its columns are 0..1: pass "
                                         r"--text_field=N"):
        load_records(p, require=TEXT_LABEL)
    assert len(load_records(p, header=True).rows) == 4  # told so, the first row is a header


def test_sniffing_jsonl_and_csv_and_text(tmp_path):
    assert load_records(write(tmp_path / "j", b'{"text": "a"}\n{"text": "b"}\n')).rows[1][1] == {"text": "b"}
    assert load_records(write(tmp_path / "c", b"text,label\nhi,1\nyo,0\n")).rows[1][1] == {"text": "yo", "label": "0"}
    assert load_records(write(tmp_path / "t", b"Once upon a time, there was\nnothing.\n")).rows[0][1] == {
        "text": "Once upon a time, there was"}


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_files(tmp_path, suffix):
    p = write(tmp_path / f"a.jsonl{suffix}", b'{"text": "x"}\n{"text": "y"}\n')
    assert rows(load_records(p)) == [(f"a.jsonl{suffix}:1", {"text": "x"}), (f"a.jsonl{suffix}:2", {"text": "y"})]
    p = write(tmp_path / f"b.tsv{suffix}", b"text\tlabel\nx\t1\n")
    assert load_records(p, require=TEXT_LABEL).rows[0][1] == {"text": "x", "label": "1"}


def test_txt_per_line_or_per_file(tmp_path):
    p = write(tmp_path / "a.txt", b"first line\r\n\r\nsecond paragraph\r\n")
    assert rows(load_records(p)) == [("a.txt:1", {"text": "first line"}), ("a.txt:3", {"text": "second paragraph"})]
    assert rows(load_records(p, txt_records="file")) == [("a.txt:1", {"text": "first line\n\nsecond paragraph"})]
    with pytest.raises(ValueError, match=r"txt_records must be 'line' .* or 'file' .*, got 'para'"):
        load_records(p, txt_records="para")


def test_folder_glob_and_comma_list(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    write(d / "a.jsonl.gz", b'{"text": "a"}\n')
    write(d / "b.csv", b"text\nb\n")
    write(d / "c.txt", b"c\n")
    write(d / "notes.md", b"# not data\n")
    write(d / ".hidden.jsonl", b"{broken\n")
    assert [r["text"] for _, r in load_records(str(d)).rows] == ["a", "b", "c"]
    assert "ignoring files that are no records: ['notes.md']" in capsys.readouterr().out
    assert [r["text"] for _, r in load_records(str(d / "*.txt") + "," + str(d / "a.jsonl.gz")).rows] == ["c", "a"]
    assert [r["text"] for _, r in load_records(str(d), max_records=2).rows] == ["a", "b"]

# ----------------------------------------------------------------------------------------------
# bad records: FILE:LINE, what is wrong, and the fix; or skipped and counted


def test_one_broken_jsonl_line_in_the_middle(tmp_path, capsys):
    lines = [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(5)]
    lines[2] = '{"text": "t2", "label": 0'
    p = write(tmp_path / "a.jsonl", "\n".join(lines).encode())
    with pytest.raises(ValueError, match=r"(?s)a.jsonl:3: invalid JSON \(Expecting ',' delimiter at column 26: "
                                         r"'.*'\); fix the line\n1 bad record in .*a.jsonl': fix it, or skip bad "
                                         r"records with --skip_bad_records=True"):
        load_records(p, require=TEXT_LABEL)
    recs = load_records(p, require=TEXT_LABEL, skip_bad=True)
    assert [w.rsplit(":", 1)[1] for w, _ in recs.rows] == ["1", "2", "4", "5"] and recs.skipped == 1
    assert capsys.readouterr().out.count("WARNING: skipped 1 bad record of") == 1


def test_missing_field_names_the_fields_present_and_empty_text(tmp_path):
    p = write(tmp_path / "a.jsonl", b'{"sentence": "x", "label": 1}\n{"text": "  ", "label": 0}\n[1, 2]\n')
    with pytest.raises(ValueError) as e:
        load_records(p, require=TEXT_LABEL)
    msg = str(e.value).split("\n")
    assert msg[0].endswith("a.jsonl:1: no field 'text' (the record's fields are ['label', 'sentence']); fix the "
                           "record, or name the field that holds it: --text_field=sentence")
    assert msg[1].endswith("a.jsonl:2: field 'text' is empty ('  '); fill it in or delete the record")
    assert msg[2].endswith("a.jsonl:3: a JSON line must be one record, an object {\"field\": value, ...}; this one "
                           "is a list: '[1, 2]'")
    assert msg[3].startswith("3 bad records in")


def test_many_bad_records_are_counted(tmp_path):
    p = write(tmp_path / "a.jsonl", b"{}\n" * 25)
    with pytest.raises(ValueError, match=r"(?s)a.jsonl:10: no field.*\n\.\.\. and 15 more\n25 bad records"):
        load_records(p, require=["text"])
    with pytest.raises(ValueError, match=r"holds no records \(25 bad ones skipped\)"):
        load_records(p, require=["text"], skip_bad=True)


def test_wrong_encoding_names_the_one_to_try(tmp_path):
    p = write(tmp_path / "spam.csv", b"v1,v2\nham,Ok\nham,caf\xe9 au lait\n")
    with pytest.raises(ValueError, match=r"spam.csv:3: not valid utf-8 \(byte b'\\xe9' at column 8: "
                                         r"b'ham,caf\\xe9 au lait'\); the file is probably cp1252: pass "
                                         r"--encoding=cp1252"):
        load_records(p, require={"v2": "--text_field"})
    assert load_records(p, require={"v2": "--text_field"}, encoding="cp1252").rows[1][1]["v2"] == "café au lait"
    p = write(tmp_path / "a.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert len(load_records(p, skip_bad=True).rows) == 1  # the undecodable line alone is skipped
    with pytest.raises(ValueError, match=r"unknown encoding 'utf-9'"):
        load_records(p, encoding="utf-9")


def test_empty_file_and_empty_folder_and_missing_file(tmp_path):
    p = write(tmp_path / "empty.jsonl", b"")
    with pytest.raises(ValueError, match=r"empty.jsonl: the file is empty; remove it from the data, or fill it"):
        load_records(p)
    write(tmp_path / "blank.txt", b"\n\n  \n")
    with pytest.raises(ValueError, match=r"blank.txt: the file is empty"):
        load_records(str(tmp_path / "blank.txt"))
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match=r"none' matches no data files"):
        load_records(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match=r"data file '.*missing.jsonl' does not exist; pass an existing file"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"cannot tell how to read a '.parquet' file"):
        load_records(write(tmp_path / "x.parquet", b"PAR1"))


def test_invalid_json_document(tmp_path):
    p = write(tmp_path / "a.json", b'[{"text": "a"},\n {"text": "b" ]')
    with pytest.raises(ValueError, match=r"a.json:2: invalid JSON \(Expecting ',' delimiter at column 15: .*\); "
                                         r"fix the file \(one error stops a JSON document"):
        load_records(p)
    with pytest.raises(ValueError, match=r"a.json: holds a JSON str, expected a list of records"):
        load_records(write(tmp_path / "a.json", b'"text"'))


def test_csv_and_tsv_row_problems(tmp_path):
    p = write(tmp_path / "a.tsv", b"text\tlabel\nx\t1\ny\t1\textra\nz\t0\n")
    with pytest.raises(ValueError, match=r"a.tsv:3: 3 columns, but the header has 2: a tab inside a value\?"):
        load_records(p, require=TEXT_LABEL)
    assert [r["text"] for _, r in load_records(p, require=TEXT_LABEL, skip_bad=True).rows] == ["x", "z"]
    p = write(tmp_path / "a.csv", b'text,label\nx,1\n"never closed,1\ny,0\n')
    with pytest.raises(ValueError, match=r"a.csv:3: malformed CSV \(unexpected end of data\): a quote opened on "
                                         r"line 3 is never closed"):
        load_records(p, require=TEXT_LABEL)
    p = write(tmp_path / "b.csv", b'text,label\nx,1\n"a"b,1\n')
    with pytest.raises(ValueError, match=r"b.csv:3: malformed CSV \(',' expected after '\"'\)"):
        load_records(p, require=TEXT_LABEL)
    with pytest.raises(ValueError, match=r"b.csv:1: no column 'sentence'; the header row names \['text', 'label'\]: "
                                         r"pass --text_field=NAME with one of them, or a column index"):
        load_records(p, require={"sentence": "--text_field"})
    with pytest.raises(ValueError, match=r"b.csv: column 5 does not exist; the file has 2 columns \(0..1\)"):
        load_records(p, require={"5": "--text_field"})


def test_report_bad_for_checks_of_the_caller(capsys):
    with pytest.raises(ValueError, match=r"f.csv:3: label 'maybe' is none of the classes.*\n1 bad record in 'f.csv'"):
        report_bad(["f.csv:3: label 'maybe' is none of the classes ['ham', 'spam']"], False, "'f.csv'")
    report_bad(["f.csv:3: x", "f.csv:4: y"], True, "'f.csv'")
    assert capsys.readouterr().out == ("WARNING: skipped 2 bad records of 'f.csv' (the first: f.csv:3: x); fix them "
                                       "to train on them\n")

# ----------------------------------------------------------------------------------------------
# Hub datasets


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_hub_failure_is_a_clear_error(offline_hub):
    with pytest.raises(ValueError, match=r"could not load the Hugging Face dataset 'nyu-mll/glue' \(name 'sst2', "
                                         r"split 'train'\): .*; no network: run where the Hub is reachable, or "
                                         r"download the data and pass the local file"):
        load_records("nyu-mll/glue", name="sst2")


def test_hub_records_keep_class_names(offline_hub, monkeypatch):
    """What a Hub split becomes (datasets' own loading is theirs to test): rows, wheres and ClassLabel names."""
    import datasets
    ds = datasets.Dataset.from_dict({"sentence": ["good", " "], "label": [1, 0]}, features=datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}))
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or ds)
    with pytest.raises(ValueError, match=r"nyu-mll/glue \(train\) record 1: field 'sentence' is empty"):
        load_records("nyu-mll/glue", name="sst2", require={"sentence": "--text_field"})
    recs = load_records("nyu-mll/glue", name="sst2", require={"sentence": "--text_field"}, skip_bad=True)
    assert recs.rows == [("nyu-mll/glue (train) record 0", {"sentence": "good", "label": 1})]
    assert recs.label_names == {"label": ["negative", "positive"]}
    assert calls[0] == (("nyu-mll/glue", "sst2"), {"split": "train", "data_dir": None, "cache_dir": None})


def test_report_false_leaves_the_report_to_the_caller(tmp_path, capsys):
    p = write(tmp_path / "a.jsonl", b'{"text": "a", "label": "x"}\n{"text": \n{"text": "b", "label": "maybe"}\n')
    recs = load_records(p, require=["text"], report=False)
    assert [w.rsplit("/", 1)[-1] for w in recs.bad] == ["a.jsonl:2: invalid JSON (Expecting value at column 10: "
                                                         "'{\"text\": '); fix the line"]
    bad = recs.bad + [f"{w}: label {r['label']!r} is none of the classes ['x']" for w, r in recs.rows
                      if r["label"] != "x"]
    with pytest.raises(ValueError, match=r"(?s)a.jsonl:2: invalid JSON.*\n.*a.jsonl:3: label 'maybe'.*\n2 bad records"):
        report_bad(bad, False, recs.source)
    assert capsys.readouterr().out == ""
    empty = load_records(write(tmp_path / "b.jsonl", b"[]\n"), report=False)
    assert empty.rows == [] and len(empty.bad) == 1  # a JSON list in a .jsonl: no record; the caller says so


def test_streamed_txt_files_are_whole_documents(tmp_path, offline_hub):
    """StreamingLoader on .txt files: each file one document, its line breaks kept (as prepare.py reads them)."""
    import numpy as np

    from lib.streaming import StreamingLoader
    from lib.tokenizer import get_tokenizer
    (tmp_path / "books").mkdir()
    texts = ["Chapter one.\n\nIt was a dark night.\n", "Chapter two.\n\n\nMorning came."]
    for i, t in enumerate(texts):
        (tmp_path / "books" / f"{i}.txt").write_text(t)
    tok = get_tokenizer("gpt2")
    ids = np.concatenate([[tok.eot_token] + tok.encode_ordinary(t) for t in texts])
    loader = StreamingLoader(str(tmp_path / "books"), batch_size=1, block_size=len(ids) - 1, shuffle_buffer=1,
                             prefetch=0)
    x, y = loader.next_batch()
    assert x[0].tolist() + y[0, -1:].tolist() == ids.tolist()
