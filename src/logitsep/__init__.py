"""logitsep: Single Logit Classification (SLC) and the Principle of Logit Separation (PoLS).

Keren, Sabato & Schuller, "Fast Single-Class Classification and the Principle of Logit Separation",
ICDM 2018 (arXiv:1705.10246).
"""

__version__ = "0.1.0"
