# Masking: right to left (lambda -> 0): the later positions of a block are masked first (the bias fades as t -> 1).
exec(open("config/ablate/reference.py").read())
mask_half_life = 0.001
out_dir = "out-ablate/mask_r2l"
