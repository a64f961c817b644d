# Attention: block-wise on the noisy sequence only, no clean copy of earlier blocks.
exec(open("config/ablate/reference.py").read())
attention = "block_noisy"
out_dir = "out-ablate/attn_block_noisy"
