"""``keygen <path>``: make a key for ``encryption_key_file`` (keys.py), print its fingerprint, never the key."""

from __future__ import annotations

import os

from sftp_plugin.admin.runner import command_parser, parse_args
from sftp_plugin.stderr import fail


def keygen(argv: list[str]) -> int:
    """``keygen <path>``: write 32 random bytes to a new file of mode 0600; print its fingerprint."""
    parser = command_parser(
        "keygen",
        "Write a new encryption key (32 random bytes, mode 0600; an existing file is never overwritten) for the "
        "encryption_key_file option and print its fingerprint. Copy it to the same path on every host, and keep "
        "a copy off the backup host: a lost key is a lost backup.", config_help=None,
    )
    parser.add_argument("path", help="the key file to create")
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    from sftp_plugin import keys

    path = os.path.abspath(os.path.expanduser(args.path))
    try:
        key = keys.write_new_key(path)
    except FileExistsError:
        return fail("keygen", f"{path} already exists; it was left as it is (choose another path)", 1)
    except OSError as err:
        return fail("keygen", f"cannot create {path}: {err.strerror}; check the directory and its permissions", 1)
    print(f"wrote a new key to {path} (mode 0600), fingerprint {keys.fingerprint(key)}")
    print("copy it to this same path on every host of the cluster (mode 0600), set encryption_key_file: "
          f"{path} in the plugin config, and keep a copy off the backup host: without it no backup made "
          "with it can be restored")
    return 0
