"""The controller's small durable record in Ray's GCS key-value store: placement, shards, version, desired count."""

from __future__ import annotations

import json
import logging

log = logging.getLogger("elasticmoe.controller")
_NAMESPACE = "elasticmoe"
# The document's layout. Fields may be added without a new number (a reader ignores those it does not know, and takes
# a missing one as its default); a field that changes meaning gets a new one, and a controller that reads a number it
# does not know starts the placement over (recovery.Recovery._resume). Releases before the field wrote format 1.
FORMAT = 1


class GcsRecord:
    """One JSON document per application, rewritten on every published change; read once when a controller starts.

    Without a Ray connection (tests of the controller's logic) it keeps the document in this process's memory.
    """

    _memory: dict[str, bytes] = {}  # key -> document, when there is no Ray connection

    def __init__(self, app_name: str):
        self.key = f"controller/{app_name}"
        try:
            import ray

            self._kv = ray.is_initialized()
        except ImportError:
            self._kv = False

    def load(self) -> dict | None:
        raw = self._get()
        if not raw:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):  # not JSON, or not the object save() writes
            log.warning("ignoring an unreadable controller record under %s", self.key)
            return None
        return doc

    def save(self, doc: dict) -> None:
        raw = json.dumps(doc, separators=(",", ":")).encode()
        if not self._kv:
            self._memory[self.key] = raw
            return
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.key, raw, overwrite=True, namespace=_NAMESPACE)

    def clear(self) -> None:
        self._memory.pop(self.key, None)
        if self._kv:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_del(self.key, namespace=_NAMESPACE)

    def _get(self) -> bytes | None:
        if not self._kv:
            return self._memory.get(self.key)
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(self.key, namespace=_NAMESPACE)
