"""Benchmarks, printing ratios measured side by side in one run.

``python -m distnoisy.bench gpu|steps|loader|two-networks|plain-loop ...``; one module per
benchmark:

- :mod:`distnoisy.bench.gpu`: training images/s on one accelerator per method (model step,
  end to end with CPU or GPU JPEG decoding), in-process with torch and torchvision only;
- :mod:`distnoisy.bench.steps`: one training step per registered method relative to plain
  cross-entropy, on the same model, batch and inputs, on the CPU;
- :mod:`distnoisy.bench.loader`: the shard input pipeline against torchvision's
  ``ImageFolder`` + ``DataLoader``;
- :mod:`distnoisy.bench.two_networks`: ELR+ and LIMIT against two CE steps;
- :mod:`distnoisy.bench.plain_loop`: a class-ordered image folder, distnoisy against a plain
  PyTorch loop;
- :mod:`distnoisy.bench.pipeline`: the whole job (convert, train, label issues, post-train,
  analyse) at N real images, every phase measured (:mod:`~distnoisy.bench.pipeline_data` makes
  the image folder, :mod:`~distnoisy.bench.proctree` samples the commands' process trees,
  :mod:`~distnoisy.bench.pipeline_checks` checks the outputs against the truth,
  :mod:`~distnoisy.bench.pipeline_report` prints the tables).

:mod:`distnoisy.bench.common` holds what they share (the document header, machine facts, the
``--note`` handling) and :mod:`distnoisy.bench.cli` the command line.
"""
