# A small GPT trained from scratch on Shakespeare in GPT-2 tokens (50,257 ids): compare its samples with the
# character-level demo (config/train_shakespeare_char.py) and with fine-tuning GPT-2 (config/finetune_shakespeare.py).
#   python data/shakespeare/prepare.py
#   python train.py config/train_shakespeare.py
#   python sample.py --init_from=resume --out_dir=out-shakespeare-bpe --start="ROMEO:"
# The 300k training tokens are few for a 50k-word vocabulary: the model overfits after a few epochs, hence the
# dropout and keeping the checkpoint with the best val loss.

out_dir = "out-shakespeare-bpe"
dataset = "shakespeare"
data_order = "random"
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
wandb_project = "shakespeare"
wandb_run_name = "bpe-from-scratch"

# most parameters and FLOPs sit in the 50,304 x 128 embedding (= the output layer): a small body is enough
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64  # 64 tokens ~ 250 characters of context
dropout = 0.2
bias = False
batch_size = 16
total_batch_size = 0  # no accumulation: one batch of 16 x 64 tokens per step

learning_rate = 2e-3  # a small model takes a large step
warmup_iters = 50
max_iters = 2000
lr_decay_iters = 2000
min_lr = 2e-4
beta2 = 0.99  # a little more averaging for small batches

device = "auto"
compile = False  # on a CPU, compiling costs more than it saves in a run of minutes
