"""``python -m workers.head.merge DIR OUT.pt``: one file holding a head checkpoint's centres.

``DIR`` is a sharded head checkpoint (``save_head_checkpoint``'s directory, a training
checkpoint's ``head/`` or an export's ``class_centres/``); ``OUT.pt`` receives the full
``num_classes × embedding_dim`` matrix, so ``torch.load(OUT.pt)`` is the tensor. The rows are
copied block by block: memory is the output plus one block.
"""

from __future__ import annotations

import argparse
import sys

from workers.cli import OneLineParser

from ._checkpoint import merge_head_checkpoint


def main(argv: list[str] | None = None) -> int:
    """Merge; a bad checkpoint is one ``error:`` line on stderr and exit code 2."""
    parser = OneLineParser(prog="python -m workers.head.merge", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="a sharded head checkpoint directory")
    parser.add_argument("out_file", help="the .pt file to write the full centre matrix to")
    args = parser.parse_args(argv)
    try:
        shape = merge_head_checkpoint(args.directory, args.out_file)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_file}: {shape[0]} × {shape[1]} class centres")
    return 0


if __name__ == "__main__":
    sys.exit(main())
