"""gpbackup_sftp_plugin: a gpbackup/gprestore storage plugin that keeps backups on any SSH host.

Importing the package must stay cheap: `plugin_api_version` and `--version`
run on every host before each backup and must not pull in paramiko.
"""

__version__ = "0.1.0"

# The storage plugin API version we implement; the reference S3 plugin reports
# the same, and gpbackup requires >= 0.3.0.
API_VERSION = "0.5.0"

PLUGIN_NAME = "gpbackup_sftp_plugin"
