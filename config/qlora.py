# QLoRA (Dettmers et al. 2023): config/lora.py with the frozen base stored in 4-bit NormalFloat, about
# 0.14x the memory of fp32 for the adapted layers (train.py prints the measured ratio). The adapters train
# in fp32 on the dequantized weights; lora.pt records nf4, so sample.py --lora quantizes the base the same.
#   python train.py config/qlora.py --train_files="['my_chats.jsonl']"
#   python sample.py --out_dir=out/mixed --lora=out/qlora/lora.pt --task text --prompt "..."
import os

exec(open(os.path.join(os.path.dirname(__file__), "lora.py")).read())  # everything as in config/lora.py ...
out_dir = "out/qlora"
lora_quantize = "nf4"  # ... but the frozen base in 4-bit NormalFloat
