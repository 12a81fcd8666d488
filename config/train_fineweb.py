# GPT-2 (124M) pre-trained on ~10B tokens of FineWeb-Edu, on one node of 8 GPUs.
#   python data/fineweb/prepare.py                                 # sample-10BT as ~100 shards of 100M tokens
#   torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb.py
# One GPU: python train.py config/train_fineweb.py (the same batch, 8 times the accumulation; ~8x slower).
# No room for 20 GB of shards? config/train_gpt2.py streams the same data from the Hub instead.
#
# Batch arithmetic (train.py derives the accumulation and prints it):
#   total_batch_size 524,288 tokens = 2**19 ~ 0.5M, GPT-3's batch for its 125M model (Brown et al. 2020,
#   arXiv:2005.14165, Table 2.1) = batch_size 16 x block_size 1024 x 8 GPUs x 4 accumulation steps.
#   max_iters 19,073 x 524,288 = 10.0B tokens, about one pass over sample-10BT.

out_dir = "out-fineweb"
dataset = "fineweb"  # data/fineweb/fineweb_{val,train}_NNNNNN.bin
data_order = "sequential"  # each shard read in order, about once
eval_interval = 250
eval_iters = 100  # 100 x 16 x 1024 = 1.6M validation tokens, shared out over the ranks
log_interval = 10
sample_interval = 1000
sample_prompt = "Hello, I'm a language model,"
sample_tokens = 32
wandb_log = True  # falls back to offline logging without a wandb login
wandb_project = "fineweb"
wandb_run_name = "gpt2-124m"

# the model: GPT-2 small (Radford et al. 2019, Table 2: 12 layers, d_model 768; 12 heads and a 1024-token
# context in OpenAI's released hparams.json)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
bias = True  # as GPT-2
dropout = 0.0  # a corpus read about once does not overfit

# AdamW as in the GPT-3 paper (arXiv:2005.14165), appendix B and Table 2.1 (GPT-3 Small, 125M parameters)
total_batch_size = 524288  # Table 2.1: batch size 0.5M tokens
batch_size = 16  # per GPU and micro-step: fits 80 GB in bf16; on smaller GPUs use 8 or 4 (more accumulation)
learning_rate = 6e-4  # Table 2.1: learning rate 6.0e-4
beta1 = 0.9  # appendix B: Adam with beta1 = 0.9, beta2 = 0.95
beta2 = 0.95
weight_decay = 0.1  # appendix B: weight decay of 0.1
grad_clip = 1.0  # appendix B: clip the global norm of the gradient at 1.0
warmup_iters = 715  # appendix B: linear warmup over the first 375M tokens = 715 x 524,288
max_iters = 19073  # 10B tokens
lr_decay_iters = 19073  # appendix B decays over 260B tokens; with 10B we decay over the whole run
min_lr = 6e-5  # appendix B: cosine decay down to 10% of the learning rate

dtype = "auto"  # bfloat16 autocast on GPUs that have it
compile = True
