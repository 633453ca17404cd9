"""Resolving, caching and reading pretrained-weight handles (TensorFlow lives here).

Model code in `pipeline/models/` is `keras.layers`/`keras.ops` only; everything
that needs TensorFlow or `tensorflow_hub` to *obtain* weights is in this module,
imported lazily inside the functions that need it.

Handles accepted by `resolve_handle`:
  * a local SavedModel directory (must contain `saved_model.pb`);
  * `https://tfhub.dev/...` or its Kaggle form (`https://www.kaggle.com/models/
    <owner>/<model>/frameworks/TensorFlow2/variations/<v>/versions/<n>`), or
    `gs://...`: resolved by `tensorflow_hub.resolve`, which downloads once
    into the TF-Hub cache (`TFHUB_CACHE_DIR`, else `<tmp>/tfhub_modules`) and
    afterwards reads the cached copy without any network access.

Every failure a user can cause (wrong handle, no network, not a SavedModel)
raises `WeightsError` with one sentence naming the handle, the cache and the
offline alternative, without a chained traceback.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from pipeline.errors import short_reason

_REMOTE_PREFIXES = ("http://", "https://", "gs://")
# Seconds to wait for a TCP connection to the hub host before declaring it
# unreachable. Offline machines fail in milliseconds (DNS); this bounds the
# rare case of a black-holed network.
DEFAULT_CONNECT_TIMEOUT = 10.0
# Per-socket-operation timeout while downloading (not a total time limit).
DEFAULT_DOWNLOAD_TIMEOUT = 60.0
OFFLINE_HINT = "--weights=<path to a SavedModel dir or .npz>"


class WeightsError(ValueError):
    """Pretrained weights cannot be obtained, read or mapped onto the model."""




def hub_cache_dir() -> str:
    """The directory TF-Hub caches downloaded modules in (honours `TFHUB_CACHE_DIR`)."""
    from tensorflow_hub import resolver  # lazy: TensorFlow import
    return resolver.tfhub_cache_dir(use_temp=True)


def weights_error(handle: Any, reason: str) -> WeightsError:
    """The one-sentence error for a handle that cannot be used."""
    try:
        cache = hub_cache_dir()
    except Exception:  # pragma: no cover - tensorflow_hub missing or broken
        cache = os.environ.get("TFHUB_CACHE_DIR", "<unset>")
    return WeightsError(
        f"Cannot load weights {str(handle)!r} ({reason}); check the handle, or download it "
        f"once while online into the TF-Hub cache (TFHUB_CACHE_DIR, now {cache}), or work "
        f"offline with {OFFLINE_HINT}.")


def is_remote_handle(handle: Any) -> bool:
    """True for URL handles (`https://tfhub.dev/...`, Kaggle URLs, `gs://...`)."""
    return isinstance(handle, str) and handle.startswith(_REMOTE_PREFIXES)


def cached_module_dir(handle: str) -> str | None:
    """The TF-Hub cache directory holding `handle`, or None if not downloaded yet.

    Mirrors `tensorflow_hub`'s layout for compressed downloads: the module sits
    in `<cache>/<sha1(handle)>`, complete once the directory is non-empty.
    """
    path = os.path.join(hub_cache_dir(), hashlib.sha1(handle.encode("utf8")).hexdigest())
    if os.path.isdir(path) and os.listdir(path):
        return path
    return None


def _connect_target(url: str) -> tuple[str, int]:
    """(host, port) a download of `url` will first connect to (the proxy if any)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme in ("https", "gs") else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get("https" if parts.scheme in ("https", "gs") else "http")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or host, proxy_parts.port or 80
    return host, port


def check_reachable(url: str, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
    """Raise `WeightsError` unless a TCP connection to `url`'s host opens within `timeout`.

    The connection attempt (including DNS, which ignores socket timeouts) runs
    in a daemon thread so an offline machine can never hang here.
    """
    if url.startswith("gs://"):
        host, port = "storage.googleapis.com", 443
    else:
        host, port = _connect_target(url)
    if not host:
        raise weights_error(url, "the URL has no host name")
    outcome: dict[str, BaseException | None] = {}

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["error"] = None
        except BaseException as err:  # noqa: BLE001 - reported below
            outcome["error"] = err

    worker = threading.Thread(target=attempt, name="hub-connect-check", daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    if "error" not in outcome:
        raise weights_error(url, f"no connection to {host}:{port} within {timeout:g}s")
    if outcome["error"] is not None:
        raise weights_error(url, f"{host} is unreachable: {short_reason(outcome['error'])}")


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _check_saved_model_dir(path: str, handle: Any) -> str:
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    if os.path.isfile(os.path.join(path, "tfhub_module.pb")):
        raise weights_error(handle, "it is a TF1 Hub module; use the TF2 SavedModel version "
                                    "of the model")
    raise weights_error(handle, f"{path} has no saved_model.pb, so it is not a SavedModel")


def resolve_handle(handle: Any, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                   download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT) -> str:
    """A local SavedModel directory for `handle`, downloading into the TF-Hub cache if needed.

    Args:
      handle: a SavedModel directory, or a TF-Hub/Kaggle/`gs://` URL.
      connect_timeout: seconds allowed to open a connection before a download.
      download_timeout: per-socket-operation timeout during the download.

    Returns:
      Path of a directory containing `saved_model.pb`.

    Raises:
      WeightsError: no such directory, not a SavedModel, unreachable host,
        unknown handle or failed download.
    """
    handle = os.fspath(handle) if isinstance(handle, os.PathLike) else handle
    if not isinstance(handle, str) or not handle:
        raise weights_error(handle, "a handle must be a non-empty string")
    if not is_remote_handle(handle):
        path = os.path.abspath(os.path.expanduser(handle))
        if not os.path.isdir(path):
            raise weights_error(handle, "no such SavedModel directory, and it is not a URL")
        return _check_saved_model_dir(path, handle)

    import tensorflow_hub as hub  # lazy: TensorFlow import

    cached = cached_module_dir(handle)
    if cached is None:
        check_reachable(handle, connect_timeout)
        logging.info("Downloading %s into the TF-Hub cache %s.", handle, hub_cache_dir())
    try:
        with _socket_timeout(download_timeout):
            path = hub.resolve(handle)
    except Exception as err:  # noqa: BLE001 - every hub/urllib/OS failure means the same
        raise weights_error(handle, short_reason(err)) from None
    return _check_saved_model_dir(path, handle)


def load_saved_model(path: str, *, handle: Any = None):
    """`tf.saved_model.load(path)` with failures as `WeightsError`."""
    import tensorflow as tf  # lazy
    try:
        return tf.saved_model.load(path)
    except Exception as err:  # noqa: BLE001
        raise weights_error(handle if handle is not None else path,
                            f"the SavedModel does not load: {short_reason(err)}") from None


class ModuleVariable(NamedTuple):
    """One tensor of a weights file or module, in the order its source lists it.

    Attributes:
      name: the tensor's own name (`resnet/block1/unit01/a/group_norm/gamma:0`, or
        a bare `group_norm/gamma:0`: names need not be unique).
      value: its value.
      path: where it sits in the SavedModel's object graph (`model/variables/3`),
        empty for files; for messages.
    """

    name: str
    value: np.ndarray
    path: str = ""


def _object_graph_paths(obj) -> dict[int, tuple[str, Any]]:
    """id(variable) -> (first depth-first object-graph path, variable), in visiting order.

    Walks the restored object with the public `tf.train.TrackableView.children`
    (child names as saved, in saved order), visiting every object once.
    """
    import tensorflow as tf  # lazy
    found: dict[int, tuple[str, Any]] = {}
    seen = {id(obj)}

    def walk(node, path):
        for name, child in tf.train.TrackableView.children(node).items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = f"{path}/{name}" if path else name
            if isinstance(child, tf.Variable):
                found[id(child)] = (child_path, child)
            else:
                walk(child, child_path)

    walk(obj, "")
    return found


def saved_model_variables(obj) -> list[ModuleVariable]:
    """Every floating-point variable of a loaded SavedModel, in the module's own order.

    The order is the object's `variables` list (the TF-Hub reusable-SavedModel
    convention; Keras saves its layers' creation order there), else a
    depth-first walk of the object graph, which reaches Keras variables through
    the same lists. Order matters because names may not identify a variable
    (the BiT authors' own Keras code saves 49 tensors all named
    `group_norm/gamma:0`): the BiT loader then maps by position and shape.
    """
    paths = _object_graph_paths(obj)
    variables = getattr(obj, "variables", None)
    if variables is None or callable(variables):
        variables = [var for _, var in paths.values()]
    out, seen = [], set()
    for var in variables:
        if id(var) in seen or not var.dtype.is_floating:
            continue
        seen.add(id(var))
        out.append(ModuleVariable(var.name, var.numpy(), paths.get(id(var), ("",))[0]))
    return out


def call_module(obj, images: np.ndarray, *, handle: Any = None) -> np.ndarray:
    """Run a loaded image module's `__call__` on float32 `images` in [0, 1]."""
    import tensorflow as tf  # lazy
    if not callable(obj):
        raise weights_error(handle, "the SavedModel has no __call__ to run images through")
    try:
        out = obj(tf.constant(images, tf.float32))
    except Exception as err:  # noqa: BLE001
        raise weights_error(handle, f"calling the module on images failed: {short_reason(err)}") from None
    if isinstance(out, dict):
        if "default" in out:
            out = out["default"]
        elif len(out) == 1:
            out = next(iter(out.values()))
        else:
            raise weights_error(handle, f"the module returns several outputs {sorted(out)}")
    return np.asarray(out, dtype=np.float32)
