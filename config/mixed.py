# The bundled default: text, code, image and audio tasks in one model, sized so that building the data,
# training and the final evaluation finish in about 15 minutes on a 2-core laptop CPU.
# On a GPU use config/mixed_gpu.py (same data builder, a model worth the hardware).
import torch

import minimm.training

out_dir = "out/mixed"
dataset = "mixed"
vocab_size = 2048

n_layer = 4
n_head = 4
# 256 wide (heads of 64), not 192: over 250 held-out code instructions, paired seeds 1 / 2 / 3, 0.792 / 0.716 /
# 0.736 -> 0.828 / 0.772 / 0.764 parse, the code val loss lower in every seed; each step ~1.25x the time. 1.6x the
# steps at 192 instead lowered the code loss too, but not the parse rate (0.792 -> 0.792; EXPERIMENTS.md). On a
# CPU without bf16 in hardware, --n_embd=192 and --vision_pretrain_iters=600 keep the whole run near 15 minutes (README)
n_embd = 256
block_size = 256

image_size = 48  # 6 x 6 patches of 8 pixels ...
patch_size = 8
pixel_shuffle = 2  # ... merged 2 x 2: 9 image tokens per picture
audio_stack = 4  # 4 audio encoder frames (80 ms) per token: a 2 s clip is 25 tokens, not 100
# the ViT and projector first learn the pictures' per-cell colours and shapes from the generator's labels
# (prepare/vision_pretrain.py, ~70 s), as a real VLM starts from a pretrained encoder, and the ViT is then kept
# frozen while the projector and the GPT learn (LLaVA's recipe). Trained only through the GPT's answers it
# learns colour and place but hardly shape: "Describe the image." 0.09 exact; pretrained, then trained on,
# 0.27 (its shapes fade: a probe names a cell's shape 0.86 -> 0.66); pretrained and frozen, 0.72-0.84 over
# three seeds (EXPERIMENTS.md).
# 1200 steps on 19,200 pictures (prepare/vision_pretrain.py's N_PICTURES), not 600 on 8,000: a held-out cell's shape
# 0.92-0.94 -> 0.99, and over five paired runs describe 0.87 -> 0.92 on average (up in four, held in one), colour and
# place within their spread, for ~35 s more (EXPERIMENTS.md)
vision_pretrain_iters = 1200
# that pretraining warms up to 3e-3, then decays linearly (prepare/vision_pretrain.py), not 1e-3 throughout: in the
# same 600 steps a held-out cell's shape is named 0.92-0.94 of the time, not 0.86-0.90, and the colour answers rise by
# about a tenth (EXPERIMENTS.md)
vision_pretrain_lr = 3e-3
# reading: that pretraining also tells, per cell of 9,600 added text pictures, which letters lie in it (a yes / no per
# letter; prepare/vision_pretrain.py), and the GPT's rows hold 1,500 more pictures of a word besides the 1,183 of the
# scenes (prepare/shapes.py). With 3,000 added, read 0.02-0.06 -> 0.94 / 0.94 / 0.93 (seeds 1 / 2 / 3; 6,000 without
# the letters, 0.42), but a cell's shape 0.99 -> 0.97 and the lookups lower (describe / colour / place 0.96 / 0.97 /
# 0.90 -> 0.91 / 0.83 / 0.78 on average). 1,500 added, paired seeds, on average: read 0.94 -> 0.93, colour 0.83 ->
# 0.92 (up in all three), place 0.78 -> 0.81, describe 0.91 -> 0.90; the build 49 s -> 36 s (EXPERIMENTS.md)
vision_pretrain_letters = 0.3
n_read_images = 1500
freeze_vision = True
# each question about a picture is a row of its own with the picture after it ("What color is the triangle?\n<image>"):
# the GPT is causal, so only then can the image tokens attend to the question and each tell whether it holds the shape
# asked about (prepare/shapes.py). Images alone, 300 steps: colour 0.70 -> 0.87, describe 0.80 -> 0.87; in this run,
# three seeds each, colour 0.59-0.67 -> 0.70-0.82, describe 0.72-0.84 -> 0.82-0.94, where unchanged (EXPERIMENTS.md)
image_after_question = True
# the training scenes keep a quarter of their answers that need no lookup (every count; the colour and place of a
# picture's only shape), which the GPT learns early, and 5,920 scenes instead of 4,000 fill the rows so freed with
# pictures of two and three shapes, whose colour and place answers it learns last (prepare/shapes.py). Seeds 1 / 2 / 3,
# the recipe before asked the same 592 held-out pictures: colour 0.94 / 0.75 / 0.93 -> 0.99 / 1.00 / 0.96, place 0.61 /
# 0.65 / 0.73 -> 0.88 / 0.77 / 0.72, at the same cost (EXPERIMENTS.md). A tenth as many pictures are held out: 592
image_easy_keep = 0.25
n_images = 5920
# and each question is asked again after its picture ("What color is the triangle?\n<image>\nWhat color is the
# triangle?"), so that the positions right before the answer hold the word to look up (prepare/shapes.py; sample.py and
# the chat page lay a question out the same way). With the rows above, seeds 1 / 2 / 3: place 0.88 / 0.77 / 0.72 -> 0.96
# / 0.83 / 0.91, colour 0.99 / 1.00 / 0.96 -> 0.96 / 0.97 / 0.98 (a fourth seed: place 0.72, colour 0.57); a picture's
# row ~8 tokens longer (EXPERIMENTS.md)
repeat_question = True
# and a scene of two or three shapes asks the colour of each shape and the place of each colour, not of one (each
# question about the picture is a row of its own, as above): the same picture then answers "What color is the
# triangle?" and "What color is the circle?" differently, so the answer can only come from the shape named
# (prepare/shapes.py). The rows add 37% to the pictures' tokens, and the pictures are drawn 0.95x instead of 1.3x to
# keep their ~39% of a step (below). Seeds 1337 / 2 / 3: colour 0.75 / 0.95 / 0.89 -> 1.00 / 0.98 / 0.98, place 1.00 /
# 0.99 / 0.98 -> 0.98 / 0.99 / 1.00, describe 0.97 / 0.92 / 0.96 -> 0.96 / 0.86 / 0.898 (fewer descriptions a step),
# code 0.92 / 0.80 / 0.80 -> 0.84 / 0.88 / 0.88; a fourth seed colour 0.89 -> 0.97, describe 0.91 held. Colour alone
# ({"color": 3}): place 0.99 -> 0.65 in seed 2; pictures drawn 1.1x: describe 0.92 in seed 2, but code 0.78 and DTMF
# 0.89. Two of each ({"color": 2, "where": 2}, pictures drawn 1.0282x to keep their share), seeds 1337 / 2 / 3 /
# 4: describe 0.96 / 0.86 / 0.898 / 0.907 -> 0.93 / 0.898 / 0.94 / 0.94, but seed 1337's colour 1.00 -> 0.72; three
# colours and two places, seeds 1337 / 2: describe 0.94 / 0.898, code 0.78 / 0.84 (EXPERIMENTS.md)
image_lookups = {"color": 3, "where": 3}
# image_repeats stays empty. The descriptions drawn 2x or 3x as often within the pictures' share (each description row
# written n times, pictures drawn 0.775x / 0.6537x), seeds 2 / 3 / 4: describe 0.86 / 0.898 / 0.907 -> 0.88 / 0.97 /
# 0.89 (2x), 0.95 / 0.94 (3x, seeds 2 / 3), but colour, place and reading fell (3x: colour 0.98 -> 0.91 / 0.90, read
# 0.91 / 0.94 -> 0.89 / 0.83; 2x, seed 4: colour 0.97 -> 0.84, code 0.86 -> 0.68; EXPERIMENTS.md)

# 6000 synthetic clips, 3x TrainConfig's 2000 (5 s more to build). With 2000, each clip was heard ~14 times
# and the audio train loss fell to a tenth of the val loss; with 6000 (each heard ~4.5 times) the audio val
# loss is 0.040-0.044 instead of 0.07-0.17, DTMF 0.86-0.87 instead of 0.83-0.84 (two seeds each; EXPERIMENTS.md).
n_audio = 6000

# how often each example of a task is drawn (1: in proportion to its examples). Text has no task metric, so
# it keeps a tenth of its share. Code has 9,600 training functions (3,400 documented, 6,200 without a docstring
# or decorated: prepare/mixed.py), drawn 1.1x: 2x the code tokens a step that the 3,400 drawn 1.3x gave
# before (over 250 held-out instructions parse 0.66 -> 0.75; drawn 0.54x / 0.8x, 0.70 / 0.72: EXPERIMENTS.md).
# Audio clips are drawn 4/3 as often: ~38 clips a step, as 2000 clips drawn 4x gave before. Learning to name
# keys and notes starts late and at once (audio val loss 0.79 at step 250, 0.14 at step 500); with 2000 clips
# at 1.3x (~16 a step) the default run never got there (exact match 0.00). Its cost: fewer code and image
# answers per step, and ~40 s (EXPERIMENTS.md).
# Pictures take ~39% of a step's tokens, not ~33% (code ~45%, not ~49%): drawn 1.3x before image_lookups added rows,
# 0.95x since. The lookups are learned late, and with more of them a step (pictures 1x -> 1.3x), three paired seeds:
# place 0.69 / 0.82 / 0.93 -> 1.00 / 0.99 / 0.98, describe 0.93 / 0.86 / 0.89 -> 0.97 / 0.92 / 0.96, colour 0.93 / 0.97
# / 0.88 -> 0.75 / 0.95 / 0.89; code on the 50 0.86 / 0.84 / 0.88 -> 0.92 / 0.80 / 0.80, its val loss ~0.05 higher;
# reading and audio within their spread (EXPERIMENTS.md).
task_weights = {"text": 0.1, "code": 1.1, "image": 0.95, "audio": 4 / 3}

# CPUs that multiply bfloat16 in hardware (Intel AMX, Xeon 4th generation and later; AVX-512 BF16, AMD Zen 4
# and later): there bf16 autocast makes the run ~13% (AMX) / ~17% (AMD EPYC) faster at the same accuracy
# (EXPERIMENTS.md). Other CPUs keep float32 and a GPU picks its own: "auto".
dtype = "bfloat16" if minimm.training.cpu_has_fast_bf16() and not torch.cuda.is_available() else "auto"

batch_size = 16
# each head's queries and keys scaled to RMS 1 (times a learned gain) before attention (minimm/gpt.py). Seeds 1 / 2 /
# 3: code val loss 1.74 / 1.88 / 1.81 -> 1.62 / 1.83 / 1.76, the 50 held-out answers parse 0.74 / 0.76 / 0.84 ->
# 0.82 / 0.88 / 0.86 (over 250, seed 1: 0.776 -> 0.792); image place and description ~0.05 lower, audio ~0.02;
# ~8% more time a step (EXPERIMENTS.md)
qk_norm = True
# Muon for every Linear weight (minimm/muon.py). Same data and seed, against AdamW's 720 steps: val loss code 1.84
# -> 1.68, image 0.50 -> 0.47, audio 0.034 -> 0.013 in 640 steps. Its Newton-Schulz iterations, batched per
# matrix shape, add ~0.07 s to a ~0.85 s step; with the batched final evaluation, 700 Muon steps take a little
# less time than the 640 did before (EXPERIMENTS.md).
optimizer = "muon"
# against copy loops ("'wr', 'wr', 'wr', ..."), the commonest way a code answer fails to parse: each position also
# pushes down the token a wrong induction copy would write (minimm/unlikelihood.py). Over 250 held-out instructions
# +0.03 in each of three paired runs; a step costs 3% more (EXPERIMENTS.md)
unlikelihood = 1.0
# and against loops in its own answers ("'fork', 'fork', 'fork', ..." to the end of the context, 28 of the 67 failed
# answers of one run): from 70% of the schedule on, each step the model answers 8 training questions greedily and every
# token of a 4-gram repeated within an answer is pushed down (minimm/unlikelihood.py). Over 250 held-out instructions,
# four paired seeds: parse 0.796 / 0.744 / 0.792 / 0.744 -> 0.856 / 0.796 / 0.820 / 0.788; ~75 s more (EXPERIMENTS.md)
seq_unlikelihood = 0.3
max_iters = 700
learning_rate = 2e-3
# the ViT, the audio encoder and their projectors learn at half the GPT's rate. At the full rate the GPT
# learned to answer image questions from priors ("yellow", "bottom left"); at half, the image val loss fell
# from 0.71 to 0.51 and count / color accuracy rose from 0.56 / 0.27 to 1.00 / 0.67 (EXPERIMENTS.md).
media_lr_scale = 0.5
min_lr = 1e-4
warmup_iters = 50
eval_interval = 250
eval_iters = 8
# the final evaluation asks every held-out picture (592) and clip (600), not the first 250 of each: an
# accuracy near 0.9 measured on 125 DTMF clips is +-0.03 by chance alone; on 300 it is +-0.02 (a few seconds
# more, as minimm.chat.ask_many answers them in batches)
eval_media_samples = 600
