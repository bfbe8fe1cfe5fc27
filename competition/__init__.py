"""Kaggle-style COCO segmentation pipeline built on smp_unet3p."""
