#!/usr/bin/env python3
"""data/hh-sample (raw HH-RLHF text) → data/hh-sample-chat (TRL's conversational unpaired rows), so a chat model
sees its own chat template: {"prompt": [{"role", "content"}...], "completion": [{"role": "assistant", ...}],
"label": true|false}. Each pair gives its chosen row (label true) then its rejected row (false), so batches mix
both classes. Standard library only:
    python3 scripts/hh-to-conversational.py [data/hh-sample] [data/hh-sample-chat]"""
import json
import os
import re
import sys

TURN = re.compile(r"\n\n(Human|Assistant): ")


def messages(text):
    parts = TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"text before the first turn: {parts[0]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def convert(src, dst):
    with open(src) as f, open(dst + ".partial", "w") as out:
        for number, line in enumerate(f, 1):
            row = json.loads(line)
            chosen, rejected = messages(row["chosen"]), messages(row["rejected"])
            if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant":
                raise ValueError(f"{src}:{number}: chosen and rejected must differ only in the last Assistant turn")
            for completion, label in [(chosen[-1], True), (rejected[-1], False)]:
                out.write(json.dumps({"prompt": chosen[:-1], "completion": [completion], "label": label},
                                     ensure_ascii=False) + "\n")
    os.replace(dst + ".partial", dst)


def main(src="data/hh-sample", dst="data/hh-sample-chat"):
    os.makedirs(dst, exist_ok=True)
    for split in ["train.jsonl", "test.jsonl"]:
        convert(os.path.join(src, split), os.path.join(dst, split))


if __name__ == "__main__":
    main(*sys.argv[1:3])
