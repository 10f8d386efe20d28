"""The sketch model: a tiny text-to-video Wan trained on procedural videos (issue 7).

`data` makes the captioned procedural clips, `codec` is the small causal latent autoencoder that stands in
for the Wan VAE, and `train` trains both and writes the model folder.
"""
