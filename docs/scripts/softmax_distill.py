"""Held-out LeanK distillation loss of every static selection stored by the table runs."""

import glob
import sys
from harness.loader import load_model
from harness.methods.leank_training import heldout_distillation_loss
from harness.selection import ChannelSelection

loaded = load_model("llama-tiny")
seen = {}
for path in sorted(glob.glob(sys.argv[1] + "/artifacts/*/selection.json")):
    sel = ChannelSelection.load(path)
    if sel.method in ("dense", "think") or (sel.method, sel.ratio) in seen:
        continue
    seen[(sel.method, sel.ratio)] = heldout_distillation_loss(loaded.model, loaded.tokenizer, sel)
for (m, r), v in sorted(seen.items()):
    print(f"| {m} | {r:g} | {v:.4f} |")
