"""What the tests, ``make demo`` and the bench share to run the plugin; development only, never installed.

- ``sshd``: a throwaway OpenSSH backup host on 127.0.0.1 (the docker backup host's entrypoint, run directly);
- ``harness``: the installed plugin run as gpbackup runs it (``Plugin``) and the configs it reads
  (``SiteConfig``), with the one ``RUN_TIMEOUT``;
- ``gpbackup``: gpbackup's side of the calls: backup directories, and a simulated cluster's calls made as
  gpbackup makes them (``bash -c``, a config copy per host, hooks after ``greenplum_path.sh``);
- ``faultproxy``: a TCP proxy that resets, stalls or refuses connections on purpose;
- ``delayproxy``: a TCP proxy that delays every byte, a high-latency link without netem.

Scripts that import it run as modules from the repository root (``python -m bench.run``,
``python -m scripts.demo``); pytest puts the root on the path itself.
"""
