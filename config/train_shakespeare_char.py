# A baby GPT on Shakespeare, character by character: trains on a laptop CPU in a couple of minutes (make demo).
#   python data/shakespeare_char/prepare.py
#   python train.py config/train_shakespeare_char.py
#   python sample.py --init_from=resume --out_dir=out-shakespeare-char --start="ROMEO:"
# nanoGPT's CPU settings for this benchmark (4 layers x 4 heads x 128, block 64, batch 12, 2000 iterations at
# lr 1e-3) reach val loss 1.8857 on Tiny Shakespeare; the same model and compute with the changes marked * below
# reach about 1.75.
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
data_order = "random"  # random windows: a small corpus seen for many epochs
eval_interval = 250  # evaluate (and checkpoint) 8 times per run
eval_iters = 20  # 20 batches per split: cheap and steady enough at this size
log_interval = 100
always_save_checkpoint = False  # keep the checkpoint with the best val loss
sample_interval = 1000  # watch it learn: a short sample from "\n" every 1000 iterations
sample_tokens = 120

# model: tiny, so that a CPU step takes milliseconds
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64  # context of 64 characters
dropout = 0.0  # too few iterations to overfit
bias = False  # * no biases: slightly better and faster at this size

# optimisation: 12 sequences x 64 characters per step, no gradient accumulation
batch_size = 12
total_batch_size = 0  # = batch_size * block_size
max_iters = 2000
lr_decay_iters = 2000  # cosine all the way down at the last step
learning_rate = 3e-3  # * 3x nanoGPT's 1e-3: a small model takes (and needs) a high learning rate
min_lr = 3e-4  # learning_rate / 10 (Chinchilla, Hoffmann et al. 2022)
warmup_iters = 50  # * short warmup: 2.5% of the run
beta2 = 0.99  # the tokens per step are few, so a shorter second-moment memory helps

device = "cpu"  # the demo runs on the CPU everywhere; drop this line to use a GPU (--device=auto)
compile = False  # compiling a model this small costs more time than it saves
