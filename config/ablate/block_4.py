# Training block size 4.
exec(open("config/ablate/reference.py").read())
block_size = 4
out_dir = "out-ablate/block_4"
