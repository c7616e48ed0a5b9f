"""The load-time check of a dataset's gold answers: those math-verify cannot parse are reported once,
by file and line, instead of silently scoring every completion 0.

The check is math-verify's (`polopt.verify.unparseable_gold_answers`), whichever verifier the
config names: `load_rows` does not know the verifier. `load_rows(check_answers=False)` skips it.
"""

from __future__ import annotations

import logging

from polopt.verify.gold import unparseable_gold_answers

log = logging.getLogger(__name__)


def report_unparseable_gold(rows: list[dict], source: str) -> None:
    bad = unparseable_gold_answers([r["answer"] for r in rows])
    if bad:
        shown = ", ".join(f"{rows[i]['source']} ({rows[i]['answer'][:40]!r})" for i in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        log.warning(
            f"{source}: {len(bad)} of {len(rows)} gold answers cannot be parsed by math-verify; every "
            f"completion for them will score 0: {shown}{more}"
        )
