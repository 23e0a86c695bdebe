"""``python -m easy_context.data ...``: prepare_data.py's command line (:func:`easy_context.data.prepare.main`)."""
from .prepare import main

main()
