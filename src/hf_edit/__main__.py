"""``python -m hf_edit`` runs the ``hf-edit`` command line."""

import sys

from .cli import main

sys.exit(main())
