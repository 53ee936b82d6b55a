#!/usr/bin/env python3
"""Writes tests/fixtures/data-kinds/: the same preference rows in every file kind kto reads, written by the tools
that write them for a TRL user (pyarrow, `datasets`, pandas, gzip), plus broken files and a faked Hugging Face cache.

Run from the repository root, in a venv with `datasets==5.2.*` (it brings pyarrow and pandas):

    python -m venv /tmp/fx && /tmp/fx/bin/pip install 'datasets==5.2.*'
    /tmp/fx/bin/python scripts/make-data-fixtures.py      # here: /work/bench-venv/bin/python

The tests (crates/kto-data/tests/data_kinds.rs, crates/kto-cli/tests/parquet_run.rs) read only the committed files;
CI has no Python. Rerunning rewrites the folder; the Parquet and Arrow bytes depend on the pyarrow version
(VERSIONS records it), the rows do not.
"""
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile

import datasets
import pandas
import pyarrow as pa
import pyarrow.parquet as pq

OUT = os.path.join("tests", "fixtures", "data-kinds")
PARITY_DATA = os.path.join("tests", "fixtures", "trl-kto-parity", "data.jsonl")

UNPAIRED = [
    {"prompt": "What is 2+2?", "completion": " 4", "label": True},
    {"prompt": "What is 2+2?", "completion": " 5", "label": False},
    {"prompt": "Name a colour, please.", "completion": ' Blue, like the "sky".', "label": True},
    {"prompt": "Say hi\nin two lines", "completion": " Hi\nthere", "label": True},
    {"prompt": "Café?", "completion": " Non, merci — ☕ later.", "label": False},
    {"prompt": "Capital of France?", "completion": " Berlin", "label": False},
]

NEMO = [
    {"prompt": "What is 2+2?", "response": " 4", "preference": "chosen", "pair": 0},
    {"prompt": "What is 2+2?", "response": " 5", "preference": "rejected", "pair": 0},
    {"prompt": "Capital of France?", "response": " Paris", "preference": "chosen", "pair": 1},
    {"prompt": "Capital of France?", "response": " Berlin", "preference": "rejected", "pair": 1},
]

PAIRED = [
    {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Berlin"},
    {"prompt": "Name a colour, please.", "chosen": " Blue.", "rejected": " Seven, maybe, or \"x\"."},
    {"prompt": "Café?", "chosen": " Oui, merci.", "rejected": " ☕☕☕"},
]

HH = [
    {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: It is 5.",
    },
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Paris.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Berlin.",
    },
]


def msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


CONVERSATIONAL = [
    {"prompt": msgs(("user", "What is 2+2?")), "completion": msgs(("assistant", "4")), "label": True},
    {"prompt": msgs(("user", "What is 2+2?")), "completion": msgs(("assistant", "5")), "label": False},
    {
        "prompt": msgs(("system", "Be brief."), ("user", "Capital of France?")),
        "completion": msgs(("assistant", "Paris.")),
        "label": True,
    },
    {
        "prompt": msgs(("user", "Hi"), ("assistant", "Hello!"), ("user", "Café?")),
        "completion": msgs(("assistant", "Non — ☕.")),
        "label": False,
    },
]

PAIRED_CONVERSATIONAL = [
    {
        "prompt": msgs(("user", "What is 2+2?")),
        "chosen": msgs(("assistant", "4")),
        "rejected": msgs(("assistant", "5")),
    },
    {
        "prompt": msgs(("system", "Be brief."), ("user", "Capital of France?")),
        "chosen": msgs(("assistant", "Paris.")),
        "rejected": msgs(("assistant", "Berlin.")),
    },
]

FORMATS = {
    "unpaired": UNPAIRED,
    "nemo": NEMO,
    "paired": PAIRED,
    "hh": HH,
    "conversational": CONVERSATIONAL,
    "paired_conversational": PAIRED_CONVERSATIONAL,
}


def path(*parts):
    p = os.path.join(OUT, *parts)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p


def jsonl(rows):
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_text(p, text):
    with open(p, "w", encoding="utf-8") as f:
        f.write(text)


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)

    # The reference of every test: each format as JSONL, and as Parquet written by `datasets` (snappy, pyarrow's
    # default; list<struct<content, role>> columns for the message lists).
    for name, rows in FORMATS.items():
        write_text(path(f"{name}.jsonl"), jsonl(rows))
        datasets.Dataset.from_list(rows).to_parquet(path(f"{name}.parquet"))

    # Compressed JSON: gzip (as Anthropic/hh-rlhf ships .jsonl.gz), a gzipped JSON array, zstd from pyarrow.
    with gzip.GzipFile(path("unpaired.jsonl.gz"), "wb", mtime=0) as f:
        f.write(jsonl(UNPAIRED).encode("utf-8"))
    with gzip.GzipFile(path("unpaired.json.gz"), "wb", mtime=0) as f:
        f.write(json.dumps(UNPAIRED, ensure_ascii=False, indent=1).encode("utf-8"))
    with pa.CompressedOutputStream(path("unpaired.jsonl.zst"), "zstd") as f:
        f.write(jsonl(UNPAIRED).encode("utf-8"))

    # CSV as pandas writes it (what `Dataset.to_csv` calls): booleans as True/False, quoted newlines and commas.
    for name in ["unpaired", "nemo", "paired", "hh"]:
        pandas.DataFrame(FORMATS[name]).to_csv(path(f"{name}.csv"), index=False)

    # Arrow IPC streams as `datasets` writes them: a save_to_disk folder and a file of the datasets cache.
    datasets.Dataset.from_list(CONVERSATIONAL).save_to_disk(os.path.join(OUT, "conversational_saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(UNPAIRED[:4]), "test": datasets.Dataset.from_list(UNPAIRED[4:])}
    ).save_to_disk(os.path.join(OUT, "dict_saved"))
    with tempfile.TemporaryDirectory() as cache:
        loaded = datasets.load_dataset("json", data_files=path("unpaired.jsonl"), cache_dir=cache, split="train")
        (arrow_file,) = [f["filename"] for f in loaded.cache_files]
        shutil.copy(arrow_file, path("unpaired-cache-train.arrow"))
        write_text(path("unpaired-cache-train.arrow.source"), os.path.relpath(arrow_file, cache) + "\n")

    # Shards as push_to_hub names them, read in name order; a test shard beside them.
    paired = datasets.Dataset.from_list(PAIRED)
    for i in range(2):
        paired.shard(2, i, contiguous=True).to_parquet(path("shards", f"train-{i:05d}-of-00002.parquet"))
    datasets.Dataset.from_list(PAIRED[:1]).to_parquet(path("shards", "test-00000-of-00001.parquet"))

    # Broken inputs.
    whole = open(path("unpaired.parquet"), "rb").read()
    open(path("bad", "truncated.parquet"), "wb").write(whole[: len(whole) // 2])
    open(path("bad", "truncated.jsonl.gz"), "wb").write(open(path("unpaired.jsonl.gz"), "rb").read()[:-12])
    write_text(path("bad", "jsonl-named.parquet"), jsonl(UNPAIRED))
    label_int = [dict(row, label=int(row["label"])) for row in UNPAIRED]
    pq.write_table(pa.Table.from_pylist(label_int), path("bad", "label-int.parquet"))
    write_text(
        path("bad", "missing-column.csv"),
        'prompt,completion,label\n"What is 2+2?", 4,True\n"What is 2+2?", 5\n',
    )

    # The rows of the training fixture (tests/fixtures/trl-kto-parity/data.jsonl) as Parquet, for the run that must
    # give the metrics of the JSONL run.
    parity = datasets.load_dataset("json", data_files=PARITY_DATA, split="train", cache_dir=tempfile.mkdtemp())
    parity.to_parquet(path("trl-kto-parity-data.parquet"))

    make_hub()
    write_text(
        path("VERSIONS"),
        f"python {sys.version.split()[0]}\npyarrow {pa.__version__}\ndatasets {datasets.__version__}\n"
        f"pandas {pandas.__version__}\n",
    )


def make_hub():
    """A Hugging Face cache (HF_HUB_CACHE) as `hf download --repo-type dataset` leaves it: refs/main holds the
    commit, snapshots/COMMIT/... are symlinks into blobs/."""
    hub = os.path.join(OUT, "hub")

    def repo(repo_id, files):
        folder = os.path.join(hub, "datasets--" + repo_id.replace("/", "--"))
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        os.makedirs(os.path.join(folder, "refs"))
        write_text(os.path.join(folder, "refs", "main"), commit)
        for name, data in files.items():
            blob = os.path.join(folder, "blobs", hashlib.sha256(data).hexdigest())
            os.makedirs(os.path.dirname(blob), exist_ok=True)
            open(blob, "wb").write(data)
            link = os.path.join(folder, "snapshots", commit, name)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)

    def parquet(rows):
        with tempfile.NamedTemporaryFile(suffix=".parquet") as f:
            datasets.Dataset.from_list(rows).to_parquet(f.name)
            return open(f.name, "rb").read()

    def card(configs):
        lines = ["---", "configs:"]
        for config, splits in configs.items():
            lines += [f"- config_name: {config}", "  data_files:"]
            for split, pattern in splits.items():
                lines += [f"  - split: {split}", f"    path: {pattern}"]
        return ("\n".join(lines + ["---", "", "A kto test fixture.", ""])).encode()

    # push_to_hub's default config: data/{split}-NNNNN-of-NNNNN.parquet (the train split in two shards).
    repo(
        "kto-test/prefs",
        {
            "README.md": card({"default": {"train": "data/train-*", "test": "data/test-*"}}),
            "data/train-00000-of-00002.parquet": parquet(PAIRED[:2]),
            "data/train-00001-of-00002.parquet": parquet(PAIRED[2:]),
            "data/test-00000-of-00001.parquet": parquet(PAIRED[:1]),
        },
    )
    # push_to_hub(config_name=...): CONFIG/{split}-NNNNN-of-NNNNN.parquet, one folder per config.
    repo(
        "kto-test/configs",
        {
            "README.md": card(
                {
                    "plain": {"train": "plain/train-*", "test": "plain/test-*"},
                    "chat": {"train": "chat/train-*", "test": "chat/test-*"},
                }
            ),
            "plain/train-00000-of-00001.parquet": parquet(UNPAIRED),
            "plain/test-00000-of-00001.parquet": parquet(UNPAIRED[:2]),
            "chat/train-00000-of-00001.parquet": parquet(CONVERSATIONAL),
            "chat/test-00000-of-00001.parquet": parquet(CONVERSATIONAL[:2]),
        },
    )
    # The training fixture's rows as push_to_hub writes them, train and test split alike.
    parity_rows = [json.loads(line) for line in open(PARITY_DATA, encoding="utf-8")]
    repo(
        "kto-test/parity",
        {
            "data/train-00000-of-00001.parquet": parquet(parity_rows),
            "data/test-00000-of-00001.parquet": parquet(parity_rows),
        },
    )
    # Anthropic/hh-rlhf's layout: no card configs, gzipped JSONL named after the split in data folders.
    repo(
        "kto-test/hh-style",
        {
            "README.md": b"---\nlicense: mit\n---\n",
            "harmless-base/train.jsonl.gz": gzip.compress(jsonl(HH[:1]).encode(), mtime=0),
            "helpful-base/train.jsonl.gz": gzip.compress(jsonl(HH[1:]).encode(), mtime=0),
            "harmless-base/test.jsonl.gz": gzip.compress(jsonl(HH[:1]).encode(), mtime=0),
        },
    )
    # A card whose data_files do not follow the layout rules (a notes file the rules would put in train; a split
    # named by a list of paths), a default config marked so, and a config given only by its data_dir.
    repo(
        "kto-test/card-paths",
        {
            "README.md": (
                "---\nlicense: mit\nconfigs:\n- config_name: chat\n  data_dir: conversations\n"
                "- config_name: prefs\n  default: true\n  data_files:\n  - split: train\n    path: raw/prefs-*.jsonl\n"
                "  - split: test\n    path:\n    - raw/heldout.jsonl\n---\n\nA kto test fixture.\n"
            ).encode(),
            "raw/prefs-a.jsonl": jsonl(UNPAIRED[:3]).encode(),
            "raw/prefs-b.jsonl": jsonl(UNPAIRED[3:]).encode(),
            "raw/heldout.jsonl": jsonl(UNPAIRED[:2]).encode(),
            "raw/notes-train.jsonl": jsonl(UNPAIRED[:1]).encode(),
            "conversations/train.jsonl": jsonl(CONVERSATIONAL).encode(),
            "conversations/test.jsonl": jsonl(CONVERSATIONAL[:2]).encode(),
        },
    )
    write_resolved(hub)


def write_resolved(hub):
    """What `datasets` itself resolves each faked data set's splits to (load_dataset_builder on the snapshot folder,
    offline): hub-resolved.json, {"repo[:config]": {split: [files relative to the snapshot]} or {"error": text}},
    which crates/kto-data/tests/data_kinds.rs compares kto's resolution with."""
    resolved = {}
    for folder in sorted(os.listdir(hub)):
        repo_id = folder.removeprefix("datasets--").replace("--", "/")
        commit = open(os.path.join(hub, folder, "refs", "main")).read().strip()
        snapshot = os.path.join(hub, folder, "snapshots", commit)
        for config in [None, "chat", "plain", "prefs", "nope"]:
            key = repo_id + (f":{config}" if config else "")
            try:
                builder = datasets.load_dataset_builder(snapshot, name=config)
            except Exception as e:  # noqa: BLE001 - the error is what is recorded
                if config is None:
                    resolved[key] = {"error": f"{type(e).__name__}: {e}"}
                continue
            if config is not None and builder.config.name != config:
                continue
            resolved[key] = {
                str(split): [os.path.relpath(f, snapshot) for f in files]
                for split, files in builder.config.data_files.items()
            }
    write_text(os.path.join(OUT, "hub-resolved.json"), json.dumps(resolved, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
