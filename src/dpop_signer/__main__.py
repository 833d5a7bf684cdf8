"""``python -m dpop_signer``: the ``dpop`` command."""

from dpop_signer.cli import main

main()
