"""PEFT load check of an adapter written by `kto train`.

usage: python3 scripts/peft_check.py BASE_MODEL_DIR ADAPTER_DIR [DEVICE]

Loads the base checkpoint with transformers and the adapter with `PeftModel.from_pretrained`, then checks that every
tensor of adapter_model.safetensors landed in a LoRA module with its exact values (none missing, none extra), and that
the adapted model runs and its logits differ from the base model's (a trained adapter is not zero). Prints one JSON
line; exits 1 when a check fails.
"""
import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

base_dir, adapter_dir = sys.argv[1], sys.argv[2]
device = sys.argv[3] if len(sys.argv) > 3 else ("cuda" if torch.cuda.is_available() else "cpu")

model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device).eval()
vocab = model.config.vocab_size
ids = torch.tensor([[1, 5, 9, 13, 200 % vocab, 31, 77 % vocab, 2]], device=device)
with torch.no_grad():
    base_logits = model(ids).logits.float()

peft_model = PeftModel.from_pretrained(model, adapter_dir).to(device).eval()
saved = load_file(f"{adapter_dir}/adapter_model.safetensors")
state = peft_model.state_dict()
problems = []
for key, value in saved.items():
    loaded_key = key.replace(".weight", ".default.weight")
    if loaded_key not in state:
        problems.append(f"{key}: not loaded into the model")
    elif not torch.equal(state[loaded_key].float().cpu(), value.float()):
        problems.append(f"{key}: loaded with other values")
lora_keys = [k for k in state if ".lora_A." in k or ".lora_B." in k]
if len(lora_keys) != len(saved):
    problems.append(f"the model has {len(lora_keys)} LoRA tensors, the file {len(saved)}")
with torch.no_grad():
    adapted_logits = peft_model(ids).logits.float()
change = (adapted_logits - base_logits).abs().max().item()
if not torch.isfinite(adapted_logits).all():
    problems.append("the adapted model gives non-finite logits")
if change == 0.0:
    problems.append("the adapter leaves the logits unchanged")
print(json.dumps({"tensors": len(saved), "max_logit_change": change, "device": device, "problems": problems}))
sys.exit(1 if problems else 0)
