"""medfed: federated self-supervised learning for medical imaging on Flower.

Sites pretrain a shared image encoder on their own unlabeled scans (SimCLR, BYOL, MAE,
restoration, or a weighted combination), share only encoder weights, then fine-tune with
few labels. See README.md for the three uses and docs/ for results.
"""

__version__ = "0.1.0"
