"""The extraction run: config, resume keys, planning, the local and Ray engines."""
