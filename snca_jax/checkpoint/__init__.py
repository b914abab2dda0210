"""Orbax checkpoints of the train state with the run's config: writing them (`saving.py`),
checking their files (`checksums.py`), keeping Orbax's failures to one line (`quiet.py`), and
reading them back onto any mesh (`restore.py`)."""

from snca_jax.checkpoint.checksums import CHECKSUMS, ChecksumError, verify, write_checksums
from snca_jax.checkpoint.saving import (BestCheckpoint, Manager, checkpoint_dir, locate,
                                        manager, save)
from snca_jax.checkpoint.restore import (check_resumable, read_config, reading,
                                         restore_as_saved, restore_config, restore_state,
                                         restore_train_state)

__all__ = (
    'BestCheckpoint', 'CHECKSUMS', 'ChecksumError', 'Manager', 'check_resumable',
    'checkpoint_dir', 'locate', 'manager', 'read_config', 'reading', 'restore_as_saved',
    'restore_config', 'restore_state', 'restore_train_state', 'save', 'verify',
    'write_checksums',
)
