"""Writes tests/fixtures/accelerate-shards/cases.json: which samples each process trains on, as accelerate's
`BatchSamplerShard` deals a data loader's batches to N processes (its defaults under `accelerate launch` /
`torchrun`: `split_batches=False`, `even_batches=True`, `drop_last=False`), for a sequential sampler.

    python scripts/make-accelerate-shard-fixture.py      # needs accelerate and torch from PyPI

kto's `kto_data::batch` shards micro-batches the same way and is tested against this file. (With one process
accelerate deals nothing: the data loader's batches stay as they are, the last one short.)
"""
import json
import os
import sys

import accelerate
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler

# (samples, batch size, processes): a multiple of the global batch, a short last batch, a last group with too few
# batches, fewer samples than one global batch, one sample, and four processes.
CASES = [(12, 4, 2), (29, 3, 2), (29, 4, 2), (7, 2, 3), (5, 4, 3), (1, 2, 2), (30, 4, 4), (16, 2, 4)]

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                          "accelerate-shards", "cases.json")
cases = []
for samples, batch_size, processes in CASES:
    ranks = []
    for rank in range(processes):
        sampler = BatchSampler(SequentialSampler(range(samples)), batch_size, drop_last=False)
        shard = BatchSamplerShard(sampler, num_processes=processes, process_index=rank, even_batches=True)
        ranks.append([list(b) for b in shard])
    cases.append({"samples": samples, "batch_size": batch_size, "processes": processes, "batches_of_rank": ranks})
with open(out, "w") as f:
    json.dump({"accelerate": accelerate.__version__, "cases": cases}, f, indent=None)
    f.write("\n")
print(f"{len(cases)} cases -> {out}")
