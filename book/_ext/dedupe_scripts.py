"""Drop repeated <script> entries from each page (Sphinx 7.4 lists scripts that sphinx-thebe and
sphinx-togglebutton add after the builder starts twice; the repeated `const THEBE_JS_URL` is a SyntaxError)."""


def _dedupe(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for js in context.get("script_files", []):
        key = (str(getattr(js, "filename", js) or ""), tuple(sorted((getattr(js, "attributes", {}) or {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"][:] = kept


def setup(app):
    app.connect("html-page-context", _dedupe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
