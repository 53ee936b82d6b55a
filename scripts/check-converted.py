#!/usr/bin/env python3
"""Checks that transformers loads a folder written by `kto convert` and computes what it computes from the GGUF:
    kto convert --gguf ~/.cache/kto/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smollm2-hf
    .venv/bin/python scripts/check-converted.py /tmp/smollm2-hf tests/fixtures/gguf-parity/smollm2.json
(the venv of scripts/make-gguf-parity-fixture.py). Compares token ids of the fixture's stress strings (transformers'
GGUF loading) and the prompts' argmax, top-10 logits and greedy continuations; exits non-zero on a difference."""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(folder, fixture_path):
    fixture = json.load(open(fixture_path))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    failures = 0
    for case in fixture["stress"]:
        ids = tok(case["text"]).input_ids
        if ids != case["ids"]:
            failures += 1
            print(f"tokens differ for {case['text']!r}: {ids} vs {case['ids']}")
    with torch.no_grad():
        for prompt in fixture["prompts"]:
            ids = torch.tensor([prompt["ids"]])
            logits = model(ids).logits[0]
            top = logits[-1, prompt["last_top_ids"]]
            drift = (top - torch.tensor(prompt["last_top_logits"])).abs().max().item()
            if logits.argmax(-1).tolist() != prompt["argmax"] or drift > 2e-3:
                failures += 1
                print(f"logits differ for {prompt['text']!r}: top-10 drift {drift}")
            for _ in range(len(prompt["greedy_24"])):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if ids[0, -len(prompt["greedy_24"]):].tolist() != prompt["greedy_24"]:
                failures += 1
                print(f"greedy continuation differs for {prompt['text']!r}")
    print(f"{folder}: {type(model).__name__}, {len(fixture['stress'])} stress strings, "
          f"{len(fixture['prompts'])} prompts, {failures} differences")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
