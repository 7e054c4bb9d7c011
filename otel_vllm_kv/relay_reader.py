"""The reading side of the relay: which engine files are read, and which file wins for an engine.

Read in the exporter, and in each API server that serves a multiprocess ``/metrics``.

Where an engine index repeats (an engine replaced by a newer one, or reported by several
frontends), the newest probe file wins; without a probe file, the newest statistics record
wins if it is younger than ``STATS_MAX_AGE_SECONDS``. The file format is ``relay``'s.
"""

from __future__ import annotations

import logging
import os
import time

from otel_vllm_kv.holdings import HoldersPass
from otel_vllm_kv.relay import PROBE_PREFIX, STATS_PREFIX, BadRelayFile, EngineSnapshot, OpenedRelayFile

_logger = logging.getLogger(__name__)

#: A statistics record older than this is not reported: its frontend lives, but the engine may not.
STATS_MAX_AGE_SECONDS = 300.0


def _creation_order(name: str) -> tuple[int, int]:
    """Files are named ``<kind>-<index>-<pid>-<time_ns>-<counter>``."""
    try:
        _, _, _, created_ns, counter = name.split("-")
        return int(created_ns), int(counter)
    except ValueError:
        return 0, 0


class SnapshotReader:
    """Reads every engine file of one relay directory: in the exporter, and in each API server
    that serves a multiprocess ``/metrics``.

    One bad file (made by no writer of this package, or changed under the reader, or out of
    range) is skipped with one warning and costs no other engine; files of writers that died
    are removed.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._files: dict[str, OpenedRelayFile] = {}
        self._skipped: set[str] = set()
        self._bad_holders: set[str] = set()

    def read(self, holders: bool = False) -> list[EngineSnapshot]:
        """One snapshot per live engine: the newest probe file where an engine index repeats, else
        the newest record of statistics (if younger than ``STATS_MAX_AGE_SECONDS``). With ``holders``,
        each probe's holders section too (64 KiB read and parsed per engine: only its metrics need it)."""
        try:
            names = sorted(
                (name for name in os.listdir(self.directory) if name.startswith((PROBE_PREFIX, STATS_PREFIX))),
                key=_creation_order,
            )
        except OSError:
            names = []
        self._forget_missing(set(names))
        probed: dict[tuple[int, str], EngineSnapshot] = {}
        from_stats: dict[tuple[int, str], tuple[int, EngineSnapshot]] = {}
        oldest_stats_ns = time.time_ns() - int(STATS_MAX_AGE_SECONDS * 1e9)
        for name in names:
            opened = self._open(name)
            if opened is None:
                continue
            try:
                if not opened.writer_lives():
                    self._discard(name, unlink=True)
                    continue
                values = opened.read_values()
            except (OSError, BadRelayFile) as error:
                self._skip(name, error)
                continue
            if values is None:
                continue
            key = (opened.engine_index, opened.model_name)
            if opened.from_stats:
                free_blocks, arrived_ns = values
                if arrived_ns >= oldest_stats_ns and (key not in from_stats or arrived_ns > from_stats[key][0]):
                    snapshot = EngineSnapshot(*key, opened.pid, opened.layout, free_blocks, None)
                    from_stats[key] = (arrived_ns, snapshot)
            else:
                held = self._holders(name, opened) if holders else None
                probed[key] = EngineSnapshot(*key, opened.pid, opened.layout, values[0], values[1:], held)
        unprobed = [snapshot for key, (_, snapshot) in from_stats.items() if key not in probed]
        return [*probed.values(), *unprobed]

    def _holders(self, name: str, opened: OpenedRelayFile) -> HoldersPass | None:
        """The file's holders section; a bad one spoils only itself (its pool is still reported), with
        one warning per file."""
        try:
            return opened.read_holders()
        except (OSError, BadRelayFile) as error:
            if name not in self._bad_holders:
                self._bad_holders.add(name)
                _logger.warning(
                    "otel-vllm-kv: leaving out the holders of %s in the relay %s: %s", name, self.directory, error
                )
            return None

    def close(self) -> None:
        for name in list(self._files):
            self._discard(name, unlink=False)

    def _open(self, name: str) -> OpenedRelayFile | None:
        opened = self._files.get(name)
        if opened is None and name not in self._skipped:
            try:
                path = os.path.join(self.directory, name)
                opened = self._files[name] = OpenedRelayFile(path, from_stats=name.startswith(STATS_PREFIX))
            except FileNotFoundError:
                return None  # withdrawn meanwhile
            except (OSError, BadRelayFile) as error:
                self._skip(name, error)
                return None
        return opened

    def _skip(self, name: str, error: Exception) -> None:
        """Leave a bad file out from now on, with one warning."""
        self._discard(name, unlink=False)
        self._skipped.add(name)
        _logger.warning("otel-vllm-kv: skipping %s in the relay %s: %s", name, self.directory, error)

    def _forget_missing(self, present: set[str]) -> None:
        for name in [name for name in self._files if name not in present]:
            self._discard(name, unlink=False)
        self._skipped &= present
        self._bad_holders &= present

    def _discard(self, name: str, unlink: bool) -> None:
        opened = self._files.pop(name, None)
        if opened is not None:
            opened.close()
        if unlink:
            try:
                os.unlink(os.path.join(self.directory, name))
            except OSError:
                pass
