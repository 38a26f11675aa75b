"""Authentication: md5 and SCRAM-SHA-256 math, pg_hba rules, and the decision between them.

Everything here is sans-IO.
"""
