# Stage 3 of the journey (runs/journey.sh): DPO on pairs about the same question, starting from the fully fine-tuned
# model (config/journey_sft.py, the better of the two side by side: 65.2% against LoRA's 55.5%): chosen = the true speaker,
# rejected = another of the 20 characters, from the same play when it has one (data/shakespeare_tasks/prepare.py).
# LoRA adapters on the fine-tuned weights: the preference moves through 0.13M numbers, the rest stays.
#   python align.py config/journey_dpo.py
# The reference is the SFT model, so every implicit reward starts at 0 and the strict held-out reward accuracy
# (TRL's rewards/accuracies: a tie is no win) at exactly 0.

out_dir = "out-journey/dpo"
init_from = "out-journey/sft"
dataset = "out-journey/data/tasks/dpo_train.jsonl"
val_split = "out-journey/data/tasks/dpo_val.jsonl"  # the held-out questions
val_pairs = 400
prompt_template = "none"  # the prompts are already in finetune.py's template (with the excerpt as its input)
block_size = 128

loss_type = "dpo"
beta = 0.1  # the DPO paper's value
rpo_alpha = 1.0  # plus the chosen answer's NLL: plain DPO lowered the chosen names' likelihood too, and the held-out
# task accuracy with it (tiny journey: 42.5% after SFT, 28.7% after DPO)
precompute_ref = True  # the reference's log-probs once, up front: no second model in memory
lora_rank = 16  # as config/journey_sft_lora.py: the embeddings and LM head stay as they are
lora_alpha = 32.0
lora_norms = True

batch_size = 8
total_batch_pairs = 16
max_iters = 100  # 1,600 pairs: 0.8 passes over the 2,000 training pairs
learning_rate = 5e-4  # far above the paper's 1e-6 for 2.8B+ models: a 7M-parameter model and adapters that start
# at zero (B = 0) need the larger step
warmup_iters = 10
lr_schedule = "constant"

eval_interval = 25
log_interval = 5
device = "cpu"
compile = False
