# Loss against model size on Shakespeare's plays, one character at a time: 5 sizes from 3k to 0.33M non-embedding
# parameters, the same 1,000 steps of 12 x 64 characters (768k characters) each: 7.3 minutes on a shared 2-core CPU
# (docs/experiments.md; about 2-3 minutes when it is idle).
#   python data/shakespeare_char/prepare.py
#   python sweep.py config/sweep_scaling_char.py
# Then out-sweep-scaling-char/ holds results.md with the power-law fits, scaling.png and curves.png.
# Every run sees the same data (same tokens, same order): only the size differs. Kaplan et al. fit alpha_N on
# models trained near convergence; here the larger models are still learning when they stop, which flattens the
# curve at the top (see docs/experiments.md for what this measures and what it does not).

script = "train.py"
base = ["config/train_shakespeare_char.py"]  # the demo's recipe (Muon, lr and schedule) for every size
runs = [  # n_head keeps heads of 16-32 dims; 12 * n_layer * n_embd^2 non-embedding parameters
    {"name": "L1-d16", "n_layer": 1, "n_embd": 16, "n_head": 1},
    {"name": "L1-d32", "n_layer": 1, "n_embd": 32, "n_head": 1},
    {"name": "L2-d48", "n_layer": 2, "n_embd": 48, "n_head": 2},
    {"name": "L3-d64", "n_layer": 3, "n_embd": 64, "n_head": 2},
    {"name": "L3-d96", "n_layer": 3, "n_embd": 96, "n_head": 3},
]
fixed = {"max_iters": 1000, "lr_decay_iters": 1000, "eval_interval": 250, "eval_iters": 20, "sample_interval": 0,
         "log_interval": 250, "device": "cpu"}
out_dir = "out-sweep-scaling-char"
