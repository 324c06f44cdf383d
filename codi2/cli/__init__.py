"""The `codi2` command line."""
