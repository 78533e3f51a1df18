"""GroupedLinear against the layers users already write; writes docs/benchmarks/peers.md, .json, .png.

The same as ``python -m grouped_ops bench --peers``, with every option (``--help``); the code is
:mod:`grouped_ops.bench.peers_report`.

    python scripts/peers_bench.py                      # the full run (a minute or two on 2 cores)
    python scripts/peers_bench.py --quick --out /tmp/p # a smoke run
"""

from grouped_ops.bench.peers_report import main

if __name__ == "__main__":
    raise SystemExit(main())
