"""minimm: a minimal multimodal language model (text, code, images, audio), written to be read.

Reading order: config -> bpe -> tokenizer -> formats -> data -> ops -> gpt -> vit -> audio -> multimodal
-> lora -> kernels/ -> opencl/. See README.md.
"""
