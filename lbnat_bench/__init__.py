"""The benchmark suite: lbnat side by side with direct, HAProxy and nginx stream.

Run ``python -m lbnat_bench`` (or ``make bench``) as root from a checkout; it builds the netns
lab of ``scripts/lab.sh``. Modules:

- `report`: pure: parse the tools' output, take medians, compute ratios, write the markdown
  table. Unit-tested with recorded output.
- `charts`: matplotlib PNGs from a report's summary.
- `scale`: lbnat's own scale: per-packet cost and RSS with 10k, 100k and 1M table rows.
- `run`: the runner: lab, servers, the load balancers, the workloads, CPU accounting.
"""
