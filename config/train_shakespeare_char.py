# A baby GPT on Shakespeare's plays, one character at a time: about two minutes on a 2-core CPU (what `make demo` runs).
#   python data/shakespeare_char/prepare.py
#   python train.py config/train_shakespeare_char.py
#   python sample.py --init_from=resume --out_dir=out-shakespeare-char --start="ROMEO:"
# With a GPU, nanoGPT's bigger baby GPT reaches ~1.47 on Tiny Shakespeare in minutes: --n_layer=6 --n_head=6
# --n_embd=384 --block_size=256 --batch_size=64 --dropout=0.2 --learning_rate=1e-3 --min_lr=1e-4
# --max_iters=5000 --lr_decay_iters=5000 --warmup_iters=100 --eval_iters=200 --compile=True
#
# Chosen by measuring on a 2-core CPU against nanoGPT's CPU recipe (same model, batch and steps), side by side:
# runs/compare_nanogpt.sh, figures in the README. Muon for the blocks' matrices (AdamW took val 1.727 at 2,000
# steps; Muon 1.590, and 1.578 with the learning rate decayed to 0 at the end; a higher muon_lr 0.04: 1.600, 0.015:
# 1.589; dropout 0.1: 1.714; weight decay 0.3: 1.663). AdamW's learning rate for the rest: 5e-3 (AdamW alone:
# 2e-3 1.806, 3e-3 1.751, 5e-3 1.738, 8e-3 1.739; with Muon, 1e-2: 1.587). At the same cost, longer context
# (128 x 6), smaller (8 x 3000 steps) or larger (16 x 1500) batches all did worse.

out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
data_order = "random"  # a few MB of text seen about once or more: random windows
eval_interval = 500
eval_iters = 20  # 20 x 12 x 64 = 15k characters per split: enough to follow the curve, cheap on a CPU
log_interval = 100
sample_interval = 1000  # watch it learn: a sample every 1000 iterations
sample_prompt = "ROMEO:"
sample_tokens = 200
wandb_project = "shakespeare-char"
wandb_run_name = "baby-gpt"

# a baby GPT: 0.8M parameters
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64  # characters of context
dropout = 0.0  # 1.5 passes over the data: dropout 0.1 did worse (above)
bias = False  # slightly faster, no worse
batch_size = 12
total_batch_size = 0  # one batch of 12 x 64 characters per step, no accumulation

optimizer = "muon"  # Muon (lr muon_lr) for the 2-D weights inside the blocks, AdamW for the rest
muon_lr = 0.02
learning_rate = 5e-3  # AdamW's, for the embeddings and LayerNorms: tiny models take large steps
warmup_iters = 50
max_iters = 2000
lr_decay_iters = 2000
min_lr = 0.0  # decayed to 0 at the end (both optimizers: the schedule scales muon_lr alike)
beta2 = 0.99  # more averaging in Adam's second moment for small batches

compile = False  # on a CPU, compiling costs more than it saves in a one-minute run
