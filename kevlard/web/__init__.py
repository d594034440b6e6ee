"""kevlard's web layer: the Starlette app in front of the engine (`kevlard.web.app.create_app`).

Kept free of imports so that modules of this package (dashboard, events) can be imported
without pulling in, or cycling through, the whole app.
"""
