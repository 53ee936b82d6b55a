"""Table of scripts/bench-gpu.sh: TRL plain / precompute and kto, same checkpoint, data and settings.

s/step is the mean over steps 6..STEPS (the first 5 are warm-up). Tokens per step are the real (unpadded) prompt +
completion tokens of the batch. Peak memory: TRL reports torch.cuda.max_memory_allocated; for kto it is the peak of
nvidia-smi's used memory above what was in use before it started (so it includes the CUDA context, ~0.5 GiB).
MFU counts useful FLOPs only: 2 * P * (4 * T + 2 * K) per step, where P = 1.034e9 matmul parameters of TinyLlama
(layers' linears + lm_head), T the target tokens and K the KL tokens of the step (policy forward + backward of the
targets = 3 T, reference forward of the targets = T, policy and reference forwards of the KL pairs = 2 K),
against the H100's dense bf16 peak of 989 TFLOP/s.
"""
import json, os, sys

work, steps = sys.argv[1], int(sys.argv[2])
WARM, BATCH, PARAMS, PEAK = 5, 16, 1.034e9, 989e12

def peak_gib(name):
    try:
        base = float(open(os.path.join(work, name + ".base")).read().split()[0])
        used = [float(x) for x in open(os.path.join(work, name + ".mem")).read().split()]
        return (max(used) - base) / 1024
    except (OSError, ValueError):
        return float("nan")

rows = []
for variant in ("plain", "precompute"):
    out = [l for l in open(os.path.join(work, f"trl-{variant}.out")) if l.startswith("{")]
    r = json.loads(out[-1])
    rows.append((f"TRL {variant}", r["step_s"], r["tokens_per_s"] * r["step_s"], r["peak_gib"]))

for name, run in (("kto", "kto-run"), ("kto-precompute", "kto-run-pre")):
    path = os.path.join(work, run, "metrics.jsonl")
    if not os.path.exists(path):
        continue
    m = [json.loads(l) for l in open(path)]
    train = [r for r in m if "loss" in r and "step" in r]
    timed = [r for r in train if r["step"] > WARM]
    step_s = sum(BATCH / r["samples_per_second"] for r in timed) / len(timed)
    toks = (train[-1]["num_tokens"] - train[WARM - 1]["num_tokens"]) / len(timed)
    rows.append((name, step_s, toks, peak_gib(name)))

trl_plain = rows[0][1]
print(f"{'run':<16} {'s/step':>8} {'samples/s':>10} {'tokens/s':>10} {'peak GiB':>9} {'MFU %':>6} {'TRL plain / this':>17}")
for name, step_s, toks, peak in rows:
    flops = 2 * PARAMS * (4 * toks + 2 * toks)  # K ≈ T: the KL pairs reuse the batch's completions
    print(f"{name:<16} {step_s:8.3f} {BATCH / step_s:10.1f} {toks / step_s:10.0f} {peak:9.1f} "
          f"{100 * flops / step_s / PEAK:6.1f} {trl_plain / step_s:17.2f}")
