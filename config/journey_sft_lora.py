# Stage 2b of the journey (runs/journey.sh): the same fine-tuning as config/journey_sft.py (give both files, this one
# second), with LoRA adapters (Hu et al. 2021, arXiv:2106.09685) instead of every weight, side by side with it:
#   python finetune.py config/journey_sft.py config/journey_sft_lora.py
# The token embedding, which is also the LM head, and the position table stay the pre-trained model's; a rank-16
# update of each block's Linear layers trains, with the LayerNorms (132k parameters, 1.8% of the model). What it
# should show: the task learnt with the language model kept (held-out plays' perplexity), where full fine-tuning at
# the same learning rate trades the plays for the task. The saved checkpoint holds plain merged weights.

out_dir = "out-journey/sft_lora"
lora_rank = 16
lora_alpha = 32.0  # scale alpha / r = 2
lora_dropout = 0.0
lora_targets = "c_attn,c_proj,c_fc"  # every Linear of the blocks (QLoRA's finding: all layers, not only q and v)
lora_norms = True  # the LayerNorms train too (1,152 numbers): the LM head is frozen, and ln_f's gain sets how
# confident its logits can be (tiny journey, 200 steps: held-out loss 7.59 with, 7.76 without)
weight_decay = 0.0  # a decay of B A pulls the update to zero, not the weights to a prior
