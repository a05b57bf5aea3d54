# QLoRA (Dettmers et al. 2023): config/lora.py with the frozen base stored in 4-bit NormalFloat, about
# 0.14x the memory of fp32 for the adapted layers (train.py prints the measured ratio). The adapters train
# in fp32 on the dequantized weights; lora.pt records nf4, so sample.py --lora quantizes the base the same.
#   python train.py config/qlora.py --train_files="['my_chats.jsonl']"
#   python sample.py --out_dir=out/mixed --lora=out/qlora/lora.pt --task text --prompt "..."
init_from = "out/mixed"
out_dir = "out/qlora"
dataset = "sft"
train_files = ["data/chat.jsonl"]  # a placeholder: override with your JSONL (any schema of minimm/formats.py)

lora_rank = 8
lora_alpha = 16
lora_dropout = 0.0
lora_trainable = ["projector"]  # a text-only base has none: pass --lora_trainable=[]
lora_quantize = "nf4"

max_iters = 300
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 20
weight_decay = 0.0
eval_interval = 100
eval_iters = 8
