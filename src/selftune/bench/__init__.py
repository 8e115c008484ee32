"""selftune's benchmark: workloads x methods x seeds, run resumably, reported with ratios.

Data flows ``data`` → ``workloads`` (with ``models``) → ``methods`` (with ``hd``) → ``runner`` →
``results.jsonl`` → ``report``; ``suites`` says which runs make a suite, ``overhead`` measures the
per-step cost of wrapping, ``fields`` checks what is read back from the results folder, and
``cli`` is ``selftune bench``.  The core never imports this package.
"""
