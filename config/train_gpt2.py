# GPT-2 (124M) pre-trained on ~10B tokens of FineWeb-Edu streamed from the Hugging Face Hub: no prepare step and
# no 20 GB of shards; documents are tokenized while training (a background thread keeps batches ready).
#   python data/fineweb/prepare.py --max_tokens=100_000_000        # only the validation shard (first 100M tokens)
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# The stream also holds the validation shard's documents (1% of sample-10BT), so val loss is a little optimistic;
# for a clean split prepare everything and use config/train_fineweb.py. Streaming runs resume exactly on the
# same number of GPUs (each rank's stream position and shuffle buffer are in the checkpoint).
#
# Batch arithmetic: total_batch_size 524,288 tokens = 2**19 ~ 0.5M (GPT-3 paper, arXiv:2005.14165, Table 2.1,
# 125M model) = batch_size 16 x block_size 1024 x 8 GPUs x 4 accumulation steps; 19,073 iterations = 10.0B tokens.

out_dir = "out-gpt2"
data_source = "stream"
stream_dataset = "HuggingFaceFW/fineweb-edu"
stream_name = "sample-10BT"
stream_text_field = "text"
shuffle_buffer = 10000  # documents
dataset = "fineweb"  # validation: data/fineweb/fineweb_val_000000.bin
data_order = "sequential"
eval_interval = 250
eval_iters = 100
log_interval = 10
sample_interval = 1000
sample_prompt = "Hello, I'm a language model,"
sample_tokens = 32
wandb_log = True  # falls back to offline logging without a wandb login
wandb_project = "fineweb"
wandb_run_name = "gpt2-124m-stream"

# GPT-2 small (Radford et al. 2019, Table 2; 12 heads and a 1024-token context in OpenAI's hparams.json)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
bias = True
dropout = 0.0

# GPT-3 paper, appendix B and Table 2.1 (GPT-3 Small); see config/train_fineweb.py for each number's source
total_batch_size = 524288  # 0.5M tokens
batch_size = 16
learning_rate = 6e-4
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0
warmup_iters = 715  # 375M tokens
max_iters = 19073  # 10B tokens
lr_decay_iters = 19073
min_lr = 6e-5  # 10% of the peak
