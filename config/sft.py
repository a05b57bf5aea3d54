# Supervised fine-tuning: continue the bundled default's checkpoint on your own chat data, every weight
# training. Only assistant turns (and the <|end|> closing each) are in the loss, token-weighted across the
# batch; the data is read with the base model's own tokenizer (train.py sets tokenizer_from=init_from).
#   python train.py config/sft.py --train_files="['my_chats.jsonl']"
init_from = "out/mixed"
out_dir = "out/sft"
dataset = "sft"
train_files = ["data/chat.jsonl"]  # a placeholder: override with your JSONL (any schema of minimm/formats.py)

# a few hundred steps at a tenth of the pretraining rate: enough to learn the new answers, too little
# to wash out what the base knows
max_iters = 300
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 20
eval_interval = 100
eval_iters = 8
