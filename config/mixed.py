# The bundled default: text, code and image-prompt tasks (plus images and audio as they land),
# sized so that data preparation, training and the final evaluation finish in about 15 minutes on a
# 2-core laptop CPU. On a GPU use config/mixed_gpu.py (same data, a model worth the hardware).
out_dir = "out/mixed"
dataset = "mixed"
vocab_size = 2048

n_layer = 4
n_head = 4
n_embd = 192
block_size = 256

batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1500
learning_rate = 2e-3
min_lr = 1e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 8
