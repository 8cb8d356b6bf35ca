"""``python -m vqkit.train.torchrun ARGS``: torchrun (``torch.distributed.run``) as
``vqkit train --nproc N`` runs it, saying nothing of its own about the ranks' ends.

The ranks say what happened (``vqkit: interrupted at step ...``, one ``vqkit: error:`` line,
or an internal error's traceback), so torchrun's own report of it is left out: no
``SignalException`` traceback when it is interrupted (it passes the signal on to the
ranks, which stop together at a step and checkpoint), no ``ChildFailedError`` table when a
rank exits non-zero, and its warnings (``Sending process ... closing signal``) below error
level. The exit code is the first failed rank's (a rank killed by a signal: 128 + signal),
or 130 when torchrun was interrupted (SIGINT, SIGTERM, SIGHUP), as a single-process
``vqkit train`` exits on an interrupt.
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence


def _code(exitcode: int) -> int:
    return 128 - exitcode if exitcode < 0 else exitcode


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.run"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        run.main(list(argv) if argv is not None else None)
    except SignalException:  # passed on to the ranks, which checkpointed and said so
        return 130
    except ChildFailedError as exc:
        return _code(exc.get_first_failure()[1].exitcode) or 1
    return 0


if __name__ == "__main__":  # pragma: no cover - run by vqkit train --nproc
    sys.exit(main())
