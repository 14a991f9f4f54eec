"""``python -m clip_lens.cli``: the ``clip-lens`` command line."""

from clip_lens.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
