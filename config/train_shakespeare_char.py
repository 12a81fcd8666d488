# placeholder
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
data_order = "random"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
total_batch_size = 0
max_iters = 2000
lr_decay_iters = 2000
eval_interval = 250
eval_iters = 20
