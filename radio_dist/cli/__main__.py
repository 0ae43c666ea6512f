"""`python -m radio_dist.cli ...`: the same as the `radio-dist` console script."""

from radio_dist.cli import main

main()
