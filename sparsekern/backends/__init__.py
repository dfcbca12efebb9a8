"""One module per backend; importing it registers its op implementations with ``dispatch``."""
