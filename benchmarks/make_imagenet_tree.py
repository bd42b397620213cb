"""Derive ``configs/classify/imagenet_wordnet_tree.json``, the ImageNet-1K class hierarchy for
HDC (:mod:`difffeat.heads.dc_hierarchy`), from WordNet 3.0, offline.

Inputs: WordNet 3.0's ``data.noun`` (Debian package ``wordnet-base``:
``apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb wn/`` gives
``wn/usr/share/wordnet/data.noun``), the 1000 ImageNet wnids in class-index order (a JSON
``{"0": ["n01440764", "tench"], ...}``, e.g. the Diffusion Classifier reference's
``diffusion/imagenet_class_index.json``) and the class names (a prompts CSV with
``classname,classidx``: the reference's ``prompts/imagenet_prompts.csv``; repeated names
become ``"name (classidx)"``, as ``difffeat classify --prompts-file`` reads them).

Each class climbs its *first* hypernym to ``entity`` (one tree); inner nodes with a single
child are removed. Inner nodes are named by their first lemma (``"lemma (wnid)"`` where that
is taken). WordNet 3.0 Copyright 2006 by Princeton University (licence next to the JSON).

    python benchmarks/make_imagenet_tree.py wn/usr/share/wordnet/data.noun \\
        .refs/diffusion-classifier/diffusion/imagenet_class_index.json \\
        .refs/diffusion-classifier/prompts/imagenet_prompts.csv configs/classify/imagenet_wordnet_tree.json
"""
from __future__ import annotations

import csv
import json
import sys
from typing import Any


def read_nouns(path: str) -> dict[str, tuple[str, list[str]]]:
    """WordNet noun synsets: offset -> (first lemma, hypernym offsets)."""
    out = {}
    for line in open(path, encoding="latin-1"):
        if line.startswith("  "):  # licence header
            continue
        f = line.split(" | ")[0].split()
        w_cnt = int(f[3], 16)
        i = 4 + 2 * w_cnt
        ptrs = f[i + 1: i + 1 + 4 * int(f[i])]
        hyp = [ptrs[j + 1] for j in range(0, len(ptrs), 4) if ptrs[j] in ("@", "@i") and ptrs[j + 2] == "n"]
        out[f[0]] = (f[4].replace("_", " "), hyp)
    return out


def class_names(prompts_csv: str) -> dict[int, str]:
    """Class index -> class name; a repeated name becomes ``"name (classidx)"``."""
    names: dict[int, str] = {}
    for r in csv.DictReader(open(prompts_csv, encoding="utf-8")):
        n = r["classname"]
        names[int(r["classidx"])] = f"{n} ({r['classidx']})" if n in names.values() else n
    return names


def build(nouns: dict, wnids: dict, names: dict[int, str]) -> dict[str, Any]:
    """The first-hypernym tree of the classes, single-child inner nodes removed."""
    children: dict[str, set[str]] = {}
    leaf = {w[0][1:]: names[int(k)] for k, w in wnids.items()}
    root = ""
    for off in leaf:
        node = off
        while nouns[node][1]:
            children.setdefault(nouns[node][1][0], set()).add(node)
            node = nouns[node][1][0]
        root = node
    taken = set(leaf.values())

    def node(off: str) -> dict[str, Any]:
        if off in leaf:
            assert off not in children, f"class n{off} has classes below it"
            return {"name": leaf[off], "wnid": "n" + off}
        kids = [node(c) for c in sorted(children[off])]
        if len(kids) == 1:
            return kids[0]
        name = nouns[off][0] if nouns[off][0] not in taken else f"{nouns[off][0]} (n{off})"
        taken.add(name)
        return {"name": name, "wnid": "n" + off, "children": kids}

    tree = node(root)
    tree["source"] = ("WordNet 3.0 (Princeton University), first-hypernym tree of the ImageNet-1K classes; "
                      "built by benchmarks/make_imagenet_tree.py; licence: imagenet_wordnet_tree.LICENSE")
    return tree


if __name__ == "__main__":
    data_noun, class_index, prompts_csv, out = sys.argv[1:5]
    tree = build(read_nouns(data_noun), json.load(open(class_index)), class_names(prompts_csv))
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(tree, fh, separators=(",", ":"))
        fh.write("\n")
