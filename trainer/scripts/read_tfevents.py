#!/usr/bin/env python3
"""Reads a directory of TensorBoard event files with TensorBoard's own reader and prints
what it saw as JSON: used by trainer/tests/tensorboard_events.rs to check that the
trainer's curves are files TensorBoard accepts.

Two readers, both TensorBoard's (pip package `tensorboard`, no TensorFlow):
* the record reader, over every event file: each record's length and data CRCs are
  checked; a bad one is an error here (EventAccumulator would silently stop at it, as it
  does at a record still being written);
* EventAccumulator, as the TensorBoard server loads a run: the scalar series per tag,
  after its purge of points orphaned by a restarted (resumed) run.

Usage: read_tfevents.py LOGDIR  → {"files": [...], "scalars": {tag: [[step, value], ...]}}
"""

import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow


def check_file(path):
    """Every record of one file: CRCs checked, decoded; the first is the file version."""
    reader = pywrap_tensorflow.PyRecordReader_New(path)
    events = []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            break
        except errors.DataLossError as e:
            sys.exit(f"{path}: record {len(events)}: {e.message}")
        events.append(event_pb2.Event.FromString(reader.record()))
    if not events or events[0].WhichOneof("what") != "file_version":
        sys.exit(f"{path}: the first event is not a file_version")
    if events[0].file_version != "brain.Event:2":
        sys.exit(f"{path}: file_version {events[0].file_version!r}")
    return {
        "name": os.path.basename(path),
        "events": len(events),
        "kinds": [e.WhichOneof("what") for e in events],
    }


def main():
    logdir = sys.argv[1]
    names = sorted(n for n in os.listdir(logdir) if "tfevents" in n)
    files = [check_file(os.path.join(logdir, n)) for n in names]
    acc = event_accumulator.EventAccumulator(
        logdir, size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    scalars = {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }
    json.dump({"files": files, "scalars": scalars}, sys.stdout)


if __name__ == "__main__":
    main()
