"""Researcher catalog: a served, token-gated download service for approved, signed releases.

`create_app(releases_dir, public_keys)` (app.py) serves the release pages and JSON API; `store.py` keeps tokens
(hashed), terms acceptances, auth failures and the download log in SQLite; `archive.py` streams a bundle as one
deterministic tar; `fetch.py` is the researcher's side (download, safe unpack, verify).
"""
