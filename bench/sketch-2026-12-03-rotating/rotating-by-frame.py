"""Rotating validation captions, frame by frame: how many of them read as their caption's shape at each of
the 21 frames, for the clips, the codec and each stream; and what the stream's frames 9-20 read as.
Usage: python rotating-by-frame.py EVALUATE_JSON... (from `evaluate --only shapes --split validation`)."""
import collections
import json
import sys

from instrument.sketch.data import describe


def shape_of(caption):
    return describe(caption).groups[0].shape


for path in sys.argv[1:]:
    figures = json.load(open(path))
    for source in ("clips", "codec", "stream"):
        rows = [r for r in figures[f"shape_following_{source}"]["rows"] if r["motion"] == "rotating"]
        by_frame = [sum(r["read"][i] == shape_of(r["caption"]) for r in rows) for i in range(21)]
        print(f"{path} {source}: {sum(r['ok'] for r in rows)} of {len(rows)} right; by frame {by_frame}")
    later = collections.Counter(x for r in rows for x in r["read"][9:])
    print(f"{path} stream frames 9-20 read as: {later.most_common(4)} of {sum(later.values())}")
