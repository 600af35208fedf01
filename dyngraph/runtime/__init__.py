"""The runtime: execution context, model, trace."""
