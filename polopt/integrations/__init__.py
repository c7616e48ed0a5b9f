"""Adapters that put polopt losses into other trainers.

`polopt.integrations.trl.PoloptGRPOTrainer` (needs the `trl` extra). Nothing is imported here, so
`import polopt.integrations` never pulls in an optional dependency.
"""
