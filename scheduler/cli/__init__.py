"""The `specserve` command: parser, flags and the generate / serve / cache / bench subcommands."""
