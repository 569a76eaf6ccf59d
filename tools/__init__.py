"""Developer tools that run beside samvad: not part of the package."""
