"""The compiler: build pass, fx segments, units, torch.compile."""
