"""The benchmark table of scripts/gpu-check.sh: kto and TRL, plain and precompute, same checkpoint, data, settings.

usage: python3 scripts/bench_table.py WORK STEPS

Reads, for each run NAME in kto-plain, trl-plain, kto-precompute, trl-precompute, kto-q4k (plain, the base held
as q4_k blocks: compared with TRL plain):
  WORK/NAME.status  the section's outcome (PASS, FAIL (...), TIMEOUT, SKIPPED (...)), written by gpu-check.sh
  WORK/NAME.mem     nvidia-smi's used memory (MiB), one sample every 100 ms while the run lasted
  WORK/NAME.base    the used memory (MiB) just before the run started
  kto: WORK/NAME/metrics.jsonl (logging_steps = 1); TRL: the JSON line trl_kto_bench.py prints, in WORK/NAME.out

s/step is the mean over the steps after the first 5 (warm-up). For kto it is 16 / samples_per_second of each step,
so a run cut short by its time limit still gives the figure of the steps it finished (shown as "n/STEPS").
Peak memory is measured the same way for both (nvidia-smi peak minus the memory in use before the run: CUDA
context and allocator cache included; a 100 ms sample can miss a short peak); TRL's own
torch.cuda.max_memory_allocated is given beside it. Ratios are kto / TRL of the same variant: samples/s above 1 means
kto is faster, peak memory below 1 means kto needs less. Prints one Markdown table.
"""
import json
import math
import os
import sys

work, steps = sys.argv[1], int(sys.argv[2])
WARM, BATCH = 5, 16


def read(name, default=None):
    try:
        with open(os.path.join(work, name)) as f:
            return f.read().strip()
    except OSError:
        return default


def peak_gib(name):
    try:
        base = float(read(name + ".base").split()[0])
        used = [float(x) for x in read(name + ".mem", "").split()]
        return (max(used) - base) / 1024
    except (AttributeError, ValueError, IndexError):
        return math.nan


def kto_run(name):
    """(s/step, timed steps) from metrics.jsonl, or None."""
    path = os.path.join(work, name, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = [json.loads(line) for line in open(path) if line.strip()]
    timed = [r for r in rows if "loss" in r and r.get("step", 0) > WARM and r.get("samples_per_second", 0) > 0]
    if not timed:
        return None
    return sum(BATCH / r["samples_per_second"] for r in timed) / len(timed), max(r["step"] for r in timed)


def trl_run(name):
    """(s/step, steps, torch peak GiB) from trl_kto_bench.py's JSON line, or None."""
    lines = [line for line in (read(name + ".out", "") or "").splitlines() if line.startswith("{")]
    if not lines:
        return None
    r = json.loads(lines[-1])
    return r["step_s"], r["steps"], r["peak_gib"]


def fmt(x, spec):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


print("| run | outcome | steps | s/step | samples/s | peak GiB (nvidia-smi) | samples/s kto/TRL | peak kto/TRL |")
print("|---|---|---|---|---|---|---|---|")
for variant, trl_variant in (("plain", "plain"), ("precompute", "precompute"), ("q4k", "plain")):
    kto_name, trl_name = f"kto-{variant}", f"trl-{trl_variant}"
    if variant == "q4k" and read(kto_name + ".status") is None:
        continue  # not run (an older pack's check, or no time left)
    kto, trl = kto_run(kto_name), trl_run(trl_name)
    kto_peak, trl_peak = peak_gib(kto_name), peak_gib(trl_name)
    kto_sps = BATCH / kto[0] if kto else None
    trl_sps = BATCH / trl[0] if trl else None
    ratio = kto_sps / trl_sps if kto_sps and trl_sps else None
    mem_ratio = kto_peak / trl_peak if not math.isnan(kto_peak) and not math.isnan(trl_peak) and trl_peak > 0 else None
    print(f"| kto {variant} | {read(kto_name + '.status', 'not run')} | {f'{kto[1]}/{steps}' if kto else '—'} "
          f"| {fmt(kto and kto[0], '.3f')} | {fmt(kto_sps, '.1f')} | {fmt(kto_peak, '.1f')} "
          f"| {fmt(ratio, '.2f')} | {fmt(mem_ratio, '.2f')} |")
    if variant == "q4k":
        continue  # its TRL row is plain's, printed above
    torch_peak = f" (torch: {trl[2]:.1f})" if trl else ""
    print(f"| TRL {variant} | {read(trl_name + '.status', 'not run')} | {f'{trl[1]}/{steps}' if trl else '—'} "
          f"| {fmt(trl and trl[0], '.3f')} | {fmt(trl_sps, '.1f')} | {fmt(trl_peak, '.1f')}{torch_peak} | | |")
