"""`python -m streamkv` is the `streamkv` command (for machines where the package is not installed)."""
from .cli import main

main()
