#!/usr/bin/env python3
"""transformers' own GGUF loading of SmolLM2-135M-Instruct, as a small JSON fixture for kto's parity tests.

Made with torch + transformers 5.17 + gguf from PyPI (CPU):
    python3 -m venv .venv && .venv/bin/pip install torch transformers==5.17.0 gguf accelerate
    scripts/get-smollm2.sh            # the .gguf into ~/.cache/kto/
    .venv/bin/python scripts/make-gguf-parity-fixture.py ~/.cache/kto/SmolLM2-135M-Instruct.Q4_1.gguf \
        tests/fixtures/gguf-parity/smollm2.json

A second fixture covers the SentencePiece kind (`tokenizer.ggml.model = llama`), which SmolLM2 does not use: a tiny
random llama GGUF with a hand-made SentencePiece vocabulary (byte tokens, scored pieces) written with gguf's
GGUFWriter, and the ids transformers' GGUF tokenizer gives the stress strings:
    .venv/bin/python scripts/make-gguf-parity-fixture.py --sentencepiece tests/fixtures/gguf-parity/sentencepiece.json

transformers dequantizes every tensor to f32 (`from_pretrained(..., gguf_file=...)`); the logits below are of that
f32 model. Only what the tests compare is stored: per prompt the top-10 logits of the last position and the greedy
next token at every position, 24 greedily chosen tokens (no stop token), and the token ids of stress strings.
"""
import json
import os
import sys

import importlib.metadata
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

STRESS = [
    "Hello world",
    "  two leading spaces",
    "digits 0123456789 and 3.14159, 1,000,000",
    "accents: café naïve résumé Ångström",
    "CJK: 你好，世界。日本語のテキスト 한국어",
    "emoji: 👍🏽 🤖 ❤️‍🔥",
    "tabs\tand\t\ttabs",
    "CRLF line\r\nnext line\r\n",
    "special text: <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "code: fn main() { println!(\"{}\", x); }",
    "",
]

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGive me a tip for making tea.<|im_end|>\n<|im_start|>assistant\n",
]


def greedy(model, ids, steps):
    """The argmax continuation, one full forward per token and no stop token (`generate` would stop at or
    suppress the end-of-turn token, which the test generates through)."""
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -steps:]


def main(gguf_path, out_path):
    folder, name = os.path.split(os.path.abspath(gguf_path))
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    stress = [{"text": t, "ids": tok(t).input_ids} for t in STRESS]
    chat = [{"role": "user", "content": "Any tips for tea?"}]
    chat_text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prompts = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, return_tensors="pt").input_ids
            logits = model(ids).logits[0]
            top = torch.topk(logits[-1], 10)
            generated = greedy(model, ids, 24)
            prompts.append({
                "text": text,
                "ids": ids[0].tolist(),
                "argmax": logits.argmax(-1).tolist(),
                "last_top_ids": top.indices.tolist(),
                "last_top_logits": [round(v, 5) for v in top.values.tolist()],
                "greedy_24": generated.tolist(),
                "greedy_24_text": tok.decode(generated),
            })
    fixture = {
        "made_by": "scripts/make-gguf-parity-fixture.py",
        "gguf_file": name,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": importlib.metadata.version("gguf")},
        "special_tokens": {"bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token, "unk": tok.unk_token},
        "chat_template_render": {"messages": chat, "text": chat_text},
        "stress": stress,
        "prompts": prompts,
    }
    with open(out_path, "w") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")


SP_PIECES = ["▁", "e", "t", "a", "o", "h", "l", "s", "n", "1", "2", "3", "é", "▁t", "he", "▁the", "ll", "▁he",
             "▁hell", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "▁a", "▁s", "ca", "fé", "▁ca", "▁café", "12",
             "▁1", "▁12", "\t", "你", "好"]


def sentencepiece_fixture(out_path):
    import tempfile

    import numpy as np
    from gguf import GGUFWriter

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SP_PIECES
    types = [3, 3, 3] + [6] * 256 + [1] * len(SP_PIECES)
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(SP_PIECES))]
    hidden, layers, heads, kv, inter, vocab = 64, 1, 4, 2, 96, len(tokens)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny-sp.gguf")
        w = GGUFWriter(path, "llama")
        w.add_block_count(layers)
        w.add_context_length(128)
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(inter)
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        head_dim = hidden // heads
        shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
        for name, shape in [("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (kv * head_dim, hidden)), ("attn_v", (kv * head_dim, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)),
                            ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))]:
            shapes[f"blk.0.{name}.weight"] = shape
        for name, shape in shapes.items():
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * 0.02)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file="tiny-sp.gguf")
        stress = [{"text": t, "ids": tok(t).input_ids} for t in STRESS + ["hello world", "the café 123", "tell"]]
    fixture = {
        "made_by": "scripts/make-gguf-parity-fixture.py --sentencepiece",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": importlib.metadata.version("gguf")},
        "tokens": tokens, "token_types": types, "scores": scores, "add_bos_token": True,
        "special_tokens": {"bos": tok.bos_token, "eos": tok.eos_token, "unk": tok.unk_token},
        "stress": stress,
    }
    with open(out_path, "w") as f:
        json.dump(fixture, f, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    if sys.argv[1] == "--sentencepiece":
        sentencepiece_fixture(sys.argv[2])
    else:
        main(*sys.argv[1:3])
