"""Flow's shared internals: settings, protocol, tokens, logging and process glue."""
