# The bundled default at a size worth a GPU: same data builder, a bigger model, 224-pixel images.
# python train.py config/mixed_gpu.py          (one GPU; bf16 autocast and Triton kernels are automatic)
# torchrun --nproc_per_node=8 train.py config/mixed_gpu.py
out_dir = "out/mixed_gpu"
dataset = "mixed_gpu"  # its own data folder: images are drawn at 224 pixels
vocab_size = 8192
n_images = 20000
n_audio = 8000

n_layer = 8
n_head = 8
n_embd = 512
block_size = 512

image_size = 224
patch_size = 16  # 14 x 14 = 196 patches ...
pixel_shuffle = 2  # ... merged 2 x 2 into 49 image tokens
vit_n_layer = 6
vit_n_head = 6
vit_n_embd = 384
audio_n_layer = 4
audio_n_head = 6
audio_n_embd = 384

batch_size = 32
gradient_accumulation_steps = 2
max_iters = 10000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 500
eval_interval = 500
eval_iters = 40
compile = True
