"""A local server that speaks TensorFlow Serving's REST API for one exported model.

    GET  /v1/models/<name>[/versions/<v>]              version status
    GET  /v1/models/<name>[/versions/<v>]/metadata     signatures, inputs and outputs
    POST /v1/models/<name>[/versions/<v>]:predict      {"instances": ...} or {"inputs": ...}

A prediction holds every output of the signature (transfer.export): probabilities,
class_index, class_name, score and unknown (JSON true/false); {"predictions": [one dict per
instance]} for "instances" (row format), {"outputs": {name: one value per instance}} for
"inputs" (columnar), as TensorFlow Serving answers a signature of several outputs.

Built on aiohttp (asyncio). As in TensorFlow Serving, a version is loaded before it is served:
the default is the newest version that loaded, one that fails to load is reported (state END)
and never served, and new versions are picked up as they appear. A request's instances run in
chunks of at most --max-batch; chunks from requests that arrive together for the same version
and signature run as one batch, in a thread of their own, so the event loop keeps accepting
requests. An encoded image that declares more than HEAVY_IMAGE_PIXELS is decoded alone, in a
second lane, so one heavy image holds up only the requests that carry heavy images too.
Every bad request gets a 4xx and a JSON {"error": ...}, as TensorFlow Serving answers.
"""

import asyncio
import base64
import binascii
import ctypes
import errno
import functools
import gc
import io
import json
import logging
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from aiohttp import http_exceptions, web

from transfer.export import SIGNATURE, is_version_name
from transfer.images import MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)

DTYPE_NAMES = {"float32": "DT_FLOAT", "string": "DT_STRING", "int32": "DT_INT32",
               "int64": "DT_INT64", "uint8": "DT_UINT8", "bool": "DT_BOOL"}
# Decoding runs at about 10 million pixels a second on one core: a batch of encoded images
# closes at BATCH_PIXELS (well under a second), and an image over HEAVY_IMAGE_PIXELS (a
# 12-megapixel photo, a 64-megapixel bomb) runs on its own in the heavy lane, one at a time.
BATCH_PIXELS = 4_000_000
HEAVY_IMAGE_PIXELS = 2_000_000
POLL_SECONDS = 1.0  # new versions are looked for this often, as TensorFlow Serving's default
SHUTDOWN_SECONDS = 2.0  # after SIGTERM, requests in flight get this long to finish
MAX_LINE_BYTES = 8190  # a longer request line (URL) or header is refused (aiohttp's default)


class RequestError(Exception):
    """A request the server must refuse, with its HTTP status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Servable:
    """One loaded SavedModel version: its signatures, their runners and their batchers."""

    def __init__(self, name, version, path, max_batch, batch_wait):
        import tensorflow as tf

        self.name, self.version = name, version
        self._loaded = tf.saved_model.load(str(path))
        self.signatures = dict(self._loaded.signatures)
        self.runners = {key: self._runner(fn) for key, fn in self.signatures.items()}
        self.batchers = {key: Batcher(run, max_batch, batch_wait)
                         for key, run in self.runners.items()}

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
    """Runs chunks of concurrent requests as batches of at most max_batch instances and
    max_pixels declared pixels, one batch at a time, in a thread of its own."""

    def __init__(self, run, max_batch, wait_seconds, max_pixels=BATCH_PIXELS):
        self.run, self.max_batch, self.wait = run, max_batch, wait_seconds
        self.max_pixels = max_pixels
        self.queue = None
        self.worker = None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="serve-batch")

    async def submit(self, batch, pixels=0):
        loop = asyncio.get_running_loop()
        if self.worker is None:
            self.queue = asyncio.Queue()
            self.worker = loop.create_task(self._work())
        future = loop.create_future()
        self.queue.put_nowait((batch, pixels, future))
        return await future

    async def _work(self):
        loop = asyncio.get_running_loop()
        held = None  # the chunk that did not fit the last batch opens the next one
        while True:
            items = [held or await self.queue.get()]
            held = None
            deadline = loop.time() + self.wait
            while True:
                size = sum(len(batch) for batch, _, _ in items)
                pixels = sum(cost for _, cost, _ in items)
                if size >= self.max_batch or pixels >= self.max_pixels:
                    break
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        item = await asyncio.wait_for(self.queue.get(),
                                                      max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        break
                if size + len(item[0]) > self.max_batch or pixels + item[1] > self.max_pixels:
                    held = item
                    break
                items.append(item)
            items = [item for item in items if not item[2].done()]  # its request has gone
            if items:
                await self._run(items)

    async def _run(self, items):
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(
                self.thread, self.run, np.concatenate([batch for batch, _, _ in items]))
        except Exception as error:  # noqa: BLE001 - any failure must reach its own request
            if len(items) == 1:
                _settle(items[0][2], error=error)
                return
            for item in items:  # one bad request must not fail the others batched with it
                await self._run([item])
            return
        start = 0
        for batch, _, future in items:
            _settle(future, {key: value[start:start + len(batch)]
                             for key, value in outputs.items()})
            start += len(batch)


def _settle(future, result=None, error=None):
    if future.done():  # cancelled: its request was abandoned while the batch ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Failure:
    """Why a version did not load, for the status call, and what its folder held then."""

    def __init__(self, code, message, fingerprint):
        self.code, self.message, self.fingerprint = code, message, fingerprint


class ModelServer:
    """The versions of one model folder, as TensorFlow Serving serves them.

    The default version is the newest one that loaded: load_default() loads the newest that
    loads at start, watch() loads newer ones as they appear, and each becomes the default only
    once it has loaded. Older versions load on first use. A version that fails to load is
    reported with its error (state END) and retried only when its files change.
    """

    def __init__(self, model_dir, max_batch=32, batch_wait=0.002, max_image_bytes=4 * 2**20,
                 max_instances=256, max_request_pixels=64_000_000):
        self.model_dir = Path(model_dir)
        self.name = self.model_dir.name
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.max_image_bytes = max_image_bytes
        self.max_instances, self.max_request_pixels = max_instances, max_request_pixels
        self.loaded, self.failed, self.loading = {}, {}, {}
        self.requests = 0  # :predict calls so far
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="serve-load")
        self._heavy = ThreadPoolExecutor(1, thread_name_prefix="serve-heavy")
        self._parser = ThreadPoolExecutor(2, thread_name_prefix="serve-parse")

    def scan(self):
        """{version: folder} of the folders named as versions: canonical whole numbers."""
        try:
            entries = list(self.model_dir.iterdir())
        except OSError:
            return {}
        return {int(p.name): p for p in entries if is_version_name(p.name) and p.is_dir()}

    def load_default(self):
        """Load the newest version that loads and return it; ValueError when none does."""
        found = self.scan()
        if not found:
            raise FileNotFoundError(f"{self.model_dir} holds no SavedModel versions; expected "
                                    f"{self.model_dir}/<version>/saved_model.pb from "
                                    "`python -m transfer export`.")
        for path in self.model_dir.iterdir():
            if path.is_dir() and path.name.isdigit() and not is_version_name(path.name):
                log.warning("Ignoring %s: version folders are named 1, 2, 3 ... (ASCII digits, "
                            "no leading zeros)", path)
        for number in sorted(found, reverse=True):
            servable, failure = self._open(number, found[number])
            if servable is not None:
                self.loaded[number] = servable
                return servable
            self.failed[number] = failure
        errors = "; ".join(f"version {n}: {self.failed[n].message}" for n in sorted(found))
        raise ValueError(f"No version of {self.model_dir} loads ({errors}). Expected "
                         "<version>/saved_model.pb and variables/ as `python -m transfer export` "
                         "writes them; re-export, or copy the version folder again.")

    def _open(self, number, path):
        """(Servable, None), or (None, Failure) when the version does not load. Runs in the
        loader thread (or at start, before serving)."""
        fingerprint = _fingerprint(path)  # before loading: a change meanwhile means a retry
        try:
            servable = Servable(self.name, number, path.resolve(), self.max_batch,
                                self.batch_wait)
        except Exception as error:  # noqa: BLE001 - whatever the reason, it is not served
            failure = Failure(_error_code(error), _load_error(error, path), fingerprint)
            log.warning("Version %d of %s did not load: %s", number, self.name,
                        (str(error).strip().splitlines() or [type(error).__name__])[0])
            return None, failure
        # TensorFlow leaves millions of objects behind; a JSON tensor of pixels allocates
        # tens of thousands per request, so full collections would rescan them all and
        # stall requests for ~200 ms. Freezing moves what is loaded out of their way.
        gc.collect()
        gc.freeze()
        log.info("Loaded version %d of %s", number, self.name)
        return servable, None

    async def _load(self, number, path):
        """Load a version in the loader thread, once however many requests ask; True if it
        loaded."""
        if number not in self.loading:
            self.loading[number] = asyncio.get_running_loop().create_task(
                self._load_task(number, path))
        return await asyncio.shield(self.loading[number])

    async def _load_task(self, number, path):
        try:
            servable, failure = await asyncio.get_running_loop().run_in_executor(
                self._loader, self._open, number, path)
        finally:
            del self.loading[number]
        if servable is None:
            self.failed[number] = failure
            return False
        self.failed.pop(number, None)
        self.loaded[number] = servable
        if number == self.default(self.scan()):
            log.info("Serving version %d of %s by default", number, self.name)
        return True

    def default(self, found):
        """The version unversioned requests get: the newest loaded one still in the folder
        (found), so removing a version folder rolls back to the one before."""
        return max([n for n in self.loaded if n in found] or self.loaded)

    async def watch(self):
        """Every POLL_SECONDS: load versions newer than the default (newest first, until one
        loads), retry failed versions whose files changed, and hand back freed memory."""
        loop = asyncio.get_running_loop()
        trimmed_at = 0
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if self.requests != trimmed_at:  # what they freed goes back to the system
                trimmed_at = self.requests
                await loop.run_in_executor(self._loader, _trim_memory)
            try:
                found = self.scan()
                for number in [n for n in self.failed if n not in found]:
                    del self.failed[number]
                for number in sorted(found, reverse=True):
                    if number in self.loaded or number in self.loading:
                        continue
                    if number in self.failed:
                        now = await loop.run_in_executor(self._loader, _fingerprint,
                                                         found[number])
                        if now in (None, self.failed[number].fingerprint):
                            continue
                    elif number < self.default(found):
                        continue  # older than the default: loaded when asked for
                    await self._load(number, found[number])
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad scan
                log.exception("Looking for new versions of %s failed", self.name)

    async def servable(self, name, version=None):
        if name != self.name:
            raise RequestError(404, f"Servable not found for request: Latest({name}); this "
                                    f"server serves {self.name}")
        found = self.scan()
        if version is None:
            return self.loaded[self.default(found)]
        number = _version_number(version)
        if number in found and number not in self.loaded and number not in self.failed:
            await self._load(number, found[number])
        if number not in found or number not in self.loaded:
            reason = "" if number not in self.failed else (
                f": version {number} did not load ({self.failed[number].message})")
            usable = sorted(set(found) - set(self.failed))
            raise RequestError(404, f"Servable not found for request: Specific({name}, "
                                    f"{number}){reason}; available versions: "
                                    f"{', '.join(map(str, usable))}")
        return self.loaded[number]

    def status(self, name, version=None):
        if name != self.name:
            raise RequestError(404, f"Could not find any versions of model {name}")
        found = sorted(self.scan(), reverse=True)
        if version is not None:
            found = [n for n in found if n == _version_number(version)]
            if not found:
                raise RequestError(404, f"Could not find version {version} of model {name}")
        return {"model_version_status": [self._state(n) for n in found]}

    def _state(self, number):
        state, code, message = "START", "OK", ""  # START: found, not loaded until asked for
        if number in self.loaded:
            state = "AVAILABLE"
        elif number in self.loading:
            state = "LOADING"
        elif number in self.failed:
            failure = self.failed[number]
            state, code, message = "END", failure.code, failure.message
        return {"version": str(number), "state": state,
                "status": {"error_code": code, "error_message": message}}

    async def predict(self, servable, body, gone=lambda: False):
        """The answer to a :predict body; `gone()` says whether the client has left, so the
        rest of an abandoned request is not run."""
        loop = asyncio.get_running_loop()
        self.requests += 1
        # Parsing a JSON tensor of pixels takes milliseconds: keep it off the event loop.
        signature, chunks, row_format = await loop.run_in_executor(
            self._parser, self._parse, servable, body)
        parts = []
        for batch, pixels, heavy in chunks:  # in turn: a big request shares the batcher
            if gone():
                raise ConnectionResetError("the client closed the connection")
            if heavy:
                parts.append(await loop.run_in_executor(
                    self._heavy, _run_heavy, servable.runners[signature], batch))
            else:
                parts.append(await servable.batchers[signature].submit(batch, pixels))
        outputs = {key: _jsonable(np.concatenate([part[key] for part in parts]))
                   for key in parts[0]}
        if row_format:
            return {"predictions": [dict(zip(outputs, row)) for row in zip(*outputs.values())]}
        return {"outputs": outputs}

    def _parse(self, servable, body):
        """(signature, chunks, row_format): the request's instances as _chunks gives them."""
        request = _load_json(body)
        if not isinstance(request, dict):
            raise RequestError(400, "The request body must be a JSON object with \"instances\" "
                                    "or \"inputs\"")
        if ("instances" in request) == ("inputs" in request):
            raise RequestError(400, "Missing 'inputs' or 'instances' key" if "inputs" not in
                               request else "Not both 'inputs' and 'instances' may be given")
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
        if not isinstance(values, list) or not values:
            raise RequestError(400, f"{input_name} must be a non-empty list of instances")
        if len(values) > self.max_instances:
            raise RequestError(413, f"A request of {len(values):,} instances exceeds the limit "
                                    f"of {self.max_instances:,} (--max-instances); send them "
                                    f"in requests of at most {self.max_instances:,}")
        if row_format:
            values = [v[input_name] if isinstance(v, dict) and "b64" not in v and input_name in v
                      else v for v in values]
        if spec.dtype.name == "string":
            images = [self._bytes(v, input_name) for v in values]
            self._check_request_pixels(sum(pixels or 0 for _, pixels in images))
            # An image whose size Pillow cannot read is left to the model's decoder, which
            # says what is wrong; not knowing its cost, it runs alone, as a heavy one.
            costs = [HEAVY_IMAGE_PIXELS + 1 if pixels is None else pixels for _, pixels in images]
            return signature, self._chunks([data for data, _ in images], costs), row_format
        array = _pixels(values, spec, input_name, b"true" in body or b"false" in body)
        self._check_request_pixels(int(np.prod(array.shape[:-1])))
        # Already decoded: only --max-batch bounds their batches.
        return signature, self._chunks(array, [0] * len(array)), row_format

    def _check_request_pixels(self, pixels):
        if pixels > self.max_request_pixels:
            raise RequestError(413, f"This request's images come to {pixels:,} pixels, over the "
                                    f"limit of {self.max_request_pixels:,} a request "
                                    "(--max-request-mpx); send fewer or smaller images per "
                                    "request")

    def _chunks(self, instances, costs):
        """Consecutive instances as [(batch, pixels, heavy)]: at most max_batch of them and
        BATCH_PIXELS in all, or one heavy image alone."""
        chunks, start = [], 0
        for end in range(1, len(instances) + 1):
            heavy = costs[end - 1] > HEAVY_IMAGE_PIXELS
            if (heavy or end == len(instances) or end - start == self.max_batch
                    or costs[end] > HEAVY_IMAGE_PIXELS
                    or sum(costs[start:end + 1]) > BATCH_PIXELS):
                batch = instances[start:end]
                if isinstance(batch, list):
                    batch = np.array(batch, dtype=object)
                chunks.append((batch, sum(costs[start:end]), heavy))
                start = end
        return chunks

    def _bytes(self, value, input_name):
        """(encoded image, pixels its header declares or None)."""
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
        return data, _declared_pixels(data, input_name)  # a few KB can declare gigabytes


def _run_heavy(run, batch):
    try:
        return run(batch)
    finally:
        _trim_memory()


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: its allocator decides
        return None


M_ARENA_MAX = -8  # glibc's mallopt parameter: the most malloc arenas


def returnable_memory():
    """Make what a heavy request takes go back to the system once it is answered; call
    before TensorFlow starts its threads. On CPUs where TensorFlow runs oneDNN's kernels
    (AVX-512 ones) oneDNN keeps its own memory pool, which never shrinks: the system allocator
    is used instead. glibc then gets 2 heap arenas, not one per thread, so that its free
    memory stays in few places that malloc_trim hands back (_trim_memory)."""
    os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def _trim_memory():
    """Hand freed heap memory back to the system (glibc keeps it for reuse otherwise)."""
    if _libc() is not None:
        _libc()(0)


def _load_json(body):
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        message = ("JSON Parse error: nested too deeply (over about 1,000 levels); a tensor of "
                   "images needs 4 ([instance][row][column][channel])")
        raise RequestError(400, message) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, f"JSON Parse error: {error}") from None


def _refuse_constant(name):
    raise RequestError(400, f"JSON Parse error: {name} is not a JSON number; send finite numbers")


def _pixels(values, spec, input_name, may_hold_bools):
    """`values` as float32 of the signature's shape, or RequestError: they must be numbers
    0-255, and not true/false, strings or null, which NumPy would turn into numbers."""
    expected = f"{input_name} must be numbers 0-255 (raw RGB) of shape {_shape(spec)}"
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, RecursionError):
        unequal = "lists of unequal lengths or depths"
        raise RequestError(400, f"{expected}; received {unequal}") from None
    if array.dtype.kind == "b" or (may_hold_bools and array.dtype.kind in "iuf" and any(
            type(v) is bool for v in np.asarray(values, dtype=object).flat)):
        raise RequestError(400, f"{expected}; received true or false")
    if array.dtype.kind not in "iuf":
        received = ("strings" if array.dtype.kind in "US"
                    else "null, objects or integers too large for a pixel")
        raise RequestError(400, f"{expected}; received {received}")
    if array.shape[1:] != tuple(spec.shape)[1:]:
        raise RequestError(400, f"{input_name} must have shape {_shape(spec)}; received "
                                f"[{', '.join(map(str, array.shape))}]")
    wrong = ~((array >= 0) & (array <= 255))
    if wrong.any():
        where = tuple(int(i) for i in np.argwhere(wrong)[0])
        raise RequestError(400, f"{expected}; received {array[where].item()!r} at "
                                f"{list(where)}: send pixels as they are, the model does its own "
                                "preprocessing")
    return array.astype(np.float32)


def _declared_pixels(data, input_name):
    """The pixels an encoded image's header declares (None when Pillow cannot read it);
    RequestError 413 when over MAX_IMAGE_PIXELS."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Image.DecompressionBombError:  # Pillow's own limit, far above ours
            declared = f"more than {2 * Image.MAX_IMAGE_PIXELS:,}"
        except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None
        else:
            if width * height <= MAX_IMAGE_PIXELS:
                return width * height
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
    if not is_version_name(version):
        raise RequestError(400, "Version must be an integer written as version folders are "
                                "named: ASCII digits, no sign, spaces or leading zeros (1, 2, "
                                f"10); received {json.dumps(version)}")
    return int(version)


def _fingerprint(path):
    """What a version folder holds (names, sizes, times), to see when it changes; None when
    it cannot be read."""
    try:
        return tuple(sorted((str(p.relative_to(path)), s.st_size, s.st_mtime_ns)
                            for p in path.rglob("*") for s in [p.stat()]))
    except OSError:
        return None


def _load_error(error, path):
    """What went wrong loading a version, for clients: one line, and no path of the server."""
    text = (str(error).strip().splitlines() or [""])[0]
    for folder in sorted({str(path), str(path.resolve())}, key=len, reverse=True):
        text = text.replace(folder + os.sep, "").replace(folder, "the version folder")
    text = re.sub(r"(?<![\w.])/[^\s'\"]+", "<path>", text)  # any other absolute path
    return f"{type(error).__name__}: {text}".rstrip(": ")


def _error_code(error):
    """TensorFlow's canonical error code name for a load failure, as TensorFlow Serving's
    status gives it."""
    import tensorflow as tf

    if isinstance(error, tf.errors.OpError):  # NotFoundError -> NOT_FOUND
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__.removesuffix("Error")).upper()
    return "NOT_FOUND" if isinstance(error, FileNotFoundError) else "UNKNOWN"


def _shape(spec):
    return "[" + ", ".join("N" if d is None else str(d) for d in spec.shape) + "]"


def _jsonable(array):
    """A batch of one output as JSON values: strings decoded, bools as true/false."""
    if array.dtype == object:
        return [value.decode() if isinstance(value, bytes) else value for value in array.tolist()]
    return array.tolist()


_dumps = functools.partial(json.dumps, allow_nan=False)  # NaN would not be JSON


async def _read_body(request, max_body_bytes, read_timeout):
    if (request.content_length or 0) > max_body_bytes:  # refused before reading it
        raise web.HTTPRequestEntityTooLarge(max_body_bytes, request.content_length)
    try:
        return await asyncio.wait_for(request.read(), read_timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"The request body did not arrive within {read_timeout:g} s "
                                "(--read-timeout-s); received less than its Content-Length "
                                "declared. Send the whole body at once.") from None


def _gone(request):
    return request.transport is None or request.transport.is_closing()


def build_app(server, max_body_bytes=32 * 2**20, read_timeout=30.0):
    """The aiohttp application for a ModelServer."""

    @web.middleware
    async def json_errors(request, handler):
        try:
            return await handler(request)
        except RequestError as error:
            response = web.json_response({"error": str(error)}, status=error.status)
            if error.status == 408:  # answer, then hang up rather than wait for the rest
                response.force_close()
                await response.prepare(request)
                await response.write_eof()
                request.transport.close()
            return response
        except web.HTTPException as error:
            if error.status < 400:
                raise
            message = error.reason
            if error.status == 413:
                message = (f"Request body exceeds the limit of {max_body_bytes:,} bytes "
                           "(--max-body-mb)")
            return web.json_response({"error": message}, status=error.status)
        except ConnectionError:  # the client left; nobody is waiting for an answer
            log.info("%s %s: the client closed the connection first", request.method,
                     request.path)
            return web.json_response({"error": "client closed the connection"}, status=400)
        except Exception as error:  # noqa: BLE001 - a client gets JSON, whatever went wrong
            log.exception("Request %s failed", request.path)
            return web.json_response({"error": f"Internal error ({type(error).__name__}); the "
                                               "server's log has the details"}, status=500)

    routes = web.RouteTableDef()

    @routes.get("/")
    async def page(request):  # try the model in a browser (transfer.demo)
        from transfer import demo

        return web.Response(text=demo.render(server), content_type="text/html")

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
        return web.json_response((await server.servable(info["name"],
                                                        info.get("version"))).metadata())

    @routes.post(model + ":predict")
    @routes.post(model + version + ":predict")
    async def predict(request):
        info = request.match_info
        servable = await server.servable(info["name"], info.get("version"))
        body = await _read_body(request, max_body_bytes, read_timeout)
        answer = await server.predict(servable, body, gone=lambda: _gone(request))
        return web.json_response(answer, dumps=_dumps)

    async def watching(app):
        task = asyncio.get_running_loop().create_task(server.watch())
        yield
        task.cancel()

    app = web.Application(middlewares=[json_errors], client_max_size=max_body_bytes)
    app.add_routes(routes)
    app.cleanup_ctx.append(watching)
    return app


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, answering requests that are not valid HTTP (a URL or a
    header over MAX_LINE_BYTES, a bad request line) in JSON, with one line in the log."""

    __slots__ = ()

    def handle_error(self, request, status=500, exc=None, message=None):
        if status >= 500:  # a bug: its traceback belongs in the log
            log.error("Request failed", exc_info=exc)
            text = "Internal error; the server's log has the details"
        else:
            log.info("Refused a malformed HTTP request from %s: %s", request.remote,
                     type(exc).__name__ if exc else status)
            text = f"Not a valid HTTP/1.1 request ({type(exc).__name__ if exc else status})"
            if isinstance(exc, http_exceptions.LineTooLong):
                text = (f"The request line (its URL) or a header is longer than "
                        f"{MAX_LINE_BYTES:,} bytes; send data in the POST body")
        if request.writer.output_size > 0:  # an answer has begun: no other can be sent
            raise ConnectionError("Response is sent already")
        response = web.json_response({"error": text}, status=status)
        response.force_close()
        return response


class _Server(web.Server):
    def __init__(self, handler, *, request_factory, loop, **protocol_args):
        super().__init__(handler, request_factory=request_factory, loop=loop, **protocol_args)
        self.protocol_args, self.protocol_loop = protocol_args, loop

    def __call__(self):
        return _Protocol(self, loop=self.protocol_loop, **self.protocol_args)


class _Runner(web.AppRunner):
    """An AppRunner whose connections are _Protocols (aiohttp has no public hook for that)."""

    async def _make_server(self):
        server = await super()._make_server()
        return _Server(server.request_handler, request_factory=server.request_factory,
                       loop=asyncio.get_running_loop(), max_line_size=MAX_LINE_BYTES,
                       max_field_size=MAX_LINE_BYTES)


def _one_thread_per_op():
    """Run each TensorFlow op on one thread, and ops side by side on all cores, unless
    TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS say otherwise. TensorFlow splits a big op
    over every core and other requests' ops queue behind its pieces: with a 64-megapixel image
    decoding, small requests waited up to 1.8 s instead of 0.15 s."""
    import tensorflow as tf

    try:
        if "TF_NUM_INTRAOP_THREADS" not in os.environ:
            tf.config.threading.set_intra_op_parallelism_threads(1)
        if "TF_NUM_INTEROP_THREADS" not in os.environ:
            tf.config.threading.set_inter_op_parallelism_threads(2 * len(os.sched_getaffinity(0)))
    except RuntimeError:  # TensorFlow already running in this process (tests): keep its own
        pass


def serve(model_dir, host="127.0.0.1", port=8501, max_batch=32, batch_wait_ms=2.0,
          max_image_mb=4.0, max_body_mb=32.0, max_instances=256, max_request_mpx=64.0,
          read_timeout_s=30.0):
    """Run the server until interrupted (SIGINT or SIGTERM)."""
    _one_thread_per_op()
    server = ModelServer(model_dir, max_batch, batch_wait_ms / 1000, int(max_image_mb * 2**20),
                         max_instances, int(max_request_mpx * 1e6))
    newest = server.load_default()  # load now: errors show at start, not first request
    app = build_app(server, int(max_body_mb * 2**20), read_timeout_s)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # aiohttp's runner asks for the current loop
    runner = _Runner(app, handle_signals=True, shutdown_timeout=SHUTDOWN_SECONDS)
    try:
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, host, port).start())
        log.info("Serving %s version %d (of %s) at http://%s:%d/v1/models/%s", server.name,
                 newest.version, ", ".join(map(str, sorted(server.scan()))), host, port,
                 server.name)
        loop.run_forever()
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    except OSError as error:  # socket.gaierror included: a host name that does not resolve
        if error.errno == errno.EADDRINUSE:
            raise ValueError(f"Port {port} on {host} is already in use (by another server, or "
                             "TensorFlow Serving itself); choose another with --port.") from None
        raise ValueError(f"Cannot listen on {host}:{port}: {error.strerror or error}. Expected "
                         "--host to be this machine's name or one of its addresses (127.0.0.1, "
                         "or 0.0.0.0 for all).") from None
    finally:
        loop.run_until_complete(runner.cleanup())
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        asyncio.set_event_loop(None)
        loop.close()
