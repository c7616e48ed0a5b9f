"""The end of a multi-rank test script: every rank done, the process group gone, then out.

FSDP2 on gloo sometimes aborts a rank after its work is done ("terminate called without an active
exception", exit -6): the abort comes from gloo objects destroyed while the interpreter shuts down
(pytorch/pytorch#179291 describes the mechanism). A barrier before `destroy_process_group()` made it
rarer, not gone (a CI run on 2026-12-05 lost one of ~40 launches). `os._exit` skips the interpreter's
finalisation, where the abort happens; results are written and streams flushed before it.
"""

import os
import sys

import torch.distributed as dist


def finish() -> None:
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
