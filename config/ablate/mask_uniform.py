# Masking: uniform over the block (beta = 0), the masked-diffusion baseline.
exec(open("config/ablate/reference.py").read())
mask_half_life = None
out_dir = "out-ablate/mask_uniform"
