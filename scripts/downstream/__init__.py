"""Downstream tasks: MAE pretraining, ViT fine-tuning and the Table 2 runner."""
