"""torchrun, with the trainer's exit code kept: `python -m kubetune_trainer.launch <torchrun args>`.

torchrun reports any failed worker as exit code 1. Kubernetes' podFailurePolicy must tell
"bad config/data, do not retry" (2) from everything else, so when every failed worker exited with
2 the launcher exits with 2 as well.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from kubetune_trainer.errors import EXIT_BAD_INPUT, EXIT_RETRYABLE


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        print(f"kubetune: trainer workers failed with exit codes {sorted(codes)}", file=sys.stderr)
        return EXIT_BAD_INPUT if codes == {EXIT_BAD_INPUT} else EXIT_RETRYABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
