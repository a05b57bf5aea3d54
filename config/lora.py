# LoRA fine-tuning (Hu et al. 2021): the base checkpoint stays frozen and a rank-8 update B A is learned
# next to every attention and MLP Linear; the projectors of a multimodal base train fully. train.py writes
# the adapters alone to out/lora/lora.pt (a few hundred KB), to use on top of the base:
#   python train.py config/lora.py --train_files="['my_chats.jsonl']"
#   python sample.py --out_dir=out/mixed --lora=out/lora/lora.pt --task text --prompt "..."
init_from = "out/mixed"
out_dir = "out/lora"
dataset = "sft"
train_files = ["data/chat.jsonl"]  # a placeholder: override with your JSONL (any schema of minimm/formats.py)

lora_rank = 8
lora_alpha = 16  # the update is scaled by alpha / rank = 2
lora_dropout = 0.0
lora_trainable = ["projector"]  # a text-only base has none; train.py says so and goes on

# adapters start at B = 0 and a few thousand numbers carry the whole update, so the rate is 5x full
# fine-tuning's; weight decay would pull the update back towards zero, fighting the fit
max_iters = 300
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
weight_decay = 0.0
eval_interval = 100
eval_iters = 8
