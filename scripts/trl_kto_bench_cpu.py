"""Helper of scripts/bench-cpu.sh: TRL 1.16's KTOTrainer on CPU beside `kto train`, same data and settings.

usage:
  trl_kto_bench_cpu.py data PREPARED_TRAIN_JSONL OUT_JSONL          (standard library only)
  trl_kto_bench_cpu.py data-long UNPAIRED_JSONL OUT_JSONL            (standard library only)
  trl_kto_bench_cpu.py make-smollm2 TOKENIZER_DIR OUT_DIR            (torch + transformers)
  trl_kto_bench_cpu.py make-tinyllama TOKENIZER_DIR OUT_DIR          (torch + transformers)
  trl_kto_bench_cpu.py trl MODEL DATA_JSONL OUT_DIR STEPS THREADS gc|nogc
  trl_kto_bench_cpu.py table WORK STEPS WARMUP THREADS DATA... -- MODEL... -- RUN...   (standard library only)

MODEL: a checkpoint folder, or a .gguf file (transformers dequantizes it to f32 at load, as kto's quantize = "none").
RUN: a folder name under WORK/DATA/MODEL: trl-gc, trl-nogc (TRL) or kto[-plain][-gc][-keep|-TYPE] (kto; its
metrics.jsonl). BENCH_BATCH and BENCH_MAX_LENGTH (default 8 and 256) set the batch on both sides.

`trl` prints nothing useful itself: it writes OUT_DIR/trl.json (per step: the time at on_step_end, TRL's running
`num_tokens` and the tokens its forward passes embedded). `table` reads every run's files and prints the markdown
table.
"""
import json, os, shutil, sys

BATCH, MAX_LENGTH = int(os.environ.get("BENCH_BATCH", 8)), int(os.environ.get("BENCH_MAX_LENGTH", 256))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cmd_data(prepared, out):
    """The unpaired samples in `kto prepare`'s (seeded, shuffled) order, reduced to TRL's three fields, so that
    both trainers read the very same file (TRL would carry an extra `pair` column into its batches)."""
    n = 0
    with open(prepared) as src, open(out + ".tmp", "w") as dst:
        for line in src:
            if line.strip():
                r = json.loads(line)
                dst.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"],
                                      "label": r["label"]}) + "\n")
                n += 1
    os.replace(out + ".tmp", out)
    print(f"{n} unpaired samples -> {out}")


def cmd_data_long(unpaired, out, n=480, seed=0):
    """A data set shaped like the GPU benchmark's: long prompts (32 to 120 words, several earlier turns' worth)
    and short completions (8 to 32 words), the words drawn (seeded) from the HH sample's own text so that the
    tokenizer sees the same vocabulary; labels alternate."""
    import random
    rng = random.Random(seed)
    words = []
    with open(unpaired) as src:
        for line in src:
            if line.strip():
                r = json.loads(line)
                words += (r["prompt"] + " " + r["completion"]).replace("\n", " ").split()
    with open(out + ".tmp", "w") as dst:
        for i in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(32, 120)))
            completion = " ".join(rng.choice(words) for _ in range(rng.randint(8, 32)))
            dst.write(json.dumps({"prompt": f"Human:\n{prompt}\nAssistant:\n", "completion": completion,
                                  "label": i % 2 == 0}) + "\n")
    os.replace(out + ".tmp", out)
    print(f"{n} long-prompt samples -> {out}")


# Random checkpoints of real models' shapes (their config.json), for TRL and kto alike.
SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rope_theta=100000.0, tie_word_embeddings=True),
    # TinyLlama-1.1B-Chat-v1.0 (issue 24's 1.1B shape): 1.100 G parameters, 4.40 GB of f32.
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                      rope_theta=10000.0, tie_word_embeddings=False),
}


def cmd_make_random(shape, tokenizer_dir, out):
    """A Llama of a real model's shape with random N(0, 0.02) weights (transformers' init, seed 0), f32
    safetensors, with the tokenizer of `tokenizer_dir` (its ids must stay below the shape's vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    dims = SHAPES[shape]
    tok_cfg = json.load(open(os.path.join(tokenizer_dir, "tokenizer_config.json")))
    vocab = json.load(open(os.path.join(tokenizer_dir, "tokenizer.json")))["model"]["vocab"]
    assert max(vocab.values()) < dims["vocab_size"], f"the tokenizer's ids must fit the {shape} vocabulary"
    torch.manual_seed(0)
    cfg = LlamaConfig(**dims, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{shape}-shaped checkpoint ({params / 1e6:.1f} M parameters, tokenizer "
          f"{tok_cfg.get('tokenizer_class')}, {len(vocab)} tokens) -> {out}")


def cmd_trl(model_dir, data, out, steps, threads, gc):
    """TRL's KTOTrainer with its defaults but for the bench's settings; `gc`: gradient checkpointing, which
    KTOConfig turns on by default (kto has none in training, hence the `nogc` variant beside it)."""
    import time
    import torch
    torch.set_num_threads(threads)
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    embedded = [0]  # tokens through the input embedding: every forward pass, padding included

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends, self.forward_tokens = [], []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())  # CPU: the step's work is done when it returns
            self.forward_tokens.append(embedded[0])

    ds = load_dataset("json", data_files=data, split="train")
    # A GGUF file: its tokenizer converted, every tensor dequantized to f32 (`dequantize=True` asks for the plain
    # dense model that Trainer accepts; transformers keeps no GGUF blocks on the CPU anyway). Needs `gguf`.
    folder, gguf = ((os.path.dirname(model_dir), {"gguf_file": os.path.basename(model_dir)})
                    if model_dir.endswith(".gguf") else (model_dir, {}))
    tok = AutoTokenizer.from_pretrained(folder, **gguf)
    if gguf:
        from transformers import GgufConfig
        gguf["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf)
    # Gradient checkpointing recomputes decoder layers, not the embedding: this counts each pass once.
    model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: embedded.__setitem__(0, embedded[0] + inputs[0].numel()))
    args = KTOConfig(output_dir=os.path.join(out, "trl_out"), per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=1, max_length=MAX_LENGTH, beta=0.1,
                     precompute_ref_log_probs=False, max_steps=steps, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                     gradient_checkpointing=gc,
                     # TRL's configs default bf16 to True, which autocasts to bf16 on the CPU too: f32 like kto.
                     bf16=False)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    timer = StepTimes()
    trainer = KTOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=[timer])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r and "num_tokens" in r]
    result = {
        "steps": len(timer.ends), "step_ends": timer.ends, "num_tokens": [r["num_tokens"] for r in logs],
        "forward_tokens": timer.forward_tokens,
        "loss": [r["loss"] for r in logs], "threads": torch.get_num_threads(),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "versions": {m.__name__: m.__version__ for m in map(__import__, ("torch", "transformers", "peft", "trl"))},
        "samples": len(trainer.train_dataset), "device": str(trainer.args.device),
    }
    with open(os.path.join(out, "trl.json"), "w") as f:
        json.dump(result, f)


# ---- table ----

def peak_rss_gib(path):
    """`/usr/bin/time -v`'s "Maximum resident set size (kbytes)"."""
    try:
        for line in open(path):
            if "Maximum resident set size" in line:
                return int(line.rsplit(":", 1)[1]) / 2**20
    except (OSError, ValueError):
        pass
    return float("nan")


def trl_row(run_dir, steps, warmup):
    r = json.load(open(os.path.join(run_dir, "trl.json")))
    ends, toks = r["step_ends"], r["num_tokens"]
    if len(ends) != steps or len(toks) != steps:
        raise SystemExit(f"{run_dir}: TRL ran {len(ends)} steps / logged {len(toks)}, expected {steps}")
    step_s = (ends[-1] - ends[warmup - 1]) / (steps - warmup)
    fwd = r["forward_tokens"]
    return {"step_s": step_s, "tokens": toks, "rss": peak_rss_gib(os.path.join(run_dir, "trl.time")), "meta": r,
            "forward_per_step": (fwd[-1] - fwd[warmup - 1]) / (steps - warmup)}


def kto_row(run_dir, steps, warmup):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if l.strip()]
    train = [r for r in rows if "loss" in r and "samples_per_second" in r]
    if [r["step"] for r in train] != list(range(1, steps + 1)):
        raise SystemExit(f"{run_dir}: kto logged steps {[r['step'] for r in train]}, expected 1..{steps}")
    timed = train[warmup:]
    step_s = sum(BATCH / r["samples_per_second"] for r in timed) / len(timed)
    forward = [r.get("num_forward_tokens", float("nan")) for r in timed]
    return {"step_s": step_s, "tokens": [r["num_tokens"] for r in train],
            "rss": peak_rss_gib(os.path.join(run_dir, "kto.time")), "forward_per_step": sum(forward) / len(forward)}


TRL_LABELS = {"trl-gc": "TRL (gc: its default)", "trl-nogc": "TRL (no gc)"}
TRL_SHORT = {"trl-gc": "gc", "trl-nogc": "no gc"}


def kto_parts(run):
    """`kto-plain-gc-q4_k` -> {"plain", "gc", "q4_k"}: the settings bench-cpu.sh gave that run."""
    return set(run.split("-")[1:])


# KTO_BIN_BASELINE's row: another binary with the default settings, not a setting of this one.
BASELINE = "kto-baseline"


def kto_label(run):
    if run == BASELINE:
        return run
    words = {"plain": "padding_free and kl_prefix_sharing off", "gc": "gradient_checkpointing on"}
    said = [words.get(p, f'quantize = "{p}"') for p in sorted(kto_parts(run), key=lambda p: p not in words)]
    return ", ".join(["kto"] + said)


def unquantized_twin(run, runs):
    """The run of the same settings on the base as the file has it (quantize = "none"), when measured."""
    if run == BASELINE:
        return None
    quantized = {p for p in kto_parts(run) if p not in ("plain", "gc")}
    twin = [r for r in runs if r.startswith("kto") and kto_parts(r) == kto_parts(run) - quantized]
    return twin[0] if quantized and twin else None


def cmd_table(work, steps, warmup, threads, datasets, models, runs):
    """One markdown table; each kto row carries its ratios to every TRL row of the same data and model."""
    trl_runs = [r for r in runs if r in TRL_LABELS]
    kto_runs = [r for r in runs if r not in TRL_LABELS]
    vs = " / ".join(TRL_SHORT[r] for r in trl_runs)
    quantized = any(unquantized_twin(r, kto_runs) for r in kto_runs)
    print(f"| data | model | trainer | s/step | samples/s | tokens/s | forward tokens/step | peak RSS GiB | "
          f"samples/s ÷ TRL ({vs}) | RSS ÷ TRL ({vs}) |" + (" s/step, RSS ÷ kto unquantized |" if quantized else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if quantized else ""))
    notes, meta = [], None
    for data, model in [(d, m) for d in datasets for m in models]:
        where = os.path.join(work, data, model)
        trl = {r: trl_row(os.path.join(where, r), steps, warmup) for r in trl_runs}
        kto = {r: kto_row(os.path.join(where, r), steps, warmup) for r in kto_runs}
        rows = list(trl.items()) + list(kto.items())
        meta = rows[0][1].get("meta", meta) if trl else meta
        # Real (unpadded) prompt + completion tokens per timed step: the growth of the running `num_tokens`
        # (TRL: the batch's attention-mask sum; kto counts the same), from the first run (all must agree).
        ref_name, ref = rows[0]
        per_step = (ref["tokens"][-1] - ref["tokens"][warmup - 1]) / (steps - warmup)
        for name, r in rows:
            if r["tokens"] != ref["tokens"]:
                notes.append(f"{data} {model}: {name}'s running num_tokens {r['tokens'][:3]}… differ from {ref_name}'s "
                             f"{ref['tokens'][:3]}…: not the same samples or tokenization")
            speed = " / ".join(f"{t['step_s'] / r['step_s']:.2f}×" for t in trl.values()) if name in kto else ""
            mem = " / ".join(f"{r['rss'] / t['rss']:.2f}×" for t in trl.values()) if name in kto else ""
            label = TRL_LABELS.get(name) or kto_label(name)
            twin = kto.get(unquantized_twin(name, kto_runs)) if name in kto else None
            vs_twin = f" {r['step_s'] / twin['step_s']:.2f}×, {r['rss'] / twin['rss']:.2f}× |" if twin else " |"
            print(f"| {data} | {model} | {label} | {r['step_s']:.3f} | {BATCH / r['step_s']:.2f} | "
                  f"{per_step / r['step_s']:.0f} | {r['forward_per_step']:.0f} | {r['rss']:.2f} | {speed} | {mem} |"
                  + (vs_twin if quantized else ""))
    print()
    print(f"{steps} steps of batch {BATCH} on every side ({steps * BATCH} samples; running num_tokens "
          f"{'DIFFER, see below' if notes else 'identical on every side, step by step'}), the first {warmup} not "
          f"timed; max_length {MAX_LENGTH}, f32, LoRA r 8 / alpha 16 / dropout 0.05 (zeroed by disable_dropout) on "
          f"q,k,v,o,gate,up,down, beta 0.1, KL pairs and reference log-probs every step, TRL defaults otherwise; "
          f"{threads} threads on every side (RAYON_NUM_THREADS={threads}"
          + (f", torch.get_num_threads()={meta['threads']}; TRL on {meta['device']}; torch {meta['versions']['torch']}, "
             f"transformers {meta['versions']['transformers']}, peft {meta['versions']['peft']}, "
             f"trl {meta['versions']['trl']}" if meta else "") + ").")
    print()
    print("Data: `hh` is the HH sample made unpaired (prompts of earlier turns, completions of one answer); `long` is "
          "shaped like the GPU benchmark's (prompts of 32-120 words, completions of 8-32, cut at max_length). "
          "Forward tokens/step: the tokens every forward pass of a step pushed through the model, padding included "
          "(TRL: counted at its input embedding; kto: its `num_forward_tokens`); tokens/s counts real prompt + "
          "completion tokens.")
    print("Models: `tiny` the embedded test model; `smollm2` and `tinyllama` random f32 checkpoints of "
          "SmolLM2-135M's and TinyLlama-1.1B's shapes; `smollm2-gguf` the real SmolLM2-135M-Instruct Q4_1 GGUF "
          "file, which TRL (transformers' GGUF loader) and kto's `quantize = \"none\"` dequantize to f32 at load "
          "and `quantize = \"keep\"` holds as Q4_1 blocks. `÷ kto unquantized`: a quantized run against the kto run "
          "of the same settings on the f32 base.")
    for n in notes:
        print(f"WARNING: {n}")


def main(argv):
    cmd = argv[0]
    if cmd == "data":
        cmd_data(argv[1], argv[2])
    elif cmd == "data-long":
        cmd_data_long(argv[1], argv[2])
    elif cmd in ("make-smollm2", "make-tinyllama"):
        cmd_make_random(cmd.removeprefix("make-"), argv[1], argv[2])
    elif cmd == "trl":
        if argv[6] not in ("gc", "nogc"):
            raise SystemExit(__doc__)
        cmd_trl(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]), argv[6] == "gc")
    elif cmd == "table":
        # table WORK STEPS WARMUP THREADS DATA... -- MODEL... -- RUN...
        first = argv.index("--")
        second = argv.index("--", first + 1)
        cmd_table(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5:first], argv[first + 1:second],
                  argv[second + 1:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
