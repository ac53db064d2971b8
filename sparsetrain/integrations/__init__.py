"""The training loops that drive a :class:`~sparsetrain.engine.SparsityEngine`.

* :mod:`.loop`: any PyTorch loop, Lightning Fabric included (:func:`sparsetrain.attach`: optimizer step hooks);
* :mod:`.hf`: the Hugging Face ``Trainer`` (:class:`~sparsetrain.integrations.hf.SparsityTrainerCallback`);
* :mod:`.lightning`: what the Lightning callback (:class:`sparsetrain.SparsityCallback`) knows of Lightning's
  own components.

Each imports its framework only when it is used.
"""
