#!/usr/bin/env python3
"""Reads a TensorBoard log folder with TensorBoard's own reader and prints its scalars as JSON.

    python3 scripts/read-tensorboard.py LOGDIR

The reader is the one `tensorboard --logdir` builds its scalar charts from (EventAccumulator over every event
file of the folder, in name order; here without its purge of steps that go backwards), so kto's tests compare what TensorBoard shows with metrics.jsonl
(crates/kto-cli/tests/tensorboard.rs). Output: {"event_files": [names], "scalars": {tag: [[step, value], ...]}},
values as the f32 TensorBoard holds, NaN as null.

Needs the `tensorboard` package (pip install tensorboard; .ci/run installs it into a venv).
"""

import json
import math
import os
import sys

from tensorboard.backend.event_processing import event_accumulator


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    logdir = sys.argv[1]
    # size 0: keep every scalar (the default keeps a sample of 10,000 per tag). No purge: the accumulator would
    # otherwise drop the events after a step that goes backwards (its guess at a restarted writer), hiding the
    # repeated steps a resumed run must not write.
    accumulator = event_accumulator.EventAccumulator(
        logdir, size_guidance={event_accumulator.SCALARS: 0}, purge_orphaned_data=False
    )
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        scalars[tag] = [
            [event.step, None if math.isnan(event.value) else event.value] for event in accumulator.Scalars(tag)
        ]
    files = sorted(name for name in os.listdir(logdir) if "tfevents" in name)
    json.dump({"event_files": files, "scalars": scalars}, sys.stdout)


if __name__ == "__main__":
    main()
