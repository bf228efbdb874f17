"""Band-gap data: readers, validation, splits and the graph cache.

- ``readers``: ``load_dataset`` (extxyz, pymatgen JSON, CIF/POSCAR folders + CSV) and
  ``read_structures`` (prediction inputs);
- ``dataset``: ``BandGapDataset`` and ``Rejection``;
- ``validation``: named rejection reasons, ``check_structure``;
- ``splits``: ``random_split``, ``grouped_split``, ``matbench_fold`` and ``Split``;
- ``graph_cache``: ``GraphCache`` (CHGNet graphs converted once, stored as safetensors);
- ``sources``: ``from_materials_project``, ``from_matbench``;
- ``info``: ``summarize``, ``format_summary``.

Importing this package imports none of them.
"""
