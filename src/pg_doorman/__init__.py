"""pg_doorman: a PostgreSQL connection pooler."""

# Before any other submodule: decides whether the hot-path modules load compiled.
from pg_doorman import implementation as implementation

__version__ = "0.1.0"
