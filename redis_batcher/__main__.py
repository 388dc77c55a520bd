"""``python -m redis_batcher`` is the ``redis-batcher`` command."""

from .cli import main

if __name__ == "__main__":
    main()
