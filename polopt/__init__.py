"""polopt: online policy optimization (NFT, RFT, GRPO, Dr.GRPO, DAPO, InfoNCA) for LLM math
reasoning with binary verifier rewards.

`import polopt` stays light: subpackages import what they need (``polopt.losses`` needs only torch).
"""

__version__ = "0.1.0"
