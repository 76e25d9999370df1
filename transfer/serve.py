"""A local server that speaks TensorFlow Serving's REST API for one exported model.

    GET  /v1/models/<name>[/versions/<v>]              version status
    GET  /v1/models/<name>[/versions/<v>]/metadata     signatures, inputs and outputs
    POST /v1/models/<name>[/versions/<v>]:predict      {"instances": ...} or {"inputs": ...}

Built on aiohttp (asyncio): requests that arrive together for the same version and signature
are run as one batch, in a worker thread, so the event loop keeps accepting requests.
Every bad request gets a 4xx and a JSON {"error": ...}, as TensorFlow Serving answers.
"""

import asyncio
import base64
import binascii
import errno
import gc
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
from aiohttp import web

from transfer.export import SIGNATURE, versions
from transfer.images import MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)

DTYPE_NAMES = {"float32": "DT_FLOAT", "string": "DT_STRING", "int32": "DT_INT32",
               "int64": "DT_INT64", "uint8": "DT_UINT8"}


class RequestError(Exception):
    """A request the server must refuse, with its HTTP status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Servable:
    """One loaded SavedModel version: its signatures and their batchers."""

    def __init__(self, name, version, path, max_batch, batch_wait):
        import tensorflow as tf

        self.name, self.version = name, version
        self._loaded = tf.saved_model.load(str(path))
        self.signatures = dict(self._loaded.signatures)
        self.batchers = {key: Batcher(self._runner(fn), max_batch, batch_wait)
                         for key, fn in self.signatures.items()}

    @staticmethod
    def _runner(fn):
        import tensorflow as tf

        (input_name, spec), = fn.structured_input_signature[1].items()

        def run(batch):
            try:
                outputs = fn(**{input_name: tf.constant(batch, dtype=spec.dtype)})
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
                raise RequestError(400, f"{input_name}: {_op_error_reason(error.message)}") from None
            return {key: value.numpy() for key, value in outputs.items()}

        return run

    def input_spec(self, signature_name):
        if signature_name not in self.signatures:
            raise RequestError(400, f"Serving signature name: \"{signature_name}\" not found in "
                                    f"signature def; this model has {', '.join(self.signatures)}")
        (input_name, spec), = self.signatures[signature_name].structured_input_signature[1].items()
        return input_name, spec

    def metadata(self):
        def tensor(spec, name):
            dims = [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape]
            return {"dtype": DTYPE_NAMES.get(spec.dtype.name, spec.dtype.name),
                    "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": name}

        defs = {}
        for key, fn in self.signatures.items():
            inputs = {name: tensor(spec, f"{key}_{name}:0")
                      for name, spec in fn.structured_input_signature[1].items()}
            outputs = {name: tensor(spec, name) for name, spec in fn.structured_outputs.items()}
            defs[key] = {"inputs": inputs, "outputs": outputs,
                         "method_name": "tensorflow/serving/predict"}
        return {"model_spec": {"name": self.name, "signature_name": "",
                               "version": str(self.version)},
                "metadata": {"signature_def": {"signature_def": defs}}}


class Batcher:
    """Collects concurrent requests into one batch of at most max_batch instances."""

    def __init__(self, run, max_batch, wait_seconds):
        self.run, self.max_batch, self.wait = run, max_batch, wait_seconds
        self.queue = None
        self.worker = None

    async def submit(self, batch):
        if self.worker is None:
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((batch, future))
        return await future

    async def _work(self):
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while sum(len(batch) for batch, _ in items) < self.max_batch:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(),
                                                        max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            await self._run(items)

    async def _run(self, items):
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(
                None, self.run, np.concatenate([batch for batch, _ in items]))
        except Exception as error:  # noqa: BLE001 - any failure must reach its own request
            if len(items) == 1:
                items[0][1].set_exception(error)
                return
            for item in items:  # one bad request must not fail the others batched with it
                await self._run([item])
            return
        start = 0
        for batch, future in items:
            future.set_result({key: value[start:start + len(batch)]
                               for key, value in outputs.items()})
            start += len(batch)


class ModelServer:
    """The model folder's versions, loaded on first use; the newest is the default."""

    def __init__(self, model_dir, max_batch=32, batch_wait=0.002, max_image_bytes=4 * 2**20):
        self.model_dir = Path(model_dir)
        self.name = self.model_dir.name
        if not versions(self.model_dir):
            raise FileNotFoundError(f"{self.model_dir} holds no SavedModel versions; expected "
                                    f"{self.model_dir}/<version>/saved_model.pb from "
                                    "`python -m transfer export`.")
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.max_image_bytes = max_image_bytes
        self.loaded = {}

    def servable(self, name, version=None):
        if name != self.name:
            raise RequestError(404, f"Servable not found for request: Latest({name}); this "
                                    f"server serves {self.name}")
        found = versions(self.model_dir)
        number = max(found) if version is None else _version_number(version)
        if number not in found:
            raise RequestError(404, f"Servable not found for request: Specific({name}, {number}); "
                                    f"available versions: {', '.join(map(str, sorted(found)))}")
        if number not in self.loaded:
            self.loaded[number] = Servable(name, number, found[number], self.max_batch,
                                           self.batch_wait)
            # TensorFlow leaves millions of objects behind; a JSON tensor of pixels allocates
            # tens of thousands per request, so full collections would rescan them all and
            # stall requests for ~200 ms. Freezing moves what is loaded out of their way.
            gc.collect()
            gc.freeze()
        return self.loaded[number]

    def status(self, name, version=None):
        if name != self.name:
            raise RequestError(404, f"Could not find any versions of model {name}")
        found = sorted(versions(self.model_dir), reverse=True)
        if version is not None:
            found = [n for n in found if n == _version_number(version)]
            if not found:
                raise RequestError(404, f"Could not find version {version} of model {name}")
        return {"model_version_status": [
            {"version": str(n), "state": "AVAILABLE",
             "status": {"error_code": "OK", "error_message": ""}} for n in found]}

    async def predict(self, name, version, body):
        # Parsing a JSON tensor of pixels takes milliseconds: keep it off the event loop.
        servable, signature, batch, row_format = await asyncio.get_running_loop().run_in_executor(
            None, self._parse, name, version, body)
        outputs = await servable.batchers[signature].submit(batch)
        outputs = {key: _jsonable(value) for key, value in outputs.items()}
        if row_format:
            return {"predictions": [dict(zip(outputs, row)) for row in zip(*outputs.values())]}
        return {"outputs": outputs}

    def _parse(self, name, version, body):
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise RequestError(400, f"JSON Parse error: {error}") from None
        if not isinstance(request, dict):
            raise RequestError(400, "The request body must be a JSON object with \"instances\" "
                                    "or \"inputs\"")
        if ("instances" in request) == ("inputs" in request):
            raise RequestError(400, "Missing 'inputs' or 'instances' key" if "inputs" not in
                               request else "Not both 'inputs' and 'instances' may be given")
        servable = self.servable(name, version)
        signature = request.get("signature_name", SIGNATURE)
        if not isinstance(signature, str):
            raise RequestError(400, "signature_name must be a string; received "
                                    f"{json.dumps(signature)}")
        input_name, spec = servable.input_spec(signature)
        row_format = "instances" in request
        values = request["instances"] if row_format else request["inputs"]
        if isinstance(values, dict):
            if set(values) != {input_name}:
                raise RequestError(400, f"Signature {signature} takes one input, {input_name}; "
                                        f"received {', '.join(values) or 'none'}")
            values = values[input_name]
        if row_format and isinstance(values, list):
            values = [v[input_name] if isinstance(v, dict) and "b64" not in v and input_name in v
                      else v for v in values]
        return servable, signature, self._to_array(values, spec, input_name), row_format

    def _to_array(self, values, spec, input_name):
        if not isinstance(values, list) or not values:
            raise RequestError(400, f"{input_name} must be a non-empty list of instances")
        if spec.dtype.name == "string":
            return np.array([self._bytes(v, input_name) for v in values], dtype=object)
        try:
            array = np.asarray(values, dtype=np.float32)
        except (ValueError, TypeError):
            raise RequestError(400, f"{input_name} must be numbers of shape "
                                    f"{_shape(spec)}; received values that are not") from None
        expected = tuple(spec.shape)[1:]
        if array.shape[1:] != expected:
            raise RequestError(400, f"{input_name} must have shape {_shape(spec)}; received "
                                    f"[{', '.join(map(str, array.shape))}]")
        return array

    def _bytes(self, value, input_name):
        if not (isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str)):
            raise RequestError(400, f"Each {input_name} value must be {{\"b64\": \"<base64 of an "
                                    "encoded image>\"}")
        try:
            data = base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(400, f"{input_name}: invalid base64: {error}") from None
        if len(data) > self.max_image_bytes:
            raise RequestError(413, f"{input_name}: an image of {len(data):,} bytes exceeds the "
                                    f"limit of {self.max_image_bytes:,} (--max-image-mb)")
        _check_pixels(data, input_name)  # a few KB can declare gigabytes of pixels
        return data


def _check_pixels(data, input_name):
    """RequestError 413 when an encoded image's header declares over MAX_IMAGE_PIXELS; a
    header Pillow cannot read is left to the model's decoder, which says what is wrong."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Image.DecompressionBombError:  # Pillow's own limit, far above ours
            declared = f"more than {2 * Image.MAX_IMAGE_PIXELS:,}"
        except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return
        else:
            if width * height <= MAX_IMAGE_PIXELS:
                return
            declared = f"{width * height:,}"
    raise RequestError(413, f"{input_name}: an image declaring {declared} pixels exceeds the "
                            f"limit of {MAX_IMAGE_PIXELS:,}")


def _op_error_reason(message):
    """The line of a TensorFlow op error that says what was wrong, without graph details."""
    lines = [line.strip() for line in message.splitlines()]
    useful = [line for line in lines if line and not line.startswith(("Graph execution error",
                                                                        "Detected at node", "[["))]
    return useful[-1] if useful else lines[0]


def _version_number(version):
    try:
        return int(version)
    except ValueError:
        raise RequestError(400, f"Version must be an integer; received {version!r}") from None


def _shape(spec):
    return "[" + ", ".join("N" if d is None else str(d) for d in spec.shape) + "]"


def _jsonable(array):
    if array.dtype == object:
        return [value.decode() if isinstance(value, bytes) else value for value in array.tolist()]
    return array.tolist()


def build_app(server, max_body_bytes=32 * 2**20):
    """The aiohttp application for a ModelServer."""

    @web.middleware
    async def json_errors(request, handler):
        try:
            return await handler(request)
        except RequestError as error:
            return web.json_response({"error": str(error)}, status=error.status)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            message = error.reason
            if error.status == 413:
                message = (f"Request body exceeds the limit of {max_body_bytes:,} bytes "
                           "(--max-body-mb)")
            return web.json_response({"error": message}, status=error.status)
        except Exception as error:  # noqa: BLE001 - a client gets JSON, whatever went wrong
            log.exception("Request %s failed", request.path)
            return web.json_response({"error": f"{type(error).__name__}: {error}"}, status=500)

    routes = web.RouteTableDef()
    model = "/v1/models/{name:[^/:]+}"
    version = "/versions/{version:[^/:]+}"

    @routes.get(model)
    @routes.get(model + version)
    async def status(request):
        info = request.match_info
        return web.json_response(server.status(info["name"], info.get("version")))

    @routes.get(model + "/metadata")
    @routes.get(model + version + "/metadata")
    async def metadata(request):
        info = request.match_info
        return web.json_response(server.servable(info["name"], info.get("version")).metadata())

    @routes.post(model + ":predict")
    @routes.post(model + version + ":predict")
    async def predict(request):
        info = request.match_info
        body = await request.read()
        return web.json_response(await server.predict(info["name"], info.get("version"), body))

    app = web.Application(middlewares=[json_errors], client_max_size=max_body_bytes)
    app.add_routes(routes)
    return app


def serve(model_dir, host="127.0.0.1", port=8501, max_batch=32, batch_wait_ms=2.0,
          max_image_mb=4.0, max_body_mb=32.0):
    """Run the server until interrupted."""
    server = ModelServer(model_dir, max_batch, batch_wait_ms / 1000, int(max_image_mb * 2**20))
    newest = server.servable(server.name)  # load now: errors show at start, not first request
    log.info("Serving %s version %d (of %s) at http://%s:%d/v1/models/%s", server.name,
             newest.version, ", ".join(map(str, sorted(versions(server.model_dir)))), host, port,
             server.name)
    try:
        web.run_app(build_app(server, int(max_body_mb * 2**20)), host=host, port=port,
                    print=None)
    except OSError as error:  # socket.gaierror included: a host name that does not resolve
        if error.errno == errno.EADDRINUSE:
            raise ValueError(f"Port {port} on {host} is already in use (by another server, or "
                             "TensorFlow Serving itself); choose another with --port.") from None
        raise ValueError(f"Cannot listen on {host}:{port}: {error.strerror or error}. Expected "
                         "--host to be this machine's name or one of its addresses (127.0.0.1, "
                         "or 0.0.0.0 for all).") from None
