#!/usr/bin/env python3
"""Interop check with the Python stack (transformers + PEFT) on the same GGUF base.

  forward:  PEFT loads an adapter written by Arbiter and scores the rows Arbiter scored;
  reverse:  PEFT writes an adapter (non-zero LoRA B, trained head) that Arbiter then serves.

Usage: peft_interop.py GGUF CASE_DIR
CASE_DIR/arbiter_adapter/   the adapter Arbiter wrote
CASE_DIR/rows.json          {"ids": [[token ids]...], "arbiter_probs": [[pa, pb, pt]...]}
Writes CASE_DIR/peft_adapter/ and CASE_DIR/peft.json {"forward_probs": ..., "reverse_probs": ...}.
Rows are scored one at a time (no padding), at temperature 1, in f32.
"""
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

gguf, case = sys.argv[1], sys.argv[2]
rows = json.load(open(os.path.join(case, "rows.json")))
torch.manual_seed(0)


def base():
    m = AutoModelForSequenceClassification.from_pretrained(
        os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf), num_labels=3,
        torch_dtype=torch.float32)
    m.config.pad_token_id = None
    return m.eval()


def score(model):
    out = []
    with torch.no_grad():
        for ids in rows["ids"]:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            out.append(torch.softmax(logits.float(), -1).tolist())
    return out


# forward: Arbiter's adapter under PEFT
fwd = PeftModel.from_pretrained(base(), os.path.join(case, "arbiter_adapter")).eval()
forward_probs = score(fwd)

# reverse: a PEFT adapter with non-trivial weights, saved for Arbiter
cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 task_type="SEQ_CLS", init_lora_weights=False)
rev = get_peft_model(base(), cfg)
with torch.no_grad():
    for n, p in rev.named_parameters():
        if "lora_B" in n:
            p.mul_(0.05)
        if "score" in n and p.requires_grad:
            p.normal_(0, 0.05)
rev.eval()
reverse_probs = score(rev)
rev.save_pretrained(os.path.join(case, "peft_adapter"))
json.dump({"forward_probs": forward_probs, "reverse_probs": reverse_probs}, open(os.path.join(case, "peft.json"), "w"))
print("ok", len(forward_probs), "rows")
