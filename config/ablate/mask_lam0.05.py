# Masking: position-dependent, half-life ratio lambda 0.05 (stronger bias to later positions).
exec(open("config/ablate/reference.py").read())
mask_half_life = 0.05
out_dir = "out-ablate/mask_lam0.05"
