"""Architecture descriptions: the normalised hyperparameters read from an HF config.json
(`hf`), the dataclasses they fill (`spec`), and the per-tensor inventory built from them
(`layers`); `meta` describes a model_type vramplan lacks from transformers' meta-device model.
`vramplan.arch` re-exports the public names."""
