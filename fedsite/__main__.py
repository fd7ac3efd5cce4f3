"""``python -m fedsite ...``: the same as the ``fedsite`` console script."""

from fedsite.cli import run

if __name__ == "__main__":
    run()
