"""Measure accelerated generation during training: AccelEvalCallback logs through Trainer.log.

    python examples/trainer_callback.py
"""

import os

import torch
from transformers import Trainer, TrainingArguments

import hfaccel
from hfaccel.data import calibration_text
from hfaccel.integrations import AccelEvalCallback

SMOKE = os.environ.get("HFACCEL_SMOKE") == "1"
torch.manual_seed(0)

model, tok = hfaccel.models.load_default()
ids = tok(calibration_text()[:20000], return_tensors="pt").input_ids[0]
seq = 32 if SMOKE else 128
rows = [ids[i:i + seq] for i in range(0, len(ids) - seq, seq)][: 8 if SMOKE else 256]
data = [{"input_ids": r, "labels": r} for r in rows]

args = TrainingArguments(output_dir="/tmp/hfaccel-trainer-example", max_steps=2 if SMOKE else 60,
                         per_device_train_batch_size=2, learning_rate=1e-5, eval_strategy="steps",
                         eval_steps=2 if SMOKE else 20, logging_steps=2 if SMOKE else 10, report_to=[],
                         use_cpu=not torch.cuda.is_available(), save_strategy="no")
trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
AccelEvalCallback(tokenizer=tok, preset="cpu-fast", max_new_tokens=8 if SMOKE else 32,
                  ppl_windows=1 if SMOKE else 2).attach(trainer)
trainer.train()
for entry in trainer.state.log_history:
    if "hfaccel/tok_s" in entry:
        print({k: round(v, 3) for k, v in entry.items() if k.startswith("hfaccel/") or k == "step"})
