"""Downstream tasks: MAE pretraining, the labelled cohort and its folds, the linear probe, ViT fine-tuning, paired
statistics and the Table 2 runner."""
