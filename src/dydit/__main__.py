"""`python -m dydit`: the same command as `dydit`."""
from dydit.cli import main

main()
