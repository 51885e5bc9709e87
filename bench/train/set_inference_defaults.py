"""Set the inference defaults a checkpoint carries, without touching its weights.

Usage: python bench/train/set_inference_defaults.py CKPT [-o OUT] [--replace] KEY=VALUE ...

Example, after the cross-validation chose them: ``... trees_r18.pt score_threshold=0.8 nms_threshold=0.3``.
A value is read as YAML (``0.8``, ``4``, ``polygon``); ``KEY=`` (empty) removes a key. The file is
rewritten atomically in place unless ``-o`` names another; weights keep their dtype (a float16 model
stays float16) and a training state, if any, is kept. Prints the defaults now stored.
"""

from __future__ import annotations

import argparse
import json

import yaml

from geomask.detect.checkpoint import load_checkpoint, set_inference_defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("values", nargs="*", metavar="KEY=VALUE")
    ap.add_argument("-o", "--output", help="Write here instead of in place.")
    ap.add_argument("--replace", action="store_true", help="Drop the stored defaults first.")
    args = ap.parse_intermixed_args()  # -o may come before the KEY=VALUE list
    values = {}
    for item in args.values:
        key, sep, raw = item.partition("=")
        if not sep:
            ap.error(f"{item!r} is not KEY=VALUE")
        values[key] = yaml.safe_load(raw) if raw else None
    out = set_inference_defaults(args.checkpoint, args.output or args.checkpoint, values, replace=args.replace)
    meta = load_checkpoint(out).meta
    print(f"{out}: inference defaults {json.dumps(meta.inference if meta else {})}")


if __name__ == "__main__":
    main()
