# LoRA rank 4 on every attention and MLP linear (embeddings, norms and head trained), merged on save.
exec(open("config/ablate/reference.py").read())
lora_rank = 4
out_dir = "out-ablate/lora_4"
