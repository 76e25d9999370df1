"""The page `transfer serve` shows at /: try the served model on one's own images in a browser.

Plain HTML, CSS and JavaScript in templates/demo.html, nothing fetched from elsewhere: the
page sends each chosen or dropped file, as it is, to the server's own REST API (the serve_bytes
signature, base64 in TensorFlow Serving's {"b64": ...} form) and draws the answer.
"""

import json

from transfer.export import read_asset


def render(server):
    """The page for a serve.ModelServer: its model, versions and each version's classes."""
    import jinja2

    versions = server.status(server.name)["model_version_status"]
    folders = server.scan()
    classes = {}
    for entry in versions:
        try:
            classes[entry["version"]] = read_asset(folders[int(entry["version"])])
        except (OSError, ValueError, KeyError):  # a version whose files are not all there yet
            continue
    environment = jinja2.Environment(loader=jinja2.PackageLoader("transfer"), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    return environment.get_template("demo.html").render(
        model=server.name, versions=versions,
        # inside <script>: no "</script>" can end it early
        classes_json=json.dumps(classes).replace("<", "\\u003c"))
