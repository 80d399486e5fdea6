"""headstart's admin: what `headstart status|workers|queues|jobs|models|train|embed` and /admin show and do.

`views` computes what is shown, `actions` what can be changed; the CLI (backend/cli/admin.py),
the page and its JSON API (`web`) are thin layers over those two. See README.md beside this file.
"""
