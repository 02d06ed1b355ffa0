"""MoCo v1/v2: Momentum Contrast for unsupervised visual representation learning.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", arXiv:1911.05722;
Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv:2003.04297.
"""
