"""``python -m sparsetrain.train``: the same as the ``sparsetrain-train`` command."""

from sparsetrain.apps.train import main

if __name__ == "__main__":
    main()
