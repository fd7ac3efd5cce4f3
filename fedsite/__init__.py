"""The ``fedsite`` command's front: one parser over each side's commands (see :mod:`fedsite.cli`)."""
