"""Makes tests/fixtures/trl-kto-dp/: TRL 1.16's KTOTrainer + PEFT trained data-parallel by torchrun over two CPU
processes (DDP on gloo), the numbers `mpirun -n 2 kto train` must reproduce (issue 23).

    python scripts/make-trl-kto-dp-fixture.py [OUT]     # default tests/fixtures/trl-kto-dp; about a minute

The interpreter needs torch 2.11, transformers 5.17, peft 0.21, trl 1.16, datasets 5.2 and accelerate from PyPI
(the venv `scripts/bench-cpu.sh` makes has them). It launches `python -m torch.distributed.run --nproc_per_node 2`
itself, once per run, on this script's `worker` command.

The model, its tokenizer and the start adapter are those of tests/fixtures/trl-kto-parity (copied by reference:
the runs name them by path relative to the fixture). The data are made here, seeded: 29 training samples (not a
multiple of any run's global batch, so accelerate's `even_batches` wrap-around shows) and 7 held-out ones, prompts of
2-14 words and completions of 1-12 words over the tokenizer's `wN` vocabulary, so that `max_length` truncates some.
Each run: train_sampling_strategy "sequential" (kto's `shuffle = false`), `disable_dropout`, no gradient
checkpointing (it does not change the numbers), logging every step, f32, lr 1e-2 constant, AdamW defaults,
max_grad_norm 1.0. Each run folder holds `config.json` (every setting, in TRL's names), `log.json` (rank 0's
`trainer.state.log_history`: training rows per step and `eval_*` rows), `adapter_model.safetensors` (LoRA weights
after the last step, PEFT key names) and `VERSIONS`.
"""
import json
import os
import random
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARITY = os.path.join(ROOT, "tests", "fixtures", "trl-kto-parity")

COMMON = {
    "learning_rate": 1e-2,
    "lr_scheduler_type": "constant",
    "max_grad_norm": 1.0,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "logging_steps": 1,
    "seed": 0,
    # TRL's configs default bf16 to True (autocast, on the CPU too): the fixture is f32 like kto's runs.
    "bf16": False,
}

# name -> settings that differ between runs (TRL's KTOConfig names).
RUNS = {
    # An odd micro-batch, gradient accumulation, truncation and evaluation every 2 steps.
    "kto_odd_accum_eval": {
        "per_device_train_batch_size": 3,
        "per_device_eval_batch_size": 3,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        "max_length": 16,
        "beta": 0.1,
        "loss_type": "kto",
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
        "eval_strategy": "steps",
        "eval_steps": 2,
    },
    # Batch 4, no accumulation, 4 steps: the 29 samples end mid-step in the epoch's last global batch.
    "kto_wraparound": {
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 5,
        "max_length": 64,
        "beta": 0.5,
        "loss_type": "kto",
        "desirable_weight": 1.0,
        "undesirable_weight": 1.5,
        "eval_strategy": "no",
    },
    # The reference log-probs precomputed (sharded, then gathered) and the loss without KL.
    "apo_precompute": {
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        "max_length": 20,
        "beta": 0.1,
        "loss_type": "apo_zero_unpaired",
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
        "precompute_ref_log_probs": True,
        "eval_strategy": "steps",
        "eval_steps": 3,
    },
}


def make_data(out):
    rng = random.Random(23)

    def words(low, high):
        return " ".join(f"w{rng.randrange(3, 128)}" for _ in range(rng.randint(low, high)))

    def sample():
        return {"prompt": words(2, 14), "completion": " " + words(1, 12) + " </s>", "label": rng.random() < 0.55}

    for name, count in [("train.jsonl", 29), ("eval.jsonl", 7)]:
        with open(os.path.join(out, name), "w") as f:
            for _ in range(count):
                f.write(json.dumps(sample()) + "\n")


def worker(name, out):
    import torch
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    settings = {**COMMON, **RUNS[name]}
    run_dir = os.path.join(out, "runs", name)
    work = os.path.join(out, ".work", name)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(PARITY, "model"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(PARITY, "model"), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, os.path.join(PARITY, "adapter_init"), is_trainable=True)
    data = load_dataset("json", data_files={"train": os.path.join(out, "train.jsonl"),
                                            "eval": os.path.join(out, "eval.jsonl")})
    args = KTOConfig(
        output_dir=work,
        use_cpu=True,
        ddp_backend="gloo",
        train_sampling_strategy="sequential",
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        **settings,
    )
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"] if settings.get("eval_strategy") != "no" else None,
        processing_class=tokenizer,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({**settings, "nproc_per_node": 2, "train_sampling_strategy": "sequential"}, f, indent=1)
        with open(os.path.join(run_dir, "log.json"), "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(os.path.join(work, "adapter"))
        shutil.copy(os.path.join(work, "adapter", "adapter_model.safetensors"), run_dir)


def main(argv):
    if argv and argv[0] == "worker":
        worker(argv[1], argv[2])
        return
    out = os.path.abspath(argv[0] if argv else os.path.join(ROOT, "tests", "fixtures", "trl-kto-dp"))
    os.makedirs(out, exist_ok=True)
    make_data(out)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": os.path.join(out, ".work", "hf-home")}
    for name in RUNS:
        print(f"{name}: torchrun --nproc_per_node 2", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", os.path.abspath(__file__), "worker", name, out],
                       env=env, check=True)
    import peft, torch, transformers, trl, datasets, accelerate
    with open(os.path.join(out, "VERSIONS"), "w") as f:
        for module in (torch, transformers, peft, trl, datasets, accelerate):
            f.write(f"{module.__name__} {module.__version__}\n")
    shutil.rmtree(os.path.join(out, ".work"))


if __name__ == "__main__":
    main(sys.argv[1:])
