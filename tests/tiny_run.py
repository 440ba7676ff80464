"""The tests' tiny run as a config file, for command-line tests of the trainer.

python -m trainer.train --config=tests/tiny_run.py --workdir=/tmp/tiny_run
"""

from tests.common import tiny_config


def get_config():
  c = tiny_config()
  c.unlock()
  return c
