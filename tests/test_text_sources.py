"""lamda_pipe.text_sources: documents from .txt / .jsonl / .parquet files and Hugging Face datasets
(local ones only; the Hub path is tested offline), limits, and the one-line input errors."""

import gzip
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lamda_pipe.data import text_sources
from lamda_pipe.data.loader import bundled_corpus
from lamda_pipe.data.text_sources import DataError, check_source, describe_source, iter_documents

pytestmark = pytest.mark.unit

DOCS = ["First document.", "Naïve café in 東京 🙂", "Third\nspans two lines.", "Fourth — last."]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and a private datasets cache. huggingface_hub / datasets read the
    environment once at import, so their constants are set too if they are already imported."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


# --- .txt ----------------------------------------------------------------------------------------

def test_bundled_corpus_splits_on_blank_lines():
    files = bundled_corpus()
    want = [d.strip() for p in files for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    got = list(iter_documents([str(p) for p in files]))
    assert got == want and len(got) == 149  # one document per chapter


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_txt_streaming_split_matches_whole_file_split(tmp_path, monkeypatch, chunk):
    # separators straddling chunk boundaries, runs of 3-5 newlines, CRLF, edge whitespace
    text = "a\n\n\nb c\r\n\r\nd\n \ne\n\n\n\n\nf  \n\n  \n\n\tg\n"
    (tmp_path / "x.txt").write_bytes(text.encode())
    want = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]
    monkeypatch.setattr(text_sources, "READ_CHUNK", chunk)
    assert list(iter_documents([str(tmp_path / "x.txt")])) == want == ["a", "b c", "d\n \ne", "f", "g"]


def test_txt_gz_and_directory_inputs(tmp_path):
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(DOCS[2:]))
    (tmp_path / "a.txt").write_text("\n\n".join(DOCS[:2]), encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an input")
    assert list(iter_documents([str(tmp_path)])) == DOCS  # sorted supported files of the directory


def test_not_utf8_names_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\n\nok".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text.*iconv"):
        list(iter_documents([str(tmp_path / "latin1.txt")]))


# --- .jsonl / .json --------------------------------------------------------------------------------

def test_jsonl_and_json_lines(tmp_path):
    rows = [{"text": DOCS[0], "id": 1}, {"text": "  \n "}, {"text": None}, {"text": ""}, {"text": DOCS[1], "id": 2}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text("\n" + json.dumps({"body": DOCS[2]}) + "\n\n" + json.dumps({"body": DOCS[3]}))
    assert list(iter_documents([str(tmp_path / "a.jsonl")])) == DOCS[:2]  # blank, null and empty skipped
    assert list(iter_documents([str(tmp_path / "b.json")], text_field="body")) == DOCS[2:]


def test_jsonl_missing_field_names_existing_fields_up_front(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "x", "meta": {}}])
    with pytest.raises(DataError, match=r"a\.jsonl \(first record\) has no field 'text'; its fields are: "
                                        r"content, meta; pass --text-field"):
        iter_documents([str(tmp_path / "a.jsonl")])  # raised by the call itself, before iterating


def test_jsonl_bad_lines_name_file_and_line(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "a"}]))
    with pytest.raises(DataError, match=r"arr\.json:1: a JSON list, not an object.*one JSON object per line"):
        iter_documents([str(tmp_path / "arr.json")])
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"text": 3}\n{"text": "b"\n')
    docs = iter_documents([str(tmp_path / "c.jsonl")])
    assert next(docs) == "a"
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'text' holds a int, not text"):
        next(docs)


# --- .parquet ----------------------------------------------------------------------------------

def test_parquet_read_in_batches(tmp_path, monkeypatch):
    texts = [f"row {i} " + "word " * (i % 5) for i in range(50)] + [None, " "]
    table = pa.table({"id": list(range(52)), "text": texts})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=16)
    monkeypatch.setattr(text_sources, "PARQUET_BATCH_ROWS", 7)
    assert list(iter_documents([str(tmp_path / "a.parquet")])) == texts[:50]


def test_parquet_missing_or_non_text_column(tmp_path):
    pq.write_table(pa.table({"content": ["a"], "n": [1]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"has no field 'text'; its fields are: content, n"):
        iter_documents([str(tmp_path / "a.parquet")])
    with pytest.raises(DataError, match=r"column 'n' holds int64, not text"):
        iter_documents([str(tmp_path / "a.parquet")], text_field="n")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"fake\.parquet: cannot read it as parquet"):
        iter_documents([str(tmp_path / "fake.parquet")])


# --- Hugging Face datasets (offline) ------------------------------------------------------------

@pytest.mark.parametrize("streaming", [False, True])
def test_hf_dataset_from_a_local_dataset_dir(tmp_path, hf_offline, streaming):
    # a dataset repository checked out locally: load_dataset(NAME) is the --dataset code path
    texts = DOCS + ["", "   "]
    ds = hf_offline.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    (tmp_path / "ds").mkdir()
    ds.to_parquet(str(tmp_path / "ds" / "train.parquet"))
    assert list(iter_documents(dataset=str(tmp_path / "ds"), streaming=streaming)) == DOCS
    with pytest.raises(DataError, match=r"--dataset .*ds \(split train\) has no field 'body'; its fields are: "
                                        r"text, n"):
        iter_documents(dataset=str(tmp_path / "ds"), text_field="body", streaming=streaming)
    with pytest.raises(DataError, match=r"--split validation.*validation"):
        iter_documents(dataset=str(tmp_path / "ds"), split="validation", streaming=streaming)


def test_hf_dataset_path_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match=r"--dataset .*nope: no such directory"):
        iter_documents(dataset=str(tmp_path / "nope"))


def test_hf_dataset_saved_to_disk(tmp_path, hf_offline):
    hf_offline.DatasetDict({"train": hf_offline.Dataset.from_dict({"body": DOCS})}).save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents(dataset=str(tmp_path / "dd"), text_field="body")) == DOCS


def test_hf_hub_name_offline_is_one_clear_error(hf_offline):
    start = time.perf_counter()
    with pytest.raises(DataError) as e:
        iter_documents(dataset="EleutherAI/pile", streaming=True)
    assert time.perf_counter() - start < 10  # at once, not after ~23 s of retries
    msg = str(e.value)
    assert "could not reach dataset EleutherAI/pile on the Hugging Face Hub" in msg and "--input" in msg
    assert "\n" not in msg


# --- argument errors and limits ------------------------------------------------------------------

def test_input_errors(tmp_path):
    with pytest.raises(DataError, match=r"--input .*missing\.txt: no such file"):
        iter_documents([str(tmp_path / "missing.txt")])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"a\.csv: unsupported file type; supported: \.txt, \.jsonl, \.json, "
                                        r"\.parquet"):
        iter_documents([str(tmp_path / "a.csv")])
    (tmp_path / "b.jsonl.zst").write_text("x")
    with pytest.raises(DataError, match=r"decompress it first"):
        iter_documents([str(tmp_path / "b.jsonl.zst")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"directory holds no"):
        iter_documents([str(tmp_path / "empty")])
    for kwargs in ({}, {"inputs": [str(tmp_path / "a.csv")], "dataset": "x"}):
        with pytest.raises(DataError, match=r"either --input FILE \[FILE \.\.\.\] or --dataset NAME"):
            iter_documents(**kwargs)
    with pytest.raises(DataError, match=r"--config and --streaming apply to --dataset only"):
        iter_documents([str(tmp_path / "a.csv")], streaming=True)
    with pytest.raises(DataError, match=r"--max-docs must be a positive number"):
        check_source([str(tmp_path / "a.csv")], max_docs=0)


def test_a_bad_file_anywhere_is_refused_before_reading_the_good_ones(tmp_path):
    (tmp_path / "good.txt").write_text("a\n\nb")
    write_jsonl(tmp_path / "bad.jsonl", [{"content": "c"}])
    with pytest.raises(DataError, match="has no field 'text'"):
        check_source([str(tmp_path / "good.txt"), str(tmp_path / "bad.jsonl")])


def test_max_docs_and_max_bytes(tmp_path):
    docs = ["é" * i + f"document {i}" for i in range(20)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs), encoding="utf-8")
    src = [str(tmp_path / "a.txt")]
    assert list(iter_documents(src, max_docs=5)) == docs[:5]
    sizes = [len(d.encode()) for d in docs]
    limit = sum(sizes[:7]) - 1  # reached inside document 7 (index 6): that one is the last
    got = list(iter_documents(src, max_bytes=limit))
    assert got == docs[:7]
    assert sum(sizes[:6]) < limit <= sum(sizes[:7])
    assert list(iter_documents(src, max_bytes=sum(sizes[:7]))) == docs[:7]
    assert list(iter_documents(src, max_docs=3, max_bytes=10 ** 9)) == docs[:3]


def test_describe_source():
    assert describe_source(["a.txt", "b.txt"]) == "files a.txt, b.txt"
    assert describe_source(["a.jsonl"], text_field="body") == "files a.jsonl field body"
    assert describe_source(dataset="EleutherAI/pile", split="train") == "dataset EleutherAI/pile split train field text"
    assert "(20 inputs)" in describe_source([f"{i}.txt" for i in range(20)])
    assert os.sep not in describe_source(dataset="x", config="en")
