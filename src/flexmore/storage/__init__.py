"""Reading checkpoints and writing artefacts: safetensors only, one tensor at a time, atomically."""

from flexmore.storage.atomic import atomic_dir, atomic_write_text
from flexmore.storage.checkpoint import PROJECTIONS, CheckpointError, FlexOlmoCheckpoint, resolve_source
from flexmore.storage.fingerprint import fingerprint, first_difference, public_digest
from flexmore.storage.stream import StreamingSafetensorsWriter, write_sharded

__all__ = [
    "PROJECTIONS",
    "CheckpointError",
    "FlexOlmoCheckpoint",
    "StreamingSafetensorsWriter",
    "atomic_dir",
    "atomic_write_text",
    "fingerprint",
    "first_difference",
    "public_digest",
    "resolve_source",
    "write_sharded",
]
