"""Benchmark harness: the plugin against OpenSSH's ``sftp`` on a throwaway sshd (``make bench``)."""
