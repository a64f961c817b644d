# Attention: bidirectional over the whole sequence (Dream-style); decoding has no exact cache.
exec(open("config/ablate/reference.py").read())
attention = "bidirectional"
out_dir = "out-ablate/attn_bidirectional"
