"""``python -m sparsetrain.lottery``: the same as the ``sparsetrain-lottery`` command."""

from sparsetrain.apps.lottery import main

if __name__ == "__main__":
    main()
