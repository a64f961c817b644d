# Training block size 16.
exec(open("config/ablate/reference.py").read())
block_size = 16
out_dir = "out-ablate/block_16"
