"""The admin console (virtual databases `pgdoorman` and `pgbouncer`)."""
