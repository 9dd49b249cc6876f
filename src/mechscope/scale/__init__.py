"""Scale: PyTorch's own distributed engine (``torchrun``, ``torch.distributed``), made exact and fail-fast.

- :mod:`.dist`: process-group start-up with a short timeout, a self-test of the collectives a plan uses,
  global-index ownership of work items, errors naming the rank.
"""

from mechscope.scale.dist import (COLLECTIVES, DistInfo, DistributedError, guarded, init_distributed, owned,
                                  self_test, shutdown)

__all__ = ["COLLECTIVES", "DistInfo", "DistributedError", "guarded", "init_distributed", "owned", "self_test",
           "shutdown"]
