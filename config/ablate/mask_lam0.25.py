# Masking: position-dependent, half-life ratio lambda 0.25 (weaker bias to later positions).
exec(open("config/ablate/reference.py").read())
mask_half_life = 0.25
out_dir = "out-ablate/mask_lam0.25"
