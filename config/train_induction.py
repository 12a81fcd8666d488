# Watching an induction head form: a 2-layer character model on Shakespeare with repeated passages mixed in (80% of
# the characters are in passages of 8-48 characters written twice in a row, data/shakespeare_repeat/prepare.py).
# 830 s of CPU time, about 6-8 minutes on a quiet 2-core CPU (23 min under a load of 6-7; docs/experiments.md).
# Between steps 500 and 700 layer 1's induction score jumps from 0.01 to 0.37 as the in-context loss falls from ~0
# to -0.37 nats, after layer 0 has grown a previous-token head (steps 200-400).
#   python data/shakespeare_char/prepare.py
#   python data/shakespeare_repeat/prepare.py
#   python train.py config/train_induction.py      # heads.png: the loss, the heads' scores, the in-context loss
# Measured on a 2-core CPU before settling: on natural text alone no induction head formed (256 characters of
# context, 900 steps: best induction score 0.01); nor with passages of 16-128 characters at 256 of context (50% or
# 80% of the text, 1,200-1,500 steps); 128 characters of context with 8-48-character passages formed one (at 60%:
# after ~1,000 steps; at 80%: after ~600). Two 32-wide heads per layer and AdamW at 0.03: with four 16-wide heads at
# the demo's 5e-3, layer 0 grew no previous-token head in 1,500 steps (0.22); with these, 0.9 by step 600.

out_dir = "out-induction"
dataset = "shakespeare_repeat"
data_order = "random"
track_heads = True  # previous-token and induction scores and the in-context loss at every evaluation
eval_interval = 100
eval_iters = 10  # 10 x 16 x 128 = 20k characters per split
log_interval = 50
sample_interval = 0  # no samples: the heads are the point

n_layer = 2
n_head = 2
n_embd = 64  # 0.1M parameters
block_size = 128  # characters of context: twice the demo's, room for a passage and its repeat
bias = False
batch_size = 16
total_batch_size = 0  # 16 x 128 = 2,048 characters a step, no accumulation

optimizer = "muon"  # the demo's recipe (config/train_shakespeare_char.py), with a larger AdamW step
muon_lr = 0.02
learning_rate = 0.03  # AdamW's, for the embeddings: the position embeddings carry the previous-token head
warmup_iters = 50
max_iters = 2500
lr_decay_iters = 2500
min_lr = 0.0
beta2 = 0.99
compile = False  # on a CPU, compiling costs more than it saves
