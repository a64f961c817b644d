# Training block size 32.
exec(open("config/ablate/reference.py").read())
block_size = 32
out_dir = "out-ablate/block_32"
