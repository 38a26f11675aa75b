"""Protocol-level prepared statements shared by all clients of a pool (transaction mode)."""
