# Stage 2b of the journey (runs/journey.sh): the same fine-tuning as config/journey_sft.py (give both files, this one
# second), with LoRA adapters (Hu et al. 2021, arXiv:2106.09685) instead of every weight, side by side with it:
#   python finetune.py config/journey_sft.py config/journey_sft_lora.py
# The token embedding, which is also the LM head, and the position table stay the pre-trained model's; a rank-16
# update of each block's Linear layers trains, with the LayerNorms (132k parameters, 1.8% of the model). The saved
# checkpoint holds plain merged weights. make journey (docs/journey.md): held-out task accuracy 55.5% at x1.10 the
# pre-trained model's perplexity, against 65.2% at x1.13 with every weight. From a weaker model LoRA learns the names
# slowly (the frozen token embedding is also the LM head, and the names are rare tokens). Measured for 300 steps
# from a model after 200 pre-training steps (held-out task accuracy, perplexity of the held-out plays x the
# pre-trained model's): lr 2e-3 without replay 11.3%, x36; 6e-3 without replay 38.5%, x70
# (LoRA changed the blocks' weights by 20-56% of their norm and ln_f's gain by 25%); 6e-3 with the replay of
# config/journey_sft.py 19.8%, x1.01; every weight at 1e-3 with replay 66.8%, x0.89.

out_dir = "out-journey/sft_lora"
lora_rank = 16
lora_alpha = 32.0  # scale alpha / r = 2
lora_dropout = 0.0
lora_targets = "c_attn,c_proj,c_fc"  # every Linear of the blocks (QLoRA's finding: all layers, not only q and v)
learning_rate = 6e-3  # adapters that start at zero (B = 0) need a larger step than every weight
max_iters = 400  # and more of them: from the 420-step model, 250 steps reached 24.0% (22.5% at 1e-2), 400 55.5%
lora_norms = True  # the LayerNorms train too (1,152 numbers): the LM head is frozen, and ln_f's gain sets how
# confident its logits can be (tiny journey, 200 steps: held-out loss 7.59 with, 7.76 without)
weight_decay = 0.0  # a decay of B A pulls the update to zero, not the weights to a prior
