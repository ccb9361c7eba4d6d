"""GitHub as a source of jobs: the GitHub App's authentication and its REST client.

``appauth`` makes the app's JWT and keeps installation tokens; ``rest`` is the client every other
GitHub module talks through (its docstring lists the public API).
"""
