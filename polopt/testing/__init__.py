"""polopt.testing: the conformance kit and the property-test building blocks behind it.

    from polopt.testing import check_policy_loss
    report = check_policy_loss(my_loss, "nft", epsilon=1.0, prompt_weight="dr_grpo")
    print(report); assert report.ok

Needs hypothesis (the `test` extra). Modules: strategies (hypothesis strategies of loss inputs),
references (the equations written out), conformance (`check_policy_loss`), tiny_lm (a tiny
Qwen2 model and tokenizer built in memory, for integration tests and examples).
"""

from polopt.testing.conformance import (
    KINDS,
    ConformanceFailure,
    ConformanceReport,
    as_loss_function,
    check_policy_loss,
)

__all__ = ["KINDS", "ConformanceFailure", "ConformanceReport", "as_loss_function", "check_policy_loss"]
